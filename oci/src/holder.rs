//! The holder: the host process whose pid the pid file names.
//!
//! containerd's runc shim is a subreaper that learns a container's exit only by
//! reaping the pid in the pid file, and hands that process the container's stdio.
//! The container itself runs in a VM, so that pid is a holder: a child of the
//! `create` (or `exec`) that started it, re-parented to the caller when that call
//! exits (never double-forked away, never burrowd's), which
//!
//! 1. holds the caller's fds 0-2, or a host pty whose master it sent over
//!    `--console-socket` (its slave in raw mode: the guest's pty does the line
//!    discipline);
//! 2. opens the container's stream on burrowd and relays standard input (its end
//!    is the guest's end of input), output, error and the window size;
//! 3. turns the signals it receives into signals to the container's process;
//! 4. exits with the container's exit status, or kills itself with the signal
//!    that killed the container's process (so the shim sees 137 for SIGKILL).
//!
//! A holder started by `create` reads its orders on fd 3 and says on fd 4 when
//! the container's process exists (`ok <guest pid>`) or why it does not
//! (`error <message>`). Foreground `run` and `exec` relay in their own process.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use burrow::api::client::Client;
use burrow::api::stream::{ClientStream, ServerEvent, StreamMessage, Up};
use burrow::db::ProcId;
use burrow_proto::{
    ContainerCreate, ContainerExec, ContainerOp, ExitInfo, StreamControl, StreamOpen,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::bundle::Netns;
use crate::error::{Error, Result};
use crate::log::Log;
use crate::term;

/// The fd a spawned holder reads its [`Orders`] from.
const ORDERS_FD: RawFd = 3;
/// The fd a spawned holder reports readiness on.
const READY_FD: RawFd = 4;
/// Longest wait for a holder to say that the container's process exists: the VM
/// is up by then, but the guest still makes the container (mounts, namespaces).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Signals a holder passes on to the container's process.
const FORWARDED: &[i32] = &[
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGTERM,
    libc::SIGALRM,
];

/// What a holder is to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Orders {
    /// burrowd's socket.
    pub socket: PathBuf,
    /// The container's VM.
    pub vm: String,
    pub id: String,
    /// The process of an exec (a runtime-spec Process); none for the container's own.
    #[serde(default)]
    pub exec: Option<serde_json::Value>,
    pub terminal: bool,
    #[serde(default)]
    pub console_socket: Option<PathBuf>,
    /// The runtime's `--root`, where an exec's holder takes itself out of the
    /// container's record when its process ends.
    #[serde(default)]
    pub root: Option<PathBuf>,
}

impl Orders {
    fn stream_open(&self, size: Option<burrow_proto::WinSize>) -> StreamOpen {
        match &self.exec {
            None => StreamOpen::ContainerCreate(ContainerCreate {
                id: self.id.clone(),
                stdin: true,
                size,
                durable: false,
            }),
            Some(p) => StreamOpen::ContainerExec(ContainerExec {
                id: self.id.clone(),
                process: p.clone(),
                stdin: true,
                size,
                exec_id: None,
            }),
        }
    }
}

/// Starts a holder for `orders` and waits until the container's process exists.
/// `record` is called with the holder's identity as soon as it runs, before the
/// wait, so that a crash of this call leaves it recorded. `globals` are this
/// call's global flags (`--log`, `--log-format`, `--debug`), passed on.
pub async fn spawn(
    orders: &Orders,
    globals: Vec<OsString>,
    record: impl FnOnce(ProcId) -> Result<()>,
) -> Result<ProcId> {
    let pending = start(globals, orders.terminal, &Netns::None)?;
    if let Err(e) = record(pending.id) {
        pending.abandon().await;
        return Err(e);
    }
    pending.give(orders).await
}

/// A holder that runs but has no orders yet: it waits for them on a pipe, so
/// that the caller can first run hooks with its pid and boot the VM on its
/// network namespace.
pub struct Pending {
    pub id: ProcId,
    orders: OwnedFd,
    ready: OwnedFd,
}

