//! Open files: handles on layer files, moved by copy-up.

use super::*;

impl State {
    pub fn open(&mut self, ino: u64, flags: i32) -> Result<u64, Errno> {
        let f = self.file(ino)?;
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if writes {
            self.writable_view(f.view)?;
            self.copy_up(ino)?;
        }
        let path = self.file_path(ino)?;
        let file = open_layer_file(&path, flags).map_err(errno)?;
        if flags & libc::O_TRUNC != 0 {
            file.set_len(0).map_err(errno)?;
        }
        let fh = self.next();
        let layer = self.file(ino)?.layer;
        self.handles.insert(
            fh,
            Handle {
                ino,
                file,
                layer,
                flags,
            },
        );
        self.file_mut(ino)?.handles.push(fh);
        Ok(fh)
    }

    /// Reads into a buffer kept across requests (a read asks for up to 1 MiB:
    /// allocating and zeroing that each time cost as much as the copy).
    pub fn read(&mut self, fh: u64, offset: i64, size: u32) -> Result<&[u8], Errno> {
        let h = self.handles.get(&fh).ok_or(libc::EBADF)?;
        let size = size as usize;
        if self.scratch.len() < size {
            self.scratch.resize(size, 0);
        }
        let mut got = 0;
        while got < size {
            match h
                .file
                .read_at(&mut self.scratch[got..size], offset as u64 + got as u64)
            {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(errno(e)),
            }
        }
        Ok(&self.scratch[..got])
    }

    /// Makes sure a write through `fh` lands in the upper layer: a snapshot since
    /// the open froze the layer the handle points into.
    pub(super) fn handle_for_write(&mut self, fh: u64) -> Result<&Handle, Errno> {
        let h = self.handles.get(&fh).ok_or(libc::EBADF)?;
        let ino = h.ino;
        let layer = h.layer;
        let v = self.file(ino)?.view;
        if let Ok(view) = self.view(v) {
            if view.writable && layer != view.top() {
                self.copy_up(ino)?;
            }
        }
        self.handles.get(&fh).ok_or(libc::EBADF)
    }

    /// Writes through `fh`, refusing with ENOSPC what would take the volume
    /// past its limit (an overwrite of allocated bytes never does).
    pub fn write(&mut self, fh: u64, offset: i64, data: &[u8]) -> Result<u32, Errno> {
        let h = self.handle_for_write(fh)?;
        let ino = h.ino;
        let (size, before) = match h.file.metadata() {
            Ok(m) => (m.size(), m.blocks() * 512),
            Err(e) => return Err(errno(e)),
        };
        let end = (offset.max(0) as u64).saturating_add(data.len() as u64);
        let growth = if end <= size && before >= size {
            0
        } else {
            data.len() as u64
        };
        let v = self.file(ino)?.view;
        self.room(v, growth)?;
        let h = self.handles.get(&fh).ok_or(libc::EBADF)?;
        let written = h.file.write_all_at(data, offset as u64).map_err(errno);
        let after = allocated(&h.file);
        self.charge(v, before, after);
        written?;
        Ok(data.len() as u32)
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<(), Errno> {
        let h = self.handles.get(&fh).ok_or(libc::EBADF)?;
        if datasync {
            h.file.sync_data().map_err(errno)
        } else {
            h.file.sync_all().map_err(errno)
        }
    }

    pub fn fallocate(&mut self, fh: u64, offset: i64, length: i64, mode: i32) -> Result<(), Errno> {
        use std::os::fd::AsRawFd;
        let h = self.handle_for_write(fh)?;
        let ino = h.ino;
        let before = allocated(&h.file);
        let v = self.file(ino)?.view;
        if mode & libc::FALLOC_FL_PUNCH_HOLE == 0 {
            self.room(v, length.max(0) as u64)?;
        }
        let h = self.handles.get(&fh).ok_or(libc::EBADF)?;
        // SAFETY: fallocate on an open fd.
        let r = unsafe { libc::fallocate(h.file.as_raw_fd(), mode, offset, length) };
        let err = io::Error::last_os_error();
        let after = allocated(&h.file);
        self.charge(v, before, after);
        if r < 0 {
            return Err(errno(err));
        }
        Ok(())
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64, Errno> {
        use std::os::fd::AsRawFd;
        let h = self.handles.get(&fh).ok_or(libc::EBADF)?;
        // SAFETY: lseek on an open fd.
        let r = unsafe { libc::lseek(h.file.as_raw_fd(), offset, whence) };
        if r < 0 {
            return Err(errno(io::Error::last_os_error()));
        }
        Ok(r)
    }

    pub fn release(&mut self, fh: u64) {
        let Some(h) = self.handles.remove(&fh) else {
            return;
        };
        if let Ok(f) = self.file_mut(h.ino) {
            f.handles.retain(|x| *x != fh);
        }
        self.drop_if_unused(h.ino);
    }
}
