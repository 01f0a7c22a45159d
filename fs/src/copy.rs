//! The plain-copy backend: each volume is a full copy of its image.
//!
//! A copy of a root file system takes seconds, so the store keeps one spare copy of
//! the current image ready ([`Store::prepare`]): a create renames the spare into
//! place, which is O(1), and the caller prepares the next spare in the background.
//! A create that finds no spare copies. Works on any file system; the copy-on-write
//! backends make the spare unnecessary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::layout::{
    existing_snapshot, list_snapshots, list_volumes, reconcile_dirs, subdirs, DOOMED, PARTIAL,
    RESTORED,
};
use crate::{
    validate_id, validate_snapshot_name, ImageSource, Snapshot, Store, StoreError, Volume,
};

/// Prefix of the ready spare copy of an image, followed by the image key.
const SPARE: &str = ".spare-";
/// Directory of snapshots, one subdirectory per volume.
const SNAPSHOTS: &str = ".snapshots";

pub struct CopyStore {
    root: PathBuf,
    /// One spare copy is made at a time.
    preparing: Mutex<()>,
}

impl CopyStore {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        crate::private_dir(&root)?;
        Ok(CopyStore {
            root,
            preparing: Mutex::new(()),
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    fn spare(&self, image: &ImageSource) -> PathBuf {
        self.root.join(format!("{SPARE}{}", image.key))
    }

    fn snapshot_dir(&self, volume: &str) -> PathBuf {
        self.root.join(SNAPSHOTS).join(volume)
    }

    /// Copies the tree `src` to `dest` by way of a partial directory named `partial`
    /// next to `dest`, so that `dest` appears whole or not at all.
    fn copy_tree(&self, src: &Path, partial: &str, dest: &Path) -> Result<(), StoreError> {
        let parent = dest.parent().unwrap_or(&self.root);
        let partial = parent.join(format!("{PARTIAL}{partial}"));
        remove_tree(&partial)?;
        // `cp -a` keeps everything a root file system holds (ownership, modes,
        // hard links, device nodes, xattrs, sparse files) and reflinks where the file
        // system can; nothing of its output is parsed but the first error line.
        let out = Command::new("cp")
            .arg("-a")
            .arg("--reflink=auto")
            .arg(src)
            .arg(&partial)
            .output()
            .map_err(|e| StoreError::io("run cp for", &partial, e))?;
        if !out.status.success() {
            let _ = remove_tree(&partial);
            let msg = String::from_utf8_lossy(&out.stderr);
            let first = msg.lines().next().unwrap_or("cp failed").to_string();
            return Err(StoreError::io(
                "copy into",
                &partial,
                std::io::Error::other(first),
            ));
        }
        std::fs::rename(&partial, dest).map_err(|e| StoreError::io("rename", dest, e))
    }

    fn copy(&self, image: &ImageSource, partial: &str, dest: &Path) -> Result<(), StoreError> {
        if !image.root.is_dir() {
            return Err(StoreError::BadImage(image.root.clone()));
        }
        self.copy_tree(&image.root, partial, dest)
    }

    fn existing_snapshot(&self, volume: &str, name: &str) -> Result<PathBuf, StoreError> {
        existing_snapshot(&self.snapshot_dir(volume), volume, name)
    }
}

impl Store for CopyStore {
    fn kind(&self) -> &'static str {
        "copy"
    }

    fn volume_path(&self, id: &str) -> PathBuf {
        self.path(id)
    }

    fn volumes_dir(&self) -> PathBuf {
        self.root.clone()
    }

    fn create(&self, id: &str, image: &ImageSource) -> Result<Volume, StoreError> {
        validate_id(id)?;
        let dest = self.path(id);
        if dest.exists() {
            return Err(StoreError::Exists(id.to_string()));
        }
        // Taking the spare is one rename; if another create took it first, copy.
        match std::fs::rename(self.spare(image), &dest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.copy(image, id, &dest)?,
            Err(e) => return Err(StoreError::io("rename", &dest, e)),
        }
        Ok(Volume {
            id: id.to_string(),
            path: dest,
        })
    }

    fn prepare(&self, image: &ImageSource) -> Result<(), StoreError> {
        let _one = self.preparing.lock().unwrap_or_else(|p| p.into_inner());
        let spare = self.spare(image);
        let want = spare
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let rd =
            std::fs::read_dir(&self.root).map_err(|e| StoreError::io("read", &self.root, e))?;
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(SPARE) && name != want {
                remove_tree(&entry.path())?;
            }
        }
        if spare.exists() {
            return Ok(());
        }
        validate_id(&image.key)?;
        self.copy(image, &format!("spare-{}", image.key), &spare)
    }

