//! The on-disk format of a layer, and copying one entry up from a lower layer.
//!
//! A layer is a plain directory tree holding what changed in it relative to the
//! layers below, in the format overlay file systems use without privileges:
//! - `.wh.<name>`: a whiteout, an empty file saying `<name>` is deleted here;
//! - `.wh..wh..opq` in a directory: the directory is opaque, nothing below it
//!   shows through;
//! - `.burrow-index/<layer>-<inode>` at the layer's root: the copy of a file that
//!   has several hard links, made when one of its names was written; every name of
//!   that inode in `<layer>` resolves to it, so hard links stay one file across
//!   copy-ups and snapshots;
//! - `.burrow-work/` at the layer's root: scratch for copies, so that an entry
//!   appears under its name only whole (a rename).
//!
//! Whiteout files and markers are ordinary files, so a user who cannot `mknod` can
//! write them and any file system can hold them.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) const WHITEOUT_PREFIX: &[u8] = b".wh.";
pub(crate) const OPAQUE: &str = ".wh..wh..opq";
pub(crate) const INDEX_DIR: &str = ".burrow-index";
pub(crate) const WORK_DIR: &str = ".burrow-work";

/// `.wh.<name>`.
pub(crate) fn whiteout(name: &OsStr) -> OsString {
    let mut v = WHITEOUT_PREFIX.to_vec();
    v.extend_from_slice(name.as_bytes());
    OsString::from_vec(v)
}

/// Names the layer format uses itself, which the merged view neither shows nor
/// lets anyone create: whiteouts anywhere, the index and work dirs at the root.
pub(crate) fn is_reserved(name: &OsStr, at_root: bool) -> bool {
    name.as_bytes().starts_with(WHITEOUT_PREFIX)
        || (at_root && (name == INDEX_DIR || name == WORK_DIR))
}

/// What a name read from a layer directory stands for.
pub(crate) enum Listed<'a> {
    /// A name the merged view shows (unless a layer above hides it).
    Shown,
    /// A whiteout: this name is deleted for the layers below.
    Deleted(&'a OsStr),
    /// The layer format's own bookkeeping.
    Bookkeeping,
}

pub(crate) fn classify(name: &OsStr, at_root: bool) -> Listed<'_> {
    if name == OPAQUE {
        Listed::Bookkeeping
    } else if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX) {
        Listed::Deleted(OsStr::from_bytes(hidden))
    } else if at_root && (name == INDEX_DIR || name == WORK_DIR) {
        Listed::Bookkeeping
    } else {
        Listed::Shown
    }
}

pub(crate) fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A fresh name in `layer`'s work dir for an entry being assembled.
pub(crate) fn work_path(layer: &Path) -> io::Result<std::path::PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = layer.join(WORK_DIR);
    std::fs::create_dir_all(&dir)?;
    Ok(dir.join(format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )))
}

/// Writes an empty file at `path` (a whiteout or the opaque marker).
pub(crate) fn mark(path: &Path) -> io::Result<()> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// Removes `path` if it is there.
pub(crate) fn unmark(path: &Path) -> io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

pub(crate) fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Makes `dst` (which must not exist) a copy of `src` of the same type: data
/// (sparse files stay sparse; reflinked where the file system can), owner, mode,
/// extended attributes and times. A directory is copied without its entries.
pub(crate) fn copy_entry(src: &Path, dst: &Path) -> io::Result<()> {
    let m = std::fs::symlink_metadata(src)?;
    let ft = m.file_type();
    if ft.is_file() {
        copy_file(src, dst, &m)?;
    } else if ft.is_dir() {
        std::fs::create_dir(dst)?;
    } else if ft.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(src)?, dst)?;
    } else {
        let c = cpath(dst)?;
        // SAFETY: mknod with a NUL-terminated path; the type bits come from lstat.
        check(unsafe { libc::mknod(c.as_ptr(), m.mode(), m.rdev()) })?;
    }
    copy_attrs(src, dst, &m)
}

fn copy_file(src: &Path, dst: &Path, m: &std::fs::Metadata) -> io::Result<()> {
    let from = std::fs::File::open(src)?;
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)?;
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: FICLONE takes the source fd as its argument; both fds are open.
    if unsafe { libc::ioctl(to.as_raw_fd(), FICLONE, from.as_raw_fd()) } == 0 {
        return Ok(());
    }
    copy_data(&from, &to, m.len())?;
    to.set_len(m.len())
}

