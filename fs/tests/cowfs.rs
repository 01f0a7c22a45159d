//! What the FUSE layer must get right beyond the shared conformance suite: open
//! files and hard links across a snapshot, directory renames out of frozen
//! layers, whiteouts and opaque directories, attributes, mmap, and a server that
//! is killed.

// Test helpers outside #[test] functions: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use burrow_fs::{FuseStore, ImageSource, Store};

struct Served(FuseStore);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.shutdown();
    }
}

fn setup(t: &Path) -> Option<(Served, ImageSource)> {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED: no /dev/fuse");
        return None;
    }
    let root = t.join("image");
    std::fs::create_dir_all(root.join("src/lib/deep")).unwrap();
    std::fs::write(root.join("src/lib/deep/a.rs"), "fn a() {}\n").unwrap();
    std::fs::write(root.join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(root.join("one"), "1").unwrap();
    std::fs::hard_link(root.join("one"), root.join("uno")).unwrap();
    let store = FuseStore::open(t.join("store"), env!("CARGO_BIN_EXE_burrow-cowfs")).unwrap();
    Some((
        Served(store),
        ImageSource {
            key: "img".into(),
            root,
        },
    ))
}

#[test]
fn layers_behave_like_one_file_system() {
    let t = tempfile::tempdir().unwrap();
    let Some((served, image)) = setup(t.path()) else {
        return;
    };
    let store = &served.0;
    let v = store.create("v", &image).unwrap().path;

    // A file open for writing before a snapshot: later writes land in the volume,
    // not in the snapshot, and every handle on the file sees them.
    let mut w = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(v.join("src/main.rs"))
        .unwrap();
    let mut r = std::fs::File::open(v.join("src/main.rs")).unwrap();
    let snap = store.snapshot("v", "s1").unwrap().path;
    w.seek(SeekFrom::Start(0)).unwrap();
    w.write_all(b"fn main() { changed(); }\n").unwrap();
    w.sync_all().unwrap();
    let mut seen = String::new();
    r.read_to_string(&mut seen).unwrap();
    assert_eq!(seen, "fn main() { changed(); }\n");
    assert_eq!(
        std::fs::read_to_string(snap.join("src/main.rs")).unwrap(),
        "fn main() {}\n"
    );
    drop((w, r));

    // Hard links stay one file when one name is written after a snapshot.
    std::fs::write(v.join("uno"), "one, changed").unwrap();
    assert_eq!(
        std::fs::read_to_string(v.join("one")).unwrap(),
        "one, changed"
    );
    assert_eq!(
        std::fs::metadata(v.join("one")).unwrap().ino(),
        std::fs::metadata(v.join("uno")).unwrap().ino()
    );
    assert_eq!(std::fs::read_to_string(snap.join("one")).unwrap(), "1");
    std::fs::hard_link(v.join("src/lib/deep/a.rs"), v.join("a-link")).unwrap();
    std::fs::write(v.join("a-link"), "fn b() {}\n").unwrap();
    assert_eq!(
        std::fs::read_to_string(v.join("src/lib/deep/a.rs")).unwrap(),
        "fn b() {}\n"
    );

    // A directory from a frozen layer renamed whole; its old name is gone.
    std::fs::rename(v.join("src/lib"), v.join("lib2")).unwrap();
    assert!(!v.join("src/lib").exists());
    assert_eq!(
        std::fs::read_to_string(v.join("lib2/deep/a.rs")).unwrap(),
        "fn b() {}\n"
    );
    assert_eq!(std::fs::read_dir(v.join("src")).unwrap().count(), 1);

    // A deleted directory made again is empty (opaque), not the old one back.
    std::fs::remove_dir_all(v.join("lib2")).unwrap();
    std::fs::create_dir(v.join("lib2")).unwrap();
    assert_eq!(std::fs::read_dir(v.join("lib2")).unwrap().count(), 0);
    std::fs::remove_file(v.join("one")).unwrap();
    assert!(!v.join("one").exists());
    assert_eq!(
        std::fs::read_to_string(v.join("uno")).unwrap(),
        "one, changed"
    );

    // Layer bookkeeping never shows, and cannot be made.
    let names: Vec<String> = std::fs::read_dir(&v)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.starts_with(".wh.") && !n.starts_with(".burrow")),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n == "one"),
        "deleted, yet listed: {names:?}"
    );
    assert!(std::fs::write(v.join(".wh.sneaky"), "x").is_err());

    // Attributes, symlinks, xattrs, rename over, exclusive create.
    std::fs::set_permissions(v.join("uno"), std::fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(
        std::fs::metadata(v.join("uno")).unwrap().mode() & 0o777,
        0o700
    );
    std::os::unix::fs::symlink("uno", v.join("ln")).unwrap();
    assert_eq!(
        std::fs::read_to_string(v.join("ln")).unwrap(),
        "one, changed"
    );
    let ok = std::process::Command::new("setfattr")
        .args(["-n", "user.burrow", "-v", "yes"])
        .arg(v.join("uno"))
        .status();
    if ok.map(|s| s.success()).unwrap_or(false) {
        let out = std::process::Command::new("getfattr")
            .args(["-n", "user.burrow", "--only-values"])
            .arg(v.join("uno"))
            .output()
            .unwrap();
        assert_eq!(out.stdout, b"yes");
    }
    std::fs::write(v.join("x"), "x").unwrap();
    std::fs::rename(v.join("x"), v.join("uno")).unwrap();
    assert_eq!(std::fs::read_to_string(v.join("uno")).unwrap(), "x");
    assert!(std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(v.join("uno"))
        .is_err());

    // mmap writes reach the file (and fsync flushes them).
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(v.join("mapped"))
        .unwrap();
    f.set_len(4096).unwrap();
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a shared mapping of 4096 bytes of a file at least that long,
        // written then unmapped before the file is used again.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            std::ptr::copy_nonoverlapping(b"mapped!".as_ptr(), p.cast::<u8>(), 7);
            assert_eq!(libc::msync(p, 4096, libc::MS_SYNC), 0);
            libc::munmap(p, 4096);
        }
    }
    f.sync_all().unwrap();
    assert_eq!(&std::fs::read(v.join("mapped")).unwrap()[..7], b"mapped!");

    // The snapshot is still exactly the image, and read-only.
    assert_eq!(
        std::fs::read_to_string(snap.join("src/lib/deep/a.rs")).unwrap(),
        "fn a() {}\n"
    );
    assert!(std::fs::write(snap.join("new"), "x").is_err());
}

