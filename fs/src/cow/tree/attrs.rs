//! Attributes and extended attributes.

use std::os::unix::fs::PermissionsExt;

use super::*;

impl State {
    /// The path to change for a setattr/xattr write on `ino`, after copy-up.
    pub(super) fn writable_path(&mut self, ino: u64) -> Result<PathBuf, Errno> {
        match &self.node(ino)?.kind {
            Kind::Dir(_) => {
                self.ensure_dir(ino)?;
                self.dir_path(ino)
            }
            Kind::File(f) => {
                self.writable_view(f.view)?;
                self.copy_up(ino)?;
                self.file_path(ino)
            }
            _ => Err(libc::EPERM),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn setattr(
        &mut self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<fuser::TimeOrNow>,
        mtime: Option<fuser::TimeOrNow>,
        fh: Option<u64>,
    ) -> Result<FileAttr, Errno> {
        // After copy-up; an unlinked file still open is changed through its
        // handle (which copy-up moved along with the file).
        let path = self.writable_path(ino);
        let handle = match fh.and_then(|fh| self.handles.get(&fh)) {
            Some(h) => Some(h.file.try_clone().map_err(errno)?),
            None => None,
        };
        let path = match (path, &handle) {
            (Ok(p), _) => Some(p),
            (Err(_), Some(_)) => None,
            (Err(e), None) => return Err(e),
        };
        let is_link = path
            .as_ref()
            .is_some_and(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_symlink()));
        if let Some(mode) = mode.filter(|_| !is_link) {
            let perm = std::fs::Permissions::from_mode(mode & 0o7777);
            match (&handle, &path) {
                (Some(h), _) => h.set_permissions(perm),
                (None, Some(p)) => std::fs::set_permissions(p, perm),
                (None, None) => Ok(()),
            }
            .map_err(errno)?;
        }
        if uid.is_some() || gid.is_some() {
            match (&handle, &path) {
                (Some(h), _) => std::os::unix::fs::fchown(h, uid, gid),
                (None, Some(p)) => std::os::unix::fs::lchown(p, uid, gid),
                (None, None) => Ok(()),
            }
            .map_err(errno)?;
        }
        if let Some(size) = size {
            let v = self.view_of(ino)?;
            let now = |h: &Option<File>, p: &Option<PathBuf>| match (h, p) {
                (Some(h), _) => h.metadata().ok(),
                (None, Some(p)) => std::fs::symlink_metadata(p).ok(),
                (None, None) => None,
            };
            // Growing a file makes a hole, not data: only what truncating
            // allocates or frees is counted.
            let before = now(&handle, &path).map(|m| m.blocks() * 512).unwrap_or(0);
            let done = match (&handle, &path) {
                (Some(h), _) => h.set_len(size),
                (None, Some(p)) => std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .and_then(|f| f.set_len(size)),
                (None, None) => Ok(()),
            }
            .map_err(errno);
            let after = now(&handle, &path).map(|m| m.blocks() * 512).unwrap_or(0);
            self.charge(v, before, after);
            done?;
        }
        if atime.is_some() || mtime.is_some() {
            if let Some(p) = &path {
                set_times(p, atime, mtime)?;
            }
        }
        self.getattr(ino, fh)
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        use std::os::unix::ffi::OsStrExt;
        let target = std::fs::read_link(self.file_path(ino)?).map_err(errno)?;
        Ok(target.as_os_str().as_bytes().to_vec())
    }

    pub(super) fn attr_path(&self, ino: u64) -> Result<PathBuf, Errno> {
        match &self.node(ino)?.kind {
            Kind::Dir(_) => self.dir_path(ino),
            Kind::File(_) => self.file_path(ino),
            _ => Err(libc::ENODATA),
        }
    }

    pub fn getxattr(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>, Errno> {
        let c = xattr_name(name)?;
        layer::get_xattr(&self.attr_path(ino)?, &c).map_err(errno)
    }

    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        match &self.node(ino)?.kind {
            Kind::Dir(_) | Kind::File(_) => {
                layer::list_xattrs(&self.attr_path(ino)?).map_err(errno)
            }
            _ => Ok(Vec::new()),
        }
    }

    pub fn setxattr(
        &mut self,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
    ) -> Result<(), Errno> {
        let c = xattr_name(name)?;
        let path = self.writable_path(ino)?;
        layer::set_xattr(&path, &c, value, flags).map_err(errno)
    }

    pub fn removexattr(&mut self, ino: u64, name: &OsStr) -> Result<(), Errno> {
        let c = xattr_name(name)?;
        let path = self.writable_path(ino)?;
        layer::remove_xattr(&path, &c).map_err(errno)
    }

    pub fn statfs(&self, ino: u64) -> Result<libc::statvfs, Errno> {
        let path = match self.view_of(ino) {
            Ok(v) => {
                let view = self.view(v)?;
                view.layers[view.top()].clone()
            }
            Err(_) => self.catalog.layer_path("layers"),
        };
        let c = layer::cpath(&path).map_err(errno)?;
        // SAFETY: statvfs writes into the zeroed struct we own.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above; the path is NUL-terminated.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } < 0 {
            return Err(errno(io::Error::last_os_error()));
        }
        // A limited volume shows its limit as its size (df in the guest).
        let view = self.view_of(ino).ok().and_then(|v| self.view(v).ok());
        if let (Some(view), true) = (view, st.f_frsize > 0) {
            if let Some(limit) = view.limit {
                let unit = st.f_frsize;
                let free = limit.saturating_sub(view.used) / unit;
                st.f_blocks = limit / unit;
                st.f_bfree = st.f_bfree.min(free);
                st.f_bavail = st.f_bavail.min(free);
            }
        }
        Ok(st)
    }
}

fn xattr_name(name: &OsStr) -> Result<std::ffi::CString, Errno> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(name.as_bytes()).map_err(|_| libc::EINVAL)
}

fn set_times(
    path: &Path,
    atime: Option<fuser::TimeOrNow>,
    mtime: Option<fuser::TimeOrNow>,
) -> Result<(), Errno> {
    let spec = |t: Option<fuser::TimeOrNow>| match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(fuser::TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(fuser::TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: d.subsec_nanos() as i64,
            },
            Err(e) => libc::timespec {
                tv_sec: -(e.duration().as_secs() as i64),
                tv_nsec: 0,
            },
        },
    };
    let times = [spec(atime), spec(mtime)];
    let c = layer::cpath(path).map_err(errno)?;
    // SAFETY: utimensat with a NUL-terminated path and two timespecs.
    if unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } < 0
    {
        return Err(errno(io::Error::last_os_error()));
    }
    Ok(())
}
