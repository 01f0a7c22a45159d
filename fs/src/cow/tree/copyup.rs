//! Copy-up: bringing directories and files into the upper layer before they change.

use super::*;

impl State {
    /// Makes directory `ino` exist in its view's upper layer (and its parents).
    pub(super) fn ensure_dir(&mut self, ino: u64) -> Result<(), Errno> {
        let v = self.dir(ino)?.view;
        let top = self.writable_view(v)?.top();
        let mut missing = Vec::new();
        let mut cur = ino;
        loop {
            let d = self.dir(cur)?;
            if d.layers.first() == Some(&top) {
                break;
            }
            if d.root {
                return Err(libc::EIO); // every layer has the root
            }
            missing.push(cur);
            cur = d.parent;
        }
        for &dino in missing.iter().rev() {
            let view = self.view(v)?;
            let rel = self.rel(dino)?;
            let src = view.layers[self.dir(dino)?.layers[0]].join(&rel);
            let dst = view.layers[top].join(&rel);
            copy_into_place(&src, &dst, &view.layers[top])?;
            self.dir_mut(dino)?.layers.insert(0, top);
        }
        Ok(())
    }

    /// Makes file `ino`'s data live in its view's upper layer, moving its open
    /// handles there. A file with more hard links is copied to the upper layer's
    /// index and linked under its first name, so the other names find the copy.
    pub(super) fn copy_up(&mut self, ino: u64) -> Result<(), Errno> {
        let f = self.file(ino)?;
        let v = f.view;
        let top = self.writable_view(v)?.top();
        if f.layer == top {
            return Ok(());
        }
        let Some((parent, name)) = f.names.first().cloned() else {
            // Unlinked: no layer shows it, so writing to the old copy changes
            // nothing any view shows.
            return Ok(());
        };
        let src = self.file_path(ino)?;
        self.ensure_dir(parent)?;
        let view = self.view(v)?;
        let upper = view.layers[top].clone();
        let dst = upper.join(self.rel(parent)?).join(&name);
        let meta = std::fs::symlink_metadata(&src).map_err(errno)?;
        let index = if meta.is_file() && meta.nlink() > 1 {
            let layer = layer_name(&view.layers[self.file(ino)?.layer]);
            let rel = Path::new(INDEX_DIR).join(format!("{layer}-{}", meta.ino()));
            std::fs::create_dir_all(upper.join(INDEX_DIR)).map_err(errno)?;
            copy_into_place(&src, &upper.join(&rel), &upper)?;
            std::fs::hard_link(upper.join(&rel), &dst).map_err(errno)?;
            Some(rel)
        } else {
            copy_into_place(&src, &dst, &upper)?;
            None
        };
        if meta.is_file() {
            // The copy is the volume's own data now.
            let copied = std::fs::symlink_metadata(&dst)
                .map(|m| m.blocks() * 512)
                .unwrap_or(0);
            self.charge(v, 0, copied);
        }
        let f = self.file_mut(ino)?;
        f.layer = top;
        f.index = index;
        self.note_inode(ino);
        self.reopen_handles(ino)
    }

    pub(super) fn reopen_handles(&mut self, ino: u64) -> Result<(), Errno> {
        let path = self.file_path(ino)?;
        let f = self.file(ino)?;
        let layer = f.layer;
        for fh in f.handles.clone() {
            if let Some(h) = self.handles.get_mut(&fh) {
                h.file = open_layer_file(&path, h.flags).map_err(errno)?;
                h.layer = layer;
            }
        }
        Ok(())
    }

