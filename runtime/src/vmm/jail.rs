//! The jail QEMU and vhost-device-vsock run in, after Firecracker's jailer.
//!
//! Between fork and exec the child:
//! 1. leaves the host's mount, network, IPC, UTS and cgroup namespaces;
//! 2. mounts a small tmpfs over the VM's (empty) `jail` dir and builds in it a root
//!    that holds only what the binary needs, bound read-only at the same paths as
//!    on the host (`/usr` and the `/lib*` links, `ld.so.cache`, a few `/dev` nodes,
//!    the kernel and initramfs, the binary itself) plus its own sockets' dir; keeping
//!    the host paths means command lines keep naming the run dir, which is how
//!    reconcile finds a crashed daemon's orphans;
//! 3. `pivot_root`s into it and detaches the host's tree, then makes the new root
//!    read-only;
//! 4. drops every capability from its bounding set, becomes the unprivileged VMM
//!    user (groups: its own and `kvm`), and sets `no_new_privs`.
//!
//! All of it happens in the child's own mount namespace, so nothing is mounted on
//! the host and nothing is left to clean up: the namespace goes with the process.
//! Everything that runs after the fork is a raw syscall on data built before it
//! (C strings, numbers), as `pre_exec` requires.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The user VMMs run as unless `BURROW_VMM_USER` names another; made by
/// scripts/install-deps.sh.
pub const DEFAULT_VMM_USER: &str = "burrow-vmm";

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("VMM user {0:?} does not exist (scripts/install-deps.sh creates it)")]
    NoUser(String),
    #[error("VMM user {0:?} is root: it must be an unprivileged user")]
    RootUser(String),
    #[error("jail {path}: {source}")]
    Path {
        path: String,
        source: std::io::Error,
    },
    #[error("jail: {0:?} is not an absolute path without NUL bytes")]
    BadPath(PathBuf),
}

/// The unprivileged identity of a jailed VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (`kvm`, for /dev/kvm).
    pub groups: Vec<u32>,
}

impl VmmUser {
    pub fn lookup(name: &str) -> Result<VmmUser, JailError> {
        let cname = CString::new(name).map_err(|_| JailError::NoUser(name.to_string()))?;
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        // SAFETY: zeroed passwd is a valid out-parameter for getpwnam_r.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the call; buf outlives the use of pw.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pw,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        if rc != 0 || found.is_null() {
            return Err(JailError::NoUser(name.to_string()));
        }
        if pw.pw_uid == 0 || pw.pw_gid == 0 {
            return Err(JailError::RootUser(name.to_string()));
        }
        let mut groups = vec![0 as libc::gid_t; 64];
        let mut n = groups.len() as libc::c_int;
        // SAFETY: groups has room for n entries; n is updated to the count.
        let rc =
            unsafe { libc::getgrouplist(cname.as_ptr(), pw.pw_gid, groups.as_mut_ptr(), &mut n) };
        groups.truncate(if rc < 0 { 0 } else { n.max(0) as usize });
        // Root's group never goes to a VMM, whatever the group file says.
        groups.retain(|g| *g != 0);
        Ok(VmmUser {
            name: name.to_string(),
            uid: pw.pw_uid,
            gid: pw.pw_gid,
            groups,
        })
    }

    /// The user from `BURROW_VMM_USER`, else [`DEFAULT_VMM_USER`].
    pub fn from_env() -> Result<VmmUser, JailError> {
        let name =
            std::env::var("BURROW_VMM_USER").unwrap_or_else(|_| DEFAULT_VMM_USER.to_string());
        VmmUser::lookup(&name)
    }

    /// Whether this user may open `path` for reading and writing, by its owner,
    /// group and mode bits.
    pub fn can_read_write(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(m) = std::fs::metadata(path) else {
            return false;
        };
        let mode = m.mode();
        if m.uid() == self.uid {
            mode & 0o600 == 0o600
        } else if m.gid() == self.gid || self.groups.contains(&m.gid()) {
            mode & 0o060 == 0o060
        } else {
            mode & 0o006 == 0o006
        }
    }

    /// Gives `path` to this user (its sockets' dir, the sockets it connects to).
    pub fn own(&self, path: &Path, mode: u32) -> Result<(), JailError> {
        let err = |source| JailError::Path {
            path: path.display().to_string(),
            source,
        };
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).map_err(err)?;
        std::fs::set_permissions(
            path,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(mode),
        )
        .map_err(err)
    }
}

#[derive(Debug)]
enum Step {
    Mkdir(CString),
    Touch(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    /// A bind mount, then (for read-only ones) its remount with `remount` flags.
    Bind {
        src: CString,
        dst: CString,
        remount: Option<libc::c_ulong>,
    },
}

/// A jail being described, in the parent.
pub struct JailBuilder {
    root: PathBuf,
    made: BTreeSet<PathBuf>,
    /// Paths bound so far: what lies under them is already in the jail.
    bound: BTreeSet<PathBuf>,
    steps: Vec<Step>,
}

/// A jail ready to be entered from `pre_exec`.
#[derive(Debug)]
pub struct Jail {
    root: CString,
    steps: Vec<Step>,
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
    cap_last: libc::c_ulong,
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    if !p.is_absolute() {
        return Err(JailError::BadPath(p.to_path_buf()));
    }
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::BadPath(p.to_path_buf()))
}

