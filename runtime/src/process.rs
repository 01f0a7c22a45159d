//! Host processes the engine owns: identity, waiting and ending them.
//!
//! VM processes must outlive the daemon (a restart re-adopts them), so they are not
//! tied to the daemon's lifetime, and waiting on them works whether or not they are
//! our children: a pidfd becomes readable when its process exits.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::db::ProcId;

/// The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat),
/// or None when no such process exists.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Process state letter from /proc/PID/stat (`Z` for a zombie).
fn state_letter(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

impl ProcId {
    pub fn of(pid: i32) -> Option<ProcId> {
        start_time(pid).map(|start_time| ProcId { pid, start_time })
    }

    /// Whether this very process (not a recycled pid) still runs. A zombie counts
    /// as gone: it has exited and only waits to be reaped.
    pub fn is_alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time) && state_letter(self.pid) != Some('Z')
    }

    /// Sends `signal` if this is still the same process; to its whole process group
    /// when it leads one, as every VM process does, so that helpers it forked (the
    /// sandboxed child of virtiofsd) go with it.
    pub fn signal(&self, signal: i32) {
        if start_time(self.pid) == Some(self.start_time) {
            // SAFETY: getpgid has no memory effects.
            let leader = unsafe { libc::getpgid(self.pid) } == self.pid;
            let target = if leader { -self.pid } else { self.pid };
            // SAFETY: kill has no memory effects; the pid was checked to be ours.
            unsafe { libc::kill(target, signal) };
        }
    }

    /// Reaps the process if it is our child and has exited; harmless otherwise.
    pub fn reap(&self) {
        // SAFETY: waitpid with a null status pointer and WNOHANG only reaps `pid`.
        unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), libc::WNOHANG) };
    }

    /// Waits until the process has exited (and reaps it if it is our child).
    pub async fn exited(&self) {
        if !self.is_alive() {
            self.reap();
            return;
        }
        match pidfd(self.pid) {
            Some(fd) => {
                // The pidfd was opened after the identity check above; if the pid was
                // recycled in between, the check below catches it on wake-up.
                // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the
                // same for the AsyncFd's whole life.
                if let Ok(fd) = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
                    let _ = fd.readable().await;
                }
            }
            None => {
                // No pidfd (kernel < 5.3): fall back to polling the identity.
                while self.is_alive() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        self.reap();
    }

    /// SIGTERM, then SIGKILL if the process has not exited within `grace`.
    pub async fn terminate(&self, grace: Duration) {
        if !self.is_alive() {
            self.reap();
            return;
        }
        self.signal(libc::SIGTERM);
        if tokio::time::timeout(grace, self.exited()).await.is_err() {
            self.kill().await;
        }
    }

    /// SIGKILL and wait for the exit.
    pub async fn kill(&self) {
        self.signal(libc::SIGKILL);
        // SIGKILL cannot be caught: the process is gone once the kernel tears it down.
        let _ = tokio::time::timeout(Duration::from_secs(10), self.exited()).await;
    }
}

fn pidfd(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Processes whose command line mentions a path under one of `dirs`: every VM
/// process names its run dir or its volume, so this finds what a crashed daemon left
/// running even if it never recorded it.
pub fn processes_mentioning(dirs: &[&Path]) -> Vec<ProcId> {
    // With a trailing slash, so that /x/run does not match /x/run2.
    let needles: Vec<Vec<u8>> = dirs
        .iter()
        .map(|d| {
            let mut n = d.as_os_str().as_encoded_bytes().to_vec();
            n.push(b'/');
            n
        })
        .collect();
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if needles
            .iter()
            .any(|n| cmdline.windows(n.len()).any(|w| w == n.as_slice()))
        {
            if let Some(p) = ProcId::of(pid) {
                out.push(p);
            }
        }
    }
    out
}

/// Clears close-on-exec on `fd` in a child about to exec, by duplicating it onto
/// `target`. Meant for `CommandExt::pre_exec`.
///
/// # Safety
/// Only async-signal-safe calls; must run between fork and exec.
pub unsafe fn pass_fd(fd: &impl AsRawFd, target: i32) -> std::io::Result<()> {
    let fd = fd.as_raw_fd();
    if fd == target {
        // dup2 onto itself does nothing, close-on-exec included: clear the flag.
        // SAFETY: fcntl is async-signal-safe; the fd is valid in the child.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        return Ok(());
    }
    // SAFETY: dup2 is async-signal-safe; both fds are valid in the child.
    if unsafe { libc::dup2(fd, target) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;

    use super::*;

    // The children are reaped through ProcId, which is what these tests check.
    /// The fd lands on its target open, whether or not it already has that number.
    #[test]
    fn passed_fds_survive_exec() {
        use std::os::fd::{AsFd, AsRawFd};
        for target in [7, -1] {
            let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
            let target = if target < 0 {
                a.as_fd().as_raw_fd()
            } else {
                target
            };
            let mut cmd = std::process::Command::new("sh");
            cmd.arg("-c").arg(format!("test -S /proc/self/fd/{target}"));
            // SAFETY: pass_fd only calls dup2 or fcntl, both async-signal-safe.
            unsafe { cmd.pre_exec(move || pass_fd(&a, target)) };
            assert!(cmd.status().unwrap().success(), "fd {target} not passed");
        }
    }

    #[allow(clippy::zombie_processes)]
    #[tokio::test]
    async fn identity_wait_and_terminate() {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let p = ProcId::of(child.id() as i32).unwrap();
        assert!(p.is_alive());
        assert!(
            !ProcId {
                pid: p.pid,
                start_time: p.start_time + 1
            }
            .is_alive(),
            "a recycled pid is not ours"
        );
        p.terminate(Duration::from_secs(5)).await;
        assert!(!p.is_alive());
        assert!(ProcId::of(p.pid).is_none(), "reaped");
    }

    #[allow(clippy::zombie_processes)]
    #[tokio::test]
    async fn finds_processes_by_command_line() {
        let t = tempfile::tempdir().unwrap();
        let marker = t.path().join("marker");
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("echo up; sleep 30; : $0")
            .arg(&marker)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        // The shell's first line says it runs: its command line is readable by then.
        let mut up = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut up,
        )
        .unwrap();
        assert_eq!(up, "up\n");
        let found = processes_mentioning(&[t.path()]);
        // The shell, and for an instant its fork for `sleep`, name the marker; nothing
        // else does.
        let pids: Vec<i32> = found.iter().map(|p| p.pid).collect();
        assert!(pids.contains(&(child.id() as i32)), "{pids:?}");
        assert!(pids.len() <= 2, "{pids:?}");
        // SAFETY: kill has no memory effects; the group is the test's own child's.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        for p in found {
            p.kill().await;
        }
    }
}
