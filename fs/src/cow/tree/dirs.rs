//! Directories: merged listings.

use super::*;

impl State {
    /// What directory `ino` shows, merged from its layers.
    pub(super) fn list(&self, ino: u64) -> Result<Vec<DirEntry>, Errno> {
        let d = self.dir(ino)?;
        let view = self.view(d.view)?;
        let rel = self.rel(ino)?;
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for &l in &d.layers {
            let rd = match std::fs::read_dir(view.layers[l].join(&rel)) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(errno(e)),
            };
            for e in rd.flatten() {
                let name = e.file_name();
                match layer::classify(&name, d.root) {
                    layer::Listed::Bookkeeping => continue,
                    layer::Listed::Deleted(hidden) => {
                        seen.insert(hidden.to_os_string());
                        continue;
                    }
                    layer::Listed::Shown => {}
                }
                if !seen.insert(name.clone()) {
                    continue;
                }
                let Ok(ft) = e.file_type() else { continue };
                use std::os::unix::fs::DirEntryExt;
                let ino = self
                    .dentries
                    .get(&(ino, name.clone()))
                    .copied()
                    .unwrap_or(e.ino() | 1 << 63);
                out.push(DirEntry {
                    ino,
                    kind: kind_of(ft),
                    name,
                });
            }
        }
        Ok(out)
    }

    /// Opens directory `ino`; true when the kernel may cache its listing (a tree
    /// directory, which changes only through the kernel; the virtual ones change
    /// with the catalog).
    pub fn opendir(&mut self, ino: u64) -> Result<(u64, bool), Errno> {
        let cacheable = match &self.node(ino)?.kind {
            Kind::File(_) => return Err(libc::ENOTDIR),
            Kind::Dir(_) => true,
            _ => false,
        };
        let fh = self.next();
        self.listings.insert(fh, (ino, None));
        Ok((fh, cacheable))
    }

    /// The entries of an open directory, read when first asked for: a kernel
    /// that has the listing cached opens the directory but does not read it.
    pub fn listing(&mut self, fh: u64) -> Result<&[DirEntry], Errno> {
        let (ino, cached) = self.listings.get(&fh).ok_or(libc::EBADF)?;
        if cached.is_none() {
            let ino = *ino;
            let entries = self.entries(ino)?;
            if let Some(l) = self.listings.get_mut(&fh) {
                l.1 = Some(entries);
            }
        }
        match self.listings.get(&fh) {
            Some((_, Some(entries))) => Ok(entries.as_slice()),
            _ => Err(libc::EBADF),
        }
    }

    pub(super) fn entries(&self, ino: u64) -> Result<Vec<DirEntry>, Errno> {
        let mut entries = vec![
            DirEntry {
                ino,
                kind: FileType::Directory,
                name: ".".into(),
            },
            DirEntry {
                ino: ROOT,
                kind: FileType::Directory,
                name: "..".into(),
            },
        ];
        let names: Vec<String> = match &self.node(ino)?.kind {
            Kind::Root => vec!["volumes".into(), "snapshots".into()],
            Kind::Volumes => self.catalog.volumes.keys().cloned().collect(),
            Kind::Snapshots => self.catalog.volumes_with_snapshots().into_iter().collect(),
            Kind::SnapshotsOf(vol) => self.catalog.snapshot_names(vol),
            Kind::Dir(_) => {
                entries.extend(self.list(ino)?);
                Vec::new()
            }
            Kind::File(_) => return Err(libc::ENOTDIR),
        };
        for (i, n) in names.into_iter().enumerate() {
            entries.push(DirEntry {
                ino: FIRST_DYNAMIC + (1 << 62) + i as u64,
                kind: FileType::Directory,
                name: n.into(),
            });
        }
        Ok(entries)
    }

    pub fn releasedir(&mut self, fh: u64) {
        self.listings.remove(&fh);
    }
}