impl JailBuilder {
    /// A jail whose root is a tmpfs mounted over `root`, an existing empty dir.
    pub fn new(root: &Path) -> JailBuilder {
        JailBuilder {
            root: root.to_path_buf(),
            made: BTreeSet::new(),
            bound: BTreeSet::new(),
            steps: Vec::new(),
        }
    }

    /// `path` inside the jail, seen from the host before pivot_root.
    fn inside(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }

    fn mkdirs(&mut self, path: &Path) -> Result<(), JailError> {
        let mut cur = PathBuf::from("/");
        for c in path.components().skip(1) {
            cur.push(c);
            if self.made.insert(cur.clone()) {
                self.steps.push(Step::Mkdir(cstr(&self.inside(&cur))?));
            }
        }
        Ok(())
    }

    /// Binds host `path` at the same path in the jail; read-only unless `writable`.
    /// Symlinks are resolved: the jail gets the file they point to.
    pub fn bind(&mut self, path: &Path, writable: bool) -> Result<&mut Self, JailError> {
        let err = |source| JailError::Path {
            path: path.display().to_string(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(err)?;
        let src = std::fs::canonicalize(path).map_err(err)?;
        for at in [path.to_path_buf(), src.clone()] {
            if self.made.contains(&at) || at.ancestors().any(|a| self.bound.contains(a)) {
                continue;
            }
            self.bound.insert(at.clone());
            if let Some(parent) = at.parent() {
                self.mkdirs(parent)?;
            }
            let dst = cstr(&self.inside(&at))?;
            self.made.insert(at.clone());
            if meta.is_dir() {
                self.steps.push(Step::Mkdir(dst.clone()));
            } else {
                self.steps.push(Step::Touch(dst.clone()));
            }
            // Device nodes keep their device semantics; everything else is
            // nosuid,nodev.
            let is_dev = {
                use std::os::unix::fs::FileTypeExt;
                meta.file_type().is_char_device() || meta.file_type().is_block_device()
            };
            let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID;
            if !is_dev {
                flags |= libc::MS_NODEV;
            }
            if !writable {
                flags |= libc::MS_RDONLY;
            }
            self.steps.push(Step::Bind {
                src: cstr(&src)?,
                dst,
                remount: Some(flags),
            });
        }
        Ok(self)
    }

    /// What any dynamically linked binary needs: `/usr` and the `/lib*`, `/bin`,
    /// `/sbin` links into it (or the dirs, on a host without merged /usr), the
    /// loader's cache, and the harmless `/dev` nodes.
    pub fn system(&mut self) -> Result<&mut Self, JailError> {
        self.bind(Path::new("/usr"), false)?;
        for top in ["/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin"] {
            let p = Path::new(top);
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(p).map_err(|source| JailError::Path {
                        path: top.to_string(),
                        source,
                    })?;
                    let link = cstr(&self.inside(p))?;
                    self.made.insert(p.to_path_buf());
                    self.steps.push(Step::Symlink {
                        target: CString::new(target.as_os_str().as_bytes())
                            .map_err(|_| JailError::BadPath(target.clone()))?,
                        link,
                    });
                }
                Ok(m) if m.is_dir() => {
                    self.bind(p, false)?;
                }
                _ => {}
            }
        }
        if Path::new("/etc/ld.so.cache").exists() {
            self.bind(Path::new("/etc/ld.so.cache"), false)?;
        }
        for dev in ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"] {
            self.bind(Path::new(dev), true)?;
        }
        Ok(self)
    }

    pub fn build(self, user: &VmmUser) -> Result<Jail, JailError> {
        let cap_last = cap_last();
        let mut groups = user.groups.clone();
        if groups.is_empty() {
            groups.push(user.gid);
        }
        Ok(Jail {
            root: cstr(&self.root)?,
            steps: self.steps,
            uid: user.uid,
            gid: user.gid,
            groups,
            cap_last,
        })
    }
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Jail {
    /// Enters the jail and drops privileges.
    ///
    /// # Safety
    /// Only raw syscalls on data built before the fork: meant for `pre_exec`.
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: (the whole block) every call is a raw syscall; pointers are either
        // null or NUL-terminated strings owned by self, alive across the call.
        unsafe {
            // The jail's own directories and files are the VMM user's to traverse
            // and read, whatever the daemon's umask (077); what the VMM itself makes
            // later (its sockets) is its alone again.
            libc::umask(0o022);
            check(libc::unshare(
                libc::CLONE_NEWNS
                    | libc::CLONE_NEWNET
                    | libc::CLONE_NEWIPC
                    | libc::CLONE_NEWUTS
                    | libc::CLONE_NEWCGROUP,
            ))?;
            // Nothing done from here on propagates to the host's mounts.
            check(libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"tmpfs".as_ptr(),
                self.root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"mode=0755,size=1m,nr_inodes=4096".as_ptr().cast(),
            ))?;
            for step in &self.steps {
                match step {
                    Step::Mkdir(p) => check(libc::mkdir(p.as_ptr(), 0o755))?,
                    Step::Touch(p) => {
                        let fd = libc::open(
                            p.as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o644,
                        );
                        check(fd)?;
                        libc::close(fd);
                    }
                    Step::Symlink { target, link } => {
                        check(libc::symlink(target.as_ptr(), link.as_ptr()))?
                    }
                    Step::Bind { src, dst, remount } => {
                        check(libc::mount(
                            src.as_ptr(),
                            dst.as_ptr(),
                            null,
                            libc::MS_BIND | libc::MS_REC,
                            std::ptr::null(),
                        ))?;
                        if let Some(flags) = remount {
                            check(libc::mount(
                                null,
                                dst.as_ptr(),
                                null,
                                *flags,
                                std::ptr::null(),
                            ))?;
                        }
                    }
                }
            }
            check(libc::chdir(self.root.as_ptr()))?;
            // pivot_root(".", "."): the old root ends up stacked under the new one
            // and is detached at once; no directory for it is needed.
            check(
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
            )?;
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
            check(libc::chdir(c"/".as_ptr()))?;
            libc::umask(0o077);
            check(libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                std::ptr::null(),
            ))?;
            // No capability can come back: not through exec, not through a setuid
            // file (no_new_privs), not through the bounding set.
            drop_bounding_and_ambient(self.cap_last)?;
            check(libc::setgroups(self.groups.len(), self.groups.as_ptr()))?;
            check(libc::setresgid(self.gid, self.gid, self.gid))?;
            // With every uid non-zero and no SECBIT_KEEP_CAPS, the kernel clears
            // the permitted and effective sets here.
            check(libc::setresuid(self.uid, self.uid, self.uid))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        }
        Ok(())
    }
}

