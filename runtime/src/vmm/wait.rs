//! Waiting for a file (a sidecar's socket) to appear, on inotify rather than a timer.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::db::ProcId;

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("{0} did not appear within {1:?}")]
    Timeout(String, Duration),
    #[error("the process that should create {0} exited")]
    Exited(String),
    #[error("watching {0}: {1}")]
    Io(String, std::io::Error),
}

/// Waits until `path` exists, failing early if `creator` exits first.
pub async fn wait_for_path(
    path: &Path,
    creator: ProcId,
    timeout: Duration,
) -> Result<(), WaitError> {
    let name = path.display().to_string();
    let dir = path.parent().unwrap_or(Path::new("/"));
    let watch = Inotify::watch(dir).map_err(|e| WaitError::Io(name.clone(), e))?;
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the same for the
    // AsyncFd's whole life.
    let fd = unsafe { AsyncFd::register_with_interest(watch.fd, Interest::READABLE) }
        .map_err(|e| WaitError::Io(name.clone(), e.into()))?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // Checked after the watch is in place, so a creation between the two is seen.
        if path.exists() {
            return Ok(());
        }
        tokio::select! {
            r = fd.readable() => {
                let mut guard = r.map_err(|e| WaitError::Io(name.clone(), e))?;
                drain(guard.get_inner());
                guard.clear_ready();
            }
            _ = creator.exited() => {
                if path.exists() {
                    return Ok(());
                }
                return Err(WaitError::Exited(name));
            }
            _ = tokio::time::sleep_until(deadline) => return Err(WaitError::Timeout(name, timeout)),
        }
    }
}

struct Inotify {
    fd: OwnedFd,
}

impl Inotify {
    fn watch(dir: &Path) -> std::io::Result<Inotify> {
        // SAFETY: plain syscall returning a new fd or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is fresh and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let c = CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        // SAFETY: valid fd and NUL-terminated path.
        let wd = unsafe {
            libc::inotify_add_watch(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                c.as_ptr(),
                libc::IN_CREATE | libc::IN_MOVED_TO,
            )
        };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Inotify { fd })
    }
}

fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: reads into a valid buffer of the given length.
        let n = unsafe {
            libc::read(
                std::os::fd::AsRawFd::as_raw_fd(fd),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n <= 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sees_a_file_created_later_and_reports_a_dead_creator() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("sock");
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("read _; touch \"$0\"; read _")
            .arg(&target)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let me = ProcId::of(child.id() as i32).unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let waiter = tokio::spawn({
            let target = target.clone();
            async move { wait_for_path(&target, me, Duration::from_secs(10)).await }
        });
        use std::io::Write;
        stdin.write_all(b"go\n").unwrap();
        waiter.await.unwrap().unwrap();
        drop(stdin);
        let _ = child.wait();
        let err = wait_for_path(&t.path().join("never"), me, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(matches!(err, WaitError::Exited(_)), "{err}");
    }
}
