//! Spawning children, reaping them, and capturing their output.
//!
//! As PID 1 the agent must reap every zombie in the guest, orphans included, with
//! `waitpid(-1)`. A per-child wait (tokio's `Child::wait`) would race that reaper
//! for the same statuses, so there is exactly one waiter: a SIGCHLD-driven task
//! that collects every status and hands the ones the agent is waiting for to a
//! oneshot channel registered at spawn time. Statuses nobody waits for (orphans)
//! are dropped. The same path runs outside PID 1, so there is one code path.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use crate::ring::{Output, Tag};

/// How long, after a process has exited, its pipes may stay open before the agent
/// answers with the output it has. A background grandchild that inherited the
/// pipes (`server &`) would otherwise hold the answer forever; its output keeps
/// being drained (and dropped) so it never blocks on a full pipe.
pub const OUTPUT_GRACE: Duration = Duration::from_millis(250);

/// Locks a mutex, recovering the data if a holder panicked: every structure guarded
/// here stays consistent between statements.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

impl ExitStatus {
    /// The shell convention: the exit status, or 128 + the signal number.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(c) => c,
            ExitStatus::Signaled(s) => 128 + s,
        }
    }

    pub fn signal(self) -> Option<i32> {
        match self {
            ExitStatus::Exited(_) => None,
            ExitStatus::Signaled(s) => Some(s),
        }
    }
}

/// The children the agent waits for, keyed by pid.
#[derive(Default)]
pub struct ProcessTable {
    // Invariant: `spawn` holds this lock from fork until the child's waiter is
    // inserted, and the reaper holds it around every `waitpid`, so no status can be
    // collected before its waiter exists. Holding it across the spawn also keeps the
    // reaper from stealing the status of a child whose exec failed, which std's
    // `Command::spawn` itself waits for (and would panic on ECHILD).
    waiters: Mutex<HashMap<i32, oneshot::Sender<ExitStatus>>>,
    /// Notified whenever the reaper leaves the table empty.
    emptied: Notify,
}

impl ProcessTable {
    /// Creates the table and starts its reaper. Must run inside the runtime, before
    /// anything is spawned.
    pub fn start() -> io::Result<Arc<Self>> {
        let table = Arc::new(ProcessTable::default());
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Arc::clone(&table);
        tokio::spawn(async move {
            loop {
                // Reap first: children may have exited before the handler existed.
                reaper.reap();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(table)
    }

    /// Collects every exited child; SIGCHLDs coalesce, so one signal may stand for
    /// several children.
    fn reap(&self) {
        let mut waiters = lock(&self.waiters);
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid only writes the status into `status`, which we own.
            // (nix's waitpid is not used: it fails on real-time signal numbers after
            // having consumed the status.)
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid == 0 {
                break;
            }
            if pid < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break; // ECHILD: no children at all
            }
            let exit = if libc::WIFEXITED(status) {
                ExitStatus::Exited(libc::WEXITSTATUS(status))
            } else if libc::WIFSIGNALED(status) {
                ExitStatus::Signaled(libc::WTERMSIG(status))
            } else {
                continue; // stopped/continued: not asked for, not reported
            };
            if let Some(tx) = waiters.remove(&pid) {
                let _ = tx.send(exit);
            }
        }
        if waiters.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    /// Spawns `cmd` and registers its waiter.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(std::process::Child, ExitWaiter)> {
        let mut waiters = lock(&self.waiters);
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(child.id() as i32, tx);
        Ok((child, ExitWaiter(rx)))
    }

    /// Pids of the processes the agent still waits for.
    pub fn pids(&self) -> Vec<i32> {
        lock(&self.waiters).keys().copied().collect()
    }

    /// Resolves once every process the agent waits for has exited and been reaped.
    pub async fn all_exited(&self) {
        loop {
            // Registered before the check, so an emptying in between is not missed.
            let notified = self.emptied.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if lock(&self.waiters).is_empty() {
                return;
            }
            notified.await;
        }
    }
}

/// The exit status of one child, delivered by the reaper.
pub struct ExitWaiter(oneshot::Receiver<ExitStatus>);

impl ExitWaiter {
    /// A waiter fed by someone other than the reaper (the OCI helper reaps a
    /// container's process and reports its status).
    pub fn channel() -> (oneshot::Sender<ExitStatus>, ExitWaiter) {
        let (tx, rx) = oneshot::channel();
        (tx, ExitWaiter(rx))
    }

