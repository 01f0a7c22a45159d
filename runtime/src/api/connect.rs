//! Finding the daemon of a state dir, starting it when none serves it, and
//! stopping it: what every front door does before its first request.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::client::{Client, ClientError};
use super::DaemonStatus;
use crate::paths::StateDir;

/// Longest wait for a daemon to come up: it reconciles before serving, which may
/// mean pinging every running VM's agent.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// Longest wait for a daemon asked to stop to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// The fd the readiness pipe is handed over on.
const READY_FD: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{}", crate::access::NEEDS_ROOT)]
    NeedsRoot,
    #[error("{0}")]
    StateDir(#[from] crate::access::AccessError),
    #[error("open {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pipe: {0}")]
    Pipe(std::io::Error),
    #[error("start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("burrowd did not get ready within {timeout:?}; see {log}")]
    NotReady { timeout: Duration, log: PathBuf },
    #[error("waiting for burrowd: {0}")]
    Wait(String),
    /// The daemon exited before it was ready; `tail` is its log's last line
    /// (e.g. another daemon already serves the state dir).
    #[error("burrowd exited before it was ready: {tail}")]
    Exited { tail: String },
    #[error("burrowd (pid {pid}) did not stop within {} s", STOP_TIMEOUT.as_secs())]
    NotStopped { pid: u32 },
    #[error("{0}")]
    Client(#[from] ClientError),
}

/// How [`connect`] found the daemon.
#[derive(Debug, Clone)]
pub enum Found {
    /// It was serving already.
    Running(DaemonStatus),
    /// Nothing served the state dir: this is the pid of the daemon started.
    Started(u32),
}

/// `BURROWD`, else `burrowd` next to this binary, else `burrowd` on the PATH.
pub fn burrowd_binary() -> PathBuf {
    crate::paths::companion_binary("BURROWD", "burrowd").unwrap_or_else(|| PathBuf::from("burrowd"))
}

/// A client for the state dir's daemon, starting the daemon first (with image
/// cache `cache_dir`) if none serves it.
pub async fn connect(state: &StateDir, cache_dir: &Path) -> Result<(Client, Found), ConnectError> {
    let client = Client::new(state.socket());
    match client.daemon_status().await {
        Ok(s) => Ok((client, Found::Running(s))),
        Err(ClientError::NotRunning { .. }) => {
            let pid = start(state, cache_dir).await?;
            Ok((client, Found::Started(pid)))
        }
        Err(e) => Err(e.into()),
    }
}

/// What the state dir's daemon serves, or `None` when no daemon serves it.
pub async fn status(state: &StateDir) -> Result<Option<DaemonStatus>, ConnectError> {
    match Client::new(state.socket()).daemon_status().await {
        Ok(s) => Ok(Some(s)),
        Err(ClientError::NotRunning { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Stops the state dir's daemon and waits for it to exit; its pid, or `None`
/// when no daemon served it. Running workspaces keep running.
pub async fn stop(state: &StateDir) -> Result<Option<u32>, ConnectError> {
    let client = Client::new(state.socket());
    let Some(s) = status(state).await? else {
        return Ok(None);
    };
    // Watched before asking, so that its exit cannot be missed.
    let proc = crate::db::ProcId::of(s.pid as i32);
    client.daemon_shutdown().await?;
    if let Some(p) = proc {
        if tokio::time::timeout(STOP_TIMEOUT, p.exited())
            .await
            .is_err()
        {
            return Err(ConnectError::NotStopped { pid: s.pid });
        }
    }
    Ok(Some(s.pid))
}

/// Starts burrowd detached (own session, output to its log) and waits for its
/// readiness line on a pipe; returns its pid.
pub async fn start(state: &StateDir, cache_dir: &Path) -> Result<u32, ConnectError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(ConnectError::NeedsRoot);
    }
    crate::access::Access::default().secure_state_dir(state.root())?;
    let log_path = state.daemon_log();
    let log_err = |source| ConnectError::Log {
        path: log_path.clone(),
        source,
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(log_err)?;
    let log2 = log.try_clone().map_err(log_err)?;
    let (read_end, write_end) = pipe().map_err(ConnectError::Pipe)?;
    let binary = burrowd_binary();
    let mut cmd = Command::new(&binary);
    cmd.arg("--state-dir")
        .arg(state.root())
        .arg("--cache-dir")
        .arg(cache_dir)
        .arg("--ready-fd")
        .arg(READY_FD.to_string())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    // SAFETY: setsid, dup2 and fcntl are async-signal-safe; they run between fork
    // and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            crate::process::pass_fd(&write_end, READY_FD)
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|source| ConnectError::Spawn { binary, source })?;
    // The closure holds our copy of the pipe's write end: drop it, so that the read
    // below sees EOF if the daemon dies before it is ready.
    drop(cmd);
    let pid = child.id();
    // The daemon outlives us as a rule; should it exit first, a long-lived
    // caller (a front door that serves for days) reaps it instead of keeping a
    // zombie.
    std::thread::spawn(move || child.wait());
    // Reading blocks until the daemon writes "ready" or exits (EOF).
    let line = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::from(read_end);
        let mut buf = Vec::new();
        let _ = (&mut f).take(64).read_to_end(&mut buf);
        buf
    });
    let buf = tokio::time::timeout(READY_TIMEOUT, line)
        .await
        .map_err(|_| ConnectError::NotReady {
            timeout: READY_TIMEOUT,
            log: log_path.clone(),
        })?
        .map_err(|e| ConnectError::Wait(e.to_string()))?;
    if buf.starts_with(b"ready") {
        Ok(pid)
    } else {
        let tail = crate::vmm::tail_lines(&log_path, 1).join("");
        Err(ConnectError::Exited {
            tail: tail.trim_end().to_string(),
        })
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
