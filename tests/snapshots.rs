//! Snapshots, restore, forks and diff on real VMs: a snapshot taken while the guest
//! writes, a restore that brings the disk back exactly, three forks that do not see
//! each other's writes, and the bad inputs.

use std::time::Duration;

use burrow_tests::{require_root, text, wait_until, Burrow};

#[test]
fn snapshot_restore_fork_and_diff() {
    require_root!();
    scenario(Burrow::new(), "btrfs");
}

/// The same on the FUSE layer store: virtiofsd serves the guest a volume that is
/// itself a FUSE mount of layers.
#[test]
fn snapshot_restore_fork_and_diff_on_fuse() {
    require_root!();
    if !std::path::Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED: no /dev/fuse");
        return;
    }
    scenario(Burrow::new().with_env("BURROW_STORE", "fuse"), "fuse");
}

fn scenario(b: Burrow, store: &str) {
    let id = b
        .ok(&["create", "--name", "src"])
        .split_whitespace()
        .next()
        .expect("id")
        .to_string();
    assert_eq!(b.info("src")["store"], store);
    b.run_with_stdin(&["file", "write", "src", "/work/a.txt"], b"v1\n");
    b.ok(&[
        "exec",
        "src",
        "--",
        "sh",
        "-c",
        "rm /etc/motd; chmod 600 /etc/issue",
    ]);
    // A writer keeps appending while the snapshot is taken.
    let job = b
        .ok(&[
            "job",
            "start",
            "src",
            "--",
            "sh",
            "-c",
            "i=0; while [ $i -lt 400 ]; do echo line-$i >> /work/log; i=$((i+1)); done",
        ])
        .trim()
        .to_string();
    b.ok(&["snapshot", "create", "src", "after-install"]);
    wait_until("writer to finish", Duration::from_secs(60), || {
        b.json(&["job", "poll", "src", &job, "--json"])["running"] == false
    });
    let snapshots = b.json(&["snapshot", "ls", "src", "--json"]);
    assert_eq!(snapshots[0]["name"], "after-install");
    assert_eq!(snapshots[0]["dependents"], serde_json::json!([]));
    assert!(snapshots[0]["parent"].is_null());
    // What it costs: it refers to the whole root file system, and owns next to
    // nothing of it while it shares everything with the volume.
    let referenced = snapshots[0]["referenced_bytes"]
        .as_u64()
        .expect("referenced_bytes");
    let used = snapshots[0]["used_bytes"].as_u64().expect("used_bytes");
    assert!(referenced > 100 << 20, "{snapshots}");
    assert!(used < referenced / 10, "{snapshots}");

    // Changes since the snapshot, as diff reports them.
    b.run_with_stdin(&["file", "write", "src", "/work/a.txt"], b"v2\n");
    b.run_with_stdin(&["file", "write", "src", "/work/b.txt"], b"new\n");
    b.ok(&["exec", "src", "--", "rm", "/etc/hostname"]);
    let d = b.json(&["diff", "src", "after-install", "--json"]);
    let has = |k: &str, p: &str| {
        d[k].as_array()
            .expect("array")
            .iter()
            .any(|x| x["path"] == p)
    };
    assert!(has("added", "/work/b.txt"), "{d}");
    assert!(has("modified", "/work/a.txt"), "{d}");
    assert!(has("deleted", "/etc/hostname"), "{d}");
    assert!(!has("modified", "/etc/passwd"), "{d}");
    assert!(b
        .ok(&["diff", "src", "after-install"])
        .contains("A /work/b.txt"));

    // Restore: the disk is exactly the snapshot again, and the VM runs on it.
    let out = b.ok(&["snapshot", "restore", "src", "after-install"]);
    assert!(out.contains("running"), "{out}");
    assert_eq!(b.ok(&["file", "read", "src", "/work/a.txt"]), "v1\n");
    assert!(b
        .ok(&["exec", "src", "--", "ls", "/work"])
        .split_whitespace()
        .all(|f| f != "b.txt"));
    assert!(b
        .ok(&["exec", "src", "--", "test", "-f", "/etc/hostname"])
        .is_empty());
    assert_eq!(
        b.ok(&["exec", "src", "--", "stat", "-c", "%a", "/etc/issue"])
            .trim(),
        "600"
    );
    // The writer ran during the snapshot: the restored log is a prefix of its lines,
    // whole and in order.
    let log = b.run(&["file", "read", "src", "/work/log"]);
    for (i, line) in text(&log.stdout).lines().enumerate() {
        assert_eq!(
            line,
            format!("line-{i}"),
            "torn or reordered write in the snapshot"
        );
    }
    let d = b.json(&["diff", "src", "after-install", "--json"]);
    assert_eq!(d["added"], serde_json::json!([]), "{d}");
    assert_eq!(d["deleted"], serde_json::json!([]), "{d}");

    // Lineage: a snapshot taken after the restore sits on the restored one.
    b.ok(&["snapshot", "create", "src", "second"]);
    let list = b.json(&["snapshot", "ls", "src", "--json"]);
    let second = list
        .as_array()
        .expect("array")
        .iter()
        .find(|x| x["name"] == "second")
        .expect("second listed");
    assert_eq!(second["parent"], "after-install");
    b.ok(&["snapshot", "delete", "src", "second"]);

    // Three forks, made in parallel, each running and on its own disk.
    let out = b.ok(&[
        "fork",
        "src",
        "after-install",
        "--count",
        "3",
        "--name-prefix",
        "worker",
    ]);
    assert_eq!(out.lines().count(), 3, "{out}");
    for w in ["worker-1", "worker-2", "worker-3"] {
        let info = b.info(w);
        assert_eq!(info["state"], "running");
        assert_eq!(info["forked_from"]["workspace"], "src");
        assert_eq!(info["forked_from"]["snapshot"], "after-install");
        assert_eq!(b.ok(&["file", "read", w, "/work/a.txt"]), "v1\n");
    }
    b.run_with_stdin(
        &["file", "write", "worker-1", "/work/a.txt"],
        b"only in worker-1\n",
    );
    b.ok(&["snapshot", "create", "worker-1", "w1"]);
    assert_eq!(
        b.json(&["snapshot", "ls", "worker-1", "--json"])[0]["parent"],
        "src@after-install"
    );
    b.run_with_stdin(&["file", "write", "src", "/work/src-only"], b"x");
    for w in ["worker-2", "worker-3", "src"] {
        assert_eq!(
            b.ok(&["file", "read", w, "/work/a.txt"]),
            "v1\n",
            "{w} sees worker-1's write"
        );
    }
    for w in ["worker-1", "worker-2", "worker-3"] {
        assert!(b
            .fails(&["file", "read", w, "/work/src-only"])
            .1
            .contains("no such file"));
    }
    let one = b.ok(&["fork", "src", "after-install", "--name", "approach-a"]);
    assert!(one.contains("approach-a"));

    // A snapshot with forks cannot go; the error names them.
    let (_, err) = b.fails(&["snapshot", "delete", "src", "after-install"]);
    for w in ["worker-1", "worker-2", "worker-3", "approach-a"] {
        assert!(err.contains(w), "{err}");
    }
    assert_eq!(err.trim().lines().count(), 1);

    // Bad input: clear one-line errors, nothing changed.
    let cases: &[(&[&str], &str)] = &[
        (
            &["snapshot", "create", "src", "bad name"],
            "invalid snapshot",
        ),
        (&["snapshot", "create", "src", "a/b"], "invalid snapshot"),
        (
            &["snapshot", "create", "src", "after-install"],
            "already exists",
        ),
        (&["snapshot", "restore", "src", "nope"], "not found"),
        (&["snapshot", "delete", "src", "nope"], "not found"),
        (&["diff", "src", "nope"], "not found"),
        (&["fork", "src", "nope"], "not found"),
        (
            &[
                "fork",
                "src",
                "after-install",
                "--count",
                "0",
                "--name-prefix",
                "z",
            ],
            "invalid count",
        ),
        (
            &[
                "fork",
                "src",
                "after-install",
                "--count",
                "99",
                "--name-prefix",
                "z",
            ],
            "invalid count",
        ),
        (
            &["fork", "src", "after-install", "--name", "worker-1"],
            "taken",
        ),
        (&["snapshot", "ls", "nope"], "not found"),
    ];
    for (args, want) in cases {
        let (_, err) = b.fails(args);
        assert!(
            err.contains(want),
            "burrow {args:?}: expected {want:?} in {err:?}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert_eq!(b.json(&["ls", "--json"]).as_array().map(Vec::len), Some(5));
    assert_eq!(
        b.json(&["snapshot", "ls", "src", "--json"])
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // Once the forks are gone the snapshot can go; destroying leaves nothing.
    for w in ["worker-1", "worker-2", "worker-3", "approach-a"] {
        b.ok(&["destroy", w]);
    }
    b.ok(&["snapshot", "delete", "src", "after-install"]);
    assert_eq!(
        b.json(&["snapshot", "ls", "src", "--json"]),
        serde_json::json!([])
    );
    b.ok(&["destroy", "src"]);
    b.assert_gone(&id);
    assert!(b.volumes().is_empty(), "{:?}", b.volumes());
}

/// A full disk: writes fail with "No space left on device", the workspace keeps
/// working, and once space is freed writes and snapshots succeed again.
#[test]
fn a_full_store_reports_enospc_and_recovers() {
    require_root!();
    let b = Burrow::new().with_env("BURROW_STORE_SIZE_MIB", "1024");
    b.ok(&["create", "--name", "small"]);
    let out = b.run(&[
        "exec",
        "small",
        "--timeout",
        "300",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/work/fill bs=1M count=4000 2>&1; sync",
    ]);
    assert!(
        text(&out.stdout).contains("No space left on device"),
        "{}",
        text(&out.stdout)
    );
    let out = b.run_with_stdin(
        &["file", "write", "small", "/work/more.bin"],
        &vec![1u8; 8 << 20],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("No space left on device") && err.contains("/work/more.bin"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // Still alive, and it recovers once space is freed.
    assert_eq!(
        b.ok(&["exec", "small", "--", "echo", "alive"]).trim(),
        "alive"
    );
    b.ok(&["exec", "small", "--", "sh", "-c", "rm /work/fill; sync"]);
    let out = b.run_with_stdin(
        &["file", "write", "small", "/work/more.bin"],
        &vec![1u8; 8 << 20],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    b.ok(&["snapshot", "create", "small", "after"]);
    b.ok(&["destroy", "small"]);
}