/// Starts a holder process in the container's network namespace (`netns`: a
/// new one, one it joins, or this process's). `terminal`: the container's
/// stdio is a pty, so the holder must not keep the caller's fds 0-2.
pub fn start(globals: Vec<OsString>, terminal: bool, netns: &Netns) -> Result<Pending> {
    let exe = std::env::current_exe().map_err(|e| Error::Holder(format!("own binary: {e}")))?;
    let join = match netns {
        Netns::Join(p) => Some(
            std::fs::File::open(p)
                .map_err(|e| Error::Holder(format!("network namespace {}: {e}", p.display())))?,
        ),
        _ => None,
    };
    let join_fd = join.as_ref().map(|f| f.as_raw_fd());
    let new_netns = *netns == Netns::New;
    let (orders_r, orders_w) = pipe()?;
    let (ready_r, ready_w) = pipe()?;
    let mut cmd = Command::new(&exe);
    cmd.args(globals).arg("holder");
    if terminal {
        // The container's stdio is the pty: the holder must not keep the
        // caller's pipes open (go-runc reads create's output to its end).
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    }
    let (or, rw) = (orders_r.as_raw_fd(), ready_w.as_raw_fd());
    // SAFETY: setsid, unshare, fcntl and dup2 are async-signal-safe; they run
    // between fork and exec on fds that are open in the child.
    unsafe {
        cmd.pre_exec(move || {
            // A session of its own, as runc gives a container: a terminal it
            // opens becomes its controlling terminal (SIGWINCH, SIGHUP), and the
            // caller's terminal signals do not reach it.
            libc::setsid();
            // The container's network namespace, as runc makes one: hooks set
            // it up through /proc/<holder>/ns/net, then the VM takes its
            // interface over. It lives as long as the holder.
            if new_netns && libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = join_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Moved out of the way first, so that neither dup2 below clobbers
            // the other's source.
            let or = libc::fcntl(or, libc::F_DUPFD_CLOEXEC, 10);
            let rw = libc::fcntl(rw, libc::F_DUPFD_CLOEXEC, 10);
            if or < 0 || rw < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::dup2(or, ORDERS_FD) < 0 || libc::dup2(rw, READY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| Error::Holder(format!("start the holder {}: {e}", exe.display())))?;
    drop(cmd);
    drop(orders_r);
    drop(ready_w);
    let pid = child.id() as i32;
    // The holder outlives this call: its exit is the caller's to reap (the
    // shim's), so the Child is forgotten, not waited.
    drop(child);
    let id = ProcId::of(pid).ok_or_else(|| Error::Holder("the holder exited at once".into()))?;
    Ok(Pending {
        id,
        orders: orders_w,
        ready: ready_r,
    })
}

impl Pending {
    /// Kills the holder (a create that failed before giving it orders).
    pub async fn abandon(self) {
        self.id.signal(libc::SIGKILL);
        self.id.exited().await;
    }

    /// Gives the holder its orders and waits until the container's process
    /// exists; kills it if it does not say so.
    pub async fn give(self, orders: &Orders) -> Result<ProcId> {
        let Pending {
            id,
            orders: w,
            ready,
        } = self;
        let fed = serde_json::to_vec(orders)
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|body| std::fs::File::from(w).write_all(&body));
        let line = tokio::task::spawn_blocking(move || {
            let mut f = std::fs::File::from(ready);
            let mut buf = Vec::new();
            let _ = (&mut f).take(4096).read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        });
        let line = match (fed, tokio::time::timeout(READY_TIMEOUT, line).await) {
            (Ok(()), Ok(Ok(line))) => line,
            (Err(e), _) => format!("error cannot give the holder its orders: {e}"),
            (_, Err(_)) => format!(
                "error the container's process did not start within {} s",
                READY_TIMEOUT.as_secs()
            ),
            (_, Ok(Err(e))) => format!("error {e}"),
        };
        let line = line.trim_end();
        if line.starts_with("ok ") {
            return Ok(id);
        }
        id.signal(libc::SIGKILL);
        id.exited().await;
        Err(Error::Holder(match line.strip_prefix("error ") {
            Some(m) => m.to_string(),
            None => "the holder exited before the container's process existed".to_string(),
        }))
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::Holder(format!(
            "pipe: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: both fds are fresh and ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The `holder` command: what a process started by [`spawn`] runs. Never returns.
pub async fn main(log: &Log) -> ! {
    // SAFETY: the fds were set up by `spawn` for this process alone.
    let (mut orders_f, ready) = unsafe {
        (
            std::fs::File::from_raw_fd(ORDERS_FD),
            std::fs::File::from_raw_fd(READY_FD),
        )
    };
    let mut body = Vec::new();
    let orders = orders_f
        .read_to_end(&mut body)
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_slice::<Orders>(&body).map_err(|e| e.to_string()));
    drop(orders_f);
    let orders = match orders {
        Ok(o) => o,
        Err(e) => fail_ready(ready, log, &format!("holder orders: {e}")),
    };
    let io = if orders.terminal {
        match console(&orders) {
            Ok(slave) => Io::Pty(slave),
            Err(e) => fail_ready(ready, log, &e),
        }
    } else {
        Io::Pipes
    };
    let client = Client::new(&orders.socket);
    let open = orders.stream_open(io.window_size());
    let stream = match client.open_stream(&orders.vm, &open).await {
        Ok(s) => s,
        Err(e) => fail_ready(ready, log, &e.to_string()),
    };
    let mut ready = ready;
    let _ = writeln!(ready, "ok {}", stream.pid.unwrap_or(0));
    drop(ready);
    let kill = match orders.exec {
        None => Kill::Container {
            client,
            vm: orders.vm.clone(),
            id: orders.id.clone(),
        },
        Some(_) => Kill::Stream,
    };
    let ended = relay(stream, io, kill).await;
    if let (Some(_), Some(root)) = (&orders.exec, &orders.root) {
        forget_exec(root, &orders.id, log);
    }
    exit_as(ended, log)
}

/// Takes this process (an exec's holder whose process ended) out of the
/// container's record under `root`.
pub fn forget_exec(root: &std::path::Path, id: &str, log: &Log) {
    let Some(me) = ProcId::of(std::process::id() as i32) else {
        return;
    };
    let done = crate::store::Root::new(Some(root)).and_then(|r| r.note_exec(id, me, false));
    if let Err(e) = done {
        log.error(&format!("{id}: forget the exec's holder: {e}"));
    }
}

fn fail_ready(mut ready: std::fs::File, log: &Log, msg: &str) -> ! {
    log.error(msg);
    let _ = writeln!(ready, "error {}", msg.replace('\n', " "));
    std::process::exit(1)
}

/// A pty for the container's terminal: the master to the console socket, the
/// slave held here as the controlling terminal, in raw mode.
fn console(orders: &Orders) -> Result<OwnedFd, String> {
    let Some(socket) = &orders.console_socket else {
        return Err("--console-socket: needed when the process has a terminal".into());
    };
    let (master, slave, name) = term::openpty().map_err(|e| format!("openpty: {e}"))?;
    term::make_controlling(slave.as_raw_fd()).map_err(|e| format!("controlling terminal: {e}"))?;
    term::set_raw(slave.as_raw_fd()).map_err(|e| format!("raw mode: {e}"))?;
    term::send_fd(socket, master.as_raw_fd(), &name)
        .map_err(|e| format!("--console-socket {}: {e}", socket.display()))?;
    Ok(slave)
}

/// Where the container's standard I/O goes on the host.
pub enum Io {
    /// This process's fds 0-2 (the caller's pipes, FIFOs or files).
    Pipes,
    /// A pty slave this process holds (its master is the caller's).
    Pty(OwnedFd),
    /// This process's own terminal (foreground `run` or `exec` on a tty), in raw
    /// mode while the relay lasts (held for its Drop, which restores it).
    Terminal(#[allow(dead_code)] Option<term::RawMode>),
}

impl Io {
    fn input_fd(&self) -> RawFd {
        match self {
            Io::Pty(s) => s.as_raw_fd(),
            _ => 0,
        }
    }

    fn output_fds(&self) -> (RawFd, RawFd) {
        match self {
            Io::Pty(s) => (s.as_raw_fd(), s.as_raw_fd()),
            _ => (1, 2),
        }
    }

    pub fn window_size(&self) -> Option<burrow_proto::WinSize> {
        match self {
            Io::Pipes => None,
            Io::Pty(s) => Some(
                term::window_size(s.as_raw_fd())
                    .unwrap_or(burrow_proto::WinSize { rows: 24, cols: 80 }),
            ),
            Io::Terminal(_) => {
                Some(term::window_size(0).unwrap_or(burrow_proto::WinSize { rows: 24, cols: 80 }))
            }
        }
    }
}

/// How a signal the holder receives reaches the container.
pub enum Kill {
    /// `kill` on the container (its own process).
    Container {
        client: Client,
        vm: String,
        id: String,
    },
    /// A signal control on the stream (an exec's process).
    Stream,
}

/// How a relay ended.
pub enum Ended {
    Exit(ExitInfo),
    /// The stream broke before the process's exit (the VM or burrowd went away).
    Lost(String),
}

/// Relays `io` and the stream until the process's exit.
pub async fn relay(stream: ClientStream, io: Io, kill: Kill) -> Ended {
    let ClientStream {
        sender,
        mut receiver,
        ..
    } = stream;
    let (up_tx, up_rx) = mpsc::channel::<Up>(16);
    let send_task = tokio::spawn(sender.pump(up_rx));
    let _abort = AbortOnDrop(send_task);
    let input_is_tty = term::is_terminal(io.input_fd());
    if let Err(e) = read_input(io.input_fd(), input_is_tty, up_tx.clone()) {
        return Ended::Lost(format!("standard input: {e}"));
    }
    let (out_fd, err_fd) = io.output_fds();
    let mut out = Sink::new(out_fd);
    let mut err = Sink::new(err_fd);
    let (sig_tx, mut sig_rx) = mpsc::channel::<i32>(16);
    let mut watched: Vec<i32> = FORWARDED.to_vec();
    let winch_fd = match &io {
        Io::Pty(s) => Some(s.as_raw_fd()),
        Io::Terminal(_) => Some(0),
        Io::Pipes => None,
    };
    if winch_fd.is_some() {
        watched.push(libc::SIGWINCH);
    }
    for &sig in &watched {
        let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(sig))
        else {
            return Ended::Lost(format!("cannot watch signal {sig}"));
        };
        let tx = sig_tx.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if tx.send(sig).await.is_err() {
                    break;
                }
            }
        });
    }
    loop {
        tokio::select! {
            msg = receiver.next() => match msg {
                Ok(Some(StreamMessage::Stdout(d))) | Ok(Some(StreamMessage::Record { data: d, .. })) => out.write(&d),
                Ok(Some(StreamMessage::Stderr(d))) => err.write(&d),
                Ok(Some(StreamMessage::Event(e))) => match e {
                    ServerEvent::Exit(x) => return Ended::Exit(x),
                    ServerEvent::Dropped { reason } => return Ended::Lost(reason),
                    ServerEvent::Error { message, .. } => return Ended::Lost(message),
                    _ => {}
                },
                Ok(None) => return Ended::Lost("burrowd closed the stream before the process exited".into()),
                Err(e) => return Ended::Lost(format!("lost the stream: {e}")),
            },
            Some(sig) = sig_rx.recv() => {
                if sig == libc::SIGWINCH {
                    if let Some(size) = winch_fd.and_then(term::window_size) {
                        let _ = up_tx.try_send(Up::Control(StreamControl::Resize(size)));
                    }
                    continue;
                }
                match &kill {
                    Kill::Container { client, vm, id } => {
                        let (client, vm) = (client.clone(), vm.clone());
                        let op = ContainerOp::Kill { id: id.clone(), signal: sig, all: false };
                        tokio::spawn(async move { let _ = client.container_op(&vm, &op).await; });
                    }
                    Kill::Stream => {
                        let _ = up_tx.try_send(Up::Control(StreamControl::Signal { signal: sig }));
                    }
                }
            }
        }
    }
}

/// Reads the input fd on a thread of its own (a blocking read; the thread is
/// left behind when the process exits).
fn read_input(fd: RawFd, is_tty: bool, tx: mpsc::Sender<Up>) -> std::io::Result<()> {
    // SAFETY: dup of an fd that is open; the copy is owned by the File.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `dup` is a fresh fd nothing else owns.
    let mut f = unsafe { std::fs::File::from_raw_fd(dup) };
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match f.read(&mut buf) {
                Ok(n) if n > 0 => {
                    if tx.blocking_send(Up::Data(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // End of input. On a terminal (a hung-up pty reads EIO) keys just
                // stop coming; otherwise it is the process's end of input.
                _ => {
                    if !is_tty {
                        let _ = tx.blocking_send(Up::Eof);
                    }
                    return;
                }
            }
        }
    });
    Ok(())
}

/// An output fd. Once a write fails (the reader went away) later output is
/// dropped: the process goes on, as a container whose log reader left does.
struct Sink {
    file: Option<std::fs::File>,
}

impl Sink {
    fn new(fd: RawFd) -> Sink {
        // SAFETY: dup of an fd that is open; the copy is owned by the File.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        Sink {
            // SAFETY: `dup` is a fresh fd nothing else owns.
            file: (dup >= 0).then(|| unsafe { std::fs::File::from_raw_fd(dup) }),
        }
    }

    fn write(&mut self, d: &[u8]) {
        let Some(f) = self.file.as_mut() else { return };
        // A slow reader slows the relay (and so the guest), never this runtime's
        // other tasks.
        if tokio::task::block_in_place(|| f.write_all(d)).is_err() {
            self.file = None;
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Ends this process as the container's process ended: its exit code, or killed
/// by the same signal (without a core dump).
pub fn exit_as(ended: Ended, log: &Log) -> ! {
    match ended {
        Ended::Exit(x) => match exit_plan(x) {
            ExitPlan::Raise(sig) => {
                raise(sig);
                std::process::exit(128 + sig)
            }
            ExitPlan::Code(c) => std::process::exit(c),
        },
        Ended::Lost(m) => {
            log.error(&m);
            std::process::exit(crate::EXIT_LOST)
        }
    }
}

/// How the holder ends for a given exit of the container's process.
#[derive(Debug, PartialEq, Eq)]
enum ExitPlan {
    Raise(i32),
    Code(i32),
}

/// The guest says how its process ended, and the guest is untrusted: the holder
/// kills itself only with a signal whose default action ends a process (a
/// "killed by SIGSTOP" must not stop it, leaving the shim waiting forever), and
/// exits with a status in 0-255 (exit(256) would read as success).
fn exit_plan(x: ExitInfo) -> ExitPlan {
    let ends = |s: i32| {
        matches!(
            s,
            libc::SIGHUP
                | libc::SIGINT
                | libc::SIGQUIT
                | libc::SIGILL
                | libc::SIGTRAP
                | libc::SIGABRT
                | libc::SIGBUS
                | libc::SIGFPE
                | libc::SIGKILL
                | libc::SIGUSR1
                | libc::SIGSEGV
                | libc::SIGUSR2
                | libc::SIGPIPE
                | libc::SIGALRM
                | libc::SIGTERM
                | libc::SIGSTKFLT
                | libc::SIGXCPU
                | libc::SIGXFSZ
                | libc::SIGVTALRM
                | libc::SIGPROF
                | libc::SIGIO
                | libc::SIGPWR
                | libc::SIGSYS
        ) || (34..=64).contains(&s)
    };
    match x.signal {
        Some(s) if ends(s) => ExitPlan::Raise(s),
        _ if (0..=255).contains(&x.exit_code) => ExitPlan::Code(x.exit_code),
        _ => ExitPlan::Code(255),
    }
}

/// Kills this process with `sig` (one whose default action ends a process).
fn raise(sig: i32) {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct; signal and kill have no memory effects.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::kill(libc::getpid(), sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: i32, signal: Option<i32>) -> ExitInfo {
        ExitInfo {
            exit_code: code,
            signal,
            timed_out: false,
            oom_killed: false,
        }
    }

    #[test]
    fn the_holder_ends_as_the_container_did() {
        assert_eq!(exit_plan(exit(3, None)), ExitPlan::Code(3));
        assert_eq!(exit_plan(exit(137, Some(9))), ExitPlan::Raise(9));
        assert_eq!(exit_plan(exit(143, Some(15))), ExitPlan::Raise(15));
        assert_eq!(exit_plan(exit(162, Some(34))), ExitPlan::Raise(34));
    }

    /// A hostile guest's exit report cannot stop the holder (the shim would wait
    /// forever) or turn into a success.
    #[test]
    fn a_guests_exit_report_cannot_stop_or_fake_the_holder() {
        for sig in [libc::SIGSTOP, libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU] {
            assert_eq!(
                exit_plan(exit(128 + sig, Some(sig))),
                ExitPlan::Code(128 + sig)
            );
        }
        for sig in [
            libc::SIGCHLD,
            libc::SIGCONT,
            libc::SIGWINCH,
            libc::SIGURG,
            0,
            -1,
            65,
            1000,
        ] {
            assert!(
                matches!(exit_plan(exit(1, Some(sig))), ExitPlan::Code(_)),
                "{sig}"
            );
        }
        assert_eq!(exit_plan(exit(256, None)), ExitPlan::Code(255));
        assert_eq!(exit_plan(exit(-1, None)), ExitPlan::Code(255));
    }
}
