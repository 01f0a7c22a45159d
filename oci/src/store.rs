//! The runtime's own state under `--root`: one directory per container holding
//! `state.json`, and one lock file per id beside it.
//!
//! ```text
//! <root>/<id>.lock        flock'ed by every call on <id>; removed by delete
//! <root>/<id>/state.json  the container's record, replaced atomically
//! ```
//!
//! burrowd keeps the VM; this record keeps what only the runtime knows (the
//! bundle, the holder process, annotations), so that `state`, `kill` and
//! `delete --force` work from any process, after any crash.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use burrow::db::ProcId;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// runc's default is /run/runc.
pub const DEFAULT_ROOT: &str = "/run/burrow-runtime";

/// One container as the runtime recorded it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub id: String,
    /// Absolute bundle directory.
    pub bundle: PathBuf,
    /// The spec's root.path made absolute.
    pub rootfs: PathBuf,
    /// The VM burrowd made for it (its workspace id), once it answered.
    #[serde(default)]
    pub vm: Option<String>,
    /// The process whose pid the pid file names (the holder), once it exists.
    #[serde(default)]
    pub holder: Option<ProcId>,
    /// RFC 3339.
    pub created: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The user who created it, as runc's `owner` (empty for root).
    #[serde(default)]
    pub owner: String,
    /// The container's process runs on a terminal.
    #[serde(default)]
    pub terminal: bool,
    /// The spec's host hooks: poststart runs after `start`, poststop after `delete`.
    #[serde(default)]
    pub hooks: crate::hooks::Hooks,
    /// The holders of the execs into it (a host process each, standing for
    /// the exec's process in the guest): added before an exec's stream opens,
    /// removed by the holder when its process ends, all killed by `delete`.
    #[serde(default)]
    pub execs: Vec<ProcId>,
}

impl Record {
    /// Whether the holder (and so the container's process) still runs.
    pub fn holder_alive(&self) -> bool {
        self.holder.is_some_and(|h| h.is_alive())
    }

    /// The host processes that stand for the container's processes: its holder
    /// and each exec's, those still alive (what `ps --format json` answers).
    pub fn host_pids(&self) -> Vec<i32> {
        self.holder
            .iter()
            .chain(&self.execs)
            .filter(|h| h.is_alive())
            .map(|h| h.pid)
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct Root {
    dir: PathBuf,
}

impl Root {
    pub fn new(dir: Option<&Path>) -> Result<Root> {
        let dir = dir.unwrap_or(Path::new(DEFAULT_ROOT));
        let dir = std::path::absolute(dir).map_err(Error::io(dir))?;
        Ok(Root { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn ensure(&self) -> Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(Error::io(&self.dir))
    }

    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn state_file(&self, id: &str) -> PathBuf {
        self.container_dir(id).join("state.json")
    }

    fn lock_file(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.lock"))
    }

    /// Takes `id`'s lock, waiting for another call that holds it. The id must
    /// have been validated (it names files).
    pub fn lock(&self, id: &str) -> Result<IdLock> {
        self.ensure()?;
        let path = self.lock_file(id);
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(Error::io(&path))?;
            // SAFETY: flock on an fd we own; it blocks until the lock is ours.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(Error::io(&path)(std::io::Error::last_os_error()));
            }
            // A delete that held the lock before us removed the file: ours is an
            // orphan that nobody else would lock. Take the one at the path.
            let same = match std::fs::metadata(&path) {
                Ok(m) => file
                    .metadata()
                    .is_ok_and(|f| f.ino() == m.ino() && f.dev() == m.dev()),
                Err(_) => false,
            };
            if same {
                return Ok(IdLock { file, path });
            }
        }
    }

    pub fn load(&self, id: &str) -> Result<Option<Record>> {
        let path = self.state_file(id);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Holder(format!("{}: damaged record: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path)(e)),
        }
    }

    /// Writes the record whole or not at all (a temp file renamed over it).
    pub fn save(&self, r: &Record) -> Result<()> {
        let dir = self.container_dir(&r.id);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(Error::io(&dir))?;
        let body = serde_json::to_vec_pretty(r)
            .map_err(|e| Error::Holder(format!("encode the record: {e}")))?;
        write_atomic(&self.state_file(&r.id), &body, 0o600)
    }

    /// Removes the container's directory (the lock goes with the [`IdLock`]).
    pub fn remove(&self, id: &str) -> Result<()> {
        let dir = self.container_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(dir)(e)),
            _ => Ok(()),
        }
    }

    /// Adds (`add`) or removes an exec's holder in `id`'s record, under the
    /// id's lock; holders that are gone are dropped on the way. Nothing happens
    /// when the container has no record (deleted): its lock file, made by this
    /// call, goes again.
    pub fn note_exec(&self, id: &str, holder: ProcId, add: bool) -> Result<()> {
        let lock = self.lock(id)?;
        let Some(mut r) = self.load(id)? else {
            lock.release_and_remove();
            return Ok(());
        };
        r.execs.retain(|h| *h != holder && h.is_alive());
        if add {
            r.execs.push(holder);
        }
        self.save(&r)
    }

    /// Every id with a record, sorted.
    pub fn ids(&self) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ids),
            Err(e) => return Err(Error::io(&self.dir)(e)),
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().join("state.json").is_file() {
                ids.push(name);
            }
        }
        ids.sort();
        Ok(ids)
    }
}

