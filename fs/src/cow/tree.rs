//! The merged views the server shows, and every operation on them.
//!
//! The mount's root holds `volumes/<id>/` (writable views) and
//! `snapshots/<volume>/<name>/` (read-only views). A view is a chain of layer
//! directories, bottom first; in a writable one the last is the upper layer that
//! takes every change. Reading resolves a name through the chain top down
//! (whiteouts and opaque directories stop the search); writing first copies the
//! entry up into the upper layer.
//!
//! Nodes are what the kernel holds inode numbers for. A directory node knows its
//! parent and name (directories have one) and which layers contribute to it. A
//! file node knows every name the kernel reached it by (hard links), the layer its
//! data is in, and the handles open on it: a copy-up moves those handles to the
//! copy, so every open file keeps seeing one file.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType};

use super::catalog::Catalog;
use super::layer::{self, is_reserved, whiteout, INDEX_DIR, OPAQUE};

pub(crate) const ROOT: u64 = 1;
pub(crate) const VOLUMES: u64 = 2;
pub(crate) const SNAPSHOTS: u64 = 3;
const FIRST_DYNAMIC: u64 = 16;

pub(crate) type Errno = i32;

pub(crate) fn errno(e: io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

struct View {
    /// Layer directories, bottom first.
    layers: Vec<PathBuf>,
    writable: bool,
    /// False once the volume was restored or deleted: its nodes answer ESTALE.
    alive: bool,
    root: Option<u64>,
}

impl View {
    fn top(&self) -> usize {
        self.layers.len() - 1
    }
}

struct Dir {
    view: u64,
    parent: u64,
    name: OsString,
    /// Contributing layers, topmost first.
    layers: Vec<usize>,
    root: bool,
    /// Removed or replaced: its path now names something else.
    gone: bool,
}

struct FileNode {
    view: u64,
    /// Every (directory, name) the kernel knows this inode by; the first locates it.
    names: Vec<(u64, OsString)>,
    layer: usize,
    /// Set when the data is a hard-link index entry rather than the first name.
    index: Option<PathBuf>,
    handles: Vec<u64>,
}

enum Kind {
    Root,
    Volumes,
    Snapshots,
    SnapshotsOf(String),
    Dir(Dir),
    File(FileNode),
}

struct Node {
    kind: Kind,
    lookups: u64,
}

struct Handle {
    ino: u64,
    file: File,
    layer: usize,
    flags: i32,
}

enum Found {
    Dir(Vec<usize>),
    File {
        layer: usize,
        index: Option<PathBuf>,
        meta: Metadata,
    },
}

pub(crate) struct DirEntry {
    pub ino: u64,
    pub kind: FileType,
    pub name: OsString,
}

/// A name the kernel may hold in its cache that changed behind it.
pub(crate) type Stale = (u64, OsString);

pub(crate) struct State {
    pub catalog: Catalog,
    views: HashMap<u64, View>,
    volume_views: HashMap<String, u64>,
    snapshot_views: HashMap<(String, String), u64>,
    nodes: HashMap<u64, Node>,
    dentries: HashMap<(u64, OsString), u64>,
    handles: HashMap<u64, Handle>,
    /// Open directories: which, and their entries once read.
    listings: HashMap<u64, (u64, Option<Vec<DirEntry>>)>,
    next_ino: u64,
    next_id: u64,
    as_root: bool,
    started: SystemTime,
}

fn ts(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn kind_of(ft: std::fs::FileType) -> FileType {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_fifo() {
        FileType::NamedPipe
    } else if ft.is_socket() {
        FileType::Socket
    } else if ft.is_char_device() {
        FileType::CharDevice
    } else if ft.is_block_device() {
        FileType::BlockDevice
    } else {
        FileType::RegularFile
    }
}

fn to_attr(ino: u64, m: &Metadata) -> FileAttr {
    FileAttr {
        ino,
        size: m.size(),
        blocks: m.blocks(),
        atime: ts(m.atime(), m.atime_nsec()),
        mtime: ts(m.mtime(), m.mtime_nsec()),
        ctime: ts(m.ctime(), m.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: kind_of(m.file_type()),
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: m.blksize() as u32,
        flags: 0,
    }
}

/// Opens a layer file for a handle: the kernel applies O_APPEND (it sends offsets)
/// and O_TRUNC (as a setattr), and the layer file is never created here.
///
/// With the kernel's writeback cache a write-only handle may be read from (to fill
/// a partly written page), so it is opened for reading too where the mode allows.
fn open_layer_file(path: &Path, flags: i32) -> io::Result<File> {
    if flags & libc::O_ACCMODE == libc::O_WRONLY {
        let rw = (flags & !libc::O_ACCMODE) | libc::O_RDWR;
        match open_exactly(path, rw) {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {}
            other => return other,
        }
    }
    open_exactly(path, flags)
}

fn open_exactly(path: &Path, flags: i32) -> io::Result<File> {
    let acc = flags & libc::O_ACCMODE;
    let strip = libc::O_ACCMODE
        | libc::O_CREAT
        | libc::O_EXCL
        | libc::O_TRUNC
        | libc::O_APPEND
        | libc::O_DIRECT
        | libc::O_NOCTTY;
    std::fs::OpenOptions::new()
        .read(acc == libc::O_RDONLY || acc == libc::O_RDWR)
        .write(acc == libc::O_WRONLY || acc == libc::O_RDWR)
        .custom_flags(flags & !strip)
        .open(path)
}

fn layer_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl State {
    pub fn new(catalog: Catalog) -> State {
        // SAFETY: geteuid has no preconditions.
        let as_root = unsafe { libc::geteuid() } == 0;
        let mut nodes = HashMap::new();
        for (ino, kind) in [
            (ROOT, Kind::Root),
            (VOLUMES, Kind::Volumes),
            (SNAPSHOTS, Kind::Snapshots),
        ] {
            nodes.insert(ino, Node { kind, lookups: 1 });
        }
        State {
            catalog,
            views: HashMap::new(),
            volume_views: HashMap::new(),
            snapshot_views: HashMap::new(),
            nodes,
            dentries: HashMap::new(),
            handles: HashMap::new(),
            listings: HashMap::new(),
            next_ino: FIRST_DYNAMIC,
            next_id: 1,
            as_root,
            started: SystemTime::now(),
        }
    }

    fn next(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    // ---- views ----------------------------------------------------------------

    fn volume_view(&mut self, id: &str) -> Option<u64> {
        if let Some(v) = self.volume_views.get(id) {
            return Some(*v);
        }
        let chain = self.catalog.volumes.get(id)?;
        let layers = self.catalog.paths(chain);
        let v = self.next();
        self.views.insert(
            v,
            View {
                layers,
                writable: true,
                alive: true,
                root: None,
            },
        );
        self.volume_views.insert(id.to_string(), v);
        Some(v)
    }

    fn snapshot_view(&mut self, volume: &str, name: &str) -> Option<u64> {
        let key = (volume.to_string(), name.to_string());
        if let Some(v) = self.snapshot_views.get(&key) {
            return Some(*v);
        }
        let chain = self.catalog.snapshots.get(&key)?;
        let layers = self.catalog.paths(chain);
        let v = self.next();
        self.views.insert(
            v,
            View {
                layers,
                writable: false,
                alive: true,
                root: None,
            },
        );
        self.snapshot_views.insert(key, v);
        Some(v)
    }

    /// Ends a volume's view (after a restore or delete); returns the cached names
    /// to invalidate.
    pub fn end_volume_view(&mut self, id: &str) -> Vec<Stale> {
        if let Some(v) = self.volume_views.remove(id) {
            if let Some(view) = self.views.get_mut(&v) {
                view.alive = false;
            }
        }
        vec![(VOLUMES, OsString::from(id))]
    }

    pub fn end_snapshot_view(&mut self, volume: &str, name: &str) -> Vec<Stale> {
        let key = (volume.to_string(), name.to_string());
        if let Some(v) = self.snapshot_views.remove(&key) {
            if let Some(view) = self.views.get_mut(&v) {
                view.alive = false;
            }
        }
        let mut stale = vec![(SNAPSHOTS, OsString::from(volume))];
        if let Some(ino) = self.dentries.get(&(SNAPSHOTS, OsString::from(volume))) {
            stale.push((*ino, OsString::from(name)));
        }
        stale
    }

    /// Freezes the upper layer of volume `id`'s open view (if one is open) by
    /// putting `new_top` over it: from now on writes copy up into `new_top`.
    pub fn push_layer(&mut self, id: &str, new_top: PathBuf) {
        let Some(v) = self.volume_views.get(id) else {
            return;
        };
        let Some(view) = self.views.get_mut(v) else {
            return;
        };
        view.layers.push(new_top);
        let top = view.top();
        // Every layer has the root directory; nothing else is in the new one yet.
        if let Some(root) = view.root {
            if let Ok(d) = self.dir_mut(root) {
                d.layers.insert(0, top);
            }
        }
    }

    fn view(&self, v: u64) -> Result<&View, Errno> {
        match self.views.get(&v) {
            Some(view) if view.alive => Ok(view),
            _ => Err(libc::ESTALE),
        }
    }

    fn writable_view(&self, v: u64) -> Result<&View, Errno> {
        let view = self.view(v)?;
        if view.writable {
            Ok(view)
        } else {
            Err(libc::EROFS)
        }
    }

    // ---- nodes ----------------------------------------------------------------

    fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(libc::ESTALE)
    }

    fn dir(&self, ino: u64) -> Result<&Dir, Errno> {
        match &self.node(ino)?.kind {
            Kind::Dir(d) if d.gone => Err(libc::ENOENT),
            Kind::Dir(d) => Ok(d),
            Kind::File(_) => Err(libc::ENOTDIR),
            _ => Err(libc::EPERM),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut Dir, Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            Some(Kind::Dir(d)) => Ok(d),
            _ => Err(libc::ESTALE),
        }
    }

    fn file(&self, ino: u64) -> Result<&FileNode, Errno> {
        match &self.node(ino)?.kind {
            Kind::File(f) => Ok(f),
            Kind::Dir(_) => Err(libc::EISDIR),
            _ => Err(libc::EISDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut FileNode, Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            Some(Kind::File(f)) => Ok(f),
            _ => Err(libc::ESTALE),
        }
    }

    /// The view a tree node belongs to.
    fn view_of(&self, ino: u64) -> Result<u64, Errno> {
        match &self.node(ino)?.kind {
            Kind::Dir(d) => Ok(d.view),
            Kind::File(f) => Ok(f.view),
            _ => Err(libc::EROFS),
        }
    }

    /// A directory's path inside its layers.
    fn rel(&self, ino: u64) -> Result<PathBuf, Errno> {
        let mut parts = Vec::new();
        let mut cur = ino;
        loop {
            let d = self.dir(cur)?;
            if d.root {
                break;
            }
            parts.push(d.name.clone());
            cur = d.parent;
        }
        Ok(parts.iter().rev().collect())
    }

    /// Where a file node's data is.
    fn file_path(&self, ino: u64) -> Result<PathBuf, Errno> {
        let f = self.file(ino)?;
        let view = self.view(f.view)?;
        let rel = match &f.index {
            Some(i) => i.clone(),
            None => {
                let (parent, name) = f.names.first().ok_or(libc::ENOENT)?;
                self.rel(*parent)?.join(name)
            }
        };
        Ok(view.layers[f.layer].join(rel))
    }

    /// The top path of a directory node (the layer that shows its attributes).
    fn dir_path(&self, ino: u64) -> Result<PathBuf, Errno> {
        let d = self.dir(ino)?;
        let view = self.view(d.view)?;
        Ok(view.layers[d.layers[0]].join(self.rel(ino)?))
    }

    fn insert(&mut self, kind: Kind) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, Node { kind, lookups: 0 });
        ino
    }

    fn view_root(&mut self, v: u64, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        if let Some(r) = self.view(v)?.root {
            return Ok(r);
        }
        let layers = (0..self.view(v)?.layers.len()).rev().collect();
        let ino = self.insert(Kind::Dir(Dir {
            view: v,
            parent,
            name: name.to_os_string(),
            layers,
            root: true,
            gone: false,
        }));
        if let Some(view) = self.views.get_mut(&v) {
            view.root = Some(ino);
        }
        Ok(ino)
    }

    /// Resolves `name` in directory `parent` through its layers.
    fn find(&self, parent: u64, name: &OsStr, below_top: bool) -> Result<Option<Found>, Errno> {
        let d = self.dir(parent)?;
        let view = self.view(d.view)?;
        if is_reserved(name, d.root) {
            return Ok(None);
        }
        let rel = self.rel(parent)?;
        let mut dirs = Vec::new();
        for &l in &d.layers {
            if below_top && l == view.top() && view.writable {
                continue;
            }
            let base = view.layers[l].join(&rel);
            match std::fs::symlink_metadata(base.join(name)) {
                Ok(m) if m.is_dir() => {
                    dirs.push(l);
                    if layer::exists(&base.join(name).join(OPAQUE)) {
                        break;
                    }
                }
                Ok(m) => {
                    if !dirs.is_empty() {
                        break;
                    }
                    let (layer, index, meta) = resolve_index(view, l, m);
                    return Ok(Some(Found::File { layer, index, meta }));
                }
                Err(_) => {
                    if layer::exists(&base.join(whiteout(name))) {
                        break;
                    }
                }
            }
        }
        Ok((!dirs.is_empty()).then_some(Found::Dir(dirs)))
    }

    /// The node for `name` in tree directory `parent`, made or updated from what
    /// the layers hold now.
    fn tree_child(&mut self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        let found = self.find(parent, name, false)?.ok_or(libc::ENOENT)?;
        let view = self.dir(parent)?.view;
        let key = (parent, name.to_os_string());
        if let Some(&ino) = self.dentries.get(&key) {
            let same_kind = matches!(
                (&self.node(ino)?.kind, &found),
                (Kind::Dir(_), Found::Dir(_)) | (Kind::File(_), Found::File { .. })
            );
            if same_kind {
                self.relocate(ino, found)?;
                return Ok(ino);
            }
            self.forget_name(parent, name);
        }
        let ino = match found {
            Found::Dir(layers) => self.insert(Kind::Dir(Dir {
                view,
                parent,
                name: name.to_os_string(),
                layers,
                root: false,
                gone: false,
            })),
            Found::File { layer, index, meta } => {
                match self.hard_link_sibling(view, &meta) {
                    Some(ino) => {
                        self.file_mut(ino)?.names.push(key.clone());
                        ino
                    }
                    None => self.insert(Kind::File(FileNode {
                        view,
                        names: vec![key.clone()],
                        layer,
                        index,
                        handles: Vec::new(),
                    })),
                }
            }
        };
        self.dentries.insert(key, ino);
        Ok(ino)
    }

    /// A file node of `view` that is the same inode as `meta` (another name of a
    /// hard-linked file the kernel already holds).
    fn hard_link_sibling(&self, view: u64, meta: &Metadata) -> Option<u64> {
        if meta.nlink() < 2 {
            return None;
        }
        self.nodes.iter().find_map(|(ino, n)| match &n.kind {
            Kind::File(f) if f.view == view => {
                let m = std::fs::symlink_metadata(self.file_path(*ino).ok()?).ok()?;
                (m.dev() == meta.dev() && m.ino() == meta.ino()).then_some(*ino)
            }
            _ => None,
        })
    }

    fn relocate(&mut self, ino: u64, found: Found) -> Result<(), Errno> {
        match found {
            Found::Dir(layers) => self.dir_mut(ino)?.layers = layers,
            Found::File { layer, index, .. } => {
                let f = self.file_mut(ino)?;
                f.layer = layer;
                f.index = index;
            }
        }
        Ok(())
    }

    /// The kernel no longer reaches a node by `(parent, name)`.
    fn forget_name(&mut self, parent: u64, name: &OsStr) {
        let key = (parent, name.to_os_string());
        let Some(ino) = self.dentries.remove(&key) else {
            return;
        };
        match self.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            Some(Kind::Dir(d)) => d.gone = true,
            Some(Kind::File(f)) => f.names.retain(|n| *n != key),
            _ => {}
        }
    }

    /// Whether the kernel may remember that a name is absent from `ino`: true in
    /// the trees, whose names change only through the kernel.
    pub fn caches_absence(&self, ino: u64) -> bool {
        matches!(self.nodes.get(&ino).map(|n| &n.kind), Some(Kind::Dir(_)))
    }

    pub fn lookup(&mut self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        let ino = match &self.node(parent)?.kind {
            Kind::Root if name == "volumes" => VOLUMES,
            Kind::Root if name == "snapshots" => SNAPSHOTS,
            Kind::Root => return Err(libc::ENOENT),
            Kind::Volumes => {
                let id = name.to_str().ok_or(libc::ENOENT)?;
                let v = self.volume_view(id).ok_or(libc::ENOENT)?;
                self.view_root(v, VOLUMES, name)?
            }
            Kind::Snapshots => {
                let vol = name.to_str().ok_or(libc::ENOENT)?.to_string();
                if !self.catalog.volumes_with_snapshots().contains(&vol) {
                    return Err(libc::ENOENT);
                }
                let key = (SNAPSHOTS, name.to_os_string());
                match self.dentries.get(&key) {
                    Some(ino) => *ino,
                    None => {
                        let ino = self.insert(Kind::SnapshotsOf(vol));
                        self.dentries.insert(key, ino);
                        ino
                    }
                }
            }
            Kind::SnapshotsOf(vol) => {
                let vol = vol.clone();
                let snap = name.to_str().ok_or(libc::ENOENT)?;
                let v = self.snapshot_view(&vol, snap).ok_or(libc::ENOENT)?;
                self.view_root(v, parent, name)?
            }
            Kind::Dir(_) => self.tree_child(parent, name)?,
            Kind::File(_) => return Err(libc::ENOTDIR),
        };
        let attr = self.getattr(ino, None)?;
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.lookups += 1;
        }
        Ok(attr)
    }

    pub fn forget(&mut self, ino: u64, n: u64) {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups == 0 && ino >= FIRST_DYNAMIC {
            self.drop_if_unused(ino);
        }
    }

    fn drop_if_unused(&mut self, ino: u64) {
        let Some(node) = self.nodes.get(&ino) else {
            return;
        };
        if node.lookups > 0 {
            return;
        }
        let names: Vec<(u64, OsString)> = match &node.kind {
            Kind::File(f) if !f.handles.is_empty() => return,
            Kind::File(f) => f.names.clone(),
            Kind::Dir(d) if d.root => {
                if let Some(view) = self.views.get_mut(&d.view) {
                    view.root = None;
                }
                Vec::new()
            }
            Kind::Dir(d) => vec![(d.parent, d.name.clone())],
            Kind::SnapshotsOf(vol) => vec![(SNAPSHOTS, OsString::from(vol))],
            _ => Vec::new(),
        };
        for key in names {
            if self.dentries.get(&key) == Some(&ino) {
                self.dentries.remove(&key);
            }
        }
        self.nodes.remove(&ino);
    }

    pub fn virtual_attr(&self, ino: u64) -> FileAttr {
        FileAttr {
            ino,
            size: 0,
            blocks: 0,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            // SAFETY: getuid/getgid have no preconditions.
            uid: unsafe { libc::getuid() },
            // SAFETY: as above.
            gid: unsafe { libc::getgid() },
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> Result<FileAttr, Errno> {
        match &self.node(ino)?.kind {
            Kind::Dir(d) => {
                self.view(d.view)?;
                let m = std::fs::symlink_metadata(self.dir_path(ino)?).map_err(errno)?;
                Ok(to_attr(ino, &m))
            }
            Kind::File(f) => {
                let by_path = self
                    .file_path(ino)
                    .and_then(|p| std::fs::symlink_metadata(p).map_err(errno));
                let m = match by_path {
                    Ok(m) => m,
                    // An unlinked file still open: its handle knows it.
                    Err(e) => {
                        let fh = fh.or_else(|| f.handles.first().copied()).ok_or(e)?;
                        let h = self.handles.get(&fh).ok_or(e)?;
                        h.file.metadata().map_err(errno)?
                    }
                };
                Ok(to_attr(ino, &m))
            }
            _ => Ok(self.virtual_attr(ino)),
        }
    }

    // ---- copy-up ----------------------------------------------------------------

    /// Makes directory `ino` exist in its view's upper layer (and its parents).
    fn ensure_dir(&mut self, ino: u64) -> Result<(), Errno> {
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
    fn copy_up(&mut self, ino: u64) -> Result<(), Errno> {
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
        let f = self.file_mut(ino)?;
        f.layer = top;
        f.index = index;
        self.reopen_handles(ino)
    }

    fn reopen_handles(&mut self, ino: u64) -> Result<(), Errno> {
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
    fn materialize(&mut self, ino: u64) -> Result<(), Errno> {
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

    fn is_under(&self, ino: u64, dir: u64) -> bool {
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

    // ---- changing the tree --------------------------------------------------------

    /// Checks that `name` may be made in `parent`, makes `parent` exist in the
    /// upper layer and clears a whiteout there. Returns the new entry's path and
    /// whether a whiteout was cleared (a new directory must then be opaque).
    fn prepare_new(&mut self, parent: u64, name: &OsStr) -> Result<(PathBuf, bool), Errno> {
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
    fn own(&self, path: &Path, parent: u64, uid: u32, gid: u32) -> Result<(), Errno> {
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

    fn add_new(&mut self, parent: u64, name: &OsStr, is_dir: bool) -> Result<u64, Errno> {
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
            }))
        };
        self.dentries.insert(key, ino);
        Ok(ino)
    }

    fn entry_attr(&mut self, ino: u64) -> Result<FileAttr, Errno> {
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
    fn shows_below(&self, parent: u64, name: &OsStr) -> Result<bool, Errno> {
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
            std::fs::remove_file(&path).map_err(errno)?;
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
        self.dir(ino).map_err(|e| if e == libc::EISDIR { libc::ENOTDIR } else { e })?;
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
                (Kind::Dir(_), true) if !self.list(d)?.is_empty() => {
                    return Err(libc::ENOTEMPTY)
                }
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

    // ---- attributes ---------------------------------------------------------------

    /// The path to change for a setattr/xattr write on `ino`, after copy-up.
    fn writable_path(&mut self, ino: u64) -> Result<PathBuf, Errno> {
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
        let path = self.writable_path(ino);
        // An unlinked file still open is changed through its handle.
        let handle = fh
            .and_then(|fh| self.handles.get(&fh))
            .map(|h| h.file.try_clone())
            .transpose()
            .map_err(errno)?;
        let path = match (path, &handle) {
            (Ok(p), _) => Some(p),
            (Err(_), Some(_)) => None,
            (Err(e), None) => return Err(e),
        };
        if let Some(mode) = mode {
            let perm = std::fs::Permissions::from_mode(mode & 0o7777);
            match (&path, &handle) {
                (Some(p), _) => {
                    if !std::fs::symlink_metadata(p).map_err(errno)?.is_symlink() {
                        std::fs::set_permissions(p, perm).map_err(errno)?;
                    }
                }
                (None, Some(h)) => h.set_permissions(perm).map_err(errno)?,
                _ => {}
            }
        }
        if uid.is_some() || gid.is_some() {
            if let Some(p) = &path {
                layer::lchown(p, uid, gid).map_err(errno)?;
            }
        }
        if let Some(size) = size {
            match (&handle, &path) {
                // The handle was moved to the copy by copy-up.
                (Some(_), _) if fh.is_some() => {
                    let h = fh.and_then(|fh| self.handles.get(&fh)).ok_or(libc::EBADF)?;
                    h.file.set_len(size).map_err(errno)?;
                }
                (_, Some(p)) => std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .and_then(|f| f.set_len(size))
                    .map_err(errno)?,
                _ => {}
            }
        }
        if atime.is_some() || mtime.is_some() {
            if let Some(p) = &path {
                set_times(p, atime, mtime)?;
            }
        }
        use std::os::unix::fs::PermissionsExt;
        self.getattr(ino, fh)
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        use std::os::unix::ffi::OsStrExt;
        let target = std::fs::read_link(self.file_path(ino)?).map_err(errno)?;
        Ok(target.as_os_str().as_bytes().to_vec())
    }

    fn attr_path(&self, ino: u64) -> Result<PathBuf, Errno> {
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
            Kind::Dir(_) | Kind::File(_) => layer::list_xattrs(&self.attr_path(ino)?).map_err(errno),
            _ => Ok(Vec::new()),
        }
    }

    pub fn setxattr(&mut self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<(), Errno> {
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
        Ok(st)
    }

    // ---- files --------------------------------------------------------------------

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

    pub fn read(&self, fh: u64, offset: i64, size: u32) -> Result<Vec<u8>, Errno> {
        let h = self.handles.get(&fh).ok_or(libc::EBADF)?;
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match h.file.read_at(&mut buf[got..], offset as u64 + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(errno(e)),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    /// Makes sure a write through `fh` lands in the upper layer: a snapshot since
    /// the open froze the layer the handle points into.
    fn handle_for_write(&mut self, fh: u64) -> Result<&Handle, Errno> {
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

    pub fn write(&mut self, fh: u64, offset: i64, data: &[u8]) -> Result<u32, Errno> {
        let h = self.handle_for_write(fh)?;
        h.file.write_all_at(data, offset as u64).map_err(errno)?;
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
        // SAFETY: fallocate on an open fd.
        if unsafe { libc::fallocate(h.file.as_raw_fd(), mode, offset, length) } < 0 {
            return Err(errno(io::Error::last_os_error()));
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

    // ---- directories ----------------------------------------------------------------

    /// What directory `ino` shows, merged from its layers.
    fn list(&self, ino: u64) -> Result<Vec<DirEntry>, Errno> {
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
                if name == OPAQUE || (d.root && is_reserved(&name, true)) {
                    continue;
                }
                use std::os::unix::ffi::OsStrExt;
                if let Some(hidden) = name.as_bytes().strip_prefix(layer::WHITEOUT_PREFIX) {
                    seen.insert(OsStr::from_bytes(hidden).to_os_string());
                    continue;
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

    fn entries(&self, ino: u64) -> Result<Vec<DirEntry>, Errno> {
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

/// Resolves a file found in layer `l` through the hard-link indexes above it.
fn resolve_index(view: &View, l: usize, meta: Metadata) -> (usize, Option<PathBuf>, Metadata) {
    let (mut layer, mut index, mut meta) = (l, None, meta);
    while meta.is_file() && meta.nlink() > 1 {
        let key = format!("{}-{}", layer_name(&view.layers[layer]), meta.ino());
        let rel = Path::new(INDEX_DIR).join(&key);
        let above = (layer + 1..view.layers.len())
            .rev()
            .find_map(|j| Some((j, std::fs::symlink_metadata(view.layers[j].join(&rel)).ok()?)));
        match above {
            Some((j, m)) => {
                layer = j;
                index = Some(rel);
                meta = m;
            }
            None => break,
        }
    }
    (layer, index, meta)
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
fn materialize_tree(layers: &[PathBuf], from: &[usize], top: usize, rel: &Path) -> Result<(), Errno> {
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
            if name == OPAQUE || (rel.as_os_str().is_empty() && is_reserved(&name, true)) {
                continue;
            }
            use std::os::unix::ffi::OsStrExt;
            if let Some(hidden) = name.as_bytes().strip_prefix(layer::WHITEOUT_PREFIX) {
                seen.insert(OsStr::from_bytes(hidden).to_os_string());
                continue;
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
                };
                let (fl, index, _) = resolve_index(&view, l, meta);
                let src = layers[fl].join(index.as_deref().unwrap_or(&child));
                copy_into_place(&src, &upper.join(&child), upper)?;
            }
        }
    }
    Ok(())
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
