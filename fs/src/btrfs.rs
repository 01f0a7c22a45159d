//! The Btrfs backend: volumes are subvolumes, snapshots are read-only subvolume
//! snapshots, forks are writable snapshots of a snapshot. Every one of those is a
//! single Btrfs transaction, O(1) in the size of the volume.
//!
//! Layout under the store's root (a directory on a mounted Btrfs):
//! - `images/<key>`: an image imported once, read-only;
//! - `volumes/<id>`: a workspace's volume, a writable snapshot of its image;
//! - `snapshots/<id>/<name>`: read-only snapshots of volume `<id>`.
//!
//! Entries whose names start with `.` are the store's own in-between states
//! (`.partial-`, `.doomed-`, `.restored-`); `reconcile` finishes or removes them.

use std::path::{Path, PathBuf};
use std::process::Command;

use libbtrfsutil::{CreateSnapshotOptions, DeleteSubvolumeOptions};

use crate::layout::{
    existing_snapshot, list_snapshots, list_volumes, reconcile_dirs, subdirs, DOOMED, PARTIAL,
    RESTORED,
};
use crate::{
    validate_id, validate_snapshot_name, ImageSource, Snapshot, Store, StoreError, Volume,
};

pub struct BtrfsStore {
    root: PathBuf,
    /// Quotas are turned on for the file system at the first limit set: they
    /// cost on every snapshot delete, so a store that limits nothing goes without.
    quotas_on: std::sync::atomic::AtomicBool,
    /// One image import at a time: a create and a background prepare may both ask.
    importing: std::sync::Mutex<()>,
}

fn btrfs_err(op: &'static str, path: &Path, e: libbtrfsutil::Error) -> StoreError {
    StoreError::Btrfs {
        op,
        path: path.to_path_buf(),
        message: e.os_error().to_string(),
    }
}

