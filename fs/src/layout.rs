//! What the backends share about their directories: the names of in-between
//! states, listing volumes and snapshots, and finishing or removing what a crash
//! left half done.

use std::path::{Path, PathBuf};

use crate::{validate_id, validate_snapshot_name, Snapshot, StoreError, Volume};

/// Prefix of something being built; removed by `reconcile`.
pub(crate) const PARTIAL: &str = ".partial-";
/// Prefix of something being removed; removed by `reconcile`.
pub(crate) const DOOMED: &str = ".doomed-";
/// Prefix of a volume's restored contents, complete and about to replace it: a
/// crash between the two renames of a restore is finished by `reconcile`.
pub(crate) const RESTORED: &str = ".restored-";

/// The volumes in `dir`: entries named like volume ids, by id.
pub(crate) fn list_volumes(dir: &Path) -> Result<Vec<Volume>, StoreError> {
    let rd = std::fs::read_dir(dir).map_err(|e| StoreError::io("read", dir, e))?;
    let mut out: Vec<Volume> = rd
        .flatten()
        .filter_map(|e| {
            let id = e.file_name().to_string_lossy().into_owned();
            validate_id(&id).ok().map(|_| Volume { id, path: e.path() })
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// The snapshots of `volume` kept in `dir`, by name. A missing dir means none.
pub(crate) fn list_snapshots(dir: &Path, volume: &str) -> Result<Vec<Snapshot>, StoreError> {
    validate_id(volume)?;
    let mut out: Vec<Snapshot> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            validate_snapshot_name(&name).ok().map(|_| Snapshot {
                volume: volume.to_string(),
                name,
                path: e.path(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The path of snapshot `name` of `volume`, kept in `dir`, if it exists.
pub(crate) fn existing_snapshot(
    dir: &Path,
    volume: &str,
    name: &str,
) -> Result<PathBuf, StoreError> {
    validate_id(volume)?;
    validate_snapshot_name(name)?;
    let path = dir.join(name);
    if path.is_dir() {
        Ok(path)
    } else {
        Err(StoreError::SnapshotNotFound {
            volume: volume.to_string(),
            name: name.to_string(),
        })
    }
}

/// In each of `dirs`: finishes restores that got as far as moving the old volume
/// away, and removes (with `remove`) everything else left in between. Returns what
/// it removed.
pub(crate) fn reconcile_dirs(
    dirs: &[PathBuf],
    remove: impl Fn(&Path) -> Result<(), StoreError>,
) -> Result<Vec<PathBuf>, StoreError> {
    let mut removed = Vec::new();
    for dir in dirs {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(volume) = name.strip_prefix(RESTORED) {
                let dest = dir.join(volume);
                if !dest.exists() {
                    std::fs::rename(entry.path(), &dest)
                        .map_err(|e| StoreError::io("rename", &dest, e))?;
                    continue;
                }
            }
            if name.starts_with(PARTIAL) || name.starts_with(DOOMED) || name.starts_with(RESTORED) {
                remove(&entry.path())?;
                removed.push(entry.path());
            }
        }
    }
    Ok(removed)
}

/// The subdirectories of `dir` (one per volume that has snapshots).
pub(crate) fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect()
}
