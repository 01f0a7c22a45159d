//! Containment of a workspace's files and disk, as a root guest attacks them,
//! on both stores: a setuid-root copy of bash and device nodes made in the
//! guest stay inert on the host; a guest fills its own disk and no more, while
//! its neighbour writes on; deep and non-UTF-8 names come through `diff`
//! exactly; and on the FUSE store, a kill -9 of the layer server brings the
//! workspaces back on a new one with their data.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use burrow_tests::{kill9, require_root, tail_of, text, wait_until_explained, Burrow};
use serde_json::Value;

const NOBODY: u32 = 65534;
/// The disk limit given to both workspaces.
const LIMIT_GB: u64 = 1;

#[test]
fn guest_files_and_disk_are_contained_on_btrfs() {
    require_root!();
    scenario(&Burrow::new(), "btrfs");
}

#[test]
fn guest_files_and_disk_are_contained_on_fuse() {
    require_root!();
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED: no /dev/fuse");
        return;
    }
    let b = Burrow::new().with_env("BURROW_STORE", "fuse");
    scenario(&b, "fuse");
    server_death(&b);
}

fn scenario(b: &Burrow, store: &str) {
    // tempfile makes the test's dir 0700; a state dir under /var/lib or a home
    // is reachable. Open it up so that only burrow's own modes and mount flags
    // stand between a host user and the volumes.
    let top = b.state.parent().expect("state dir parent");
    std::fs::set_permissions(top, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    // Bad input first: it changes nothing.
    let (_, err) = b.fails(&["create", "--name", "bad", "--disk-gb", "0"]);
    assert!(
        err.trim()
            .lines()
            .last()
            .is_some_and(|l| l.contains("disk_gb")),
        "{err}"
    );
    assert!(b
        .json(&["ls", "--json"])
        .as_array()
        .is_some_and(|l| l.is_empty()));

    let gb = LIMIT_GB.to_string();
    b.ok(&["create", "--name", "victim", "--disk-gb", &gb]);
    b.ok(&["create", "--name", "neighbour", "--disk-gb", &gb]);
    let info = b.info("victim");
    assert_eq!(info["store"], store);
    assert_eq!(info["disk_limit_bytes"], LIMIT_GB << 30, "{info}");
    b.ok(&["snapshot", "create", "victim", "base"]);

    setuid_and_devices(b, store);
    deep_and_strange_names(b, store);
    disk_full(b);
    if store == "btrfs" {
        forks_keep_the_limit(b);
    }
}

/// The attack: guest root drops a setuid-root bash and device nodes for the
/// host's disk and memory into its volume.
fn setuid_and_devices(b: &Burrow, store: &str) {
    let disk = host_disk_rdev();
    let (major, minor) = (libc::major(disk), libc::minor(disk));
    b.ok(&[
        "exec",
        "victim",
        "--",
        "sh",
        "-c",
        &format!(
            "cp /bin/bash /suid-bash && chmod 4755 /suid-bash && \
             {{ mknod /hostdisk b {major} {minor}; mknod /hostmem c 1 1; sync; }}"
        ),
    ]);
    // Inside the guest the setuid bit still works: it is the guest's own.
    let euid = b.ok(&[
        "exec",
        "victim",
        "--",
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "/suid-bash",
        "-p",
        "-c",
        "echo $EUID",
    ]);
    assert_eq!(euid.trim(), "0", "setuid inside the guest");

    // Every host path where those files are: the volume itself and, on the
    // FUSE store, the layer file behind it.
    let mut places: Vec<PathBuf> = Vec::new();
    let volume = PathBuf::from(b.info("victim")["volume"].as_str().expect("volume"));
    places.push(volume);
    if store == "fuse" {
        let layers = b.state.join("fuse/layers");
        for l in std::fs::read_dir(&layers).expect("layers").flatten() {
            if l.path().join("suid-bash").exists() {
                places.push(l.path());
            }
        }
        assert_eq!(
            places.len(),
            2,
            "the upper layer holds the files: {places:?}"
        );
    }
    for dir in &places {
        let bash = dir.join("suid-bash");
        assert!(bash.exists(), "{}", bash.display());
        // As nobody, by its path: unreachable, or no privilege gained.
        let by_path = as_nobody(Command::new(&bash).args(["-p", "-c", "echo $EUID"]));
        assert_no_root(&by_path, &bash, "by path");
        // Even handed the file itself (past any directory mode), nobody gains
        // nothing: the mount is nosuid.
        let file = std::fs::File::open(&bash).expect("open the setuid copy as root");
        let by_fd = exec_fd_as_nobody(&file, &["suid-bash", "-p", "-c", "echo $EUID"]);
        assert_no_root(&by_fd, &bash, "by fd");
        // The device nodes: virtiofsd runs without CAP_MKNOD, so the guest's
        // mknod is refused and there is nothing on the host; were one made by
        // another path, it opens for nobody, and not even for root: nodev.
        for node in ["hostdisk", "hostmem"] {
            let p = dir.join(node);
            if std::fs::symlink_metadata(&p).is_err() {
                continue;
            }
            let e = std::fs::File::open(&p).expect_err(&format!(
                "root opened the guest-made device node {}",
                p.display()
            ));
            assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{}: {e}", p.display());
            let cat = as_nobody(Command::new("head").args(["-c", "1"]).arg(&p));
            assert!(!cat.status.success(), "nobody read {}", p.display());
        }
    }
    // The store's own directories are root's alone.
    let private = match store {
        "btrfs" => vec!["btrfs", "btrfs/store", "btrfs/store/volumes"],
        _ => vec!["fuse", "fuse/layers", "fuse/images", "fuse/mnt"],
    };
    for d in private {
        let m = std::fs::metadata(b.state.join(d)).expect("store dir");
        assert_eq!(m.permissions().mode() & 0o777, 0o700, "{d}");
    }
    if store == "btrfs" {
        let img = std::fs::metadata(b.state.join("btrfs.img")).expect("image");
        assert_eq!(img.permissions().mode() & 0o777, 0o600);
    }
}

/// A chain of directories deeper than PATH_MAX, two names that are not UTF-8
/// and differ in one byte, and a name that is a terminal escape sequence.
fn deep_and_strange_names(b: &Burrow, store: &str) {
    // Each level gets a leaf; the guest says how deep it got. The FUSE layer
    // server names layer files by path, so it refuses (ENAMETOOLONG) a chain
    // whose layer path would pass PATH_MAX; Btrfs takes all 30 levels.
    let levels = b.ok(&[
        "exec",
        "victim",
        "--",
        "sh",
        "-c",
        "mkdir -p /work && cd /work && \
         printf x > \"$(printf 'a\\377')\" && printf y > \"$(printf 'a\\376')\" && \
         printf z > \"$(printf 'e\\033]0;pwned\\007\\033[2J')\" && \
         perl -e '$n = 0; for (1..30) { mkdir(\"d\" x 200) or last; chdir(\"d\" x 200) or last; \
                  open(F, \">leaf\") or last; close(F); $n++ } print $n' && sync",
    ]);
    let levels: usize = levels.trim().parse().expect("levels made");
    if store == "btrfs" {
        assert_eq!(levels, 30);
    }
    assert!(levels > 10, "only {levels} levels");
    let d = b.json(&["diff", "victim", "base", "--json"]);
    let added: Vec<Vec<u8>> = d["added"]
        .as_array()
        .expect("added")
        .iter()
        .map(entry_bytes)
        .collect();
    for want in [&b"/work/a\xff"[..], &b"/work/a\xfe"[..]] {
        assert!(
            added.iter().any(|p| p == want),
            "{:?} missing from {d}",
            String::from_utf8_lossy(want)
        );
    }
    let escape = b"/work/e\x1b]0;pwned\x07\x1b[2J".to_vec();
    assert!(added.contains(&escape), "escape name missing: {d}");
    let deepest = added
        .iter()
        .filter(|p| p.ends_with(b"/leaf"))
        .map(|p| p.len())
        .max()
        .expect("leaves in the diff");
    // "/work" + levels × ("/" + 200) + "/leaf": the deepest leaf the guest made.
    assert_eq!(deepest, 5 + levels * 201 + 5, "deepest leaf in the diff");
    if store == "btrfs" {
        assert!(deepest > 4096, "{deepest}");
    }
    // Text output: every name there, none with a raw control byte.
    let out = b.run(&["diff", "victim", "base"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !out.stdout
            .iter()
            .any(|&c| (c < 0x20 && c != b'\n') || c == 0x7f),
        "raw control bytes in diff's text output"
    );
    let shown = text(&out.stdout);
    assert!(shown.contains("A /work/a\\xff"), "{shown}");
    assert!(shown.contains("A /work/a\\xfe"), "{shown}");
    assert!(
        shown.contains("/leaf"),
        "deep leaf missing from text output"
    );
    // Sizes walk the same way.
    let snaps = b.json(&["snapshot", "ls", "victim", "--json"]);
    assert!(snaps[0]["referenced_bytes"].as_u64().is_some(), "{snaps}");
}

/// The exact bytes of a diff entry.
fn entry_bytes(v: &Value) -> Vec<u8> {
    match v["path_b64"].as_str() {
        Some(b64) => base64_decode(b64),
        None => v["path"].as_str().expect("path").as_bytes().to_vec(),
    }
}

/// The guest fills its disk: its writes stop at its limit, the neighbour's do not.
fn disk_full(b: &Burrow) {
    let fill = b.run(&[
        "exec",
        "victim",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/fill bs=1M count=4096 conv=fsync 2>&1; sync",
    ]);
    let said = text(&fill.stdout) + &text(&fill.stderr);
    assert!(
        said.contains("No space left on device") || said.contains("Disk quota exceeded"),
        "dd did not stop at the limit: {said}"
    );
    let info = b.info("victim");
    let used = info["disk_used_bytes"].as_u64().expect("disk_used_bytes");
    let limit = info["disk_limit_bytes"].as_u64().expect("disk_limit_bytes");
    assert_eq!(limit, LIMIT_GB << 30);
    assert!(
        used >= limit / 10 * 9 && used <= limit + (limit / 50),
        "used {used} against limit {limit}"
    );
    let wrote = b.ok(&[
        "exec",
        "neighbour",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/more bs=1M count=64 conv=fsync 2>&1 && echo written",
    ]);
    assert!(wrote.contains("written"), "{wrote}");
    let shown = b.ok(&["info", "victim"]);
    assert!(shown.contains("disk:"), "{shown}");
    // Room comes back when the guest deletes.
    b.ok(&["exec", "victim", "--", "sh", "-c", "rm /fill && sync"]);
    b.ok(&[
        "exec",
        "victim",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/again bs=1M count=16 conv=fsync",
    ]);
}

fn forks_keep_the_limit(b: &Burrow) {
    let (_, err) = b.fails(&["fork", "victim", "base", "--disk-gb", "0"]);
    assert!(err.contains("disk_gb"), "{err}");
    b.ok(&["destroy", "neighbour"]);
    b.ok(&["fork", "victim", "base", "--name", "child"]);
    assert_eq!(b.info("child")["disk_limit_bytes"], LIMIT_GB << 30);
    b.ok(&["destroy", "child"]);
}

/// kill -9 of the FUSE layer server under running VMs: they come back on a
/// new server, with what they had synced.
fn server_death(b: &Burrow) {
    b.ok(&[
        "exec",
        "neighbour",
        "--",
        "sh",
        "-c",
        "echo kept > /work-kept && sync",
    ]);
    let before = b.info("neighbour");
    let old_qemu = before["pids"]["qemu"].as_i64().expect("qemu pid");
    let server: i32 = std::fs::read_to_string(b.state.join("fuse/cowfs.pid"))
        .expect("server pid file")
        .trim()
        .parse()
        .expect("server pid");
    kill9(server);
    wait_until_explained(
        "the workspace back on a new server",
        Duration::from_secs(180),
        || {
            let i = b.info("neighbour");
            i["state"] == "running"
                && i["pids"]["qemu"].as_i64().is_some_and(|p| p != old_qemu)
                && b.run(&["exec", "neighbour", "--", "true"]).status.success()
        },
        || {
            format!(
                "info: {}\nconsole:\n{}\nburrowd.log:\n{}",
                b.info("neighbour"),
                text(&b.run(&["logs", "neighbour", "--lines", "30"]).stdout),
                tail_of(&b.state.join("burrowd.log"), 40)
            )
        },
    );
    assert_eq!(b.ok(&["file", "read", "neighbour", "/work-kept"]), "kept\n");
    let new_server: i32 = std::fs::read_to_string(b.state.join("fuse/cowfs.pid"))
        .expect("server pid file")
        .trim()
        .parse()
        .expect("server pid");
    assert_ne!(new_server, server);
    // A stop and start work on the new server too.
    b.ok(&["stop", "neighbour"]);
    b.ok(&["start", "neighbour"]);
    assert_eq!(
        b.ok(&["exec", "neighbour", "--", "cat", "/work-kept"]),
        "kept\n"
    );
}

fn host_disk_rdev() -> libc::dev_t {
    use std::os::unix::fs::MetadataExt;
    // The device the root file system is on, as a block device node would name it.
    let dev = std::fs::metadata("/").expect("stat /").dev();
    dev as libc::dev_t
}

fn as_nobody(cmd: &mut Command) -> std::process::Output {
    // SAFETY: setgroups/setgid/setuid are async-signal-safe; nothing else runs
    // between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| std::process::Output {
            status: std::os::unix::process::ExitStatusExt::from_raw(127 << 8),
            stdout: Vec::new(),
            stderr: e.to_string().into_bytes(),
        })
}

