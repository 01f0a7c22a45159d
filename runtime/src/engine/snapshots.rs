//! Snapshots, restore, forks and diffs of workspace volumes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use burrow_fs::{validate_snapshot_name, StoreError};
use burrow_proto::{Exec, Op};
use serde::{Deserialize, Serialize};

use super::{boot_timeout, now_rfc3339, Engine, VolumeSource, WorkspaceInfo};
use crate::db::{ForkedFrom, SnapshotRecord, SnapshotState, State, WorkspaceRecord};
use crate::error::{Error, Result};
use crate::names::{new_id, validate_name};

/// Most forks one request may make.
pub const MAX_FORKS: u32 = 16;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub workspace: String,
    pub name: String,
    pub created_at: String,
    /// The snapshot this one was taken on top of: a snapshot of the same
    /// workspace, or `workspace@snapshot` for the one a fork started from.
    pub parent: Option<String>,
    /// Bytes only this snapshot holds: what deleting it frees. Computed by
    /// `snapshot ls` (a walk of its extent maps), not by `snapshot create`.
    pub used_bytes: Option<u64>,
    /// Bytes of data the snapshot refers to, shared or not. As `used_bytes`.
    pub referenced_bytes: Option<u64>,
    /// Names of the workspaces forked from this snapshot.
    pub dependents: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ForkParams {
    pub snapshot: String,
    /// Name of the fork when one is made.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub count: Option<u32>,
    /// Forks are named `<prefix>-1` … `<prefix>-<count>`.
    #[serde(default)]
    pub name_prefix: Option<String>,
    #[serde(default)]
    pub boot_timeout_secs: Option<u64>,
    /// Disk limit of the forks in GiB; by default the source's.
    #[serde(default)]
    pub disk_gb: Option<u32>,
}

/// Paths (as the guest sees them) that differ between a snapshot and the volume now.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<DiffPath>,
    pub modified: Vec<DiffPath>,
    pub deleted: Vec<DiffPath>,
}

/// A guest-made path: names are bytes, not always UTF-8. `path` is always
/// there (bytes that are not UTF-8 shown as U+FFFD); `path_b64` carries the
/// exact bytes (standard base64) only when `path` does not.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct DiffPath {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_b64: Option<String>,
}

impl DiffPath {
    pub fn from_bytes(bytes: &[u8]) -> DiffPath {
        use base64::Engine as _;
        match std::str::from_utf8(bytes) {
            Ok(s) => DiffPath {
                path: s.to_string(),
                path_b64: None,
            },
            Err(_) => DiffPath {
                path: String::from_utf8_lossy(bytes).into_owned(),
                path_b64: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
            },
        }
    }

    /// The exact bytes of the path.
    pub fn bytes(&self) -> Vec<u8> {
        use base64::Engine as _;
        self.path_b64
            .as_ref()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .unwrap_or_else(|| self.path.as_bytes().to_vec())
    }
}

fn store_err(e: StoreError) -> Error {
    match e {
        StoreError::InvalidSnapshotName(n) => Error::invalid(
            "snapshot",
            format!("{n:?}: use letters, digits, '-', '_' and '.', at most 64"),
        ),
        other => Error::Store(other),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Vmm(format!("store task: {e}")))?
}

impl Engine {
    /// A snapshot as users see it. Its sizes, when `measure` asks for them, come
    /// from walking what it holds: call from a blocking context then.
    fn snapshot_info(
        &self,
        rec: &WorkspaceRecord,
        s: &SnapshotRecord,
        measure: bool,
    ) -> Result<SnapshotInfo> {
        let dependents = self
            .db
            .forks_of(&rec.id, &s.name)?
            .into_iter()
            .map(|w| w.name)
            .collect();
        let usage = measure
            .then(|| self.store.snapshot_usage(&rec.id, &s.name).ok())
            .flatten();
        Ok(SnapshotInfo {
            workspace: rec.name.clone(),
            name: s.name.clone(),
            created_at: s.created_at.clone(),
            parent: s.parent.clone(),
            used_bytes: usage.map(|u| u.exclusive_bytes),
            referenced_bytes: usage.map(|u| u.referenced_bytes),
            dependents,
        })
    }