    fn delete(&self, id: &str) -> Result<(), StoreError> {
        validate_id(id)?;
        let path = self.path(id);
        if !path.exists() {
            return Ok(());
        }
        let doomed = self.root.join(format!("{DOOMED}{id}"));
        std::fs::rename(&path, &doomed).map_err(|e| StoreError::io("rename", &path, e))?;
        remove_tree(&doomed)
    }

    fn get(&self, id: &str) -> Option<Volume> {
        validate_id(id).ok()?;
        let path = self.path(id);
        path.is_dir().then(|| Volume {
            id: id.to_string(),
            path,
        })
    }

    fn list(&self) -> Result<Vec<Volume>, StoreError> {
        list_volumes(&self.root)
    }

    fn snapshot(&self, volume: &str, name: &str) -> Result<Snapshot, StoreError> {
        validate_snapshot_name(name)?;
        let src = self
            .get(volume)
            .ok_or_else(|| StoreError::NotFound(volume.to_string()))?;
        let dir = self.snapshot_dir(volume);
        let path = dir.join(name);
        if path.exists() {
            return Err(StoreError::SnapshotExists {
                volume: volume.to_string(),
                name: name.to_string(),
            });
        }
        std::fs::create_dir_all(&dir).map_err(|e| StoreError::io("create", &dir, e))?;
        self.copy_tree(&src.path, name, &path)?;
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
        let fresh = self.root.join(format!("{RESTORED}{volume}"));
        self.copy_tree(&snap, &format!("restore-{volume}"), &fresh)?;
        let doomed = self.root.join(format!("{DOOMED}{volume}"));
        std::fs::rename(&dest, &doomed).map_err(|e| StoreError::io("rename", &dest, e))?;
        std::fs::rename(&fresh, &dest).map_err(|e| StoreError::io("rename", &fresh, e))?;
        remove_tree(&doomed)
    }

    fn clone_snapshot(&self, volume: &str, name: &str, id: &str) -> Result<Volume, StoreError> {
        validate_id(id)?;
        let snap = self.existing_snapshot(volume, name)?;
        let dest = self.path(id);
        if dest.exists() {
            return Err(StoreError::Exists(id.to_string()));
        }
        self.copy_tree(&snap, id, &dest)?;
        Ok(Volume {
            id: id.to_string(),
            path: dest,
        })
    }

    fn delete_snapshot(&self, volume: &str, name: &str) -> Result<(), StoreError> {
        let snap = self.existing_snapshot(volume, name)?;
        let doomed = self.snapshot_dir(volume).join(format!("{DOOMED}{name}"));
        std::fs::rename(&snap, &doomed).map_err(|e| StoreError::io("rename", &snap, e))?;
        remove_tree(&doomed)
    }

    fn snapshots(&self, volume: &str) -> Result<Vec<Snapshot>, StoreError> {
        list_snapshots(&self.snapshot_dir(volume), volume)
    }

    fn reconcile(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut dirs = vec![self.root.clone()];
        dirs.extend(subdirs(&self.root.join(SNAPSHOTS)));
        reconcile_dirs(&dirs, remove_tree)
    }
}

