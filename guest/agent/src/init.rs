//! The duties of PID 1: kernel file systems, host name, loopback, power-off.
//!
//! The initramfs has already mounted the workspace as `/`, put a tmpfs on `/run`
//! and moved its `/dev` in. Everything here tolerates what is already in place, and
//! a failure is logged and skipped: init must come up as far as it can, because a
//! guest whose agent never answers tells the host nothing.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::MsFlags;
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::config::GuestConfig;

/// One file system init mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountSpec {
    pub fstype: &'static str,
    pub target: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// In order: each later target lives inside an earlier one.
pub const MOUNTS: &[MountSpec] = &[
    MountSpec {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    MountSpec {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    // Containers' cgroups (libcontainer is built for cgroup v2 only).
    MountSpec {
        fstype: "cgroup2",
        target: "/sys/fs/cgroup",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    MountSpec {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    // gid 5 is Debian's `tty` group, which owns terminals as login and sshd expect.
    MountSpec {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("gid=5,mode=0620,ptmxmode=0666"),
    },
    MountSpec {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    MountSpec {
        fstype: "tmpfs",
        target: "/tmp",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
];

/// The privileged calls init makes, narrowed so the mount logic can be tested with
/// a recording double.
pub trait Sys {
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    fn is_mount_point(&self, path: &Path) -> io::Result<bool>;
    fn mount(&self, spec: &MountSpec) -> io::Result<()>;
}

/// The real system.
pub struct Host;

impl Sys for Host {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    /// A directory on another device than its parent is a mount point. (A bind
    /// mount from the same file system is not seen; `mount` then says EBUSY or
    /// stacks a fresh instance, both harmless for these file systems.) Works before
    /// /proc is mounted, unlike reading /proc/self/mountinfo.
    fn is_mount_point(&self, path: &Path) -> io::Result<bool> {
        let dev = std::fs::metadata(path)?.dev();
        let parent = path.parent().unwrap_or(Path::new("/"));
        Ok(dev != std::fs::metadata(parent)?.dev())
    }

    fn mount(&self, spec: &MountSpec) -> io::Result<()> {
        nix::mount::mount(
            Some(spec.fstype),
            spec.target,
            Some(spec.fstype),
            spec.flags,
            spec.data,
        )
        .map_err(io::Error::from)
    }
}

/// Mounts what is not mounted yet. Returns the targets that failed, with why.
pub fn mount_all(sys: &dyn Sys) -> Vec<(&'static str, io::Error)> {
    let mut failed = Vec::new();
    for spec in MOUNTS {
        let target = Path::new(spec.target);
        if let Err(e) = sys.create_dir_all(target) {
            failed.push((spec.target, e));
            continue;
        }
        match sys.is_mount_point(target) {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                failed.push((spec.target, e));
                continue;
            }
        }
        match sys.mount(spec) {
            Ok(()) => {}
            // Mounted after all (by someone we could not see): what we wanted.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => failed.push((spec.target, e)),
        }
    }
    failed
}

/// Runs the PID-1 set-up: mounts first (the command line is read from /proc).
pub fn setup() -> GuestConfig {
    for (target, e) in mount_all(&Host) {
        tracing::warn!("mount {target}: {e}");
    }
    dev_links();
    let config = GuestConfig::from_proc();
    if let Some(name) = &config.hostname {
        if let Err(e) = nix::unistd::sethostname(name) {
            tracing::warn!("sethostname: {e}");
        }
    }
    if let Err(e) = loopback_up() {
        tracing::warn!("lo: {e}");
    }
    config
}

/// The links udev or systemd would make; devtmpfs has none of them, and shells
/// need /dev/fd for process substitution.
fn dev_links() {
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        match std::os::unix::fs::symlink(target, link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => tracing::warn!("{link}: {e}"),
        }
    }
}

/// Sets IFF_UP on `lo`; the kernel then gives it 127.0.0.1/8 and ::1 by itself.
fn loopback_up() -> io::Result<()> {
    // SAFETY: socket() has no memory effects; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own; OwnedFd closes it on every path.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&sock);
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the NUL-terminated name in `req` and writes its
    // flags member; `req` lives across the call.
    if unsafe { libc::ioctl(raw, libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after SIOCGIFFLAGS the flags member is the initialised union field.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    if unsafe { libc::ioctl(raw, libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Stops every process, flushes file systems and ends the VM. Never returns.
///
/// The guest powers off by resetting: QEMU runs with `-no-reboot`, which turns a
/// guest reset into QEMU exiting. (RB_POWER_OFF needs ACPI, which the microvm
/// machine may not have; it would leave the CPUs halted and QEMU running.)
pub fn power_off() -> ! {
    tracing::info!("powering off");
    // kill(-1) from init signals every process except init itself.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    if !wait_for_no_children(Duration::from_secs(1)) {
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        wait_for_no_children(Duration::from_millis(500));
    }
    nix::unistd::sync();
    if let Some(e) = reboot(RebootMode::RB_AUTOBOOT).err() {
        tracing::error!("reboot: {e}");
    }
    // PID 1 must not exit: that panics the kernel.
    loop {
        std::thread::park();
    }
}

/// Reaps children until none is left or `limit` has passed. Called on the way
/// down, when nobody waits for these statuses any more, so it may take them from
/// the reaper task. Returns whether no child is left.
fn wait_for_no_children(limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let mut status = 0;
        // SAFETY: waitpid only writes `status`, which we own.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid > 0 {
            continue;
        }
        if pid < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        // A blocking poll is fine here: power_off runs on a blocking thread and
        // the agent has nothing else left to do.
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::HashSet;

    use super::*;

    /// Records mounts; `mounted` are already there, `busy` answer EBUSY.
    #[derive(Default)]
    struct Recorder {
        mounted: HashSet<&'static str>,
        busy: HashSet<&'static str>,
        calls: RefCell<Vec<&'static str>>,
    }

    impl Sys for Recorder {
        fn create_dir_all(&self, _: &Path) -> io::Result<()> {
            Ok(())
        }
        fn is_mount_point(&self, path: &Path) -> io::Result<bool> {
            Ok(self.mounted.iter().any(|m| Path::new(m) == path))
        }
        fn mount(&self, spec: &MountSpec) -> io::Result<()> {
            self.calls.borrow_mut().push(spec.target);
            if self.busy.contains(spec.target) {
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            if spec.target == "/sys" {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            Ok(())
        }
    }

    #[test]
    fn mounts_only_what_is_missing_and_tolerates_ebusy() {
        let sys = Recorder {
            mounted: ["/dev"].into(),
            busy: ["/tmp"].into(),
            ..Default::default()
        };
        let failed = mount_all(&sys);
        assert_eq!(
            *sys.calls.borrow(),
            vec![
                "/proc",
                "/sys",
                "/sys/fs/cgroup",
                "/dev/pts",
                "/dev/shm",
                "/tmp"
            ]
        );
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0, "/sys");
    }

    #[test]
    fn devpts_options() {
        let pts = MOUNTS.iter().find(|m| m.target == "/dev/pts").unwrap();
        assert_eq!(pts.data, Some("gid=5,mode=0620,ptmxmode=0666"));
        let tmp = MOUNTS.iter().find(|m| m.target == "/tmp").unwrap();
        assert_eq!(tmp.data, Some("mode=1777"));
    }
}
