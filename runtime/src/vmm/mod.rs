//! The VMM driver: QEMU `microvm` with two vhost-user sidecars.
//!
//! One VM is three host processes, all started in their own process group so that
//! they outlive a daemon restart, and all naming the VM's run dir or volume on their
//! command line so that a crashed daemon's orphans can be found:
//! - `vhost-device-vsock`: the guest's vsock device; the host reaches the agent
//!   through its Unix socket (hybrid vsock, "CONNECT <port>").
//! - `virtiofsd`: serves the workspace volume as the guest's root file system.
//! - `qemu-system-x86_64`: the VM, controlled over QMP.

pub mod accel;
pub mod cgroup;
pub mod jail;
pub mod netns;
mod qemu;
pub mod qmp;
mod wait;

use std::path::PathBuf;

pub use accel::Accel;
pub use cgroup::{Cgroups, Limits, WorkspaceCgroup};
pub use jail::VmmUser;
pub use qemu::{launch, LaunchError};
pub use wait::wait_for_path;

/// Everything needed to boot one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub id: String,
    pub hostname: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub accel: Accel,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Directory served to the guest: its root file system (a workspace), or the
    /// containers' shared directory (a container VM).
    pub root: PathBuf,
    pub mode: BootMode,
    pub run_dir: PathBuf,
    pub log_dir: PathBuf,
    /// The guest's network interface, when the workspace has one.
    pub net: Option<VmNet>,
    /// The unprivileged user QEMU and vhost-device-vsock run as, each in its jail;
    /// None runs them as the daemon's user, unjailed (BURROW_UNCONFINED, or a
    /// daemon that is not root and so has nothing to drop).
    pub confine: Option<VmmUser>,
    /// The workspace's cgroup, which every process of the VM joins before exec.
    pub cgroup: Option<WorkspaceCgroup>,
    pub console: ConsoleSpec,
}

/// What the initramfs makes of the shared directory (`burrow.mode=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMode {
    /// The directory is the guest's root file system (virtio-fs tag `rootfs`).
    Workspace,
    /// The root is a bounded tmpfs; the directory is the containers' one (tag
    /// `shared`), mounted at `/run/burrow/shared` (docs/oci.md).
    Container,
}

/// Where the serial console goes: QEMU's stdout, a pipe to `writer`.
#[derive(Debug, Clone)]
pub struct ConsoleSpec {
    /// The burrow-console binary.
    pub writer: PathBuf,
    /// console.log never grows past this; console.log.1 holds the previous part.
    pub max_bytes: u64,
}

/// How this daemon runs its VMs: as whom, in which cgroups, with which console
/// writer. Read once, when the engine opens.
#[derive(Debug, Clone)]
pub struct VmmConfig {
    pub confine: Option<VmmUser>,
    pub cgroups: Option<Cgroups>,
    pub console: ConsoleSpec,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The jail's error, as text: one line, not a chain.
    #[error("{0}; or set BURROW_UNCONFINED=1 to run VMMs as root, for benchmarking only")]
    User(String),
    #[error("burrow-console not found next to burrowd (set BURROW_CONSOLE to its path)")]
    NoConsoleWriter,
    #[error("invalid BURROW_CONSOLE_MAX_BYTES: {0:?} is not a number of bytes >= 1024")]
    ConsoleMax(String),
}

impl VmmConfig {
    /// From the environment of the daemon:
    /// - `BURROW_UNCONFINED=1` runs QEMU and vhost-device-vsock as the daemon's
    ///   user, unjailed, without QEMU's seccomp sandbox and without cgroups. It is a
    ///   benchmarking aid (create time with and without confinement), never for
    ///   workspaces that run untrusted code.
    /// - `BURROW_VMM_USER` names the VMM user (default `burrow-vmm`).
    /// - `BURROW_CONSOLE` is the console writer (default: next to burrowd).
    /// - `BURROW_CONSOLE_MAX_BYTES` bounds console.log (default 4 MiB).
    ///
    /// A daemon that is not root has no privileges to drop and cannot make
    /// cgroups: its VMs run as itself, without limits.
    pub fn from_env(state_dir: &std::path::Path) -> Result<VmmConfig, ConfigError> {
        let unconfined = std::env::var("BURROW_UNCONFINED").is_ok_and(|v| v == "1");
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let confine = if unconfined || !root {
            None
        } else {
            Some(VmmUser::from_env().map_err(|e| ConfigError::User(e.to_string()))?)
        };
        let cgroups = if unconfined || !root {
            None
        } else {
            Cgroups::detect(state_dir)
        };
        let writer = crate::paths::companion_binary("BURROW_CONSOLE", "burrow-console")
            .ok_or(ConfigError::NoConsoleWriter)?;
        let max_bytes = match std::env::var("BURROW_CONSOLE_MAX_BYTES") {
            Ok(v) => v
                .parse::<u64>()
                .ok()
                .filter(|n| *n >= 1024)
                .ok_or(ConfigError::ConsoleMax(v))?,
            Err(_) => CONSOLE_MAX_BYTES,
        };
        Ok(VmmConfig {
            confine,
            cgroups,
            console: ConsoleSpec { writer, max_bytes },
        })
    }
}

