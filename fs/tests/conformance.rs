//! One conformance suite, run against every `Store` backend: volume and snapshot
//! semantics, independence of forks, restore exactness, and bad input.

// Test helpers outside #[test] functions: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use burrow_fs::{BtrfsImage, BtrfsStore, CopyStore, FuseStore, ImageSource, Store, StoreError};

/// What a tree holds, entry by entry: kind, mode, size and contents (or target).
fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let desc = if m.file_type().is_symlink() {
                format!("link {:?}", std::fs::read_link(&p).unwrap())
            } else if m.is_dir() {
                walk(root, &p, out);
                format!("dir {:o}", m.mode() & 0o7777)
            } else {
                let data = std::fs::read(&p).unwrap();
                format!(
                    "file {:o} {} {:x}",
                    m.mode() & 0o7777,
                    data.len(),
                    fnv(&data)
                )
            };
            out.insert(rel, desc);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn make_image(dir: &Path) -> ImageSource {
    let root = dir.join("image-root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("work/deep")).unwrap();
    std::fs::write(root.join("etc/hostname"), "base\n").unwrap();
    std::fs::write(root.join("work/deep/data.bin"), vec![7u8; 100_000]).unwrap();
    std::fs::set_permissions(
        root.join("etc/hostname"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    symlink("../etc/hostname", root.join("work/link")).unwrap();
    std::fs::hard_link(root.join("etc/hostname"), root.join("etc/hostname.hard")).unwrap();
    ImageSource {
        key: "test-1".into(),
        root,
    }
}

fn conformance(store: &dyn Store, image: &ImageSource) {
    let base = tree(&image.root);

    // Volumes start as the image and are independent of each other and of it.
    let a = store.create("a", image).unwrap();
    let b = store.create("b", image).unwrap();
    assert_eq!(tree(&a.path), base);
    std::fs::write(a.path.join("etc/hostname"), "changed in a\n").unwrap();
    assert_eq!(tree(&b.path), base);
    assert_eq!(tree(&image.root), base);
    assert!(matches!(
        store.create("a", image),
        Err(StoreError::Exists(_))
    ));
    assert_eq!(
        store
            .list()
            .unwrap()
            .iter()
            .map(|v| v.id.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"]
    );

    // A snapshot freezes the volume as it was.
    let s1 = store.snapshot("a", "s1").unwrap();
    let at_s1 = tree(&a.path);
    assert_eq!(tree(&s1.path), at_s1);
    std::fs::write(a.path.join("new.txt"), "after s1").unwrap();
    std::fs::remove_file(a.path.join("work/deep/data.bin")).unwrap();
    std::fs::set_permissions(
        a.path.join("etc/hostname"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    // A hard link pair modified through one name after the snapshot.
    std::fs::write(a.path.join("etc/hostname.hard"), "through the other link\n").unwrap();
    assert_eq!(
        tree(&s1.path),
        at_s1,
        "the snapshot changed with its volume"
    );
    assert_eq!(
        std::fs::metadata(s1.path.join("etc/hostname"))
            .unwrap()
            .nlink(),
        2
    );
    assert_eq!(
        store
            .snapshots("a")
            .unwrap()
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["s1"]
    );
    assert!(store.snapshots("b").unwrap().is_empty());

    // Bad snapshot input.
    assert!(matches!(
        store.snapshot("a", "s1"),
        Err(StoreError::SnapshotExists { .. })
    ));
    for bad in ["", "has space", "a/b", "..", ".hidden", &"x".repeat(65)] {
        assert!(
            matches!(
                store.snapshot("a", bad),
                Err(StoreError::InvalidSnapshotName(_))
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        store.snapshot("nope", "s"),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.restore("a", "nope"),
        Err(StoreError::SnapshotNotFound { .. })
    ));
    assert!(matches!(
        store.clone_snapshot("a", "nope", "c"),
        Err(StoreError::SnapshotNotFound { .. })
    ));

    // A fork is the snapshot, then goes its own way.
    let c = store.clone_snapshot("a", "s1", "c").unwrap();
    assert_eq!(tree(&c.path), at_s1);
    std::fs::write(c.path.join("only-in-c"), "c").unwrap();
    assert!(!a.path.join("only-in-c").exists());
    assert!(!s1.path.join("only-in-c").exists());
    assert!(matches!(
        store.clone_snapshot("a", "s1", "c"),
        Err(StoreError::Exists(_))
    ));

    // Restore makes the volume exactly the snapshot again; the snapshot stays.
    store.restore("a", "s1").unwrap();
    assert_eq!(tree(&store.get("a").unwrap().path), at_s1);
    assert_eq!(
        tree(&c.path)[Path::new("only-in-c")].split(' ').next(),
        Some("file"),
        "restore touched a fork"
    );
    assert_eq!(store.snapshots("a").unwrap().len(), 1);

    // Deleting.
    store.delete_snapshot("a", "s1").unwrap();
    assert!(matches!(
        store.delete_snapshot("a", "s1"),
        Err(StoreError::SnapshotNotFound { .. })
    ));
    assert_eq!(
        tree(&c.path).len(),
        at_s1.len() + 1,
        "a fork outlives its snapshot"
    );
    for id in ["a", "b", "c"] {
        store.delete(id).unwrap();
    }
    store.delete("a").unwrap();
    assert!(store.list().unwrap().is_empty());
    assert!(
        store.reconcile().unwrap().is_empty(),
        "clean operations leave no debris"
    );
}

/// What agents do to a workspace's files, done to a volume, then snapshot, modify,
/// restore: the restored tree is exactly the snapshot's.
fn posix_torture(store: &dyn Store, image: &ImageSource) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let v = store.create("t", image).unwrap();
    let w = v.path.join("work");

    // rename over an existing file
    std::fs::write(w.join("old"), "old").unwrap();
    std::fs::write(w.join("new"), "new").unwrap();
    std::fs::rename(w.join("new"), w.join("old")).unwrap();
    assert_eq!(std::fs::read_to_string(w.join("old")).unwrap(), "new");

    // an unlinked file that is still open stays usable and is in no snapshot
    let mut open = std::fs::File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(w.join("ghost"))
        .unwrap();
    std::fs::remove_file(w.join("ghost")).unwrap();
    open.write_all(b"still here").unwrap();

    // a 1 GiB sparse file with data at both ends
    let sparse = w.join("sparse.img");
    let mut f = std::fs::File::create(&sparse).unwrap();
    f.write_all(b"head").unwrap();
    f.set_len(1 << 30).unwrap();
    f.seek(SeekFrom::End(-4)).unwrap();
    f.write_all(b"tail").unwrap();
    drop(f);

    // a git repository of 2 000 files with one commit
    let repo = w.join("repo");
    for i in 0..2000 {
        let dir = repo.join(format!("d{}", i % 40));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i}.txt")), format!("file {i}\n")).unwrap();
    }
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(&repo)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    git(&["init", "-q"]);
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "first"]);

    let s = store.snapshot("t", "torture").unwrap();
    let frozen = tree(&s.path);
    assert!(!s.path.join("work/ghost").exists());
    let mut back = String::new();
    open.seek(SeekFrom::Start(0)).unwrap();
    open.read_to_string(&mut back).unwrap();
    assert_eq!(back, "still here");
    let meta = std::fs::metadata(s.path.join("work/sparse.img")).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    assert!(
        meta.blocks() * 512 < 64 << 20,
        "the sparse file was filled in: {} blocks",
        meta.blocks()
    );

    // modify: edits, a second commit, deletions
    for i in 0..100 {
        std::fs::write(repo.join(format!("d{}/f{i}.txt", i % 40)), "changed\n").unwrap();
    }
    git(&["commit", "-q", "-am", "second"]);
    std::fs::remove_file(w.join("sparse.img")).unwrap();
    std::fs::remove_dir_all(repo.join("d7")).unwrap();

    store.restore("t", "torture").unwrap();
    let v = store.get("t").unwrap();
    assert_eq!(tree(&v.path), frozen, "restore is not exact");
    let repo = v.path.join("work/repo");
    let out = std::process::Command::new("git")
        .args(["log", "--oneline"])
        .current_dir(&repo)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    let out = std::process::Command::new("git")
        .args(["status", "--porcelain"])
        .current_dir(&repo)
        .output()
        .unwrap();
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = std::process::Command::new("git")
        .args(["fsck", "--no-progress"])
        .current_dir(&repo)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut f = std::fs::File::open(v.path.join("work/sparse.img")).unwrap();
    let mut head = [0u8; 4];
    f.read_exact(&mut head).unwrap();
    f.seek(SeekFrom::End(-4)).unwrap();
    let mut tail = [0u8; 4];
    f.read_exact(&mut tail).unwrap();
    assert_eq!((&head, &tail), (b"head", b"tail"));

    store.delete_snapshot("t", "torture").unwrap();
    store.delete("t").unwrap();
}

/// A volume with a disk limit: writes past it fail (ENOSPC or, for a Btrfs
/// qgroup, EDQUOT), its usage shows it full, and a neighbour writes on.
fn disk_limit(store: &dyn Store, image: &ImageSource) {
    use std::io::Write;
    let full = store.create("limited", image).unwrap();
    let free = store.create("neighbour", image).unwrap();
    let base = store.disk_usage("limited").unwrap().used_bytes;
    let limit = base + (4 << 20);
    store.set_disk_limit("limited", Some(limit)).unwrap();
    assert_eq!(
        store.disk_usage("limited").unwrap().limit_bytes,
        Some(limit)
    );
    // Each chunk synced: a FUSE mount with a writeback cache reports the
    // server's refusal at fsync at the latest.
    let write_until_refused = |path: &Path, max_mib: usize| -> Option<std::io::Error> {
        let mut f = std::fs::File::create(path).unwrap();
        for _ in 0..max_mib {
            if let Err(e) = f.write_all(&[5u8; 1 << 20]).and_then(|_| f.sync_all()) {
                return Some(e);
            }
        }
        None
    };
    let refused = write_until_refused(&full.path.join("fill"), 32).expect("refused past the limit");
    assert!(
        matches!(
            refused.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EDQUOT)
        ),
        "{refused}"
    );
    // A FUSE mount reports the refused writeback here again: not a failure.
    let _ = std::process::Command::new("sync")
        .arg("-f")
        .arg(&full.path)
        .status();
    let u = store.disk_usage("limited").unwrap();
    assert!(
        u.used_bytes >= limit - (2 << 20) && u.used_bytes <= limit + (1 << 20),
        "{u:?} against {limit}"
    );
    assert!(write_until_refused(&free.path.join("more"), 8).is_none());
    // Deleting gives room back.
    std::fs::remove_file(full.path.join("fill")).unwrap();
    let _ = std::process::Command::new("sync")
        .arg("-f")
        .arg(&full.path)
        .status();
    assert!(write_until_refused(&full.path.join("again"), 1).is_none());
    // Bad input changes nothing.
    assert!(store.set_disk_limit("no-such", Some(1 << 20)).is_err());
    store.delete("limited").unwrap();
    store.delete("neighbour").unwrap();
}

#[test]
fn copy_store_conforms() {
    let t = tempfile::tempdir().unwrap();
    let image = make_image(t.path());
    let store = CopyStore::new(t.path().join("store")).unwrap();
    conformance(&store, &image);
    posix_torture(&store, &image);
    assert!(!store.limits_disk());
    assert!(matches!(
        store.set_disk_limit("x", Some(1)),
        Err(StoreError::Unsupported { .. })
    ));
}

/// Flushes the file system so that new data has extents to map.
fn sync_fs(path: &Path) {
    assert!(std::process::Command::new("sync")
        .arg("-f")
        .arg(path)
        .status()
        .unwrap()
        .success());
}

/// Unmounts the test's Btrfs even when the test fails.
struct Mounted(BtrfsImage);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.0.unmount();
    }
}

