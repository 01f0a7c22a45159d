//! Terminal sessions: a process on a pseudo-terminal owned by the agent (not by any
//! connection), whose output is kept in a ring for viewers that attach later and
//! for recordings.
//!
//! The session's reader appends everything the terminal writes to a ring of
//! [`RING_BYTES`] and never waits for a viewer. A viewer copies from the ring at
//! its own pace; one that falls behind the ring's start (it stopped reading for
//! more than the ring holds) is dropped with a message, and nobody else notices.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burrow_proto::{
    validate_name, AgentError, ErrorKind, ExitInfo, FrameError, GuestFrame, HostFrame,
    StreamControl, StreamEvent, TerminalInfo, TerminalNew, WinSize, MAX_STREAM_CHUNK,
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::env::Environment;
use crate::exec::{resolve_workdir, validate_argv};
use crate::jobs::valid_signal;
use crate::process::{lock, signal_group, ExitStatus, ProcessTable, OUTPUT_GRACE};
use crate::pty::{self, PtyMaster, DEFAULT_TERM};
use crate::ring::{Cursor, Item, Next, Output, Piece, Tag};
use crate::streams::host_gone;

/// Sessions kept at most; past it the oldest ended one is forgotten, and when all
/// are alive a new one is refused.
pub const MAX_SESSIONS: usize = 64;

/// Output a session keeps (and so the longest recording it can give).
pub const RING_BYTES: usize = 1 << 20;

/// What a viewer is sent of the past when it attaches: at most this much, from a
/// chunk boundary (the screen, in practice).
pub const ATTACH_TAIL: u64 = 64 << 10;

/// How long `TerminalKill` waits for a hung-up session to end before SIGKILL.
const HANGUP_WAIT: Duration = Duration::from_secs(1);

const DEFAULT_SIZE: WinSize = WinSize { rows: 24, cols: 80 };

const DROPPED: &str = "viewer dropped: it fell more than 1 MiB behind";

pub struct Session {
    pub name: String,
    argv: Vec<String>,
    created_at: i64,
    /// The session leader; its process group and session ids too.
    pid: i32,
    master: Arc<PtyMaster>,
    pub output: Arc<Output>,
    viewers: AtomicU32,
    size: Mutex<WinSize>,
    /// Until the leader's exit status arrives: its group may be signalled.
    alive: AtomicBool,
}

impl Session {
    fn info(&self) -> TerminalInfo {
        let exit = self.output.exit();
        TerminalInfo {
            name: self.name.clone(),
            argv: self.argv.clone(),
            created_at: self.created_at,
            viewers: self.viewers.load(Ordering::SeqCst),
            alive: exit.is_none(),
            exit_code: exit.map(|e| e.exit_code),
            signal: exit.and_then(|e| e.signal),
            size: *lock(&self.size),
            output_bytes: self.output.counts().0,
        }
    }

    fn ended(&self) -> bool {
        self.output.exit().is_some()
    }

    /// Gives the terminal a new size, marks it in the recording, and tells the
    /// foreground group (SIGWINCH) so full-screen programs redraw.
    pub fn resize(&self, size: WinSize) {
        if self.ended() || self.master.resize(size).is_err() {
            return;
        }
        *lock(&self.size) = size;
        self.output.push_resize(size);
        if let Some(fg) = self.master.foreground() {
            if self.alive.load(Ordering::SeqCst) {
                signal_group(fg, libc::SIGWINCH);
            }
        }
    }

    fn signal(&self, signal: i32) {
        if !self.alive.load(Ordering::SeqCst) {
            return;
        }
        let group = self.master.foreground().unwrap_or(self.pid);
        signal_group(group, signal);
    }
}

#[derive(Default)]
pub struct Terminals {
    /// Oldest first.
    sessions: Mutex<Vec<Arc<Session>>>,
}

fn invalid(m: String) -> AgentError {
    AgentError::new(ErrorKind::InvalidArgument, m)
}

/// Root's login shell from `/etc/passwd`, `/bin/sh` if none is named; and its home.
fn root_shell() -> (String, Option<String>) {
    let text = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 7 && f[2] == "0" {
            let shell = if f[6].starts_with('/') {
                f[6].to_string()
            } else {
                "/bin/sh".to_string()
            };
            let home = f[5].starts_with('/').then(|| f[5].to_string());
            return (shell, home);
        }
    }
    ("/bin/sh".to_string(), None)
}

