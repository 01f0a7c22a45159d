//! Workspace volumes.
//!
//! A volume is the directory a workspace's VM sees as its root file system (shared
//! with the guest over virtio-fs). Every backend sits behind [`Store`], chosen at run
//! time, so the engine never knows how a volume is made:
//! - [`BtrfsStore`]: subvolumes and snapshots, on a Btrfs state dir or a
//!   loop-mounted Btrfs image;
//! - [`FuseStore`]: a copy-on-write layer file system served over FUSE, for any
//!   file system and any user;
//! - [`CopyStore`]: full copies, the plain fallback.

mod btrfs;
mod copy;
pub mod cow;
mod layout;
mod loop_image;
mod qgroup;
mod usage;
pub mod walk;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub use btrfs::{is_btrfs, BtrfsStore};
pub use copy::CopyStore;
pub use cow::FuseStore;
pub use loop_image::{mount_flags, BtrfsImage};
pub use usage::{usage, Usage};
pub use walk::{walk_tree, WalkEntry};

/// Mode of every directory a store makes for itself: guests' files live below,
/// and no host user but root may reach them, whatever the umask of whoever
/// started the daemon.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of a store's own files (the loop image).
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Makes `dir` (and missing parents) and sets it to [`PRIVATE_DIR_MODE`], also
/// when it existed with another mode (a state dir made by an older build).
pub fn private_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(dir).map_err(|e| StoreError::io("create", dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(PRIVATE_DIR_MODE))
        .map_err(|e| StoreError::io("chmod", dir, e))
}

/// As [`private_dir`], for a mount point: one in use is left as it is (its
/// mode is the mounted root's, which its server sets).
pub(crate) fn private_mountpoint(dir: &Path) -> Result<(), StoreError> {
    if loop_image::is_mountpoint(dir) {
        return Ok(());
    }
    private_dir(dir)
}

/// How much a volume holds and may hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskUsage {
    /// Bytes counted against the volume's limit (see each store for what counts).
    pub used_bytes: u64,
    /// The limit, if one is set.
    pub limit_bytes: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("volume {0} already exists")]
    Exists(String),
    #[error("volume {0} not found")]
    NotFound(String),
    #[error("invalid volume id {0:?}: use [A-Za-z0-9_-]{{1,64}}")]
    InvalidId(String),
    #[error("image root {0} is not a directory")]
    BadImage(PathBuf),
    #[error("snapshot {name:?} of volume {volume} already exists")]
    SnapshotExists { volume: String, name: String },
    #[error("snapshot {name:?} of volume {volume} not found")]
    SnapshotNotFound { volume: String, name: String },
    #[error("invalid snapshot name {0:?}: use letters, digits, '-', '_' and '.', at most 64")]
    InvalidSnapshotName(String),
    #[error("btrfs {op} {path}: {message}")]
    Btrfs {
        op: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("the {store} store cannot {what}")]
    Unsupported {
        store: &'static str,
        what: &'static str,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The image a volume is made from: its root directory, and a key that changes
/// whenever the image is rebuilt (so nothing made from an old build is reused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSource {
    pub key: String,
    pub root: PathBuf,
}

/// A read-only, point-in-time copy of a volume.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    pub volume: String,
    pub name: String,
    pub path: PathBuf,
}

/// A volume as a store reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Volume {
    pub id: String,
    pub path: PathBuf,
}