    /// Waits for the exit. The reaper never drops a waiter without sending (except
    /// at power-off), so the fallback only guards against that.
    pub async fn wait(&mut self) -> ExitStatus {
        (&mut self.0)
            .await
            .unwrap_or(ExitStatus::Signaled(libc::SIGKILL))
    }
}

/// The first `cap` bytes of one output stream.
#[derive(Debug, Clone, Default)]
pub struct Capture {
    data: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl Capture {
    pub fn new(cap: usize) -> Self {
        Capture {
            data: Vec::new(),
            cap,
            truncated: false,
        }
    }

    /// Keeps what fits under the cap; notes that something was dropped.
    pub fn push(&mut self, chunk: &[u8]) {
        let room = self.cap.saturating_sub(self.data.len());
        let take = room.min(chunk.len());
        self.data.extend_from_slice(&chunk[..take]);
        if take < chunk.len() {
            self.truncated = true;
        }
    }

    /// A copy of the bytes so far and whether any were dropped.
    #[cfg(test)]
    pub fn snapshot(&self) -> (Vec<u8>, bool) {
        (self.data.clone(), self.truncated)
    }

    pub fn take(&mut self) -> (Vec<u8>, bool) {
        (std::mem::take(&mut self.data), self.truncated)
    }
}

pub type SharedCapture = Arc<Mutex<Capture>>;

/// Where a pipe reader puts what it reads.
type Sink = Box<dyn FnMut(&[u8]) + Send>;

/// The per-stream cap of a request: the default when absent, never over the
/// protocol's hard cap (the reply must fit one frame).
pub fn output_cap(requested: Option<u64>) -> usize {
    let cap = requested
        .unwrap_or(burrow_proto::DEFAULT_MAX_OUTPUT)
        .min(burrow_proto::MAX_OUTPUT);
    usize::try_from(cap).unwrap_or(usize::MAX)
}

/// What to run.
pub struct Spec<'a> {
    pub argv: &'a [String],
    pub workdir: &'a Path,
    /// The complete environment of the child.
    pub env: &'a BTreeMap<String, String>,
    /// Bytes for standard input, which is closed afterwards; `/dev/null` if `None`.
    pub stdin: Option<Vec<u8>>,
    pub max_output: usize,
    /// Where the output goes instead of the captures (jobs): a ring that keeps the
    /// tail of both streams.
    pub ring: Option<Arc<Output>>,
}

/// A process that could not be started: the shell's answer to the same failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotStarted {
    pub exit_code: i32,
    pub stderr: String,
}

impl NotStarted {
    /// Maps a spawn failure the way a shell reports it, since that is what a user
    /// who typed the command expects: 127 for a missing command, 126 for one that
    /// cannot be executed. The message goes on the process's stderr, not into an
    /// agent error, so callers see one shape whatever went wrong in the command.
    pub fn from_spawn_error(argv0: &str, err: &io::Error) -> Self {
        let (exit_code, what) = match err.kind() {
            io::ErrorKind::NotFound if !argv0.contains('/') => (127, "command not found".into()),
            io::ErrorKind::NotFound => (127, "No such file or directory".into()),
            io::ErrorKind::PermissionDenied => (126, "Permission denied".into()),
            _ => (126, err.to_string()),
        };
        NotStarted {
            exit_code,
            stderr: format!("{argv0}: {what}\n"),
        }
    }
}

/// A running child: its pid (also its process group), its exit, and the captures
/// its output flows into.
pub struct Running {
    pub pid: i32,
    pub started: Instant,
    pub stdout: SharedCapture,
    pub stderr: SharedCapture,
    exit: ExitWaiter,
    readers: Vec<JoinHandle<()>>,
    stdin_writer: Option<JoinHandle<()>>,
}

/// How a wait ended.
pub struct Finished {
    pub status: ExitStatus,
    pub timed_out: bool,
    pub duration: Duration,
}

/// Starts a process in its own process group, so that a timeout or a job kill
/// reaches everything it started.
pub fn start(table: &ProcessTable, spec: Spec<'_>) -> Result<Running, NotStarted> {
    let Some((program, args)) = spec.argv.split_first() else {
        return Err(NotStarted {
            exit_code: 127,
            stderr: "empty command\n".into(),
        });
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(spec.env)
        .current_dir(spec.workdir)
        // A new group, not a new session: enough for killpg, and it keeps std on
        // its posix_spawn fast path (no pre_exec), which matters under TCG.
        .process_group(0)
        .stdin(if spec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let (mut child, exit) = table
        .spawn(&mut cmd)
        .map_err(|e| NotStarted::from_spawn_error(program, &e))?;
    let pid = child.id() as i32;
    let stdout = Arc::new(Mutex::new(Capture::new(spec.max_output)));
    let stderr = Arc::new(Mutex::new(Capture::new(spec.max_output)));
    let mut readers = Vec::with_capacity(2);
    let sink = |tag: Tag, capture: &SharedCapture| -> Sink {
        match &spec.ring {
            Some(ring) => {
                let ring = Arc::clone(ring);
                Box::new(move |b: &[u8]| ring.push(tag, b))
            }
            None => {
                let capture = Arc::clone(capture);
                Box::new(move |b: &[u8]| lock(&capture).push(b))
            }
        }
    };
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(drain(out.into(), sink(Tag::Stdout, &stdout))));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(drain(err.into(), sink(Tag::Stderr, &stderr))));
    }
    let stdin_writer = match (child.stdin.take(), spec.stdin) {
        (Some(pipe), Some(bytes)) => Some(tokio::spawn(feed(pipe.into(), bytes))),
        _ => None,
    };
    Ok(Running {
        pid,
        started,
        stdout,
        stderr,
        exit,
        readers,
        stdin_writer,
    })
}