/// Runs the open file `file` (fexecve: no path, no directory permission) as
/// nobody.
fn exec_fd_as_nobody(file: &std::fs::File, argv: &[&str]) -> std::process::Output {
    let fd = file.as_raw_fd();
    let args: Vec<CString> = argv
        .iter()
        .map(|a| CString::new(*a).expect("arg"))
        .collect();
    let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let env: [*const libc::c_char; 1] = [std::ptr::null()];
    // Addresses, not pointers, cross into the closure (which must be Send);
    // the vectors they point into live until after the child has run.
    let (argv_at, env_at) = (ptrs.as_ptr() as usize, env.as_ptr() as usize);
    let mut cmd = Command::new("/bin/false");
    // SAFETY: only async-signal-safe calls between fork and exec; the argument
    // vectors were built before the fork and outlive it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            libc::fexecve(
                fd,
                argv_at as *const *const libc::c_char,
                env_at as *const *const libc::c_char,
            );
            Err(std::io::Error::last_os_error())
        });
    }
    let out = cmd.stdin(Stdio::null()).output();
    drop(ptrs);
    drop(args);
    out.unwrap_or_else(|e| std::process::Output {
        status: std::os::unix::process::ExitStatusExt::from_raw(127 << 8),
        stdout: Vec::new(),
        stderr: e.to_string().into_bytes(),
    })
}

/// Either the file could not be run, or it ran without gaining root.
fn assert_no_root(out: &std::process::Output, what: &Path, how: &str) {
    if out.status.success() {
        let euid = text(&out.stdout);
        assert_eq!(
            euid.trim(),
            NOBODY.to_string(),
            "{how}: {} ran as euid {euid}",
            what.display()
        );
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {s}"),
        }
    };
    let mut out = Vec::new();
    for chunk in s.trim_end_matches('=').as_bytes().chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c) << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len() - 1]);
    }
    out
}
