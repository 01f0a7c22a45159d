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

mod attrs;
mod change;
mod copyup;
mod dirs;
mod files;

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
    /// Bytes allocated in the upper layer: what counts against `limit`.
    used: u64,
    limit: Option<u64>,
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
    /// (device, inode) of the layer file, as recorded in `State::inodes`.
    real: Option<(u64, u64)>,
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
    /// (view, device, inode) of a layer file → the file node showing it, so that
    /// another name of a hard-linked file finds the node the kernel already has.
    inodes: HashMap<(u64, u64, u64), u64>,
    handles: HashMap<u64, Handle>,
    /// Open directories: which, and their entries once read.
    listings: HashMap<u64, (u64, Option<Vec<DirEntry>>)>,
    next_ino: u64,
    next_id: u64,
    /// Reused by every read.
    scratch: Vec<u8>,
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
            inodes: HashMap::new(),
            handles: HashMap::new(),
            listings: HashMap::new(),
            next_ino: FIRST_DYNAMIC,
            scratch: Vec::new(),
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
        let used = layers.last().map(|l| allocated_bytes(l)).unwrap_or(0);
        let limit = self.catalog.limits.get(id).copied();
        let v = self.next();
        self.views.insert(
            v,
            View {
                layers,
                writable: true,
                alive: true,
                root: None,
                used,
                limit,
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
                used: 0,
                limit: None,
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
        // The frozen upper layer is the snapshot's now; the new one is empty.
        view.used = 0;
        let top = view.top();
        // Every layer has the root directory; nothing else is in the new one yet.
        if let Some(root) = view.root {
            if let Ok(d) = self.dir_mut(root) {
                d.layers.insert(0, top);
            }
        }
    }

    // ---- disk accounting -------------------------------------------------------

    /// Sets volume `id`'s limit on its open view (the catalog keeps it for later).
    pub fn set_limit(&mut self, id: &str, bytes: Option<u64>) {
        if let Some(view) = self
            .volume_views
            .get(id)
            .and_then(|v| self.views.get_mut(v))
        {
            view.limit = bytes;
        }
    }

    /// What volume `id`'s upper layer holds, and its limit.
    pub fn disk_usage(&mut self, id: &str) -> Option<crate::DiskUsage> {
        let v = self.volume_view(id)?;
        let view = self.views.get(&v)?;
        Some(crate::DiskUsage {
            used_bytes: view.used,
            limit_bytes: view.limit,
        })
    }

    /// ENOSPC when `growth` more bytes would take view `v` past its limit.
    pub(super) fn room(&self, v: u64, growth: u64) -> Result<(), Errno> {
        let view = self.view(v)?;
        match view.limit {
            Some(limit) if growth > 0 && view.used.saturating_add(growth) > limit => {
                Err(libc::ENOSPC)
            }
            _ => Ok(()),
        }
    }

    /// Counts a change of a file in view `v`'s upper layer from `before` to
    /// `after` allocated bytes.
    pub(super) fn charge(&mut self, v: u64, before: u64, after: u64) {
        if let Some(view) = self.views.get_mut(&v) {
            view.used = view.used.saturating_add(after).saturating_sub(before);
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
            Found::File { layer, index, meta } => match self.hard_link_sibling(view, &meta) {
                Some(ino) => {
                    self.file_mut(ino)?.names.push(key.clone());
                    ino
                }
                None => {
                    let ino = self.insert(Kind::File(FileNode {
                        view,
                        names: vec![key.clone()],
                        layer,
                        index,
                        handles: Vec::new(),
                        real: None,
                    }));
                    self.note_inode(ino);
                    ino
                }
            },
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
        let ino = *self.inodes.get(&(view, meta.dev(), meta.ino()))?;
        // Checked, not trusted: a layer file deleted since may have left its
        // inode number to another.
        let m = std::fs::symlink_metadata(self.file_path(ino).ok()?).ok()?;
        (m.dev() == meta.dev() && m.ino() == meta.ino()).then_some(ino)
    }

    /// Records which layer file file node `ino` shows now (after it was made,
    /// found again or copied up).
    pub(super) fn note_inode(&mut self, ino: u64) {
        let Ok(path) = self.file_path(ino) else {
            return;
        };
        let Ok(m) = std::fs::symlink_metadata(path) else {
            return;
        };
        let Ok(f) = self.file_mut(ino) else { return };
        let view = f.view;
        let old = f.real.replace((m.dev(), m.ino()));
        if let Some((dev, i)) = old {
            if self.inodes.get(&(view, dev, i)) == Some(&ino) {
                self.inodes.remove(&(view, dev, i));
            }
        }
        self.inodes.insert((view, m.dev(), m.ino()), ino);
    }

    fn relocate(&mut self, ino: u64, found: Found) -> Result<(), Errno> {
        match found {
            Found::Dir(layers) => self.dir_mut(ino)?.layers = layers,
            Found::File { layer, index, .. } => {
                let f = self.file_mut(ino)?;
                f.layer = layer;
                f.index = index;
                self.note_inode(ino);
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
            Kind::File(f) => {
                if let Some((dev, i)) = f.real {
                    if self.inodes.get(&(f.view, dev, i)) == Some(&ino) {
                        self.inodes.remove(&(f.view, dev, i));
                    }
                }
                f.names.clone()
            }
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
            // The mount's own directories are the server user's alone, like
            // the store directory around them.
            perm: 0o700,
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
}

/// Bytes allocated to the files of a layer (each inode once).
fn allocated_bytes(layer: &Path) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let _ = crate::walk::walk_tree(layer, &mut |e| {
        if !e.is_dir() && seen.insert(e.stat.st_ino) {
            total += e.stat.st_blocks as u64 * 512;
        }
    });
    total
}

/// Bytes allocated to an open file.
pub(super) fn allocated(f: &File) -> u64 {
    f.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
}

/// Resolves a file found in layer `l` through the hard-link indexes above it.
fn resolve_index(view: &View, l: usize, meta: Metadata) -> (usize, Option<PathBuf>, Metadata) {
    let (mut layer, mut index, mut meta) = (l, None, meta);
    while meta.is_file() && meta.nlink() > 1 {
        let key = format!("{}-{}", layer_name(&view.layers[layer]), meta.ino());
        let rel = Path::new(INDEX_DIR).join(&key);
        let above = (layer + 1..view.layers.len()).rev().find_map(|j| {
            Some((
                j,
                std::fs::symlink_metadata(view.layers[j].join(&rel)).ok()?,
            ))
        });
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
