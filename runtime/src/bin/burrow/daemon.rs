//! Finding, starting and stopping the daemon for a state dir.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use burrow::api::client::{Client, ClientError};
use burrow::api::DaemonStatus;
use burrow::paths::StateDir;

/// Longest wait for a daemon to come up: it reconciles before serving, which may
/// mean pinging every running VM's agent.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// The fd the readiness pipe is handed over on.
const READY_FD: i32 = 3;

/// `BURROWD`, else `burrowd` next to this binary, else `burrowd` on the PATH.
pub fn burrowd_binary() -> PathBuf {
    burrow::paths::companion_binary("BURROWD", "burrowd")
        .unwrap_or_else(|| PathBuf::from("burrowd"))
}

/// A client for the state dir's daemon, starting the daemon first if none serves it.
pub async fn connect(state: &StateDir, cache_dir: &Path) -> Result<Client, String> {
    let client = Client::new(state.socket());
    match client.get::<DaemonStatus>("/v1/daemon").await {
        Ok(_) => Ok(client),
        Err(ClientError::NotRunning { .. }) => {
            let pid = start(state, cache_dir).await?;
            eprintln!(
                "burrow: started burrowd for {} (pid {pid})",
                state.root().display()
            );
            Ok(client)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Starts burrowd detached (own session, output to its log) and waits for its
/// readiness line on a pipe.
pub async fn start(state: &StateDir, cache_dir: &Path) -> Result<u32, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(burrow::access::NEEDS_ROOT.to_string());
    }
    burrow::access::Access::default()
        .secure_state_dir(state.root())
        .map_err(|e| e.to_string())?;
    let log_path = state.daemon_log();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(|e| format!("open {}: {e}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("open {}: {e}", log_path.display()))?;
    let (read_end, write_end) = pipe().map_err(|e| format!("pipe: {e}"))?;
    let mut cmd = Command::new(burrowd_binary());
    cmd.arg("--state-dir")
        .arg(state.root())
        .arg("--cache-dir")
        .arg(cache_dir)
        .arg("--ready-fd")
        .arg(READY_FD.to_string())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    // SAFETY: setsid, dup2 and fcntl are async-signal-safe; they run between fork
    // and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            burrow::process::pass_fd(&write_end, READY_FD)
        });
    }

    let child = cmd
        .spawn()
        .map_err(|e| format!("start {}: {e}", burrowd_binary().display()))?;
    // The closure holds our copy of the pipe's write end: drop it, so that the read
    // below sees EOF if the daemon dies before it is ready.
    drop(cmd);
    let pid = child.id();
    // Reading blocks until the daemon writes "ready" or exits (EOF).
    let line = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::from(read_end);
        let mut buf = Vec::new();
        let _ = (&mut f).take(64).read_to_end(&mut buf);
        buf
    });
    let buf = tokio::time::timeout(READY_TIMEOUT, line)
        .await
        .map_err(|_| {
            format!(
                "burrowd did not get ready within {READY_TIMEOUT:?}; see {}",
                log_path.display()
            )
        })?
        .map_err(|e| format!("waiting for burrowd: {e}"))?;
    if buf.starts_with(b"ready") {
        Ok(pid)
    } else {
        let tail = burrow::vmm::tail_lines(&log_path, 1).join("");
        Err(format!("burrowd exited before it was ready: {tail}"))
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