/// `id`'s lock, held until dropped.
pub struct IdLock {
    file: File,
    path: PathBuf,
}

impl IdLock {
    /// Drops the lock file as well: for after the container's record is gone. A
    /// caller waiting on the old file sees that it was removed and takes a new one.
    pub fn release_and_remove(self) {
        let _ = std::fs::remove_file(&self.path);
        drop(self.file);
    }
}

/// Writes `path` whole or not at all.
pub fn write_atomic(path: &Path, body: &[u8], mode: u32) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path)(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> Record {
        Record {
            id: id.into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            vm: None,
            holder: None,
            created: "2026-01-01T00:00:00Z".into(),
            annotations: BTreeMap::new(),
            owner: String::new(),
            terminal: false,
            hooks: Default::default(),
            execs: Vec::new(),
        }
    }

    #[test]
    fn records_round_trip_and_go_away() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = Root::new(Some(tmp.path())).expect("root");
        let lock = root.lock("c1").expect("lock");
        assert_eq!(root.load("c1").expect("load"), None);
        let r = record("c1");
        root.save(&r).expect("save");
        assert_eq!(root.load("c1").expect("load"), Some(r));
        assert_eq!(root.ids().expect("ids"), vec!["c1".to_string()]);
        root.remove("c1").expect("remove");
        lock.release_and_remove();
        assert!(std::fs::read_dir(tmp.path()).expect("dir").next().is_none());
    }

    /// A call that waited on a lock its holder removed takes a fresh one rather
    /// than an orphan nobody else would ever wait on.
    #[test]
    fn a_removed_lock_is_not_taken() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = Root::new(Some(tmp.path())).expect("root");
        let first = root.lock("c1").expect("lock");
        let root2 = root.clone();
        let waiter = std::thread::spawn(move || {
            let l = root2.lock("c1").expect("lock");
            let ino = std::fs::metadata(tmp_lock(&root2))
                .expect("lock file")
                .ino();
            drop(l);
            ino
        });
        first.release_and_remove();
        let ino = waiter.join().expect("waiter");
        assert!(ino > 0);
    }

    /// An exec's holder is added and removed under the lock; a dead one is
    /// never listed; a container without a record keeps no lock file.
    #[test]
    fn exec_holders_come_and_go() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = Root::new(Some(tmp.path())).expect("root");
        let me = ProcId::of(std::process::id() as i32).expect("own ProcId");
        let gone = ProcId {
            pid: me.pid,
            start_time: me.start_time + 1,
        };
        let mut r = record("c1");
        r.holder = Some(me);
        root.save(&r).expect("save");
        root.note_exec("c1", gone, true).expect("add");
        root.note_exec("c1", me, true).expect("add");
        let r = root.load("c1").expect("load").expect("record");
        assert_eq!(r.execs, vec![me], "a dead holder is dropped on the way");
        assert_eq!(r.host_pids(), vec![me.pid, me.pid]);
        root.note_exec("c1", me, false).expect("remove");
        let r = root.load("c1").expect("load").expect("record");
        assert!(r.execs.is_empty());
        root.remove("c1").expect("remove");
        root.lock("c1").expect("lock").release_and_remove();
        root.note_exec("c1", me, false).expect("no record");
        assert!(std::fs::read_dir(tmp.path()).expect("dir").next().is_none());
    }

    fn tmp_lock(root: &Root) -> PathBuf {
        root.lock_file("c1")
    }
}
