//! Crashes: kill -9 of the daemon (running VMs are re-adopted, records stay true)
//! and of QEMU (the workspace is reported stopped, its sidecars are ended, and it
//! can be started again). One workspace, booted twice.

use std::time::Duration;

use burrow_tests::{kill9, process_exists, require_root, text, wait_until, Burrow};

#[test]
fn kill9_of_daemon_and_of_qemu() {
    require_root!();
    let b = Burrow::new();
    let id = b
        .ok(&["create", "--name", "crashy"])
        .split_whitespace()
        .next()
        .expect("id")
        .to_string();
    b.ok(&["create", "--name", "idle", "--json"]);
    b.ok(&["stop", "idle"]);
    let info = b.info("crashy");
    let qemu = info["pids"]["qemu"].as_i64().expect("qemu pid") as i32;
    let sidecars = [
        info["pids"]["virtiofsd"].as_i64().expect("pid") as i32,
        info["pids"]["vsock"].as_i64().expect("pid") as i32,
    ];
    b.run_with_stdin(&["file", "write", "crashy", "/work/x"], b"before crash");

    // kill -9 the daemon: the VM keeps running, the next command starts a new daemon
    // which re-adopts it.
    let daemon = b.daemon_pid().expect("daemon pid");
    kill9(daemon);
    burrow_tests::wait_exit("daemon", daemon, Duration::from_secs(10));
    assert!(process_exists(qemu), "the VM died with the daemon");
    let out = b.run(&["ls", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("started burrowd"));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let states: Vec<(String, String)> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|w| {
            (
                w["name"].as_str().unwrap_or("").to_string(),
                w["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![
            ("crashy".into(), "running".into()),
            ("idle".into(), "stopped".into())
        ]
    );
    assert_ne!(b.daemon_pid(), Some(daemon));
    assert_eq!(
        b.info("crashy")["pids"]["qemu"],
        qemu,
        "re-adopted, not restarted"
    );
    assert_eq!(b.ok(&["file", "read", "crashy", "/work/x"]), "before crash");

    // kill -9 QEMU: the daemon notices, ends the sidecars, reports the truth.
    kill9(qemu);
    wait_until(
        "workspace to be reported stopped",
        Duration::from_secs(30),
        || b.info("crashy")["state"] == "stopped",
    );
    for p in sidecars {
        burrow_tests::wait_exit("sidecar", p, Duration::from_secs(10));
    }
    assert!(
        b.vm_processes().is_empty(),
        "left running: {:?}",
        b.vm_processes()
    );
    assert!(b.ok(&["logs", "crashy"]).contains("exited unexpectedly"));

    // It starts again, on the same files.
    b.ok(&["start", "crashy"]);
    assert_eq!(b.ok(&["file", "read", "crashy", "/work/x"]), "before crash");

    // kill -9 the daemon while the VM runs and its processes die too: the next
    // daemon marks it stopped and leaves nothing behind.
    let daemon = b.daemon_pid().expect("daemon pid");
    let info = b.info("crashy");
    let cgroup = burrow_tests::cgroup_file(
        info["pids"]["qemu"].as_i64().expect("pid") as i32,
        "pids",
        "",
    );
    assert!(cgroup.ends_with(&id), "{}", cgroup.display());
    kill9(daemon);
    burrow_tests::wait_exit("daemon", daemon, Duration::from_secs(10));
    for p in ["qemu", "virtiofsd", "vsock"] {
        let pid = info["pids"][p].as_i64().expect("pid") as i32;
        kill9(pid);
        burrow_tests::wait_exit("VM process", pid, Duration::from_secs(10));
    }
    assert_eq!(b.info("crashy")["state"], "stopped");
    assert!(!b.run_root().join(&id).exists(), "stale run dir kept");
    assert!(!cgroup.exists(), "stale cgroup kept: {}", cgroup.display());
    b.ok(&["destroy", "crashy"]);
    b.ok(&["destroy", "idle"]);
    b.assert_gone(&id);
}

/// kill -9 of the daemon while it makes three forks: afterwards every workspace
/// the next daemon reports has its volume, every volume belongs to a workspace, and
/// only running workspaces have processes.
#[test]
fn kill9_during_fork_leaves_whole_workspaces_or_none() {
    require_root!();
    let b = Burrow::new();
    b.ok(&["create", "--name", "src"]);
    b.ok(&["snapshot", "create", "src", "s"]);
    let daemon = b.daemon_pid().expect("daemon pid");
    let mut fork = b
        .command()
        .args(["fork", "src", "s", "--count", "3", "--name-prefix", "f"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn fork");
    // The forks are under way once one of them has a run dir next to src's.
    wait_until("a fork to start booting", Duration::from_secs(60), || {
        std::fs::read_dir(b.run_root())
            .map(|d| d.count())
            .unwrap_or(0)
            > 1
    });
    kill9(daemon);
    let _ = fork.wait();
    burrow_tests::wait_exit("daemon", daemon, Duration::from_secs(10));

    let list = b.json(&["ls", "--json"]);
    let list = list.as_array().expect("array");
    let mut ids: Vec<String> = Vec::new();
    let mut running_pids: Vec<i64> = Vec::new();
    for w in list {
        let state = w["state"].as_str().expect("state");
        assert!(state == "running" || state == "stopped", "{w}");
        let volume = std::path::Path::new(w["volume"].as_str().expect("volume")).to_path_buf();
        assert!(
            volume.join("etc").is_dir(),
            "workspace without its volume: {w}"
        );
        if state == "running" {
            for p in ["qemu", "virtiofsd", "vsock"] {
                running_pids.push(w["pids"][p].as_i64().expect("pid"));
            }
        }
        ids.push(w["id"].as_str().expect("id").to_string());
    }
    ids.sort();
    assert_eq!(b.volumes(), ids, "volumes and workspaces differ");
    for pid in b.vm_processes() {
        // A virtiofsd's sandboxed child shares its leader's process group.
        // SAFETY: getpgid has no memory effects.
        let group = unsafe { libc::getpgid(pid) } as i64;
        assert!(
            running_pids.contains(&(pid as i64)) || running_pids.contains(&group),
            "stray VM process {pid}"
        );
    }
    for id in &ids {
        b.ok(&["destroy", id]);
    }
    assert!(b.volumes().is_empty());
    assert!(b.vm_processes().is_empty(), "{:?}", b.vm_processes());
}

/// On the FUSE store the volumes are served by `burrow-cowfs`, which runs in a
/// session of its own: kill -9 of the daemon leaves it, and the VM on it, running;
/// the next daemon re-adopts both; a clean stop with no VM running ends it and
/// leaves no mount.
#[test]
fn kill9_of_daemon_on_the_fuse_store() {
    require_root!();
    if !std::path::Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED: no /dev/fuse");
        return;
    }
    let b = Burrow::new().with_env("BURROW_STORE", "fuse");
    b.ok(&["create", "--name", "layered"]);
    b.run_with_stdin(&["file", "write", "layered", "/work/x"], b"before crash");
    let server = || -> i32 {
        std::fs::read_to_string(b.state.join("fuse/cowfs.pid"))
            .expect("cowfs.pid")
            .trim()
            .parse()
            .expect("pid")
    };
    let cowfs = server();
    let qemu = b.info("layered")["pids"]["qemu"].as_i64().expect("qemu") as i32;

    let daemon = b.daemon_pid().expect("daemon pid");
    kill9(daemon);
    burrow_tests::wait_exit("daemon", daemon, Duration::from_secs(10));
    assert!(
        process_exists(cowfs),
        "the FUSE server died with the daemon"
    );
    // The guest still reads and writes its disk with no daemon at all.
    assert!(process_exists(qemu));
    let info = b.info("layered");
    assert_eq!(info["state"], "running");
    assert_eq!(info["pids"]["qemu"], qemu, "re-adopted, not restarted");
    assert_eq!(server(), cowfs, "the server was replaced");
    b.ok(&[
        "exec",
        "layered",
        "--",
        "sh",
        "-c",
        "echo after >> /work/x; sync",
    ]);
    b.ok(&["snapshot", "create", "layered", "s"]);
    assert_eq!(
        b.ok(&["file", "read", "layered", "/work/x"]),
        "before crashafter\n"
    );

    b.ok(&["destroy", "layered"]);
    b.ok(&["daemon", "stop"]);
    burrow_tests::wait_exit("FUSE server", cowfs, Duration::from_secs(10));
    assert!(
        !burrow_tests::is_mountpoint(&b.state.join("fuse/mnt")),
        "the FUSE mount outlived the daemon"
    );
}
