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
mod qemu;
pub mod qmp;
mod wait;

use std::path::PathBuf;

pub use accel::Accel;
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
    /// Directory served to the guest as its root file system.
    pub root: PathBuf,
    pub run_dir: PathBuf,
    pub log_dir: PathBuf,
    /// The guest's network interface, when the workspace has one.
    pub net: Option<VmNet>,
}

/// A network interface for the guest: a TAP device (from burrow-netd, open) and
/// the address the guest configures on it.
#[derive(Debug, Clone)]
pub struct VmNet {
    pub tap: std::sync::Arc<std::os::fd::OwnedFd>,
    pub mac: String,
    pub ip: std::net::Ipv4Addr,
    pub prefix: u8,
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
    pub fn qmp(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }
    pub fn virtiofs(&self) -> PathBuf {
        self.run_dir.join("fs.sock")
    }
    /// vhost-user control socket QEMU connects to.
    pub fn vsock_device(&self) -> PathBuf {
        self.run_dir.join("vsock.sock")
    }
    /// Host end of hybrid vsock: connect here to reach a guest port.
    pub fn vsock_uds(&self) -> PathBuf {
        self.run_dir.join("vsock.uds")
    }
    /// Where guest-initiated connections to host port `port` arrive.
    pub fn vsock_listener(&self, port: u32) -> PathBuf {
        self.run_dir.join(format!("vsock.uds_{port}"))
    }
    pub fn console(&self) -> PathBuf {
        self.log_dir.join("console.log")
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
pub fn console_tail_one_line(path: &std::path::Path) -> String {
    let lines: Vec<String> = tail_lines(path, 8)
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

/// Keeps a log file a guest appends to under `max` bytes: once over, only its last
/// `keep` bytes stay, after a line saying so. Writers must append (O_APPEND), as
/// QEMU's console chardev does, so they carry on at the new end.
pub fn trim_log(path: &std::path::Path, max: u64, keep: u64) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let len = f.metadata()?.len();
    if len <= max {
        return Ok(false);
    }
    let keep = keep.min(len);
    f.seek(SeekFrom::Start(len - keep))?;
    let mut tail = Vec::with_capacity(keep as usize);
    Read::by_ref(&mut f).take(keep).read_to_end(&mut tail)?;
    let marker = format!(
        "--- burrow: {} earlier bytes of this log dropped ---\n",
        len - keep
    );
    f.seek(SeekFrom::Start(0))?;
    f.write_all(marker.as_bytes())?;
    f.write_all(&tail)?;
    f.set_len(marker.len() as u64 + tail.len() as u64)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trim_keeps_the_tail() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("console.log");
        std::fs::write(&p, "a".repeat(100) + "tail-line\n").unwrap();
        assert!(!trim_log(&p, 1000, 10).unwrap());
        assert!(trim_log(&p, 50, 10).unwrap());
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("--- burrow: 100 earlier bytes"), "{text}");
        assert!(text.ends_with("tail-line\n"));
        assert_eq!(tail_lines(&p, 1), vec!["tail-line".to_string()]);
    }
}
