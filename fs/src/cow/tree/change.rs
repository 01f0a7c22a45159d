//! Changing the tree: making, linking, removing and renaming entries.

use super::*;

impl State {
    /// Checks that `name` may be made in `parent`, makes `parent` exist in the
    /// upper layer and clears a whiteout there. Returns the new entry's path and
    /// whether a whiteout was cleared (a new directory must then be opaque).
    pub(super) fn prepare_new(
        &mut self,
        parent: u64,
        name: &OsStr,
    ) -> Result<(PathBuf, bool), Errno> {
        let d = self.dir(parent)?;
        self.writable_view(d.view)?;
        if is_reserved(name, d.root) {
            return Err(libc::EPERM);
        }
        if self.find(parent, name, false)?.is_some() {
            return Err(libc::EEXIST);
        }
        self.ensure_dir(parent)?;
        let dir = self.dir_path(parent)?;
        let cleared = layer::unmark(&dir.join(whiteout(name))).map_err(errno)?;
        Ok((dir.join(name), cleared))
    }

    /// Gives a new entry its creator as owner (as root; a user's files are theirs
    /// anyway), with the group of a set-group-ID parent directory.
    pub(super) fn own(&self, path: &Path, parent: u64, uid: u32, gid: u32) -> Result<(), Errno> {
        if !self.as_root {
            return Ok(());
        }
        let pm = std::fs::metadata(self.dir_path(parent)?).map_err(errno)?;
        let gid = if pm.mode() & libc::S_ISGID != 0 {
            pm.gid()
        } else {
            gid
        };
        layer::lchown(path, Some(uid), Some(gid)).map_err(errno)
    }

    pub(super) fn add_new(
        &mut self,
        parent: u64,
        name: &OsStr,
        is_dir: bool,
    ) -> Result<u64, Errno> {
        let d = self.dir(parent)?;
        let v = d.view;
        let top = self.view(v)?.top();
        let key = (parent, name.to_os_string());
        let ino = if is_dir {
            self.insert(Kind::Dir(Dir {
                view: v,
                parent,
                name: name.to_os_string(),
                layers: vec![top],
                root: false,
                gone: false,
            }))
        } else {
            self.insert(Kind::File(FileNode {
                view: v,
                names: vec![key.clone()],
                layer: top,
                index: None,
                handles: Vec::new(),
                real: None,
            }))
        };
        self.dentries.insert(key, ino);
        if !is_dir {
            self.note_inode(ino);
        }
        Ok(ino)
    }

