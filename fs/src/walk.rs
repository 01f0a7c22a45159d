//! Walking a guest-made tree: by directory fds (openat, fstatat, readdir), so
//! no path is ever longer than one name and a tree deeper than PATH_MAX is
//! walked whole; names stay bytes, never converted to UTF-8.
//!
//! Symlinks are not followed; directories on other file systems (nested
//! subvolumes, mounts) are reported but not entered.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// One entry met by [`walk_tree`].
pub struct WalkEntry<'a> {
    /// The path from the walk's root, `/`-separated and starting with `/`.
    pub path: &'a [u8],
    /// The entry's own name.
    pub name: &'a CStr,
    /// The directory holding it, for `*at` calls on the entry.
    pub dir: BorrowedFd<'a>,
    pub stat: &'a libc::stat,
}

impl WalkEntry<'_> {
    pub fn is_dir(&self) -> bool {
        self.stat.st_mode & libc::S_IFMT == libc::S_IFDIR
    }

    pub fn is_file(&self) -> bool {
        self.stat.st_mode & libc::S_IFMT == libc::S_IFREG
    }

    pub fn is_symlink(&self) -> bool {
        self.stat.st_mode & libc::S_IFMT == libc::S_IFLNK
    }

    /// A symlink's target, as bytes.
    pub fn link_target(&self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
        // SAFETY: readlinkat writes at most buf.len() bytes into buf; the name is
        // NUL-terminated and the dir fd is open for the entry's lifetime.
        let n = unsafe {
            libc::readlinkat(
                self.dir.as_raw_fd(),
                self.name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// Opens the entry (a regular file) for reading, never following a link.
    pub fn open(&self) -> io::Result<std::fs::File> {
        let fd = openat(
            self.dir,
            self.name,
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
        )?;
        Ok(std::fs::File::from(fd))
    }
}

fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: openat with an open dir fd and a NUL-terminated name.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The names in directory `dir` (not `.` and `..`).
fn names(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    // fdopendir takes the fd over: give it a duplicate.
    let dup = dir.try_clone()?;
    // SAFETY: fdopendir on an fd we own; on success the DIR owns it.
    let d = unsafe { libc::fdopendir(dup.as_raw_fd()) };
    if d.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(dup);
    // Read from the start even if the fd was read before.
    // SAFETY: d is a valid DIR.
    unsafe { libc::rewinddir(d) };
    let mut out = Vec::new();
    loop {
        // SAFETY: d is a valid DIR; readdir's entry lives until the next call.
        let e = unsafe { libc::readdir(d) };
        if e.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated within the entry.
        let name = unsafe { CStr::from_ptr((*e).d_name.as_ptr()) };
        let b = name.to_bytes();
        if b != b"." && b != b".." {
            out.push(name.to_owned());
        }
    }
    // SAFETY: closes the DIR and the duplicate fd it owns.
    unsafe { libc::closedir(d) };
    Ok(out)
}

fn fstatat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: a zeroed stat is valid; fstatat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: open dir fd, NUL-terminated name, a stat we own.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

struct Frame {
    fd: OwnedFd,
    names: Vec<CString>,
    next: usize,
    /// Length of the walk's path buffer at this directory.
    prefix: usize,
}

/// Calls `visit` for every entry under `root` (not `root` itself), parents
/// before their children. Entries that vanish mid-walk are skipped; a
/// directory that cannot be opened is reported but not entered. One fd is
/// open per level of depth.
pub fn walk_tree(root: &Path, visit: &mut dyn FnMut(&WalkEntry<'_>)) -> io::Result<()> {
    let c = CString::new(root.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: open with a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let dev = {
        // SAFETY: a zeroed stat is valid; fstat fills it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat on an open fd into a stat we own.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        st.st_dev
    };
    let mut path: Vec<u8> = Vec::new();
    let mut stack = vec![Frame {
        names: names(&fd)?,
        fd,
        next: 0,
        prefix: 0,
    }];
    while let Some(top) = stack.last_mut() {
        let Some(name) = top.names.get(top.next).cloned() else {
            stack.pop();
            continue;
        };
        top.next += 1;
        path.truncate(top.prefix);
        path.push(b'/');
        path.extend_from_slice(name.to_bytes());
        let dir = top.fd.as_fd();
        let Ok(st) = fstatat(dir, &name) else {
            continue;
        };
        let entry = WalkEntry {
            path: &path,
            name: &name,
            dir,
            stat: &st,
        };
        visit(&entry);
        if entry.is_dir() && st.st_dev == dev {
            let Ok(sub) = openat(
                dir,
                &name,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            ) else {
                continue;
            };
            let Ok(list) = names(&sub) else { continue };
            let prefix = path.len();
            stack.push(Frame {
                fd: sub,
                names: list,
                next: 0,
                prefix,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_deeper_than_path_max_and_keeps_byte_names() {
        let t = tempfile::tempdir().unwrap();
        // Built with relative mkdirs from an fd-held directory: the full path
        // is far over PATH_MAX.
        let name = "d".repeat(200);
        let mut cur = std::fs::File::open(t.path()).unwrap();
        for _ in 0..30 {
            let c = CString::new(name.as_str()).unwrap();
            // SAFETY: mkdirat/openat with open fds and NUL-terminated names.
            unsafe {
                assert_eq!(libc::mkdirat(cur.as_raw_fd(), c.as_ptr(), 0o755), 0);
                let fd = libc::openat(cur.as_raw_fd(), c.as_ptr(), libc::O_RDONLY);
                assert!(fd >= 0);
                cur = std::fs::File::from_raw_fd(fd);
            }
        }
        let leaf = CString::new("leaf").unwrap();
        // SAFETY: as above.
        let fd = unsafe {
            libc::openat(
                cur.as_raw_fd(),
                leaf.as_ptr(),
                libc::O_CREAT | libc::O_WRONLY,
                0o644,
            )
        };
        assert!(fd >= 0);
        // SAFETY: closing the fd just opened.
        unsafe { libc::close(fd) };
        for n in [&b"a\xff"[..], &b"a\xfe"[..]] {
            std::fs::write(t.path().join(std::ffi::OsStr::from_bytes(n)), "x").unwrap();
        }
        let mut seen: Vec<Vec<u8>> = Vec::new();
        walk_tree(t.path(), &mut |e| seen.push(e.path.to_vec())).unwrap();
        assert!(seen.contains(&b"/a\xff".to_vec()));
        assert!(seen.contains(&b"/a\xfe".to_vec()));
        let deepest = seen.iter().map(|p| p.len()).max().unwrap();
        assert!(deepest > 4096 + 1000, "{deepest}");
        assert!(seen.iter().any(|p| p.ends_with(b"/leaf")));
    }
}
