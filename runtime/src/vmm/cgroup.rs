//! Per-workspace resource limits: one cgroup per workspace holding its VMM, its
//! sidecars and its console writer.
//!
//! Hosts have cgroup v2 (one unified hierarchy) or, like the development machines,
//! v1 (one hierarchy per controller). [`Cgroups`] is the one seam over both: the
//! engine asks for a workspace's cgroup by id and never sees which version it got.
//!
//! Layout: `<parent>/<workspace id>`, where the parent is `burrow-<hash of the state
//! dir>`, so two state dirs never share one and the path of a workspace's cgroup
//! follows from the state dir and the id alone (that is its record: it is known
//! before it is made, and reconcile finds stale ones by listing the parent).
//! - v2: the parent sits at the top of the unified hierarchy (as libvirt's
//!   `machine.slice`): a service's own cgroup may not hold both processes and
//!   children with controllers enabled (the "no internal processes" rule).
//! - v1: the parent sits in the daemon's own cgroup of each controller, so the VMs
//!   stay inside whatever bounds the daemon was given.
//!
//! Processes join from `pre_exec` (writing "0" to `cgroup.procs` moves the writer),
//! so a VM process never runs a single instruction of its own outside its cgroup,
//! and whatever it forks (virtiofsd's sandboxed child) starts inside it.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// CFS period for the CPU quota.
const CPU_PERIOD_US: u64 = 100_000;
/// Beyond its vCPUs, a workspace may use this share of one more CPU: QEMU's main
/// loop and I/O threads, virtiofsd and vhost-device-vsock.
const CPU_EXTRA_US: u64 = CPU_PERIOD_US / 2;
/// What the VMM and its sidecars may use beyond guest RAM: QEMU's own heap, TCG's
/// translated code, virtiofsd's and vhost-device-vsock's buffers, and host page
/// cache of the volume read through virtiofsd (reclaimable, so it is trimmed at the
/// limit, not killed).
pub const VMM_OVERHEAD_MIB: u64 = 384;
/// Tasks (processes and threads) of one workspace on the host: QEMU's vCPU, I/O
/// and thread-pool threads (the pool stops at 64), virtiofsd's and vhost-device-
/// vsock's threads. A guest cannot make the host fork beyond it.
pub const PIDS_MAX: u64 = 512;

/// The limits of one workspace, as `info` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// CPU time per period, in µs (cpu quota); `cpu_period_us` is the period.
    pub cpu_quota_us: u64,
    pub cpu_period_us: u64,
    pub memory_bytes: u64,
    pub pids: u64,
}