/// Where workspace volumes live and how they are made.
///
/// Implementations are blocking (file walks, ioctls): async callers go through
/// `spawn_blocking`. Every operation is all-or-nothing: a crash in the middle leaves
/// no volume that [`Store::list`] reports, and [`Store::reconcile`] removes the debris.
pub trait Store: Send + Sync {
    /// Short backend name shown to users (`btrfs`, `fuse`, `copy`).
    fn kind(&self) -> &'static str;
    /// Where volume `id` lives (or will), so it can be recorded before it is made.
    fn volume_path(&self, id: &str) -> PathBuf;
    /// The directory holding all volumes; VM processes name paths under it.
    fn volumes_dir(&self) -> PathBuf;
    /// Makes a new volume `id` whose contents are those of `image`.
    fn create(&self, id: &str, image: &ImageSource) -> Result<Volume, StoreError>;
    /// Does ahead of time whatever makes the next [`Store::create`] from `image`
    /// fast, and drops what was prepared for other images. Backends whose create is
    /// already O(1) do nothing.
    fn prepare(&self, _image: &ImageSource) -> Result<(), StoreError> {
        Ok(())
    }
    /// Removes volume `id`. Removing a volume that does not exist is not an error.
    fn delete(&self, id: &str) -> Result<(), StoreError>;
    /// The directory of volume `id`, if it exists.
    fn get(&self, id: &str) -> Option<Volume>;
    fn list(&self) -> Result<Vec<Volume>, StoreError>;
    /// Freezes volume `volume` as snapshot `name`. The caller makes the contents
    /// consistent first (a running guest flushes its writes).
    fn snapshot(&self, volume: &str, name: &str) -> Result<Snapshot, StoreError>;
    /// Makes volume `volume` exactly what snapshot `name` holds. The snapshot stays.
    fn restore(&self, volume: &str, name: &str) -> Result<(), StoreError>;
    /// A new, independent volume `id` starting from snapshot `name` of `volume`.
    fn clone_snapshot(&self, volume: &str, name: &str, id: &str) -> Result<Volume, StoreError>;
    fn delete_snapshot(&self, volume: &str, name: &str) -> Result<(), StoreError>;
    /// Snapshots of `volume`, by name.
    fn snapshots(&self, volume: &str) -> Result<Vec<Snapshot>, StoreError>;
    /// Removes half-made volumes left by a crash. Returns what it removed.
    fn reconcile(&self) -> Result<Vec<PathBuf>, StoreError>;
    /// What snapshot `name` of `volume` costs: the bytes it refers to, and the
    /// bytes that deleting it would free.
    fn snapshot_usage(&self, volume: &str, name: &str) -> Result<Usage, StoreError> {
        validate_snapshot_name(name)?;
        let path = self
            .snapshots(volume)?
            .into_iter()
            .find(|s| s.name == name)
            .map(|s| s.path)
            .ok_or_else(|| StoreError::SnapshotNotFound {
                volume: volume.to_string(),
                name: name.to_string(),
            })?;
        usage(&path).map_err(|e| StoreError::io("measure", &path, e))
    }
    /// Caps what volume `id` may hold at `bytes` (`None` lifts the cap). Writes past
    /// it fail in the guest with ENOSPC (FUSE) or EDQUOT (Btrfs qgroups).
    fn set_disk_limit(&self, _id: &str, _bytes: Option<u64>) -> Result<(), StoreError> {
        Err(StoreError::Unsupported {
            store: self.kind(),
            what: "limit a volume's disk",
        })
    }
    /// What volume `id` holds, counted as its limit counts, and its limit.
    fn disk_usage(&self, _id: &str) -> Result<DiskUsage, StoreError> {
        Err(StoreError::Unsupported {
            store: self.kind(),
            what: "measure a volume's disk",
        })
    }
    /// Whether [`Store::set_disk_limit`] works on this store.
    fn limits_disk(&self) -> bool {
        false
    }
    /// The process serving the store's volumes, if it has one (the FUSE server):
    /// when it dies, the volumes of running VMs are gone with it.
    fn server_pid(&self) -> Option<i32> {
        None
    }
    /// Makes sure the store can serve volumes now (restarting a dead server).
    fn ensure_ready(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// True once after the store replaced a server that had died while serving
    /// (its mount was left behind): VMs that ran on it lost their volumes.
    fn take_server_replaced(&self) -> bool {
        false
    }
    /// Releases what the store keeps running outside this process (a FUSE server
    /// and its mount) when nothing uses its volumes any more. The next open starts
    /// it again.
    fn shutdown(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Snapshot names become directory names: `[A-Za-z0-9._-]{1,64}`, not `.` or `..`,
/// not starting with `.` (the stores' own entries do).
pub fn validate_snapshot_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidSnapshotName(name.to_string()))
    }
}

/// Volume ids become directory names: keep them to a safe alphabet.
pub fn validate_id(id: &str) -> Result<(), StoreError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidId(id.to_string()))
    }
}