#[test]
fn btrfs_store_conforms() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: loop-mounting a Btrfs image needs root");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let image = make_image(t.path());
    let fs = Mounted(
        BtrfsImage::ensure(&t.path().join("btrfs.img"), &t.path().join("mnt"), 1 << 30).unwrap(),
    );
    assert!(fs.0.is_mounted());
    let store = BtrfsStore::new(t.path().join("mnt/store")).unwrap();
    conformance(&store, &image);
    posix_torture(&store, &image);
    disk_limit(&store, &image);
    // Sizes: a fresh snapshot shares everything with its volume; what the volume
    // writes afterwards is its own.
    let v = store.create("sized", &image).unwrap();
    let s = store.snapshot("sized", "s").unwrap();
    std::fs::write(v.path.join("new.bin"), vec![9u8; 1 << 20]).unwrap();
    sync_fs(&v.path);
    let snap = burrow_fs::usage(&s.path).unwrap();
    let vol = burrow_fs::usage(&v.path).unwrap();
    assert!(snap.referenced_bytes >= 100_000, "{snap:?}");
    assert!(
        snap.exclusive_bytes < 64 * 1024,
        "a fresh snapshot owns next to nothing: {snap:?}"
    );
    assert!(
        vol.exclusive_bytes >= 1 << 20 && vol.exclusive_bytes < 2 << 20,
        "{vol:?}"
    );
    // Creating from an imported image is a snapshot: no second import.
    store.create("x", &image).unwrap();
    store.create("y", &image).unwrap();
    assert_eq!(
        std::fs::read_dir(t.path().join("mnt/store/volumes"))
            .unwrap()
            .count(),
        3
    );
    assert_eq!(
        std::fs::read_dir(t.path().join("mnt/store/images"))
            .unwrap()
            .count(),
        1
    );
    // A store refuses a root that is not on Btrfs.
    assert!(matches!(
        BtrfsStore::new(t.path().join("plain")),
        Err(StoreError::Btrfs { .. })
    ));
}