#[test]
fn a_killed_server_is_replaced_and_loses_nothing() {
    let t = tempfile::tempdir().unwrap();
    let Some((served, image)) = setup(t.path()) else {
        return;
    };
    let store = &served.0;
    let v = store.create("v", &image).unwrap().path;
    std::fs::write(v.join("kept"), "written before the crash").unwrap();
    store.snapshot("v", "s").unwrap();
    let pid: i32 = std::fs::read_to_string(t.path().join("store/cowfs.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill of the server this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    // The next operation starts a new server on a clean mount.
    store.clone_snapshot("v", "s", "w").unwrap();
    assert_eq!(
        std::fs::read_to_string(v.join("kept")).unwrap(),
        "written before the crash"
    );
    assert_eq!(
        std::fs::read_to_string(t.path().join("store/mnt/volumes/w/kept")).unwrap(),
        "written before the crash"
    );
    let new_pid: i32 = std::fs::read_to_string(t.path().join("store/cowfs.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_ne!(pid, new_pid);
    assert!(store.reconcile().unwrap().is_empty());
}

/// The server as a user who is not root: mounted through fusermount3, changes
/// copied up, snapshots frozen, all without privileges.
#[test]
fn works_for_a_user_who_is_not_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: needs root to become another user for the test");
        return;
    }
    for tool in ["setpriv", "fusermount3", "python3"] {
        if !std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .status()
            .unwrap()
            .success()
        {
            eprintln!("SKIPPED: {tool} is not installed");
            return;
        }
    }
    let mode = std::fs::metadata("/dev/fuse")
        .map(|m| m.mode() & 0o777)
        .unwrap_or(0);
    if mode & 0o006 != 0o006 {
        eprintln!(
            "SKIPPED: /dev/fuse is mode {mode:o}; users need 0666 (Debian's default, \
             which scripts/install-deps.sh restores)"
        );
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("store");
    std::fs::create_dir_all(root.join("images/img/etc")).unwrap();
    std::fs::write(root.join("images/img/etc/motd"), "base\n").unwrap();
    for p in [t.path(), &root] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    assert!(std::process::Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&root)
        .status()
        .unwrap()
        .success());
    let script = r#"
set -e
R=$1
"$2" serve "$R" > "$R/ready" 2> "$R/log" &
while [ ! -s "$R/ready" ]; do sleep 0.05; done
ask() { python3 -c 'import socket,sys
s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]+"/control.sock")
s.sendall(sys.argv[2].encode()+b"\n"); print(s.makefile().readline().strip())' "$R" "$1"; }
ask '{"op":"create","id":"v","image":"images/img"}'
V=$R/mnt/volumes/v
echo changed > "$V/etc/motd"; echo new > "$V/new"
ask '{"op":"snapshot","volume":"v","name":"s"}'
rm "$V/new"
cat "$R/mnt/snapshots/v/s/etc/motd" "$R/mnt/snapshots/v/s/new" "$R/images/img/etc/motd"
ls "$V"
ask '{"op":"shutdown"}'
"#;
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&root)
        .arg(env!("CARGO_BIN_EXE_burrow-cowfs"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(root.join("log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["\"ok\"", "\"ok\"", "changed", "new", "base", "etc", "\"ok\""],
        "{log}"
    );
}