/// Takes every capability away from a process that keeps its uid (root), for
/// helpers that need root's ownership of their files and nothing more.
#[derive(Debug, Clone)]
pub struct NoCapabilities {
    cap_last: libc::c_ulong,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Empties the bounding set (no capability can come back through exec) and the
/// ambient set.
///
/// # Safety
/// Only raw syscalls: meant for `pre_exec`.
unsafe fn drop_bounding_and_ambient(cap_last: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    unsafe {
        for cap in 0..=cap_last {
            check(libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0))?;
        }
        check(libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ))
    }
}

impl Default for NoCapabilities {
    fn default() -> Self {
        NoCapabilities {
            cap_last: cap_last(),
        }
    }
}

impl NoCapabilities {
    /// Empties the bounding, ambient, effective, permitted and inheritable sets and
    /// sets `no_new_privs`.
    ///
    /// # Safety
    /// Only raw syscalls: meant for `pre_exec`.
    pub unsafe fn apply(&self) -> std::io::Result<()> {
        let header = CapHeader {
            // _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set.
            version: 0x2008_0522,
            pid: 0,
        };
        let data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        // SAFETY: (the whole block) raw syscalls; header and data live on this
        // stack frame across the capset call.
        unsafe {
            drop_bounding_and_ambient(self.cap_last)?;
            check(libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as libc::c_int)?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        }
        Ok(())
    }
}

fn cap_last() -> libc::c_ulong {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// The absolute path of `program`: as given if it has a slash, else the first
/// executable of that name on PATH. The jail binds it at that path.
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_keep_their_host_names_inside() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("a/b/file");
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, "x").unwrap();
        let root = t.path().join("jail");
        let mut b = JailBuilder::new(&root);
        b.bind(&f, false).unwrap();
        b.bind(&f, false).unwrap();
        let dsts: Vec<String> = b
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Bind { dst, .. } => Some(dst.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        let inside = root.join(f.strip_prefix("/").unwrap());
        assert_eq!(dsts, vec![inside.display().to_string()], "bound once");
        assert!(
            matches!(b.steps.last(), Some(Step::Bind { remount: Some(fl), .. }) if fl & libc::MS_RDONLY != 0)
        );
    }

    #[test]
    fn device_access_follows_owner_group_and_mode() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("dev");
        std::fs::write(&f, "").unwrap();
        let user = |uid, gid, groups: Vec<u32>| VmmUser {
            name: "u".into(),
            uid,
            gid,
            groups,
        };
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o660)).unwrap();
        // The file is root's (the test runs as root) or the test user's.
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        assert!(user(uid, 12345, vec![]).can_read_write(&f));
        assert!(user(54321, 12345, vec![gid]).can_read_write(&f));
        assert!(!user(54321, 12345, vec![]).can_read_write(&f));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(!user(54321, 12345, vec![gid]).can_read_write(&f));
    }

    #[test]
    fn the_vmm_user_is_never_root() {
        assert!(matches!(
            VmmUser::lookup("root"),
            Err(JailError::RootUser(_))
        ));
        assert!(matches!(
            VmmUser::lookup("no-such-user-burrow"),
            Err(JailError::NoUser(_))
        ));
    }
}