/// Default bound of console.log (and of console.log.1): 4 MiB each.
pub const CONSOLE_MAX_BYTES: u64 = 4 << 20;

/// A network interface for the guest: a TAP device (from burrow-netd, open) and
/// the address the guest configures on it.
#[derive(Debug, Clone)]
pub struct VmNet {
    pub tap: std::sync::Arc<std::os::fd::OwnedFd>,
    pub mac: String,
    pub ip: std::net::Ipv4Addr,
    pub prefix: u8,
    /// Unspecified (0.0.0.0) when there is no default route.
    pub gateway: std::net::Ipv4Addr,
}

/// The files of a VM's run dir and log dir, by role.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub run_dir: PathBuf,
    pub log_dir: PathBuf,
}

impl VmPaths {
    pub fn new(run_dir: PathBuf, log_dir: PathBuf) -> Self {
        VmPaths { run_dir, log_dir }
    }
    /// QMP: the daemon binds it and hands QEMU the listening fd, so it stays in
    /// the run dir proper, which no jail shows.
    pub fn qmp(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }
    /// What QEMU's jail shows of the run dir (read-only): virtiofsd's socket.
    pub fn qemu_dir(&self) -> PathBuf {
        self.run_dir.join("qemu")
    }
    /// What vhost-device-vsock's jail shows of the run dir (writable: it makes its
    /// sockets there); QEMU's jail shows it read-only, to reach the device socket.
    pub fn vsock_dir(&self) -> PathBuf {
        self.run_dir.join("vsock")
    }
    /// The empty dir each jail mounts its own root over, in its own namespace.
    pub fn jail(&self) -> PathBuf {
        self.run_dir.join("jail")
    }
    pub fn virtiofs(&self) -> PathBuf {
        self.qemu_dir().join("fs.sock")
    }
    /// vhost-user control socket QEMU connects to.
    pub fn vsock_device(&self) -> PathBuf {
        self.vsock_dir().join("vsock.sock")
    }
    /// Host end of hybrid vsock: connect here to reach a guest port.
    pub fn vsock_uds(&self) -> PathBuf {
        self.vsock_dir().join("vsock.uds")
    }
    /// Where guest-initiated connections to host port `port` arrive.
    pub fn vsock_listener(&self, port: u32) -> PathBuf {
        self.vsock_dir().join(format!("vsock.uds_{port}"))
    }
    pub fn console(&self) -> PathBuf {
        self.log_dir.join("console.log")
    }
    /// The console's previous part, once console.log reached its bound.
    pub fn console_rotated(&self) -> PathBuf {
        self.log_dir.join("console.log.1")
    }

    /// Makes the run dir and its parts: the daemon's own dir is root's alone; the
    /// dirs a jail shows belong to the VMM user.
    pub fn prepare(&self, user: Option<&VmmUser>) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        for dir in [&self.run_dir, &self.log_dir] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        for dir in [self.qemu_dir(), self.vsock_dir(), self.jail()] {
            std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        }
        if let Some(u) = user {
            for dir in [self.qemu_dir(), self.vsock_dir()] {
                u.own(&dir, 0o700).map_err(std::io::Error::other)?;
            }
        }
        Ok(())
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.log_dir.join("qemu.log")
    }
    pub fn virtiofsd_log(&self) -> PathBuf {
        self.log_dir.join("virtiofsd.log")
    }
    pub fn vsock_log(&self) -> PathBuf {
        self.log_dir.join("vsock.log")
    }
    /// The console writer's own errors (never the guest's output).
    pub fn console_writer_log(&self) -> PathBuf {
        self.log_dir.join("console-writer.log")
    }
}

/// The last `n` lines of the console: console.log, preceded by console.log.1 when
/// console.log alone has fewer.
pub fn console_tail(paths: &VmPaths, n: usize) -> Vec<String> {
    let mut lines = tail_lines(&paths.console(), n);
    if lines.len() < n {
        let mut older = tail_lines(&paths.console_rotated(), n - lines.len());
        older.append(&mut lines);
        lines = older;
    }
    lines
}

/// The last `n` lines of a log file, lossily decoded; for error messages and `logs`.
pub fn tail_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..]
        .iter()
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect()
}

/// The console tail as one line, for errors that must stay one line.
pub fn console_tail_one_line(paths: &VmPaths) -> String {
    let lines: Vec<String> = console_tail(paths, 8)
        .into_iter()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        "(empty)".to_string()
    } else {
        lines.join(" | ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_tail_reaches_into_the_previous_part() {
        let t = tempfile::tempdir().unwrap();
        let p = VmPaths::new(t.path().join("run"), t.path().to_path_buf());
        std::fs::write(p.console_rotated(), "a\nb\nc\n").unwrap();
        std::fs::write(p.console(), "d\n").unwrap();
        assert_eq!(console_tail(&p, 3), vec!["b", "c", "d"]);
        assert_eq!(console_tail(&p, 1), vec!["d"]);
    }
}
