//! Who reaches a daemon, and what its state dir lets the rest of the host see.
//! Written as the attacks: a daemon started under umask 000, a local user who is
//! not root, a socket left reachable by a wrong mode.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use burrow_tests::{require_root, text, Burrow};

const NOBODY: u32 = 65534;

/// `cmd` runs as uid `uid` with primary group `gid` and these supplementary groups.
fn as_user(cmd: &mut Command, uid: u32, gid: u32, groups: &[u32]) {
    let groups: Vec<libc::gid_t> = groups.to_vec();
    // SAFETY: setgroups, setgid and setuid are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Every socket and file below `dir` whose mode lets anyone but its owner in.
fn open_to_others(dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(m) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        if m.is_dir() {
            open_to_others(&e.path(), out);
        } else if m.file_type().is_socket() && m.mode() & 0o077 != 0 {
            out.push(format!("{} {:o}", e.path().display(), m.mode() & 0o7777));
        }
    }
}

/// Opens the test's temp dir to everybody, so that what keeps a user out is the
/// state dir's own mode and the daemon's checks.
fn open_parent(b: &Burrow) {
    let parent = b.state.parent().expect("parent");
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[test]
fn a_daemon_started_under_umask_000_keeps_the_host_out() {
    require_root!();
    let b = Burrow::new();
    open_parent(&b);
    let mut cmd = b.command();
    // SAFETY: umask is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let out = cmd
        .args(["create", "--name", "dev"])
        .output()
        .expect("burrow create");
    assert!(out.status.success(), "{}", text(&out.stderr));

    let mode = |p: &Path| std::fs::metadata(p).expect("stat").mode() & 0o7777;
    assert_eq!(mode(&b.state), 0o700, "state dir");
    assert_eq!(mode(&b.state.join("burrowd.sock")), 0o600, "burrowd.sock");
    assert_eq!(mode(&b.state.join("burrowd.log")) & 0o077, 0, "burrowd.log");
    // The cache the VMM boots from: nobody else may write to it, whatever the
    // umask of the CLI that built it.
    let cache = std::env::var_os("BURROW_CACHE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/cache/burrow".into());
    for d in [cache.clone(), cache.join("initramfs"), cache.join("kernel")] {
        assert_eq!(mode(&d) & 0o022, 0, "{} is writable by others", d.display());
    }
    let mut open = Vec::new();
    open_to_others(&b.state, &mut open);
    assert!(open.is_empty(), "sockets open to others: {open:?}");

    // A local user who is not root reaches neither the socket nor the guest's files.
    let mut cmd = b.command();
    as_user(&mut cmd, NOBODY, NOBODY, &[]);
    let out = cmd
        .args(["exec", "dev", "--", "true"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let vol = b.info("dev")["volume"]
        .as_str()
        .expect("volume")
        .to_string();
    let mut cmd = Command::new("ls");
    cmd.arg(&vol);
    as_user(&mut cmd, NOBODY, NOBODY, &[]);
    assert!(
        !cmd.output().expect("ls").status.success(),
        "nobody lists {vol}"
    );
}

#[test]
fn only_root_and_the_access_group_are_served() {
    require_root!();
    // `nogroup` (65534) is nobody's primary group on Debian.
    let b = Burrow::new().with_env("BURROW_GROUP", "nogroup");
    open_parent(&b);
    b.ok(&["daemon", "start"]);
    let meta = std::fs::metadata(&b.state).expect("stat");
    assert_eq!(meta.mode() & 0o7777, 0o710);
    assert_eq!(meta.gid(), NOBODY);
    let sock = std::fs::metadata(b.state.join("burrowd.sock")).expect("stat");
    assert_eq!(sock.mode() & 0o7777, 0o660);

    let ls_as = |uid: u32, gid: u32, groups: &[u32]| {
        let mut cmd = b.command();
        as_user(&mut cmd, uid, gid, groups);
        cmd.args(["ls", "--json"]).output().expect("burrow ls")
    };
    // A member (primary or supplementary group) is served.
    let out = ls_as(NOBODY, NOBODY, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = ls_as(NOBODY, 1, &[NOBODY]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Anybody else is not.
    let out = ls_as(NOBODY, 1, &[]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("permission denied"));

    // The socket's mode is one fence; the daemon's check of its peer is another: a
    // socket made reachable by mistake still refuses a stranger.
    std::fs::set_permissions(&b.state, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    std::fs::set_permissions(
        b.state.join("burrowd.sock"),
        std::fs::Permissions::from_mode(0o666),
    )
    .expect("chmod");
    let out = ls_as(NOBODY, 1, &[]);
    assert!(!out.status.success(), "a stranger was served");
    let err = text(&out.stderr);
    assert!(
        err.contains("uid 65534 is neither root nor in group nogroup"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn a_user_who_is_not_root_is_told_what_needs_root() {
    require_root!();
    let b = Burrow::new();
    open_parent(&b);
    let mut cmd = b.command();
    as_user(&mut cmd, NOBODY, NOBODY, &[]);
    // A state dir nobody may create: the CLI says what needs root, once.
    let out = cmd.args(["ls"]).output().expect("burrow ls");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("burrowd needs root"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        !b.state.exists(),
        "a refused start made {}",
        b.state.display()
    );
}
