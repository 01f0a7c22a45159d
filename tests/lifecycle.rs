//! One workspace, booted for real, driven through every command of the CLI; then
//! stopped, started again (files survive) and destroyed (nothing left behind).
//! One VM serves all the assertions: boots are the expensive part under TCG.

use std::time::Duration;

use burrow_tests::{guest_kernel_release, process_exists, require_root, text, wait_until, Burrow};

#[test]
fn workspace_lifecycle_end_to_end() {
    require_root!();
    let b = Burrow::new();

    // create: prints "<id> <name>"; the daemon is started on demand and says so.
    let out = b.run(&["create", "--name", "dev"]);
    assert!(out.status.success(), "create failed: {}", text(&out.stderr));
    let line = text(&out.stdout);
    let mut parts = line.split_whitespace();
    let id = parts.next().expect("id").to_string();
    assert_eq!(parts.next(), Some("dev"));
    assert_eq!(id.len(), 12, "{line}");
    assert!(
        text(&out.stderr).contains("started burrowd"),
        "{}",
        text(&out.stderr)
    );

    exec_checks(&b);
    env_checks(&b);
    file_checks(&b);
    job_checks(&b);
    listing_checks(&b, &id);
    state_checks(&b, &id);

    // stop / start: files survive, the VM is a new one.
    let before = b.info("dev");
    let qemu_before = before["pids"]["qemu"].as_i64().expect("qemu pid");
    let written = b.run_with_stdin(
        &["file", "write", "dev", "/work/persist.txt"],
        b"survives\n",
    );
    assert!(written.status.success());
    b.ok(&["exec", "dev", "--", "sync"]);
    assert!(b.ok(&["stop", "dev"]).contains("stopped"));
    let stopped = b.info("dev");
    assert_eq!(stopped["state"], "stopped");
    assert!(stopped["pids"].is_null());
    assert!(
        !process_exists(qemu_before as i32),
        "qemu still runs after stop"
    );
    assert!(
        b.vm_processes().is_empty(),
        "VM processes after stop: {:?}",
        b.vm_processes()
    );
    let (_, err) = b.fails(&["exec", "dev", "--", "true"]);
    assert!(err.contains("stopped"), "{err}");
    assert!(b.ok(&["start", "dev"]).contains("running"));
    assert_eq!(
        b.ok(&["file", "read", "dev", "/work/persist.txt"]),
        "survives\n"
    );
    assert_eq!(
        b.ok(&["file", "read", "dev", "/work/a.txt"]),
        "hello there\n"
    );
    assert!(
        b.ok(&["logs", "dev", "--lines", "1000"])
            .matches("burrow: boot at")
            .count()
            >= 2
    );

    // A guest that does not come up in time: one line with the console tail, and
    // nothing of the attempt is left.
    let (_, err) = b.fails(&["create", "--name", "slow", "--boot-timeout", "1"]);
    assert!(
        err.contains("did not come up within 1 s; console tail:"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(b.fails(&["info", "slow"]).1.contains("not found"));
    assert_eq!(b.json(&["ls", "--json"]).as_array().map(Vec::len), Some(1));
    let volumes = b.volumes();
    assert_eq!(volumes, vec![id.clone()]);

    // destroy: nothing left.
    assert!(b.ok(&["destroy", "dev"]).contains("destroyed"));
    b.assert_gone(&id);
    let (_, err) = b.fails(&["info", "dev"]);
    assert!(err.contains("not found"), "{err}");
    assert_eq!(b.json(&["ls", "--json"]), serde_json::json!([]));
}

fn exec_checks(b: &Burrow) {
    // The guest's kernel, not the host's.
    assert_eq!(
        b.ok(&["exec", "dev", "--", "uname", "-r"]).trim(),
        guest_kernel_release()
    );
    assert_eq!(b.ok(&["exec", "dev", "--", "hostname"]).trim(), "dev");
    assert_eq!(b.ok(&["exec", "dev", "--", "id", "-u"]).trim(), "0");

    // timeout, workdir, env and the exit code all pass through.
    let out = b.run(&[
        "exec",
        "dev",
        "--timeout",
        "5",
        "--workdir",
        "/tmp",
        "--env",
        "A=1",
        "--",
        "sh",
        "-c",
        "echo $A; pwd; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(text(&out.stdout), "1\n/tmp\n");

    let out = b.run(&["exec", "dev", "--", "sh", "-c", "echo out; echo err >&2"]);
    assert_eq!(
        (text(&out.stdout).as_str(), text(&out.stderr).as_str()),
        ("out\n", "err\n")
    );

    // stdin with -i
    let out = b.run_with_stdin(&["exec", "dev", "-i", "--", "tr", "a-z", "A-Z"], b"shout\n");
    assert_eq!(text(&out.stdout), "SHOUT\n");

    // A timeout kills the command, says so on one line, exits 124.
    let started = std::time::Instant::now();
    let out = b.run(&[
        "exec",
        "dev",
        "--timeout",
        "1",
        "--",
        "sh",
        "-c",
        "echo partial; sleep 30",
    ]);
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("timed out after 1 s"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "partial\n");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(
        b.ok(&[
            "exec",
            "dev",
            "--",
            "sh",
            "-c",
            "pgrep -x sleep || echo none"
        ])
        .trim(),
        "none"
    );

    // Output caps.
    let out = b.run(&[
        "exec",
        "dev",
        "--max-output",
        "10",
        "--",
        "sh",
        "-c",
        "yes | head -c 100000",
    ]);
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), 10);
    assert!(text(&out.stderr).contains("truncated"));

    // A missing command is the shell's 127, not a daemon error.
    let out = b.run(&["exec", "dev", "--", "no-such-command"]);
    assert_eq!(out.status.code(), Some(127));

    // Bad exec input.
    let (_, err) = b.fails(&["exec", "dev", "--workdir", "/nope", "--", "true"]);
    assert!(err.contains("/nope"), "{err}");
    let (_, err) = b.fails(&["exec", "dev", "--timeout=-3", "--", "true"]);
    assert!(err.contains("timeout"), "{err}");
    let (_, err) = b.fails(&["exec", "dev", "--env", "NOEQUALS", "--", "true"]);
    assert!(err.contains("env"), "{err}");
}

fn env_checks(b: &Burrow) {
    let secret = "xyz-not-on-disk-4711";
    b.ok(&["env", "set", "dev", &format!("API_KEY={secret}"), "OTHER=2"]);
    assert_eq!(
        b.ok(&["exec", "dev", "--", "sh", "-c", "echo $API_KEY $OTHER"])
            .trim(),
        format!("{secret} 2")
    );
    // A per-exec value wins over the workspace's.
    assert_eq!(
        b.ok(&[
            "exec",
            "dev",
            "--env",
            "OTHER=3",
            "--",
            "sh",
            "-c",
            "echo $OTHER"
        ])
        .trim(),
        "3"
    );
    b.ok(&["env", "unset", "dev", "OTHER"]);
    assert_eq!(
        b.ok(&["exec", "dev", "--", "sh", "-c", "echo ${OTHER:-unset}"])
            .trim(),
        "unset"
    );
    // Held in guest memory only: not in the volume, not in the state dir.
    let hits = std::process::Command::new("grep")
        // The loop image is sparse and as large as the free disk: its contents are
        // searched through its mount instead.
        .args([
            "-r",
            "-l",
            "--binary-files=text",
            "--exclude=btrfs.img",
            secret,
        ])
        .arg(&b.state)
        .output()
        .expect("grep");
    assert!(
        hits.stdout.is_empty(),
        "secret written to disk: {}",
        text(&hits.stdout)
    );
    let (_, err) = b.fails(&["env", "set", "dev", "=x"]);
    assert!(err.contains("env"), "{err}");
}

fn file_checks(b: &Burrow) {
    let out = b.run_with_stdin(
        &["file", "write", "dev", "/work/a.txt", "--mode", "0640"],
        b"hi there\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(b.ok(&["file", "read", "dev", "/work/a.txt"]), "hi there\n");
    assert_eq!(
        b.ok(&["exec", "dev", "--", "stat", "-c", "%a", "/work/a.txt"])
            .trim(),
        "640"
    );
    assert_eq!(
        b.ok(&[
            "file",
            "read",
            "dev",
            "/work/a.txt",
            "--offset",
            "3",
            "--limit",
            "5"
        ]),
        "there"
    );

    // Parents are created.
    let out = b.run_with_stdin(&["file", "write", "dev", "/work/deep/er/b.txt"], b"x");
    assert!(out.status.success());
    assert_eq!(
        b.ok(&["exec", "dev", "--", "cat", "/work/deep/er/b.txt"]),
        "x"
    );

    // A large file goes in several chunks and comes back whole.
    let big: Vec<u8> = (0..9_000_000u32).map(|i| (i % 251) as u8).collect();
    let out = b.run_with_stdin(&["file", "write", "dev", "/work/big.bin"], &big);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let back = b.run(&["file", "read", "dev", "/work/big.bin"]);
    assert!(
        back.stdout == big,
        "big file differs ({} bytes back)",
        back.stdout.len()
    );
    // Input that ends on a chunk's edge (two chunks of 4 MiB) comes back whole;
    // empty input empties the file.
    let edge: Vec<u8> = (0..8u32 << 20).map(|i| (i % 253) as u8).collect();
    let out = b.run_with_stdin(&["file", "write", "dev", "/work/big.bin"], &edge);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let back = b.run(&["file", "read", "dev", "/work/big.bin"]);
    assert!(back.stdout == edge, "{} bytes back", back.stdout.len());
    let out = b.run_with_stdin(&["file", "write", "dev", "/work/big.bin"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        b.ok(&["exec", "dev", "--", "stat", "-c", "%s", "/work/big.bin"])
            .trim(),
        "0"
    );

    b.ok(&[
        "file",
        "edit",
        "dev",
        "/work/a.txt",
        "--old",
        "hi",
        "--new",
        "hello",
    ]);
    assert_eq!(
        b.ok(&["file", "read", "dev", "/work/a.txt"]),
        "hello there\n"
    );

    let listing = b.json(&["file", "ls", "dev", "/work", "--json"]);
    let a = listing
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["name"] == "a.txt")
        .expect("a.txt listed");
    assert_eq!(a["kind"], "file");
    assert_eq!(a["size"], 12);
    assert_eq!(a["mode"], 0o640);
    assert!(a["modified"].as_i64().expect("mtime") > 1_600_000_000);
    let deep = listing
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["name"] == "deep")
        .expect("deep listed");
    assert_eq!(deep["kind"], "dir");
    assert!(b.ok(&["file", "ls", "dev", "/work"]).contains("a.txt"));

    // Bad file input: one line, names the path, changes nothing.
    let (_, err) = b.fails(&["file", "read", "dev", "/work/missing.txt"]);
    assert!(
        err.contains("/work/missing.txt") && err.lines().count() == 1,
        "{err}"
    );
    let (_, err) = b.fails(&[
        "file",
        "edit",
        "dev",
        "/work/a.txt",
        "--old",
        "absent",
        "--new",
        "x",
    ]);
    assert!(err.contains("not found"), "{err}");
    assert_eq!(
        b.ok(&["file", "read", "dev", "/work/a.txt"]),
        "hello there\n"
    );
    let out = b.run_with_stdin(&["file", "write", "dev", "/work/deep"], b"x");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("directory"),
        "{}",
        text(&out.stderr)
    );
    let (_, err) = b.fails(&["file", "write", "dev", "/work/c.txt", "--mode", "999"]);
    assert!(err.contains("mode"), "{err}");
    let (_, err) = b.fails(&["file", "read", "dev", "relative/path"]);
    assert!(err.contains("path"), "{err}");
}

fn job_checks(b: &Burrow) {
    let job = b.ok(&[
        "job",
        "start",
        "dev",
        "--",
        "sh",
        "-c",
        "echo started; sleep 2; echo done",
    ]);
    let job = job.trim().to_string();
    assert!(job.parse::<u32>().is_ok(), "{job}");
    let s = b.json(&["job", "poll", "dev", &job, "--json"]);
    assert_eq!(s["job"].to_string(), job);
    // Wait for the job to finish as the user would: poll.
    wait_until("job to finish", Duration::from_secs(30), || {
        b.json(&["job", "poll", "dev", &job, "--json"])["running"] == false
    });
    let s = b.json(&["job", "poll", "dev", &job, "--json"]);
    assert_eq!(s["exit_code"], 0);
    assert_eq!(s["stdout"], "started\ndone\n");

    let job2 = b
        .ok(&["job", "start", "dev", "--", "sleep", "300"])
        .trim()
        .to_string();
    assert_eq!(
        b.json(&["job", "poll", "dev", &job2, "--json"])["running"],
        true
    );
    b.ok(&["job", "kill", "dev", &job2, "--signal", "TERM"]);
    wait_until("killed job to end", Duration::from_secs(30), || {
        b.json(&["job", "poll", "dev", &job2, "--json"])["running"] == false
    });
    let s = b.json(&["job", "poll", "dev", &job2, "--json"]);
    assert_eq!(s["signal"], 15);
    assert!(b
        .ok(&["job", "poll", "dev", &job2])
        .contains(&format!("job {job2}:")));

    let (_, err) = b.fails(&["job", "poll", "dev", "999"]);
    assert!(err.contains("999"), "{err}");
    let (_, err) = b.fails(&["job", "kill", "dev", &job2, "--signal", "BOGUS"]);
    assert!(err.contains("signal"), "{err}");
}

fn listing_checks(b: &Burrow, id: &str) {
    let list = b.json(&["ls", "--json"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert_eq!(list[0]["id"], id);
    assert_eq!(
        b.json(&["ls", "--state", "running", "--json"])
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(
        b.json(&["ls", "--state", "stopped", "--json"]),
        serde_json::json!([])
    );
    assert!(b.ok(&["ls"]).contains("dev"));

    for reference in ["dev", id] {
        let info = b.info(reference);
        assert_eq!(info["id"], id);
        assert_eq!(info["name"], "dev");
        assert_eq!(info["state"], "running");
        assert_eq!(info["vcpus"], 1);
        assert_eq!(info["memory_mib"], 512);
        assert_eq!(info["image"], "debian");
        // As root on a non-Btrfs host, the default store is a loop-mounted Btrfs.
        assert_eq!(info["store"], "btrfs");
        assert!(
            matches!(info["accel"].as_str(), Some("kvm" | "tcg")),
            "{info}"
        );
        assert!(
            info["created_at"]
                .as_str()
                .is_some_and(|s| s.ends_with('Z')),
            "{info}"
        );
        for p in ["qemu", "virtiofsd", "vsock"] {
            let pid = info["pids"][p]
                .as_i64()
                .unwrap_or_else(|| panic!("no {p} pid: {info}"));
            assert!(process_exists(pid as i32), "{p} pid {pid} not running");
        }
    }
    assert!(b.ok(&["info", "dev"]).contains("accel:"));

    let console = b.ok(&["logs", "dev", "--type", "console", "--lines", "1000"]);
    assert!(console.contains("burrow: boot at"), "{console}");
    let agent = b.ok(&["logs", "dev", "--type", "agent"]);
    assert!(
        !agent.is_empty() && agent.lines().all(|l| l.contains("burrow-agent: ")),
        "{agent}"
    );
    assert_eq!(b.ok(&["logs", "dev", "--lines", "2"]).lines().count(), 2);
}

fn state_checks(b: &Burrow, id: &str) {
    // A duplicate name is refused and changes nothing.
    let (_, err) = b.fails(&["create", "--name", "dev"]);
    assert!(err.contains("dev") && err.contains("taken"), "{err}");
    assert_eq!(b.json(&["ls", "--json"]).as_array().map(Vec::len), Some(1));
    assert_eq!(b.info("dev")["id"], id);
    // start on a running workspace is a no-op, not an error.
    assert!(b.ok(&["start", "dev"]).contains("running"));
    let st = b.json(&["daemon", "status", "--json"]);
    assert_eq!(st["workspaces"], 1);
    assert_eq!(st["running"], 1);
}