impl BtrfsStore {
    /// A store in `root`, which must be on Btrfs.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        crate::private_dir(&root)?;
        for d in ["images", "volumes", "snapshots"] {
            crate::private_dir(&root.join(d))?;
        }
        if !is_btrfs(&root)? {
            return Err(StoreError::Btrfs {
                op: "open",
                path: root,
                message: "not on a Btrfs file system".into(),
            });
        }
        Ok(BtrfsStore {
            root,
            quotas_on: std::sync::atomic::AtomicBool::new(false),
            importing: std::sync::Mutex::new(()),
        })
    }

    fn volumes(&self) -> PathBuf {
        self.root.join("volumes")
    }

    fn image_path(&self, image: &ImageSource) -> PathBuf {
        self.root.join("images").join(&image.key)
    }

    fn snapshot_path(&self, volume: &str, name: &str) -> PathBuf {
        self.root.join("snapshots").join(volume).join(name)
    }

    /// Imports `image` as a read-only subvolume if it is not there yet: a copy into a
    /// new subvolume (reflinked where the image lives on the same Btrfs), frozen by a
    /// read-only snapshot under the final name.
    fn import(&self, image: &ImageSource) -> Result<PathBuf, StoreError> {
        validate_id(&image.key)?;
        let dest = self.image_path(image);
        if dest.exists() {
            return Ok(dest);
        }
        let _one = self.importing.lock().unwrap_or_else(|p| p.into_inner());
        if dest.exists() {
            return Ok(dest);
        }
        if !image.root.is_dir() {
            return Err(StoreError::BadImage(image.root.clone()));
        }
        let partial = self
            .root
            .join("images")
            .join(format!("{PARTIAL}{}", image.key));
        delete_subvolume_if_any(&partial)?;
        libbtrfsutil::create_subvolume(&partial)
            .map_err(|e| btrfs_err("create subvolume", &partial, e))?;
        // Copy the image's contents (not the directory itself) into the subvolume.
        let out = Command::new("cp")
            .arg("-a")
            .arg("--reflink=auto")
            .arg(image.root.join("."))
            .arg(&partial)
            .output()
            .map_err(|e| StoreError::io("run cp for", &partial, e))?;
        if !out.status.success() {
            let _ = delete_subvolume_if_any(&partial);
            let msg = String::from_utf8_lossy(&out.stderr);
            let first = msg.lines().next().unwrap_or("cp failed").to_string();
            return Err(StoreError::io(
                "import image into",
                &partial,
                std::io::Error::other(first),
            ));
        }
        snapshot(&partial, &dest, true)?;
        delete_subvolume_if_any(&partial)?;
        Ok(dest)
    }

    /// Turns quotas on, once per store opened (idempotent in the kernel too).
    fn quotas(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        if !self.quotas_on.load(Ordering::Acquire) {
            crate::qgroup::enable(&self.root)?;
            self.quotas_on.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn existing_snapshot(&self, volume: &str, name: &str) -> Result<PathBuf, StoreError> {
        existing_snapshot(&self.root.join("snapshots").join(volume), volume, name)
    }
}

impl Store for BtrfsStore {
    fn kind(&self) -> &'static str {
        "btrfs"
    }

    fn volume_path(&self, id: &str) -> PathBuf {
        self.volumes().join(id)
    }

    fn volumes_dir(&self) -> PathBuf {
        self.volumes()
    }

    fn create(&self, id: &str, image: &ImageSource) -> Result<Volume, StoreError> {
        validate_id(id)?;
        let dest = self.volumes().join(id);
        if dest.exists() {
            return Err(StoreError::Exists(id.to_string()));
        }
        let base = self.import(image)?;
        snapshot(&base, &dest, false)?;
        Ok(Volume {
            id: id.to_string(),
            path: dest,
        })
    }

    fn prepare(&self, image: &ImageSource) -> Result<(), StoreError> {
        self.import(image).map(|_| ())
    }

    fn delete(&self, id: &str) -> Result<(), StoreError> {
        validate_id(id)?;
        let path = self.volumes().join(id);
        if !path.exists() {
            return Ok(());
        }
        let doomed = self.volumes().join(format!("{DOOMED}{id}"));
        std::fs::rename(&path, &doomed).map_err(|e| StoreError::io("rename", &path, e))?;
        delete_subvolume_if_any(&doomed)
    }

    fn get(&self, id: &str) -> Option<Volume> {
        validate_id(id).ok()?;
        let path = self.volumes().join(id);
        path.is_dir().then(|| Volume {
            id: id.to_string(),
            path,
        })
    }

    fn list(&self) -> Result<Vec<Volume>, StoreError> {
        list_volumes(&self.volumes())
    }

    fn snapshot(&self, volume: &str, name: &str) -> Result<Snapshot, StoreError> {
        validate_snapshot_name(name)?;
        let src = self
            .get(volume)
            .ok_or_else(|| StoreError::NotFound(volume.to_string()))?;
        let path = self.snapshot_path(volume, name);
        if path.exists() {
            return Err(StoreError::SnapshotExists {
                volume: volume.to_string(),
                name: name.to_string(),
            });
        }
        if let Some(dir) = path.parent() {
            crate::private_dir(dir)?;
        }
        snapshot(&src.path, &path, true)?;
        Ok(Snapshot {
            volume: volume.to_string(),
            name: name.to_string(),
            path,
        })
    }

    fn restore(&self, volume: &str, name: &str) -> Result<(), StoreError> {
        let snap = self.existing_snapshot(volume, name)?;
        let dest = self
            .get(volume)
            .ok_or_else(|| StoreError::NotFound(volume.to_string()))?
            .path;
        let fresh = self.volumes().join(format!("{RESTORED}{volume}"));
        delete_subvolume_if_any(&fresh)?;
        snapshot(&snap, &fresh, false)?;
        let doomed = self.volumes().join(format!("{DOOMED}{volume}"));
        std::fs::rename(&dest, &doomed).map_err(|e| StoreError::io("rename", &dest, e))?;
        std::fs::rename(&fresh, &dest).map_err(|e| StoreError::io("rename", &fresh, e))?;
        delete_subvolume_if_any(&doomed)
    }

    fn clone_snapshot(&self, volume: &str, name: &str, id: &str) -> Result<Volume, StoreError> {
        validate_id(id)?;
        let snap = self.existing_snapshot(volume, name)?;
        let dest = self.volumes().join(id);
        if dest.exists() {
            return Err(StoreError::Exists(id.to_string()));
        }
        snapshot(&snap, &dest, false)?;
        Ok(Volume {
            id: id.to_string(),
            path: dest,
        })
    }

    fn delete_snapshot(&self, volume: &str, name: &str) -> Result<(), StoreError> {
        let snap = self.existing_snapshot(volume, name)?;
        let doomed = self
            .root
            .join("snapshots")
            .join(volume)
            .join(format!("{DOOMED}{name}"));
        std::fs::rename(&snap, &doomed).map_err(|e| StoreError::io("rename", &snap, e))?;
        delete_subvolume_if_any(&doomed)
    }

    fn snapshots(&self, volume: &str) -> Result<Vec<Snapshot>, StoreError> {
        list_snapshots(&self.root.join("snapshots").join(volume), volume)
    }

    /// The volume's qgroup limits its referenced bytes: everything its guest
    /// sees, the image's data included. Snapshots and forks have qgroups of
    /// their own; a restore makes a new subvolume, so the caller sets the
    /// limit again after one (the engine does at every boot).
    fn set_disk_limit(&self, id: &str, bytes: Option<u64>) -> Result<(), StoreError> {
        let vol = self
            .get(id)
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        self.quotas()?;
        crate::qgroup::set_limit(&vol.path, bytes)
    }

    fn disk_usage(&self, id: &str) -> Result<crate::DiskUsage, StoreError> {
        let vol = self
            .get(id)
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        self.quotas()?;
        crate::qgroup::usage(&vol.path)
    }

    fn limits_disk(&self) -> bool {
        true
    }

    fn reconcile(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut dirs = vec![self.root.join("images"), self.volumes()];
        dirs.extend(subdirs(&self.root.join("snapshots")));
        reconcile_dirs(&dirs, delete_subvolume_if_any)
    }
}

fn snapshot(src: &Path, dest: &Path, read_only: bool) -> Result<(), StoreError> {
    CreateSnapshotOptions::new()
        .readonly(read_only)
        .create(src, dest)
        .map_err(|e| btrfs_err("snapshot", dest, e))
}

/// Deletes the subvolume (or plain directory, for debris of a failed create) at
/// `path`, if there is one.
fn delete_subvolume_if_any(path: &Path) -> Result<(), StoreError> {
    if !path.exists() {
        return Ok(());
    }
    match libbtrfsutil::is_subvolume(path) {
        Ok(true) => {
            // A read-only subvolume must be made writable before it can go when the
            // caller lacks CAP_SYS_ADMIN; as root deletion works either way.
            DeleteSubvolumeOptions::new()
                .recursive(true)
                .delete(path)
                .map_err(|e| btrfs_err("delete subvolume", path, e))
        }
        _ => std::fs::remove_dir_all(path).map_err(|e| StoreError::io("remove", path, e)),
    }
}

/// Whether `path` is on a Btrfs file system.
pub fn is_btrfs(path: &Path) -> Result<bool, StoreError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| StoreError::io("statfs", path, std::io::Error::other(e)))?;
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(StoreError::io(
            "statfs",
            path,
            std::io::Error::last_os_error(),
        ));
    }
    const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;
    Ok(st.f_type as i64 == BTRFS_SUPER_MAGIC)
}
