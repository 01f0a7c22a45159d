//! The VMM as a root guest that broke out into it would find it: each check is the
//! attack (read another workspace's disk, the daemon's database; be root; gain a
//! capability; spawn a program; flood the host's disk through the console while the
//! daemon is down) and what must stop it. Two workspaces, two boots.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use burrow_tests::{cgroup_file, kill9, process_exists, require_root, wait_until, Burrow};

/// Bound on console.log (and console.log.1) for this test's daemon.
const CONSOLE_MAX: u64 = 64 * 1024;

#[test]
fn a_vmm_escape_is_not_host_root() {
    require_root!();
    let b = Burrow::new().with_env("BURROW_CONSOLE_MAX_BYTES", &CONSOLE_MAX.to_string());
    // A neighbour whose disk the attacker would like to read.
    b.ok(&["create", "--name", "victim"]);
    b.run_with_stdin(&["file", "write", "victim", "/secret"], b"x");
    b.ok(&["stop", "victim"]);
    let victim_volume = PathBuf::from(b.info("victim")["volume"].as_str().expect("volume"));
    assert!(victim_volume.join("secret").exists());
    let id = b
        .ok(&["create", "--name", "attacker"])
        .split_whitespace()
        .next()
        .expect("id")
        .to_string();
    let info = b.info("attacker");
    let pid = |k: &str| info["pids"][k].as_i64().expect("pid") as i32;
    let (qemu, vsock, virtiofsd, console) =
        (pid("qemu"), pid("vsock"), pid("virtiofsd"), pid("console"));

    // QEMU and vhost-device-vsock: not root, no capability now or ever, and a root
    // of their own that holds neither the neighbour's volume nor the database.
    for (what, p) in [("qemu", qemu), ("vhost-device-vsock", vsock)] {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).expect("status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let uids = field("Uid:");
        assert!(
            !uids.split_whitespace().any(|u| u == "0"),
            "{what} runs with uid 0: {uids}"
        );
        assert_eq!(
            field("CapEff:"),
            "0000000000000000",
            "{what} has capabilities"
        );
        assert_eq!(field("CapPrm:"), "0000000000000000", "{what}");
        assert_eq!(field("CapBnd:"), "0000000000000000", "{what}");
        assert_eq!(field("NoNewPrivs:"), "1", "{what} may gain privileges");
        let root = PathBuf::from(format!("/proc/{p}/root"));
        for seen in [
            inside(&root, &victim_volume),
            inside(&root, &victim_volume.join("secret")),
            inside(&root, &b.state.join("burrow.db")),
            inside(&root, Path::new("/etc/shadow")),
            inside(&root, Path::new("/etc/passwd")),
        ]
        .into_iter()
        // Root's home holds at most the path to a binary installed there.
        .chain(
            std::fs::read_dir("/root")
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name() != ".cargo")
                .map(|e| inside(&root, &e.path())),
        ) {
            assert!(
                std::fs::symlink_metadata(&seen).is_err(),
                "{what} sees {}",
                seen.display()
            );
        }
        // Its root is read-only: nothing to plant for the next VM.
        assert!(
            std::fs::write(inside(&root, Path::new("/planted")), "x").is_err(),
            "{what} can write its root"
        );
    }
    // The console writer keeps root's ownership of the log and nothing else.
    let status = std::fs::read_to_string(format!("/proc/{console}/status")).expect("status");
    for (field, want) in [
        ("CapEff:", "0000000000000000"),
        ("CapBnd:", "0000000000000000"),
        ("NoNewPrivs:", "1"),
    ] {
        let got = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .map(str::trim);
        assert_eq!(got, Some(want), "console writer {field}");
    }
    // virtiofsd must stay root to serve files of every owner, but it cannot make
    // device nodes or set file capabilities.
    let status = std::fs::read_to_string(format!("/proc/{virtiofsd}/status")).expect("status");
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(str::trim)
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .expect("CapBnd");
    // CAP_MKNOD is 27, CAP_SETFCAP 31; the sandboxed child is what serves the guest.
    for p in children(virtiofsd).into_iter().chain([virtiofsd]) {
        let s = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        let eff = s
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(str::trim)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or(0);
        assert_eq!(
            eff & (1 << 27),
            0,
            "virtiofsd {p} may mknod (bounding {bnd:x})"
        );
        assert_eq!(
            eff & (1 << 31),
            0,
            "virtiofsd {p} may set file capabilities"
        );
    }

    // QEMU's seccomp sandbox: asked over QMP to run a helper program (a bridge
    // helper is forked and exec'd), it refuses and spawns nothing.
    let marker = b.state.parent().expect("tmp").join("spawned");
    let helper = b.state.parent().expect("tmp").join("helper.sh");
    std::fs::write(&helper, format!("#!/bin/sh\ntouch {}\n", marker.display())).expect("helper");
    std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let reply = qmp_hmp(
        &b.run_root().join(&id).join("qmp.sock"),
        &format!(
            "netdev_add bridge,id=evil,br=burrow0,helper={}",
            helper.display()
        ),
    );
    assert!(
        reply.contains("Operation not permitted"),
        "QEMU was not stopped by its sandbox: {reply}"
    );
    assert!(!marker.exists(), "QEMU ran a program");
    assert!(children(qemu).is_empty(), "QEMU has children");
    assert!(process_exists(qemu), "QEMU survives the refusal");
    assert_eq!(
        b.ok(&["exec", "attacker", "--", "echo", "still here"]),
        "still here\n"
    );

    // Per-workspace limits: every process of the VM sits in one cgroup that bounds
    // CPU, memory (guest RAM + overhead) and tasks, and `info` says so.
    let limits = &info["limits"];
    assert_eq!(limits["cpu_quota_us"], 150_000, "{info}");
    assert_eq!(limits["pids"], 512, "{info}");
    let memory = limits["memory_bytes"].as_u64().expect("memory");
    assert!(memory > 512 << 20, "{info}");
    let groups: Vec<String> = [qemu, vsock, virtiofsd, console]
        .iter()
        .map(|p| std::fs::read_to_string(format!("/proc/{p}/cgroup")).expect("cgroup"))
        .collect();
    assert!(groups.iter().all(|g| g == &groups[0]), "{groups:?}");
    assert_eq!(read_u64(&cgroup_file(qemu, "pids", "pids.max")), 512);
    let mem = cgroup_file(qemu, "memory", "memory.max");
    let mem = if mem.exists() {
        mem
    } else {
        cgroup_file(qemu, "memory", "memory.limit_in_bytes")
    };
    assert_eq!(read_u64(&mem), memory);
    let cgroup_dir = cgroup_file(qemu, "pids", "");
    assert!(cgroup_dir.ends_with(&id), "{}", cgroup_dir.display());

    // The console, flooded by the guest with the daemon killed: the writer keeps
    // it bounded and the newest lines are there.
    b.ok(&[
        "job",
        "start",
        "attacker",
        "--",
        "sh",
        "-c",
        "i=0; while [ $i -lt 20000 ]; do echo flood-line-$i; i=$((i+1)); done > /dev/ttyS0; \
         echo FLOOD-DONE > /dev/ttyS0",
    ]);
    let daemon = b.daemon_pid().expect("daemon pid");
    kill9(daemon);
    burrow_tests::wait_exit("daemon", daemon, Duration::from_secs(10));
    let log = b.state.join("logs").join(&id).join("console.log");
    let rotated = b.state.join("logs").join(&id).join("console.log.1");
    wait_until("the flood to end", Duration::from_secs(300), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("FLOOD-DONE"))
    });
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    assert!(
        size(&log) <= CONSOLE_MAX,
        "console.log is {} bytes",
        size(&log)
    );
    assert!(
        size(&rotated) <= CONSOLE_MAX,
        "console.log.1 is {} bytes",
        size(&rotated)
    );
    let text = std::fs::read_to_string(&log).expect("log");
    let tail: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    let done = tail
        .iter()
        .position(|l| *l == "FLOOD-DONE")
        .expect("marker");
    assert_eq!(tail[done - 1], "flood-line-19999", "newest lines lost");

    // A new daemon re-adopts the jailed VM (found by its command line and start
    // times), console writer included, and `logs` reads the bounded log.
    assert!(
        process_exists(console),
        "the console writer died with the daemon"
    );
    let again = b.info("attacker");
    assert_eq!(again["state"], "running");
    assert_eq!(again["pids"]["qemu"], qemu, "re-adopted, not restarted");
    assert_eq!(again["pids"]["console"], console);
    assert!(b
        .ok(&["logs", "attacker", "--lines", "5"])
        .contains("FLOOD-DONE"));

    b.ok(&["destroy", "attacker"]);
    assert!(
        !cgroup_dir.exists(),
        "cgroup left: {}",
        cgroup_dir.display()
    );
    assert!(!process_exists(console), "console writer left running");
    b.ok(&["destroy", "victim"]);
}

/// `path` as seen through a process's root (/proc/PID/root).
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn read_u64(p: &Path) -> u64 {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Runs one human monitor command over QMP and returns its output (or error).
fn qmp_hmp(sock: &Path, command: &str) -> String {
    let stream = UnixStream::connect(sock).expect("connect QMP");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut w = stream.try_clone().expect("clone");
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).expect("greeting");
    let mut call = |msg: serde_json::Value| -> serde_json::Value {
        let mut m = msg.to_string();
        m.push('\n');
        w.write_all(m.as_bytes()).expect("write QMP");
        loop {
            let mut line = String::new();
            r.read_line(&mut line).expect("read QMP");
            let v: serde_json::Value = serde_json::from_str(&line).expect("QMP JSON");
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
        }
    };
    call(serde_json::json!({"execute": "qmp_capabilities"}));
    let v = call(serde_json::json!({
        "execute": "human-monitor-command",
        "arguments": {"command-line": command}
    }));
    v.to_string()
}