impl Terminals {
    pub fn get(&self, name: &str) -> Result<Arc<Session>, AgentError> {
        lock(&self.sessions)
            .iter()
            .rev()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| {
                AgentError::new(
                    ErrorKind::NotFound,
                    format!("terminal {}: no such session", name.escape_debug()),
                )
            })
    }

    /// Starts a session. A name held by a live session is refused; an ended session
    /// of that name is replaced.
    pub fn create(
        &self,
        table: &ProcessTable,
        base: &Environment,
        req: TerminalNew,
    ) -> Result<TerminalInfo, AgentError> {
        validate_name("name", &req.name).map_err(invalid)?;
        let size = req.size.unwrap_or(DEFAULT_SIZE);
        size.validate().map_err(|m| invalid(format!("size.{m}")))?;
        let mut cmd;
        let argv;
        let mut workdir = req.workdir.clone();
        let mut login_shell = None;
        match req.argv {
            Some(a) => {
                validate_argv(&a)?;
                cmd = Command::new(&a[0]);
                cmd.args(&a[1..]);
                argv = a;
            }
            None => {
                let (shell, home) = root_shell();
                let base_name = shell.rsplit('/').next().unwrap_or("sh").to_string();
                cmd = Command::new(&shell);
                cmd.arg0(format!("-{base_name}"));
                login_shell = Some(shell.clone());
                if workdir.is_none() {
                    workdir = home.filter(|h| std::path::Path::new(h).is_dir());
                }
                argv = vec![shell];
            }
        }
        let workdir = resolve_workdir(workdir.as_deref())?;
        let mut env = base.merged(&req.env)?;
        if !req.env.contains_key("TERM") {
            env.insert("TERM".into(), DEFAULT_TERM.into());
        }
        if let Some(shell) = login_shell {
            // What login(1) would set, unless the host or SetEnv chose otherwise.
            for (k, v) in [
                ("SHELL", shell.as_str()),
                ("USER", "root"),
                ("LOGNAME", "root"),
            ] {
                env.entry(k.into()).or_insert_with(|| v.into());
            }
        }
        cmd.env_clear().envs(&env).current_dir(&workdir);

        let mut sessions = lock(&self.sessions);
        if sessions.iter().any(|s| s.name == req.name && !s.ended()) {
            return Err(AgentError::new(
                ErrorKind::AlreadyExists,
                format!("name: a terminal named {:?} is running", req.name),
            ));
        }
        sessions.retain(|s| s.name != req.name);
        if sessions.len() >= MAX_SESSIONS {
            match sessions.iter().position(|s| s.ended()) {
                Some(i) => {
                    sessions.remove(i);
                }
                None => {
                    return Err(AgentError::new(
                        ErrorKind::TooLarge,
                        format!(
                            "name: {MAX_SESSIONS} terminal sessions are running, the most \
                             kept; kill one first"
                        ),
                    ))
                }
            }
        }
        let child = pty::spawn(table, cmd, size)
            .map_err(|e| AgentError::io(&format!("argv[0] {}", argv[0]), &e))?;
        let output = Arc::new(Output::new(RING_BYTES));
        // The recording starts with the terminal's size.
        output.push_resize(size);
        let created_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let session = Arc::new(Session {
            name: req.name,
            argv,
            created_at,
            pid: child.pid,
            master: Arc::new(child.master),
            output,
            viewers: AtomicU32::new(0),
            size: Mutex::new(size),
            alive: AtomicBool::new(true),
        });
        sessions.push(Arc::clone(&session));
        drop(sessions);
        let info = session.info();
        tokio::spawn(pump(session, child.exit));
        Ok(info)
    }

    pub fn list(&self) -> Vec<TerminalInfo> {
        let sessions: Vec<Arc<Session>> = lock(&self.sessions).clone();
        sessions.iter().map(|s| s.info()).collect()
    }

    /// Hangs the session up (SIGHUP to its foreground group and its own), waits up
    /// to [`HANGUP_WAIT`] for it to end, SIGKILLs its process group, and forgets it.
    pub async fn kill(&self, name: &str) -> Result<(), AgentError> {
        let session = self.get(name)?;
        if !session.ended() {
            session.signal(libc::SIGHUP);
            if session.alive.load(Ordering::SeqCst) {
                signal_group(session.pid, libc::SIGHUP);
            }
            let _ = tokio::time::timeout(HANGUP_WAIT, session.output.ended()).await;
            if session.alive.load(Ordering::SeqCst) {
                signal_group(session.pid, libc::SIGKILL);
            }
        }
        lock(&self.sessions).retain(|s| !Arc::ptr_eq(s, &session));
        Ok(())
    }
}

/// Reads the terminal into the ring until it ends: end of file on the master (every
/// slave closed), or [`OUTPUT_GRACE`] after the leader exited (a background process
/// may keep the slave open). Then the exit is recorded.
async fn pump(session: Arc<Session>, mut exit: crate::process::ExitWaiter) {
    let mut buf = vec![0u8; 64 << 10];
    let mut status: Option<ExitStatus> = None;
    let never = || tokio::time::Instant::now() + Duration::from_secs(1 << 30);
    let grace = tokio::time::sleep_until(never());
    tokio::pin!(grace);
    let mut eof = false;
    while !eof || status.is_none() {
        tokio::select! {
            r = session.master.read(&mut buf), if !eof => match r {
                Ok(n) if n > 0 => session.output.push(Tag::Stdout, &buf[..n]),
                _ => eof = true,
            },
            st = exit.wait(), if status.is_none() => {
                session.alive.store(false, Ordering::SeqCst);
                status = Some(st);
                grace.as_mut().reset(tokio::time::Instant::now() + OUTPUT_GRACE);
            }
            _ = &mut grace, if status.is_some() => break,
        }
    }
    let status = status.unwrap_or(ExitStatus::Signaled(libc::SIGKILL));
    session.output.finish(ExitInfo {
        exit_code: status.code(),
        signal: status.signal(),
        timed_out: false,
        oom_killed: false,
    });
}