    /// Copies directory `ino` and everything under it into the upper layer and
    /// makes it opaque there: what a directory rename needs, since a layer holds
    /// each entry under one path.
    pub(super) fn materialize(&mut self, ino: u64) -> Result<(), Errno> {
        self.ensure_dir(ino)?;
        let d = self.dir(ino)?;
        let view = self.view(d.view)?;
        let (top, upper) = (view.top(), view.layers[view.top()].clone());
        let rel = self.rel(ino)?;
        if d.layers == [top] {
            return Ok(()); // made in the upper layer: nothing below shows through
        }
        let layers: Vec<PathBuf> = view.layers.clone();
        materialize_tree(&layers, &d.layers, top, &rel)?;
        layer::mark(&upper.join(&rel).join(OPAQUE)).map_err(errno)?;
        // Nodes under it now live in the upper layer only.
        let v = d.view;
        let under: Vec<u64> = self
            .nodes
            .keys()
            .copied()
            .filter(|n| *n != ino && self.is_under(*n, ino))
            .collect();
        self.dir_mut(ino)?.layers = vec![top];
        for n in under {
            match &self.nodes[&n].kind {
                Kind::Dir(_) => self.dir_mut(n)?.layers = vec![top],
                Kind::File(f) if f.view == v => {
                    if let Some((p, name)) = f.names.first().cloned() {
                        if let Some(found) = self.find(p, &name, false)? {
                            self.relocate(n, found)?;
                            self.reopen_handles(n)?;
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub(super) fn is_under(&self, ino: u64, dir: u64) -> bool {
        let mut cur = match self.nodes.get(&ino).map(|n| &n.kind) {
            Some(Kind::Dir(d)) if !d.root => d.parent,
            Some(Kind::File(f)) => match f.names.first() {
                Some((p, _)) => *p,
                None => return false,
            },
            _ => return false,
        };
        loop {
            if cur == dir {
                return true;
            }
            match self.nodes.get(&cur).map(|n| &n.kind) {
                Some(Kind::Dir(d)) if !d.root => cur = d.parent,
                _ => return false,
            }
        }
    }
}

/// Copies `src` to `dst` through the upper layer's work dir, so `dst` appears whole.
fn copy_into_place(src: &Path, dst: &Path, upper: &Path) -> Result<(), Errno> {
    let tmp = layer::work_path(upper).map_err(errno)?;
    layer::copy_entry(src, &tmp).map_err(errno)?;
    std::fs::rename(&tmp, dst).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_dir(&tmp);
        errno(e)
    })
}

/// Copies everything the merged directory `rel` shows from `from` (contributing
/// layers, topmost first) into layer `top`, which already has the directory.
fn materialize_tree(
    layers: &[PathBuf],
    from: &[usize],
    top: usize,
    rel: &Path,
) -> Result<(), Errno> {
    let upper = &layers[top];
    let mut seen = std::collections::HashSet::new();
    let mut opaque = false;
    for &l in from {
        if opaque {
            break;
        }
        let dir = layers[l].join(rel);
        opaque = l != top && layer::exists(&dir.join(OPAQUE));
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            match layer::classify(&name, rel.as_os_str().is_empty()) {
                layer::Listed::Bookkeeping => continue,
                layer::Listed::Deleted(hidden) => {
                    seen.insert(hidden.to_os_string());
                    continue;
                }
                layer::Listed::Shown => {}
            }
            if !seen.insert(name.clone()) || l == top {
                continue; // shadowed, or already in the upper layer
            }
            let child = rel.join(&name);
            let meta = std::fs::symlink_metadata(e.path()).map_err(errno)?;
            if meta.is_dir() {
                copy_into_place(&e.path(), &upper.join(&child), upper)?;
                let below: Vec<usize> = from.iter().copied().filter(|x| *x < l).collect();
                let mut sub = vec![top, l];
                sub.extend(below);
                materialize_tree(layers, &sub, top, &child)?;
            } else {
                let view = View {
                    layers: layers.to_vec(),
                    writable: true,
                    alive: true,
                    root: None,
                    used: 0,
                    limit: None,
                };
                let (fl, index, _) = resolve_index(&view, l, meta);
                let src = layers[fl].join(index.as_deref().unwrap_or(&child));
                copy_into_place(&src, &upper.join(&child), upper)?;
            }
        }
    }
    Ok(())
}