/// Stops the test's FUSE server (and so unmounts it) even when the test fails,
/// before its temporary directory is removed.
struct Served(FuseStore);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.shutdown();
    }
}

fn fuse_store(root: &Path) -> Option<Served> {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED: no /dev/fuse");
        return None;
    }
    Some(Served(
        FuseStore::open(root, env!("CARGO_BIN_EXE_burrow-cowfs")).unwrap(),
    ))
}

#[test]
fn fuse_store_conforms() {
    let t = tempfile::tempdir().unwrap();
    let image = make_image(t.path());
    let Some(store) = fuse_store(&t.path().join("store")) else {
        return;
    };
    let store = &store.0;
    conformance(store, &image);
    posix_torture(store, &image);
    disk_limit(store, &image);

    // Sizes: a fresh snapshot shares everything with its volume; what the volume
    // writes afterwards is its own, and it is freed with the volume's layer.
    let v = store.create("sized", &image).unwrap();
    store.snapshot("sized", "s").unwrap();
    std::fs::write(v.path.join("new.bin"), vec![9u8; 1 << 20]).unwrap();
    sync_fs(&t.path().join("store/layers"));
    let snap = store.snapshot_usage("sized", "s").unwrap();
    assert!(snap.referenced_bytes >= 100_000, "{snap:?}");
    assert!(snap.exclusive_bytes < 64 * 1024, "{snap:?}");
    store.snapshot("sized", "s2").unwrap();
    store.delete("sized").unwrap();
    let s2 = store.snapshot_usage("sized", "s2").unwrap();
    assert!(s2.exclusive_bytes >= 1 << 20, "{s2:?}");
    assert!(matches!(
        store.snapshot_usage("sized", "nope"),
        Err(StoreError::SnapshotNotFound { .. })
    ));
    store.delete_snapshot("sized", "s").unwrap();
    store.delete_snapshot("sized", "s2").unwrap();
    // One import serves every volume; nothing is left once all are gone.
    assert_eq!(
        std::fs::read_dir(t.path().join("store/images"))
            .unwrap()
            .count(),
        1
    );
    assert!(store.reconcile().unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(t.path().join("store/layers"))
            .unwrap()
            .count(),
        0,
        "layers leaked"
    );
}