impl Limits {
    pub fn for_vm(vcpus: u32, memory_mib: u32) -> Limits {
        Limits {
            cpu_quota_us: u64::from(vcpus) * CPU_PERIOD_US + CPU_EXTRA_US,
            cpu_period_us: CPU_PERIOD_US,
            memory_bytes: (u64::from(memory_mib) + VMM_OVERHEAD_MIB) << 20,
            pids: PIDS_MAX,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io(path: &Path, source: std::io::Error) -> CgroupError {
    CgroupError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The cgroup file system of this host, as far as burrow uses it.
#[derive(Debug, Clone)]
enum Hierarchy {
    /// Unified: one directory per cgroup.
    V2 { parent: PathBuf },
    /// One parent per controller (cpu, memory, pids), in that order.
    V1 { parents: [PathBuf; 3] },
}

/// The cgroups of one state dir's workspaces.
#[derive(Debug, Clone)]
pub struct Cgroups {
    hierarchy: Hierarchy,
}

/// One workspace's cgroup, ready for processes to join from `pre_exec`.
#[derive(Debug, Clone)]
pub struct WorkspaceCgroup {
    /// Its `cgroup.procs` file(s), one per hierarchy.
    procs: Vec<CString>,
}

impl WorkspaceCgroup {
    /// Moves the calling process into the cgroup.
    ///
    /// # Safety
    /// Async-signal-safe (open, write, close on pre-built paths): meant for
    /// `pre_exec`, between fork and exec.
    pub unsafe fn join(&self) -> std::io::Result<()> {
        for p in &self.procs {
            // SAFETY: a NUL-terminated path built before the fork.
            let fd = unsafe { libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" is the writing process itself, in v1 and v2 alike.
            // SAFETY: writes one byte from a static buffer to the fd just opened.
            let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
            let err = std::io::Error::last_os_error();
            // SAFETY: closes the fd opened above.
            unsafe { libc::close(fd) };
            if n != 1 {
                return Err(err);
            }
        }
        Ok(())
    }
}

impl Cgroups {
    /// Finds the controllers on this host. None when cpu, memory and pids are not
    /// all available (a container without a delegated cgroup): then VMs run
    /// without limits, which the daemon logs.
    pub fn detect(state_dir: &Path) -> Option<Cgroups> {
        let name = parent_name(state_dir);
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut v1: [Option<PathBuf>; 3] = [None, None, None];
        let mut v2: Option<PathBuf> = None;
        for line in mountinfo.lines() {
            // "id parent maj:min root mountpoint opts ... - fstype source superopts"
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mut l = left.split(' ');
            let mountpoint = l.nth(4).map(unescape);
            let mut r = right.split(' ');
            let (fstype, superopts) = (r.next(), r.nth(1).unwrap_or(""));
            let Some(mountpoint) = mountpoint else {
                continue;
            };
            match fstype {
                Some("cgroup2") => {
                    let controllers =
                        std::fs::read_to_string(mountpoint.join("cgroup.controllers"))
                            .unwrap_or_default();
                    let have: Vec<&str> = controllers.split_whitespace().collect();
                    if ["cpu", "memory", "pids"].iter().all(|c| have.contains(c)) {
                        v2 = Some(mountpoint);
                    }
                }
                Some("cgroup") => {
                    let opts: Vec<&str> = superopts.split(',').collect();
                    for (i, c) in ["cpu", "memory", "pids"].iter().enumerate() {
                        if opts.contains(c) && v1[i].is_none() {
                            let inner = own_v1_path(&own, c);
                            v1[i] = Some(mountpoint.join(inner.trim_start_matches('/')));
                        }
                    }
                }
                _ => {}
            }
        }
        let hierarchy = match v1 {
            [Some(c), Some(m), Some(p)] => Hierarchy::V1 {
                parents: [c.join(&name), m.join(&name), p.join(&name)],
            },
            _ => Hierarchy::V2 {
                parent: v2?.join(&name),
            },
        };
        Some(Cgroups { hierarchy })
    }

    pub fn version(&self) -> u8 {
        match self.hierarchy {
            Hierarchy::V2 { .. } => 2,
            Hierarchy::V1 { .. } => 1,
        }
    }

    fn parents(&self) -> Vec<&Path> {
        match &self.hierarchy {
            Hierarchy::V2 { parent } => vec![parent],
            Hierarchy::V1 { parents } => parents.iter().map(PathBuf::as_path).collect(),
        }
    }

    /// The workspace's cgroup directories (one, or one per v1 controller).
    pub fn dirs(&self, id: &str) -> Vec<PathBuf> {
        self.parents().iter().map(|p| p.join(id)).collect()
    }

    /// Makes (or takes over) the workspace's cgroup and sets its limits.
    pub fn create(&self, id: &str, limits: &Limits) -> Result<WorkspaceCgroup, CgroupError> {
        match &self.hierarchy {
            Hierarchy::V2 { parent } => {
                mkdir(parent)?;
                // The parent's children get the controllers only if the root hands
                // them down: enable them on the way (a no-op when already on).
                if let Some(root) = parent.parent() {
                    enable_controllers(root)?;
                }
                enable_controllers(parent)?;
                let dir = parent.join(id);
                mkdir(&dir)?;
                write(
                    &dir.join("cpu.max"),
                    &format!("{} {}", limits.cpu_quota_us, limits.cpu_period_us),
                )?;
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                // No swap beyond the limit: the bound is on memory, not RAM.
                let _ = write(&dir.join("memory.swap.max"), "0");
                write(&dir.join("pids.max"), &limits.pids.to_string())?;
                Ok(WorkspaceCgroup {
                    procs: vec![cstring(&dir.join("cgroup.procs"))],
                })
            }
            Hierarchy::V1 { parents } => {
                let [cpu, mem, pids] = parents;
                let dirs = [cpu.join(id), mem.join(id), pids.join(id)];
                for (p, d) in parents.iter().zip(&dirs) {
                    mkdir(p)?;
                    mkdir(d)?;
                }
                write(
                    &dirs[0].join("cpu.cfs_period_us"),
                    &limits.cpu_period_us.to_string(),
                )?;
                write(
                    &dirs[0].join("cpu.cfs_quota_us"),
                    &limits.cpu_quota_us.to_string(),
                )?;
                write(
                    &dirs[1].join("memory.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                )?;
                write(&dirs[2].join("pids.max"), &limits.pids.to_string())?;
                Ok(WorkspaceCgroup {
                    procs: dirs
                        .iter()
                        .map(|d| cstring(&d.join("cgroup.procs")))
                        .collect(),
                })
            }
        }
    }

    /// Pids in the workspace's cgroup (any hierarchy).
    pub fn pids(&self, id: &str) -> Vec<i32> {
        let mut out: Vec<i32> = self
            .dirs(id)
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Removes the workspace's cgroup. Its processes must be gone: a cgroup with
    /// live members cannot be removed (EBUSY), and that is reported.
    pub fn remove(&self, id: &str) -> Result<(), CgroupError> {
        let mut first = None;
        for d in self.dirs(id) {
            match std::fs::remove_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    first.get_or_insert(io(&d, e));
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Ids of the workspace cgroups that exist under this state dir's parent.
    pub fn ids(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .parents()
            .iter()
            .filter_map(|p| std::fs::read_dir(p).ok())
            .flat_map(|rd| rd.flatten())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Removes the state dir's parent cgroup(s) if empty (the daemon is closing
    /// with no VM left); harmless otherwise.
    pub fn remove_parent(&self) {
        for p in self.parents() {
            let _ = std::fs::remove_dir(p);
        }
    }
}

/// `burrow-` and 16 hex digits of a hash of the state dir's absolute path.
fn parent_name(state_dir: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(state_dir.as_os_str().as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("burrow-{hex}")
}

/// The daemon's own path in the v1 hierarchy holding `controller`, from
/// /proc/self/cgroup ("4:memory:/some/path").
fn own_v1_path(own: &str, controller: &str) -> String {
    own.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            ctrls
                .split(',')
                .any(|c| c == controller)
                .then(|| path.to_string())
        })
        .next()
        .unwrap_or_else(|| "/".to_string())
}

/// Mount points in mountinfo escape spaces and the like as octal (`\040`).
fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            let v = v as u8;
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

fn cstring(p: &Path) -> CString {
    // Paths built from a mount point and hex/id components hold no NUL.
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

fn mkdir(p: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io(p, e)),
    }
}

fn write(p: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(p, value).map_err(|e| io(p, e))
}

fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let file = dir.join("cgroup.subtree_control");
    let on = std::fs::read_to_string(&file).unwrap_or_default();
    for c in ["cpu", "memory", "pids"] {
        if !on.split_whitespace().any(|x| x == c) {
            write(&file, &format!("+{c}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_vm() {
        let l = Limits::for_vm(2, 512);
        assert_eq!(l.cpu_quota_us, 250_000);
        assert_eq!(l.cpu_period_us, 100_000);
        assert_eq!(l.memory_bytes, (512 + VMM_OVERHEAD_MIB) << 20);
        assert_eq!(l.pids, PIDS_MAX);
    }

    #[test]
    fn parent_is_named_for_the_state_dir() {
        let a = parent_name(Path::new("/var/lib/burrow"));
        assert_eq!(a, parent_name(Path::new("/var/lib/burrow")));
        assert_ne!(a, parent_name(Path::new("/var/lib/burrow2")));
        assert!(a.starts_with("burrow-") && a.len() == 7 + 16, "{a}");
    }

    /// Both layouts, on plain directories standing in for the cgroup file systems
    /// (the kernel's files are written and read the same way): the limits land in
    /// each version's own files, every hierarchy gets the workspace, and removal
    /// and listing see them all.
    #[test]
    fn both_versions_write_their_own_files() {
        let t = tempfile::tempdir().unwrap();
        let limits = Limits::for_vm(1, 256);
        let root = t.path().join("v2");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "cpu memory pids").unwrap();
        let parent = root.join("burrow-x");
        std::fs::create_dir_all(&parent).unwrap();
        std::fs::write(parent.join("cgroup.subtree_control"), "cpu memory pids").unwrap();
        let v2 = Cgroups {
            hierarchy: Hierarchy::V2 {
                parent: parent.clone(),
            },
        };
        let cg = v2.create("ws1", &limits).unwrap();
        let dir = parent.join("ws1");
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(dir.join("cpu.max")), "150000 100000");
        assert_eq!(
            read(dir.join("memory.max")),
            limits.memory_bytes.to_string()
        );
        assert_eq!(read(dir.join("pids.max")), "512");
        assert_eq!(cg.procs.len(), 1);
        assert_eq!(v2.ids(), vec!["ws1".to_string()]);

        let v1root = t.path().join("v1");
        let parents = ["cpu", "memory", "pids"].map(|c| v1root.join(c).join("burrow-x"));
        let v1 = Cgroups {
            hierarchy: Hierarchy::V1 {
                parents: parents.clone(),
            },
        };
        for c in ["cpu", "memory", "pids"] {
            std::fs::create_dir_all(v1root.join(c)).unwrap();
        }
        let cg = v1.create("ws1", &limits).unwrap();
        assert_eq!(read(parents[0].join("ws1/cpu.cfs_quota_us")), "150000");
        assert_eq!(read(parents[0].join("ws1/cpu.cfs_period_us")), "100000");
        assert_eq!(
            read(parents[1].join("ws1/memory.limit_in_bytes")),
            limits.memory_bytes.to_string()
        );
        assert_eq!(read(parents[2].join("ws1/pids.max")), "512");
        assert_eq!(cg.procs.len(), 3);
        assert_eq!(v1.dirs("ws1").len(), 3);
        // A real cgroup dir empties itself; here the limit files go first.
        for d in v1.dirs("ws1") {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
        v1.remove("ws1").unwrap();
        assert!(v1.ids().is_empty());
        v1.remove_parent();
        assert!(!parents[0].exists());
    }

    #[test]
    fn own_paths_and_escapes() {
        let own = "9:name=systemd:/\n4:memory:/a/b\n1:cpu,cpuacct:/c\n0::/\n";
        assert_eq!(own_v1_path(own, "memory"), "/a/b");
        assert_eq!(own_v1_path(own, "cpu"), "/c");
        assert_eq!(own_v1_path(own, "pids"), "/");
        assert_eq!(unescape("/a\\040b"), PathBuf::from("/a b"));
    }
}