impl Running {
    /// Waits for the process to exit, killing its group after `timeout`, then gives
    /// its pipes [`OUTPUT_GRACE`] to reach end of file.
    pub async fn wait(&mut self, timeout: Option<Duration>) -> Finished {
        let mut timed_out = false;
        let waited = match timeout {
            Some(t) => match tokio::time::timeout(t, &mut self.exit.0).await {
                Ok(r) => r,
                Err(_) => {
                    timed_out = true;
                    signal_group(self.pid, libc::SIGKILL);
                    (&mut self.exit.0).await
                }
            },
            None => (&mut self.exit.0).await,
        };
        // The reaper never drops a waiter without sending (except at power-off), so
        // this fallback only guards against that.
        let status = waited.unwrap_or(ExitStatus::Signaled(libc::SIGKILL));
        let duration = self.started.elapsed();
        if let Some(w) = self.stdin_writer.take() {
            w.abort();
        }
        let readers = std::mem::take(&mut self.readers);
        let _ = tokio::time::timeout(OUTPUT_GRACE, async {
            for r in readers {
                let _ = r.await;
            }
        })
        .await;
        Finished {
            status,
            timed_out,
            duration,
        }
    }
}

/// Sends `sig` to process group `pgid`; a group that is already gone is not an
/// error.
pub fn signal_group(pgid: i32, sig: i32) {
    if pgid <= 1 {
        return; // never signal init's group or "every process"
    }
    // SAFETY: killpg has no memory effects; pgid > 1 names one process group.
    unsafe {
        libc::killpg(pgid, sig);
    }
}

/// Reads a pipe to its end into `sink`, draining past any cap so the writer never
/// blocks on a full pipe.
async fn drain(fd: OwnedFd, mut sink: Sink) {
    let mut rx = match pipe::Receiver::from_owned_fd(fd) {
        Ok(rx) => rx,
        Err(e) => {
            tracing::warn!("output pipe: {e}");
            return;
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => sink(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
}

/// Writes `bytes` to a child's stdin and closes it. A child that exits without
/// reading gives EPIPE, which is not an error of the request.
async fn feed(fd: OwnedFd, bytes: Vec<u8>) {
    let Ok(mut tx) = pipe::Sender::from_owned_fd(fd) else {
        return;
    };
    let _ = tx.write_all(&bytes).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_keeps_the_first_bytes() {
        let mut c = Capture::new(5);
        c.push(b"abc");
        assert_eq!(c.snapshot(), (b"abc".to_vec(), false));
        c.push(b"de");
        assert_eq!(c.snapshot(), (b"abcde".to_vec(), false));
        c.push(b"f");
        assert_eq!(c.snapshot(), (b"abcde".to_vec(), true));
        let mut c = Capture::new(4);
        c.push(b"123456");
        assert_eq!(c.take(), (b"1234".to_vec(), true));
    }

    #[test]
    fn zero_cap_keeps_nothing() {
        let mut c = Capture::new(0);
        c.push(b"");
        assert_eq!(c.snapshot(), (vec![], false));
        c.push(b"x");
        assert_eq!(c.snapshot(), (vec![], true));
    }

    #[test]
    fn output_cap_is_clamped() {
        use burrow_proto::{DEFAULT_MAX_OUTPUT, MAX_OUTPUT};
        assert_eq!(output_cap(None), DEFAULT_MAX_OUTPUT as usize);
        assert_eq!(output_cap(Some(10)), 10);
        assert_eq!(output_cap(Some(u64::MAX)), MAX_OUTPUT as usize);
    }

    #[test]
    fn spawn_failures_read_like_a_shell() {
        let nf = io::Error::from(io::ErrorKind::NotFound);
        assert_eq!(
            NotStarted::from_spawn_error("frob", &nf),
            NotStarted {
                exit_code: 127,
                stderr: "frob: command not found\n".into()
            }
        );
        assert_eq!(
            NotStarted::from_spawn_error("./frob", &nf).stderr,
            "./frob: No such file or directory\n"
        );
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert_eq!(NotStarted::from_spawn_error("/etc", &denied).exit_code, 126);
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(ExitStatus::Exited(3).code(), 3);
        assert_eq!(ExitStatus::Exited(3).signal(), None);
        assert_eq!(ExitStatus::Signaled(9).code(), 137);
        assert_eq!(ExitStatus::Signaled(9).signal(), Some(9));
    }
}
