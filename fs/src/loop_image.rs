//! A Btrfs file system in a sparse image file, loop-mounted: how a host whose state
//! dir is not on Btrfs still gets O(1) snapshots (as root).
//!
//! `mkfs.btrfs` has no library, and `mount -o loop` sets up and (on unmount)
//! releases the loop device in one step; both are run as commands and nothing of
//! their output is parsed.

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
            return Ok(me);
        }
        std::fs::create_dir_all(mountpoint).map_err(|e| StoreError::io("create", mountpoint, e))?;
        if !image.exists() {
            // Made under a temporary name and renamed, so a crash never leaves an
            // image without a file system that a later start would try to mount.
            let tmp = image.with_extension("partial");
            let f = std::fs::File::create(&tmp).map_err(|e| StoreError::io("create", &tmp, e))?;
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
        run(
            Command::new("mount")
                .args(["-t", "btrfs", "-o", "loop,noatime"])
                .arg(image)
                .arg(mountpoint),
            "mount",
            mountpoint,
        )?;
        Ok(me)
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
