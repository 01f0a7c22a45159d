//! A Btrfs file system in a sparse image file, loop-mounted: how a host whose state
//! dir is not on Btrfs still gets O(1) snapshots (as root).
//!
//! `mkfs.btrfs` has no library, and `mount -o loop` sets up and (on unmount)
//! releases the loop device in one step; both are run as commands and nothing of
//! their output is parsed.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::StoreError;

/// A mounted Btrfs image. Dropping it does not unmount: the mount belongs to the
/// state dir and outlives the process; [`BtrfsImage::unmount`] ends it.
#[derive(Debug)]
pub struct BtrfsImage {
    pub image: PathBuf,
    pub mountpoint: PathBuf,
}

impl BtrfsImage {
    /// Mounts `image` on `mountpoint`, first making a sparse image of `size` bytes
    /// with a new Btrfs in it if there is none. Already mounted is fine.
    pub fn ensure(image: &Path, mountpoint: &Path, size: u64) -> Result<BtrfsImage, StoreError> {
        let me = BtrfsImage {
            image: image.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
        };
        if me.is_mounted() {
            // Mounted by an older build, perhaps without nosuid,nodev.
            me.restrict()?;
            return Ok(me);
        }
        crate::private_dir(mountpoint)?;
        if !image.exists() {
            // Made under a temporary name and renamed, so a crash never leaves an
            // image without a file system that a later start would try to mount.
            let tmp = image.with_extension("partial");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(crate::PRIVATE_FILE_MODE)
                .open(&tmp)
                .map_err(|e| StoreError::io("create", &tmp, e))?;
            f.set_len(size)
                .map_err(|e| StoreError::io("size", &tmp, e))?;
            drop(f);
            run(
                Command::new("mkfs.btrfs").arg("-q").arg("-f").arg(&tmp),
                "mkfs.btrfs",
                &tmp,
            )?;
            std::fs::rename(&tmp, image).map_err(|e| StoreError::io("rename", image, e))?;
        }
        // The image holds guests' files: whatever its mode was (an older build
        // followed the umask), only root reads or writes it.
        std::fs::set_permissions(
            image,
            std::fs::Permissions::from_mode(crate::PRIVATE_FILE_MODE),
        )
        .map_err(|e| StoreError::io("chmod", image, e))?;
        // nosuid,nodev: a guest is root in its volume and may make setuid-root
        // files and device nodes there; on the host they must stay inert.
        run(
            Command::new("mount")
                .args(["-t", "btrfs", "-o", MOUNT_OPTIONS])
                .arg(image)
                .arg(mountpoint),
            "mount",
            mountpoint,
        )?;
        // The mountpoint now shows the file system's root, which mkfs made 0755.
        crate::private_dir(mountpoint)?;
        Ok(me)
    }

    /// Makes an existing mount nosuid,nodev and its root 0700.
    fn restrict(&self) -> Result<(), StoreError> {
        remount_nosuid_nodev(&self.mountpoint)?;
        crate::private_dir(&self.mountpoint)
    }

    pub fn is_mounted(&self) -> bool {
        is_mountpoint(&self.mountpoint)
    }

    /// Unmounts; the loop device goes with it.
    pub fn unmount(&self) -> Result<(), StoreError> {
        if !self.is_mounted() {
            return Ok(());
        }
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(self.mountpoint.as_os_str().as_bytes())
            .map_err(|e| StoreError::io("unmount", &self.mountpoint, std::io::Error::other(e)))?;
        // SAFETY: umount2 with a NUL-terminated path and no flags.
        if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
            return Err(StoreError::io(
                "unmount",
                &self.mountpoint,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

/// Makes the mount at `path` nosuid,nodev if it is not, keeping its other
/// per-mount flags.
pub(crate) fn remount_nosuid_nodev(path: &Path) -> Result<(), StoreError> {
    let flags = mount_flags(path)?;
    let wanted = libc::ST_NOSUID | libc::ST_NODEV;
    if flags & wanted == wanted {
        return Ok(());
    }
    // A bind remount changes only the per-mount flags; the ones it keeps
    // (read-only, noatime, noexec) must be named again or they are lost.
    let mut ms = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV;
    for (st, m) in [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
    ] {
        if flags & st != 0 {
            ms |= m;
        }
    }
    mount(None, path, ms, "remount nosuid,nodev")
}

/// Bind-mounts `dir` on itself, nosuid,nodev (unless it is a mount already,
/// which is then made so): files below stay where they are but lose the power
/// of their setuid bits and device numbers.
pub(crate) fn seal_dir(dir: &Path) -> Result<(), StoreError> {
    if !is_mountpoint(dir) {
        mount(Some(dir), dir, libc::MS_BIND, "bind-mount")?;
    }
    remount_nosuid_nodev(dir)
}

/// Lazily unmounts what [`seal_dir`] mounted.
pub(crate) fn unseal_dir(dir: &Path) -> Result<(), StoreError> {
    if !is_mountpoint(dir) {
        return Ok(());
    }
    let c = cpath(dir)?;
    // SAFETY: umount2 with a NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(StoreError::io(
            "unmount",
            dir,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    flags: libc::c_ulong,
    op: &'static str,
) -> Result<(), StoreError> {
    let t = cpath(target)?;
    let s = source.map(cpath).transpose()?;
    // SAFETY: mount(2) with NUL-terminated paths (or null where the call
    // takes none); no file system type or data.
    let r = unsafe {
        libc::mount(
            s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            t.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(StoreError::io(op, target, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Options of the loop mount: see [`BtrfsImage::ensure`].
pub const MOUNT_OPTIONS: &str = "loop,noatime,nosuid,nodev";

fn cpath(path: &Path) -> Result<std::ffi::CString, StoreError> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| StoreError::io("path", path, std::io::Error::other(e)))
}

/// The `ST_*` flags of the mount `path` is on (statvfs's `f_flag`).
pub fn mount_flags(path: &Path) -> Result<u64, StoreError> {
    let c = cpath(path)?;
    // SAFETY: statvfs writes into the zeroed struct we own.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the path is NUL-terminated.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(StoreError::io(
            "statvfs",
            path,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(st.f_flag)
}

fn run(cmd: &mut Command, what: &'static str, path: &Path) -> Result<(), StoreError> {
    let out = cmd.output().map_err(|e| StoreError::io(what, path, e))?;
    if out.status.success() {
        return Ok(());
    }
    let msg = String::from_utf8_lossy(&out.stderr);
    let first = msg
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("failed")
        .to_string();
    Err(StoreError::io(what, path, std::io::Error::other(first)))
}

/// Whether `path` is a mount point, from /proc/self/mountinfo (field 5).
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(abs) = std::path::absolute(path) else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = abs.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}
