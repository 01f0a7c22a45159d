//! Workspace volumes.
//!
//! A volume is the directory a workspace's VM sees as its root file system (shared
//! with the guest over virtio-fs). Every backend sits behind [`Store`], chosen at run
//! time, so the engine never knows how a volume is made. This release has one
//! backend, [`CopyStore`], a full copy of the image per volume; copy-on-write
//! backends (Btrfs subvolumes, a FUSE layer) slot in behind the same trait.

mod copy;

use std::path::{Path, PathBuf};

pub use copy::CopyStore;

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
    /// Short backend name shown to users (`copy`, later `btrfs`, `fuse`).
    fn kind(&self) -> &'static str;
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
    /// Removes half-made volumes left by a crash. Returns what it removed.
    fn reconcile(&self) -> Result<Vec<PathBuf>, StoreError>;
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