    fn ready_snapshot(&self, rec: &WorkspaceRecord, name: &str) -> Result<SnapshotRecord> {
        super::containers::has_volume(rec, "snapshots, forks and diffs")?;
        validate_snapshot_name(name).map_err(store_err)?;
        match self.db.snapshot(&rec.id, name)? {
            Some(s) if s.state == SnapshotState::Ready => Ok(s),
            _ => Err(Error::SnapshotNotFound {
                workspace: rec.name.clone(),
                name: name.to_string(),
            }),
        }
    }

    /// Flushes a running guest's writes so that what the host sees is consistent.
    async fn flush_guest(&self, rec: &WorkspaceRecord) -> Result<()> {
        if rec.state != State::Running {
            return Ok(());
        }
        let exec = Exec {
            argv: vec!["sync".into()],
            timeout_ms: Some(60_000),
            ..Default::default()
        };
        self.guest(rec)
            .call(Op::Exec(exec), Some(Duration::from_secs(75)))
            .await
            .map(|_| ())
    }

    pub async fn snapshot_create(&self, reference: &str, name: &str) -> Result<SnapshotInfo> {
        validate_snapshot_name(name).map_err(store_err)?;
        let (_held, rec) = self.lock_workspace(reference).await?;
        super::containers::has_volume(&rec, "snapshots")?;
        if !matches!(rec.state, State::Running | State::Stopped) {
            return Err(super::wrong_state(
                &rec,
                rec.state,
                "snapshot",
                "running or stopped",
            ));
        }
        let srec = SnapshotRecord {
            workspace_id: rec.id.clone(),
            name: name.to_string(),
            created_at: now_rfc3339(),
            state: SnapshotState::Creating,
            parent: self.db.head(&rec.id)?,
        };
        if !self.db.insert_snapshot(&srec)? {
            return Err(Error::SnapshotExists {
                workspace: rec.name.clone(),
                name: name.to_string(),
            });
        }
        let made = async {
            self.flush_guest(&rec).await?;
            let store = self.store.clone();
            let (id, n) = (rec.id.clone(), name.to_string());
            blocking(move || store.snapshot(&id, &n).map_err(store_err)).await?;
            self.db
                .set_snapshot_state(&rec.id, name, SnapshotState::Ready)?;
            self.db.set_head(&rec.id, name)
        }
        .await;
        if let Err(e) = made {
            self.db.delete_snapshot(&rec.id, name)?;
            return Err(e);
        }
        let s = self.db.snapshot(&rec.id, name)?.unwrap_or(srec);
        // Sizes need a walk of the whole tree: `snapshot ls` does it, so that a
        // create stays O(1).
        self.snapshot_info(&rec, &s, false)
    }

    pub async fn snapshot_list(self: &Arc<Self>, reference: &str) -> Result<Vec<SnapshotInfo>> {
        let rec = self.db.resolve(reference)?;
        super::containers::has_volume(&rec, "snapshots")?;
        let engine = self.clone();
        blocking(move || {
            engine
                .db
                .snapshots(Some(&rec.id))?
                .iter()
                .filter(|s| s.state == SnapshotState::Ready)
                .map(|s| engine.snapshot_info(&rec, s, true))
                .collect()
        })
        .await
    }

    /// Makes the workspace's disk exactly the snapshot; a running VM is restarted on it.
    pub async fn snapshot_restore(
        self: &Arc<Self>,
        reference: &str,
        name: &str,
    ) -> Result<WorkspaceInfo> {
        let (_held, rec) = self.lock_workspace(reference).await?;
        self.ready_snapshot(&rec, name)?;
        let was_running = match rec.state {
            State::Running => true,
            State::Stopped => false,
            s => return Err(super::wrong_state(&rec, s, "restore", "running or stopped")),
        };
        if was_running {
            self.stop_locked(&rec).await?;
        }
        let store = self.store.clone();
        let (id, n) = (rec.id.clone(), name.to_string());
        blocking(move || store.restore(&id, &n).map_err(store_err)).await?;
        self.db.set_head(&rec.id, name)?;
        // A restored Btrfs volume is a new subvolume, without the limit.
        self.apply_disk_limit(&rec).await?;
        if was_running {
            let rec = self
                .db
                .get(&rec.id)?
                .ok_or_else(|| Error::WorkspaceNotFound(reference.to_string()))?;
            self.start_locked(&rec, super::DEFAULT_BOOT_TIMEOUT, None)
                .await?;
        }
        self.info(&rec.id)
    }