fn remove_tree(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io("remove", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    use super::*;

    fn image(dir: &Path) -> ImageSource {
        let img = dir.join("image");
        std::fs::create_dir_all(img.join("etc")).unwrap();
        std::fs::write(img.join("etc/hostname"), "x\n").unwrap();
        std::fs::set_permissions(
            img.join("etc/hostname"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::hard_link(img.join("etc/hostname"), img.join("etc/link")).unwrap();
        symlink("hostname", img.join("etc/sym")).unwrap();
        ImageSource {
            key: "img-1".into(),
            root: img,
        }
    }

    #[test]
    fn create_copies_everything_and_isolates_volumes() {
        let t = tempfile::tempdir().unwrap();
        let img = image(t.path());
        let store = CopyStore::new(t.path().join("vols")).unwrap();
        let a = store.create("a", &img).unwrap();
        let b = store.create("b", &img).unwrap();
        let meta = std::fs::metadata(a.path.join("etc/hostname")).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(meta.nlink(), 2, "hard links survive the copy");
        assert_eq!(
            std::fs::read_link(a.path.join("etc/sym")).unwrap(),
            PathBuf::from("hostname")
        );
        std::fs::write(a.path.join("etc/hostname"), "changed").unwrap();
        assert_eq!(
            std::fs::read_to_string(b.path.join("etc/hostname")).unwrap(),
            "x\n"
        );
        assert_eq!(
            std::fs::read_to_string(img.root.join("etc/hostname")).unwrap(),
            "x\n"
        );
        assert_eq!(store.list().unwrap().len(), 2);
    }

    #[test]
    fn a_prepared_spare_is_taken_once_and_stale_spares_are_dropped() {
        let t = tempfile::tempdir().unwrap();
        let img = image(t.path());
        let root = t.path().join("vols");
        let store = CopyStore::new(&root).unwrap();
        store.prepare(&img).unwrap();
        assert!(root.join(".spare-img-1").is_dir());
        assert!(store.list().unwrap().is_empty(), "a spare is not a volume");
        let a = store.create("a", &img).unwrap();
        assert!(
            !root.join(".spare-img-1").exists(),
            "the spare became the volume"
        );
        assert_eq!(
            std::fs::read_to_string(a.path.join("etc/hostname")).unwrap(),
            "x\n"
        );
        // No spare left: the next create copies.
        store.create("b", &img).unwrap();
        // A rebuilt image (new key) drops the old spare.
        store.prepare(&img).unwrap();
        let newer = ImageSource {
            key: "img-2".into(),
            ..img.clone()
        };
        store.prepare(&newer).unwrap();
        assert!(!root.join(".spare-img-1").exists());
        assert!(root.join(".spare-img-2").is_dir());
    }

    #[test]
    fn bad_input_changes_nothing() {
        let t = tempfile::tempdir().unwrap();
        let img = image(t.path());
        let store = CopyStore::new(t.path().join("vols")).unwrap();
        store.create("a", &img).unwrap();
        assert!(matches!(
            store.create("a", &img),
            Err(StoreError::Exists(_))
        ));
        assert!(matches!(
            store.create("../x", &img),
            Err(StoreError::InvalidId(_))
        ));
        let missing = ImageSource {
            key: "k".into(),
            root: t.path().join("nope"),
        };
        assert!(matches!(
            store.create("c", &missing),
            Err(StoreError::BadImage(_))
        ));
        assert_eq!(store.list().unwrap().len(), 1);
        assert_eq!(std::fs::read_dir(t.path().join("vols")).unwrap().count(), 1);
    }

    #[test]
    fn delete_and_reconcile_leave_nothing() {
        let t = tempfile::tempdir().unwrap();
        let img = image(t.path());
        let root = t.path().join("vols");
        let store = CopyStore::new(&root).unwrap();
        store.create("a", &img).unwrap();
        store.delete("a").unwrap();
        store.delete("a").unwrap();
        assert!(store.get("a").is_none());
        std::fs::create_dir_all(root.join(".partial-b/etc")).unwrap();
        std::fs::create_dir_all(root.join(".doomed-c")).unwrap();
        assert!(
            store.list().unwrap().is_empty(),
            "half-made volumes are not listed"
        );
        assert_eq!(store.reconcile().unwrap().len(), 2);
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    }
}