/// Counts a viewer while it lives.
struct ViewerGuard(Arc<Session>);

impl Drop for ViewerGuard {
    fn drop(&mut self) {
        self.0.viewers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves a viewer: the tail, then live output; a writer's input goes to the
/// terminal. Ends with `exit` when the session ends, `dropped` when the viewer fell
/// behind the ring, or when the host goes away.
pub async fn run_attach<R, W>(session: Arc<Session>, read_only: bool, rd: R, mut wr: W)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    session.viewers.fetch_add(1, Ordering::SeqCst);
    let _guard = ViewerGuard(Arc::clone(&session));
    let mut cur = session.output.tail(ATTACH_TAIL);
    let mut input = tokio::spawn(viewer_input(rd, Arc::clone(&session), read_only));
    let _abort = AbortOnDrop(input.abort_handle());
    loop {
        let next = tokio::select! {
            n = session.output.next(&mut cur, MAX_STREAM_CHUNK) => n,
            _ = &mut input => return,
        };
        let pieces = match next {
            Next::Pieces(p) => p,
            Next::Ended(exit) => {
                let _ = GuestFrame::Event(StreamEvent::Exit(exit))
                    .write(&mut wr)
                    .await;
                return;
            }
        };
        for p in pieces {
            let frame = match p {
                Piece::Gap(_) => {
                    let _ = GuestFrame::Event(StreamEvent::Dropped {
                        reason: DROPPED.into(),
                    })
                    .write(&mut wr)
                    .await;
                    return;
                }
                Piece::Entry(e) => match e.item {
                    Item::Data(_, d) => GuestFrame::Stdout(d),
                    Item::Resize(_) => continue,
                },
            };
            if frame.write(&mut wr).await.is_err() {
                return;
            }
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A viewer's frames: a writer's input and controls reach the terminal, a read-only
/// viewer's are ignored. Returns when the host closes or breaks the connection.
async fn viewer_input<R: AsyncRead + Unpin>(mut rd: R, session: Arc<Session>, read_only: bool) {
    if read_only {
        return host_gone(&mut rd).await;
    }
    loop {
        let frame = match HostFrame::read(&mut rd).await {
            Ok(f) => f,
            Err(FrameError::Malformed(_)) => continue,
            Err(_) => return,
        };
        if session.ended() {
            continue;
        }
        match frame {
            HostFrame::Stdin(d) => {
                let _ = session.master.write_all(&d).await;
            }
            HostFrame::Control(StreamControl::CloseStdin) => {
                let _ = session.master.write_all(&[session.master.eof_char()]).await;
            }
            HostFrame::Control(StreamControl::Resize(size)) => {
                if size.validate().is_ok() {
                    session.resize(size);
                }
            }
            HostFrame::Control(StreamControl::Signal { signal }) => {
                if valid_signal(signal) {
                    session.signal(signal);
                }
            }
        }
    }
}

/// Serves a recording from byte `from`: records with offsets and times, resize
/// events in their place, a gap for what was no longer kept; never dropped; ends
/// with `exit` once the session has ended.
pub async fn run_record<R, W>(session: &Session, from: u64, mut rd: R, mut wr: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut cur = Cursor::at(from);
    let gone = host_gone(&mut rd);
    tokio::pin!(gone);
    loop {
        let next = tokio::select! {
            n = session.output.next(&mut cur, MAX_STREAM_CHUNK) => n,
            _ = &mut gone => return,
        };
        let pieces = match next {
            Next::Pieces(p) => p,
            Next::Ended(exit) => {
                let _ = GuestFrame::Event(StreamEvent::Exit(exit))
                    .write(&mut wr)
                    .await;
                return;
            }
        };
        for p in pieces {
            let frame = match p {
                Piece::Gap(bytes) => GuestFrame::Event(StreamEvent::Gap { bytes }),
                Piece::Entry(e) => match e.item {
                    Item::Data(_, data) => GuestFrame::Record {
                        offset: e.offset,
                        t_us: e.t_us,
                        data,
                    },
                    Item::Resize(s) => GuestFrame::Event(StreamEvent::Resize {
                        rows: s.rows,
                        cols: s.cols,
                        t_us: e.t_us,
                    }),
                },
            };
            if frame.write(&mut wr).await.is_err() {
                return;
            }
        }
    }
}