    /// Deletes a snapshot; refused, naming them, while forks depend on it.
    pub async fn snapshot_delete(&self, reference: &str, name: &str) -> Result<()> {
        let (_held, rec) = self.lock_workspace(reference).await?;
        self.ready_snapshot(&rec, name)?;
        let forks: Vec<String> = self
            .db
            .forks_of(&rec.id, name)?
            .into_iter()
            .map(|w| w.name)
            .collect();
        if !forks.is_empty() {
            return Err(Error::HasDependents {
                snapshot: name.to_string(),
                forks: forks.join(", "),
            });
        }
        self.delete_snapshot_locked(&rec.id, name).await
    }

    pub(super) async fn delete_snapshot_locked(
        &self,
        workspace_id: &str,
        name: &str,
    ) -> Result<()> {
        self.db
            .set_snapshot_state(workspace_id, name, SnapshotState::Deleting)?;
        let store = self.store.clone();
        let (id, n) = (workspace_id.to_string(), name.to_string());
        blocking(move || match store.delete_snapshot(&id, &n) {
            Ok(()) | Err(StoreError::SnapshotNotFound { .. }) => Ok(()),
            Err(e) => Err(store_err(e)),
        })
        .await?;
        self.db.delete_snapshot(workspace_id, name)
    }

    /// New, independent, running workspaces from a snapshot, made in parallel.
    pub async fn fork(
        self: &Arc<Self>,
        reference: &str,
        p: ForkParams,
    ) -> Result<Vec<WorkspaceInfo>> {
        let source = self.db.resolve(reference)?;
        self.ready_snapshot(&source, &p.snapshot)?;
        let count = p.count.unwrap_or(1);
        if count == 0 || count > MAX_FORKS {
            return Err(Error::invalid(
                "count",
                format!("{count} is outside 1..={MAX_FORKS}"),
            ));
        }
        let timeout = boot_timeout(p.boot_timeout_secs)?;
        let disk_limit = match p.disk_gb {
            Some(_) => self.disk_limit(p.disk_gb, None)?,
            None => source.disk_limit,
        };
        let names: Vec<String> = match (&p.name, &p.name_prefix, count) {
            (Some(_), Some(_), _) => {
                return Err(Error::invalid(
                    "name",
                    "give --name or --name-prefix, not both",
                ))
            }
            (Some(_), None, c) if c > 1 => {
                return Err(Error::invalid(
                    "name",
                    "several forks need --name-prefix, not --name",
                ))
            }
            (Some(n), None, _) => vec![n.clone()],
            (None, prefix, c) => {
                let prefix = prefix
                    .clone()
                    .unwrap_or_else(|| format!("{}-fork", source.name));
                if c == 1 && p.name_prefix.is_none() {
                    vec![prefix]
                } else {
                    (1..=c).map(|i| format!("{prefix}-{i}")).collect()
                }
            }
        };
        for n in &names {
            validate_name("name", n)?;
            if self.db.resolve(n).is_ok_and(|r| &r.name == n) {
                return Err(Error::NameTaken(n.clone()));
            }
        }
        let mut recs = Vec::new();
        for name in names {
            let id = new_id()?;
            recs.push(WorkspaceRecord {
                volume: self.store.volume_path(&id),
                id,
                name,
                state: State::Creating,
                vcpus: source.vcpus,
                memory_mib: source.memory_mib,
                image: source.image.clone(),
                created_at: now_rfc3339(),
                accel: None,
                store: self.store.kind().to_string(),
                pids: None,
                forked_from: Some(ForkedFrom {
                    workspace_id: source.id.clone(),
                    workspace: source.name.clone(),
                    snapshot: p.snapshot.clone(),
                }),
                disk_limit,
                kind: crate::db::Kind::Workspace,
                container: None,
            });
        }
        let made = futures_util::future::join_all(recs.into_iter().map(|rec| {
            let src = VolumeSource::Snapshot {
                workspace_id: source.id.clone(),
                name: p.snapshot.clone(),
            };
            async move { self.materialize(rec, src, timeout, None).await }
        }))
        .await;
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for r in made {
            match r {
                Ok(w) => out.push(w),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if !errors.is_empty() && out.is_empty() {
            return Err(Error::Vmm(format!("fork failed: {}", errors.join("; "))));
        }
        if !errors.is_empty() {
            tracing::warn!(
                "{} of the forks failed: {}",
                errors.len(),
                errors.join("; ")
            );
        }
        Ok(out)
    }

    /// What changed in a workspace's disk since one of its snapshots.
    pub async fn diff(&self, reference: &str, name: &str) -> Result<Diff> {
        let rec = self.db.resolve(reference)?;
        self.ready_snapshot(&rec, name)?;
        self.flush_guest(&rec).await?;
        let snap = self
            .store
            .snapshots(&rec.id)
            .map_err(store_err)?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Error::SnapshotNotFound {
                workspace: rec.name.clone(),
                name: name.to_string(),
            })?;
        let volume = rec.volume.clone();
        blocking(move || Ok(diff_trees(&snap.path, &volume))).await
    }
}

/// One entry of a tree walk: what is compared to tell "modified".
#[derive(PartialEq, Eq)]
struct Entry {
    kind: u32,
    mode: u32,
    size: u64,
    mtime: (i64, i64),
    link: Option<Vec<u8>>,
}

/// Every entry under `root`, by its path as bytes (walked by directory fds: no
/// PATH_MAX limit, no name merged with another by a lossy conversion).
fn walk(root: &Path) -> BTreeMap<Vec<u8>, Entry> {
    let mut out = BTreeMap::new();
    let walked = burrow_fs::walk_tree(root, &mut |e| {
        let st = e.stat;
        let is_dir = e.is_dir();
        out.insert(
            e.path.to_vec(),
            Entry {
                kind: st.st_mode & libc::S_IFMT,
                mode: st.st_mode & 0o7777,
                // A directory's size and mtime change with its entries, which
                // are reported on their own.
                size: if is_dir { 0 } else { st.st_size as u64 },
                mtime: if is_dir {
                    (0, 0)
                } else {
                    (st.st_mtime, st.st_mtime_nsec)
                },
                link: e.is_symlink().then(|| e.link_target().ok()).flatten(),
            },
        );
    });
    if let Err(e) = walked {
        tracing::warn!("diff: walk {}: {e}", root.display());
    }
    out
}

fn diff_trees(before: &Path, now: &Path) -> Diff {
    let a = walk(before);
    let b = walk(now);
    let mut d = Diff::default();
    for (path, entry) in &b {
        match a.get(path) {
            None => d.added.push(DiffPath::from_bytes(path)),
            Some(old) if old != entry => d.modified.push(DiffPath::from_bytes(path)),
            Some(_) => {}
        }
    }
    d.deleted = a
        .keys()
        .filter(|p| !b.contains_key(*p))
        .map(|p| DiffPath::from_bytes(p))
        .collect();
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_of_two_trees() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        for d in [&a, &b] {
            std::fs::create_dir_all(d.join("work/sub")).unwrap();
            std::fs::write(d.join("work/same"), "x").unwrap();
        }
        std::fs::write(a.join("work/gone"), "x").unwrap();
        std::fs::write(a.join("work/changed"), "x").unwrap();
        std::fs::write(b.join("work/changed"), "xy").unwrap();
        std::fs::write(b.join("work/sub/new"), "x").unwrap();
        // Same contents written at different times: the mtime tells them apart too.
        let mtime = std::fs::metadata(a.join("work/same"))
            .unwrap()
            .modified()
            .unwrap();
        std::fs::File::options()
            .write(true)
            .open(b.join("work/same"))
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let d = diff_trees(&a, &b);
        let paths = |v: &[DiffPath]| v.iter().map(|p| p.path.clone()).collect::<Vec<_>>();
        assert_eq!(paths(&d.added), vec!["/work/sub/new"]);
        assert_eq!(paths(&d.modified), vec!["/work/changed"]);
        assert_eq!(paths(&d.deleted), vec!["/work/gone"]);
    }

    #[test]
    fn names_that_are_not_utf8_stay_distinct_and_exact() {
        use std::os::unix::ffi::OsStrExt;
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        for n in [&b"a\xff"[..], &b"a\xfe"[..]] {
            std::fs::write(b.join(std::ffi::OsStr::from_bytes(n)), "x").unwrap();
        }
        let d = diff_trees(&a, &b);
        assert_eq!(d.added.len(), 2);
        assert_eq!(d.added[0].path, d.added[1].path, "both lossy the same");
        let json = serde_json::to_string(&d).unwrap();
        let back: Diff = serde_json::from_str(&json).unwrap();
        let mut bytes: Vec<Vec<u8>> = back.added.iter().map(DiffPath::bytes).collect();
        bytes.sort();
        assert_eq!(bytes, vec![b"/a\xfe".to_vec(), b"/a\xff".to_vec()]);
    }
}