/// Copies the data extents of `from` into `to` at the same offsets, skipping holes.
pub(crate) fn copy_data(from: &std::fs::File, to: &std::fs::File, len: u64) -> io::Result<()> {
    let (src, dst) = (from.as_raw_fd(), to.as_raw_fd());
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on an open fd.
        let data = unsafe { libc::lseek(src, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let want = (hole - off_in).min(1 << 30) as usize;
            // SAFETY: both fds are open; the offsets are ours.
            let n = unsafe { libc::copy_file_range(src, &mut off_in, dst, &mut off_out, want, 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                break;
            }
        }
        pos = hole;
    }
    Ok(())
}

/// Owner, mode, extended attributes and times of `src` onto `dst`. The owner is
/// kept where the process may set it (as root); as another user the copy is
/// theirs, which is what they could have made anyway.
pub(crate) fn copy_attrs(src: &Path, dst: &Path, m: &std::fs::Metadata) -> io::Result<()> {
    let c = cpath(dst)?;
    // SAFETY: lchown with a NUL-terminated path.
    let _ = unsafe { libc::lchown(c.as_ptr(), m.uid(), m.gid()) };
    if !m.file_type().is_symlink() {
        // After chown, which clears set-id bits.
        // SAFETY: chmod with a NUL-terminated path.
        check(unsafe { libc::chmod(c.as_ptr(), m.mode() & 0o7777) })?;
    }
    copy_xattrs(src, dst)?;
    set_times(dst, m)
}

fn set_times(dst: &Path, m: &std::fs::Metadata) -> io::Result<()> {
    let c = cpath(dst)?;
    let times = [
        libc::timespec {
            tv_sec: m.atime(),
            tv_nsec: m.atime_nsec(),
        },
        libc::timespec {
            tv_sec: m.mtime(),
            tv_nsec: m.mtime_nsec(),
        },
    ];
    // SAFETY: utimensat with a NUL-terminated path and two timespecs.
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

fn copy_xattrs(src: &Path, dst: &Path) -> io::Result<()> {
    let names = list_xattrs(src)?;
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        if let Ok(value) = get_xattr(src, &cname) {
            // Namespaces this process may not write (trusted.* as a user) are
            // skipped: the copy is as faithful as the user could make it.
            let _ = set_xattr(dst, &cname, &value, 0);
        }
    }
    Ok(())
}

/// The raw `llistxattr` list of `path`: names, each NUL-terminated.
pub(crate) fn list_xattrs(path: &Path) -> io::Result<Vec<u8>> {
    let c = cpath(path)?;
    loop {
        // SAFETY: a size query with a null buffer.
        let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOTSUP) => Ok(Vec::new()),
                _ => Err(e),
            };
        }
        let mut buf = vec![0u8; n as usize];
        // SAFETY: the buffer holds buf.len() bytes.
        let got = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) {
            return Err(io::Error::last_os_error());
        }
    }
}

pub(crate) fn get_xattr(path: &Path, name: &CString) -> io::Result<Vec<u8>> {
    let c = cpath(path)?;
    loop {
        // SAFETY: a size query with a null buffer.
        let n = unsafe { libc::lgetxattr(c.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; n as usize];
        // SAFETY: the buffer holds buf.len() bytes.
        let got = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) {
            return Err(io::Error::last_os_error());
        }
    }
}

pub(crate) fn set_xattr(path: &Path, name: &CString, value: &[u8], flags: i32) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: value points to value.len() readable bytes.
    check(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

pub(crate) fn remove_xattr(path: &Path, name: &CString) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: NUL-terminated path and name.
    check(unsafe { libc::lremovexattr(c.as_ptr(), name.as_ptr()) })
}

/// `chown` without following a final symlink; `None` keeps that id.
pub(crate) fn lchown(path: &Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: lchown with a NUL-terminated path; u32::MAX is "unchanged".
    check(unsafe { libc::lchown(c.as_ptr(), uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX)) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn reserved_names() {
        assert!(is_reserved(OsStr::new(".wh.x"), false));
        assert!(is_reserved(OsStr::new(OPAQUE), false));
        assert!(is_reserved(OsStr::new(INDEX_DIR), true));
        assert!(!is_reserved(OsStr::new(INDEX_DIR), false));
        assert!(!is_reserved(OsStr::new(".whx"), true));
        assert_eq!(whiteout(OsStr::new("a")), OsString::from(".wh.a"));
    }

    #[test]
    fn copy_keeps_holes_mode_and_times() -> io::Result<()> {
        let t = tempfile::tempdir()?;
        let src = t.path().join("sparse");
        let mut f = std::fs::File::create(&src)?;
        f.write_all(b"head")?;
        f.set_len(64 << 20)?;
        f.seek(SeekFrom::End(-4))?;
        f.write_all(b"tail")?;
        drop(f);
        std::fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o751))?;
        let dst = t.path().join("copy");
        copy_entry(&src, &dst)?;
        let (a, b) = (std::fs::metadata(&src)?, std::fs::metadata(&dst)?);
        assert_eq!(b.len(), 64 << 20);
        assert_eq!(b.mode() & 0o7777, 0o751);
        assert_eq!(b.mtime(), a.mtime());
        assert!(
            b.blocks() < 1024,
            "holes were filled: {} blocks",
            b.blocks()
        );
        let data = std::fs::read(&dst)?;
        assert_eq!(
            (&data[..4], &data[data.len() - 4..]),
            (&b"head"[..], &b"tail"[..])
        );
        std::os::unix::fs::symlink("target", t.path().join("l"))?;
        copy_entry(&t.path().join("l"), &t.path().join("l2"))?;
        assert_eq!(
            std::fs::read_link(t.path().join("l2"))?,
            Path::new("target")
        );
        Ok(())
    }
}