    pub(super) fn entry_attr(&mut self, ino: u64) -> Result<FileAttr, Errno> {
        let attr = self.getattr(ino, None)?;
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.lookups += 1;
        }
        Ok(attr)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &mut self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        uid: u32,
        gid: u32,
    ) -> Result<FileAttr, Errno> {
        let (path, _) = self.prepare_new(parent, name)?;
        let c = layer::cpath(&path).map_err(errno)?;
        // SAFETY: mknod with a NUL-terminated path.
        if unsafe { libc::mknod(c.as_ptr(), mode, rdev as libc::dev_t) } < 0 {
            return Err(errno(io::Error::last_os_error()));
        }
        self.own(&path, parent, uid, gid)?;
        let ino = self.add_new(parent, name, false)?;
        self.entry_attr(ino)
    }

    pub fn mkdir(
        &mut self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<FileAttr, Errno> {
        let (path, cleared) = self.prepare_new(parent, name)?;
        let pm = std::fs::metadata(self.dir_path(parent)?).map_err(errno)?;
        let mut mode = mode & 0o7777;
        if pm.mode() & libc::S_ISGID != 0 {
            mode |= libc::S_ISGID;
        }
        let c = layer::cpath(&path).map_err(errno)?;
        // SAFETY: mkdir with a NUL-terminated path.
        if unsafe { libc::mkdir(c.as_ptr(), mode) } < 0 {
            return Err(errno(io::Error::last_os_error()));
        }
        if cleared {
            layer::mark(&path.join(OPAQUE)).map_err(errno)?;
        }
        self.own(&path, parent, uid, gid)?;
        let ino = self.add_new(parent, name, true)?;
        self.entry_attr(ino)
    }

    pub fn symlink(
        &mut self,
        parent: u64,
        name: &OsStr,
        target: &Path,
        uid: u32,
        gid: u32,
    ) -> Result<FileAttr, Errno> {
        let (path, _) = self.prepare_new(parent, name)?;
        std::os::unix::fs::symlink(target, &path).map_err(errno)?;
        self.own(&path, parent, uid, gid)?;
        let ino = self.add_new(parent, name, false)?;
        self.entry_attr(ino)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        uid: u32,
        gid: u32,
    ) -> Result<(FileAttr, u64), Errno> {
        let (path, _) = self.prepare_new(parent, name)?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode & 0o7777)
            .open(&path)
            .map_err(errno)?;
        self.own(&path, parent, uid, gid)?;
        let ino = self.add_new(parent, name, false)?;
        let fh = self.open(ino, flags)?;
        Ok((self.entry_attr(ino)?, fh))
    }

    pub fn link(&mut self, ino: u64, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        if self.file(ino)?.view != self.dir(parent)?.view {
            return Err(libc::EXDEV);
        }
        if self.file(ino)?.names.is_empty() {
            return Err(libc::ENOENT);
        }
        let (path, _) = self.prepare_new(parent, name)?;
        self.copy_up(ino)?;
        std::fs::hard_link(self.file_path(ino)?, &path).map_err(errno)?;
        let key = (parent, name.to_os_string());
        self.file_mut(ino)?.names.push(key.clone());
        self.dentries.insert(key, ino);
        self.entry_attr(ino)
    }

    /// Whether `name` shows through from below the upper layer of `parent`: then
    /// removing it needs a whiteout.
    pub(super) fn shows_below(&self, parent: u64, name: &OsStr) -> Result<bool, Errno> {
        Ok(self.find(parent, name, true)?.is_some())
    }

    pub fn unlink(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        self.writable_view(self.dir(parent)?.view)?;
        match self.find(parent, name, false)? {
            None => return Err(libc::ENOENT),
            Some(Found::Dir(_)) => return Err(libc::EISDIR),
            Some(Found::File { .. }) => {}
        }
        let below = self.shows_below(parent, name)?;
        self.ensure_dir(parent)?;
        let path = self.dir_path(parent)?.join(name);
        if layer::exists(&path) {
            // The last name of an upper-layer file gives its bytes back (once
            // its open handles close, but counted now: the guest let it go).
            let freed = std::fs::symlink_metadata(&path)
                .ok()
                .filter(|m| m.nlink() == 1)
                .map(|m| m.blocks() * 512)
                .unwrap_or(0);
            std::fs::remove_file(&path).map_err(errno)?;
            let v = self.dir(parent)?.view;
            self.charge(v, freed, 0);
        }
        if below {
            layer::mark(&self.dir_path(parent)?.join(whiteout(name))).map_err(errno)?;
        }
        self.forget_name(parent, name);
        Ok(())
    }

    pub fn rmdir(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        self.writable_view(self.dir(parent)?.view)?;
        let ino = self.tree_child(parent, name)?;
        self.dir(ino)
            .map_err(|e| if e == libc::EISDIR { libc::ENOTDIR } else { e })?;
        if !self.list(ino)?.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        let below = self.shows_below(parent, name)?;
        self.ensure_dir(parent)?;
        let path = self.dir_path(parent)?.join(name);
        if layer::exists(&path) {
            // Holds at most whiteouts and the opaque marker.
            std::fs::remove_dir_all(&path).map_err(errno)?;
        }
        if below {
            layer::mark(&self.dir_path(parent)?.join(whiteout(name))).map_err(errno)?;
        }
        self.forget_name(parent, name);
        Ok(())
    }

    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: u32,
    ) -> Result<(), Errno> {
        let v = self.dir(parent)?.view;
        if self.dir(new_parent)?.view != v {
            return Err(libc::EXDEV);
        }
        self.writable_view(v)?;
        if flags & !(libc::RENAME_NOREPLACE) != 0 {
            return Err(libc::EINVAL);
        }
        if is_reserved(new_name, self.dir(new_parent)?.root) {
            return Err(libc::EPERM);
        }
        let src = self.tree_child(parent, name)?;
        let dst = match self.tree_child(new_parent, new_name) {
            Ok(d) => Some(d),
            Err(libc::ENOENT) => None,
            Err(e) => return Err(e),
        };
        if dst == Some(src) {
            return Ok(()); // two names of one inode: rename does nothing
        }
        let src_is_dir = matches!(self.node(src)?.kind, Kind::Dir(_));
        if let Some(d) = dst {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(libc::EEXIST);
            }
            match (&self.node(d)?.kind, src_is_dir) {
                (Kind::Dir(_), false) => return Err(libc::EISDIR),
                (Kind::File(_), true) => return Err(libc::ENOTDIR),
                (Kind::Dir(_), true) if !self.list(d)?.is_empty() => return Err(libc::ENOTEMPTY),
                _ => {}
            }
            if src_is_dir && self.is_under(d, src) {
                return Err(libc::EINVAL);
            }
        }
        if src_is_dir && (new_parent == src || self.is_under(new_parent, src)) {
            return Err(libc::EINVAL);
        }
        let below = self.shows_below(parent, name)?;
        // The source, whole, under its old name in the upper layer.
        if src_is_dir {
            self.materialize(src)?;
        } else {
            self.copy_up(src)?;
            self.ensure_dir(parent)?;
            let at = self.dir_path(parent)?.join(name);
            if !layer::exists(&at) {
                std::fs::hard_link(self.file_path(src)?, &at).map_err(errno)?;
            }
        }
        self.ensure_dir(new_parent)?;
        let from = self.dir_path(parent)?.join(name);
        let to_dir = self.dir_path(new_parent)?;
        let to = to_dir.join(new_name);
        if src_is_dir && layer::exists(&to) {
            // An empty (merged) directory: at most whiteouts and a marker.
            std::fs::remove_dir_all(&to).map_err(errno)?;
        }
        layer::unmark(&to_dir.join(whiteout(new_name))).map_err(errno)?;
        std::fs::rename(&from, &to).map_err(errno)?;
        if src_is_dir && dst.is_some() {
            // It replaces a directory that may show through from below.
            layer::mark(&to.join(OPAQUE)).map_err(errno)?;
        }
        if below {
            layer::mark(&self.dir_path(parent)?.join(whiteout(name))).map_err(errno)?;
        }
        // The nodes follow.
        self.forget_name(new_parent, new_name);
        let old = (parent, name.to_os_string());
        let new = (new_parent, new_name.to_os_string());
        self.dentries.remove(&old);
        match self.nodes.get_mut(&src).map(|n| &mut n.kind) {
            Some(Kind::Dir(d)) => {
                d.parent = new_parent;
                d.name = new_name.to_os_string();
            }
            Some(Kind::File(f)) => {
                f.names.retain(|n| *n != old);
                f.names.insert(0, new.clone());
                if f.index.is_none() {
                    f.layer = self.views.get(&v).map(|view| view.top()).unwrap_or(f.layer);
                }
            }
            _ => {}
        }
        self.dentries.insert(new, src);
        Ok(())
    }
}
