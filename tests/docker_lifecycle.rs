//! docker's lifecycle commands on burrow, through a private dockerd (see
//! tests/docker.rs for the harness): `exec -it`, `logs -f`, `top`, `kill -s`,
//! `pause`/`unpause`, `cp` both ways, `restart` (a new VM), `wait`, a VM sized
//! by `--memory`/`--cpus`, and docker's own exit codes 125, 126 and 127 for
//! containers that cannot start.

use std::process::Stdio;
use std::time::Duration;

use burrow_tests::oci::Dockerd;
use burrow_tests::{require_root, text, wait_until, Burrow, LineReader, Tmux};

const LONG: Duration = Duration::from_secs(120);

/// The container's script: a line at start, a line per USR1 (and it goes on),
/// exit 7 on TERM, and a counter in the host directory mounted at /data that
/// goes up while it runs.
const WEB: &str = "echo started; trap 'echo usr1-seen' USR1; trap 'echo bye; exit 7' TERM; \
                   i=0; while :; do i=$((i+1)); echo $i > /data/count; sleep 1 & wait $!; done";

/// The counter the container writes into the host directory `dir`.
fn count(dir: &std::path::Path) -> u64 {
    std::fs::read_to_string(dir.join("count"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The PIDs `docker top` lists (its PID column).
fn top_pids(d: &Dockerd, name: &str) -> Vec<i32> {
    let out = d.ok(&["top", name]);
    let mut lines = out.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let col = header
        .iter()
        .position(|h| *h == "PID")
        .unwrap_or_else(|| panic!("no PID column in docker top's output: {out}"));
    lines
        .filter_map(|l| l.split_whitespace().nth(col))
        .map(|p| p.parse().unwrap_or_else(|_| panic!("PID {p:?} in {out}")))
        .collect()
}

/// Whether host process `pid` is one of burrow-runtime's holders.
fn is_holder(b: &Burrow, pid: i32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<String> = cmdline.split(|&c| c == 0).map(text).collect();
    let runtime = b.bin().join("burrow-runtime");
    args.first()
        .is_some_and(|a| std::path::Path::new(a) == runtime)
        && args.iter().any(|a| a == "holder")
}

/// The host pid of the QEMU of the only VM burrow has.
fn qemu_pid(b: &Burrow) -> i64 {
    let vms = b.json(&["ls", "--json"]);
    let all = vms.as_array().expect("ls --json: an array");
    assert_eq!(all.len(), 1, "one VM expected: {vms}");
    all[0]["pids"]["qemu"]
        .as_i64()
        .unwrap_or_else(|| panic!("no QEMU pid: {vms}"))
}

/// One detached container, `web`, driven through docker's lifecycle commands;
/// one VM until `restart`, which makes another.
#[test]
fn docker_drives_a_containers_lifecycle() {
    require_root!();
    let (b, d) = Dockerd::with_busybox(false);
    let data = d.dir.path().join("web-data");
    std::fs::create_dir_all(&data).expect("data dir");
    let vdata = format!("{}:/data", data.display());
    d.ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "--runtime",
        "burrow",
        "--network",
        "none",
        "-v",
        &vdata,
        "bb",
        "sh",
        "-c",
        WEB,
    ]);
    wait_until("the container's counter", LONG, || count(&data) >= 1);

    // logs -f: what the container prints later reaches a running `logs -f`.
    let mut follow = d
        .docker(&["logs", "-f", "web"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker logs -f");
    let followed = LineReader::new(follow.stdout.take().expect("stdout"));
    assert_eq!(followed.next("logs -f's first line", LONG), "started");

    // kill -s USR1: the container's trap sees it (a line in the followed log),
    // and the container goes on.
    d.ok(&["kill", "-s", "USR1", "web"]);
    followed.until("usr1-seen", LONG);
    let after = count(&data);
    wait_until("the counter to go on after USR1", LONG, || {
        count(&data) > after
    });
    let running = d.ok(&["inspect", "-f", "{{.State.Running}}", "web"]);
    assert_eq!(running.trim(), "true");

    // exec -it on a terminal, under tmux.
    let mut tmux = Tmux::new();
    let line = d.shell_line(&["exec", "-it", "web", "sh"]);
    tmux.start("ex", 90, 25, &format!("{line}; echo exec-ended-$((1+1))"));
    tmux.type_text("ex", "stty size; echo mark-$((6*7))\r");
    let screen = tmux.wait_for("ex", "mark-42", LONG);
    assert!(
        screen.contains("25 90"),
        "the exec's terminal size: {screen}"
    );
    tmux.type_text("ex", "exit\r");
    // docker exec returns once the exec's holder has exited.
    tmux.wait_for("ex", "exec-ended-2", LONG);
    drop(tmux);

    // top: the host processes standing for the container's (the holders: the
    // container's own, and one per exec that runs), never another host process.
    let pids = top_pids(&d, "web");
    assert_eq!(pids.len(), 1, "docker top: {pids:?}");
    assert!(
        is_holder(&b, pids[0]),
        "docker top lists {pids:?}, not a holder"
    );
    d.ok(&[
        "exec",
        "-d",
        "web",
        "sh",
        "-c",
        "echo $$ > /data/exec.pid; exec sleep 1000",
    ]);
    wait_until("the exec's pid file", LONG, || {
        data.join("exec.pid").exists()
    });
    wait_until("docker top to list the exec's holder", LONG, || {
        top_pids(&d, "web").len() == 2
    });
    let pids = top_pids(&d, "web");
    for p in &pids {
        assert!(
            is_holder(&b, *p),
            "docker top lists {p}, not a holder: {pids:?}"
        );
    }
    d.ok(&["exec", "web", "sh", "-c", "kill $(cat /data/exec.pid)"]);
    wait_until("the exec's holder to leave docker top", LONG, || {
        top_pids(&d, "web").len() == 1
    });

    // cp, both ways: out of the container's root and into it, seen inside.
    let out_dir = d.dir.path().join("cp-out");
    std::fs::create_dir_all(&out_dir).expect("cp dir");
    d.ok(&["cp", "web:/etc/hostname", &out_dir.to_string_lossy()]);
    let hostname = std::fs::read_to_string(out_dir.join("hostname")).expect("copied out");
    let inside = d.ok(&["exec", "web", "hostname"]);
    assert_eq!(hostname.trim(), inside.trim());
    let file_in = out_dir.join("in.txt");
    std::fs::write(&file_in, "copied in\n").expect("file");
    d.ok(&["cp", &file_in.to_string_lossy(), "web:/tmp/in.txt"]);
    assert_eq!(d.ok(&["exec", "web", "cat", "/tmp/in.txt"]), "copied in\n");

    // pause: docker refuses an exec, burrow says paused; unpause: it goes on.
    d.ok(&["pause", "web"]);
    let status = d.ok(&["inspect", "-f", "{{.State.Status}}", "web"]);
    assert_eq!(status.trim(), "paused");
    let out = d.run(&["exec", "web", "true"]);
    assert!(!out.status.success(), "an exec into a paused container ran");
    assert!(
        text(&out.stderr).contains("paused"),
        "{}",
        text(&out.stderr)
    );
    d.ok(&["unpause", "web"]);
    let after = count(&data);
    burrow_tests::wait_until_explained(
        "the counter to go on after unpause",
        LONG,
        || count(&data) > after,
        || {
            // What the container, docker and the guest say, for a recurrence.
            let inspect = d.run(&["inspect", "-f", "{{.State.Status}}", "web"]);
            let ps = d.run(&["exec", "web", "ps"]);
            let vms = b.json(&["ls", "--json"]);
            let vm = vms[0]["id"].as_str().unwrap_or_default().to_string();
            format!(
                "count {} (was {after}); docker: {} {}; ps in the container: {} {}\nconsole:\n{}",
                count(&data),
                text(&inspect.stdout).trim(),
                text(&inspect.stderr).trim(),
                text(&ps.stdout),
                text(&ps.stderr).trim(),
                text(&b.run(&["logs", &vm, "--lines", "30"]).stdout),
            )
        },
    );

    // restart: the container stops (its TERM trap), a new VM runs it again, and
    // its log holds both runs. An exec still running then ends with the
    // container, and its holder goes.
    d.ok(&["exec", "-d", "web", "sleep", "1000"]);
    wait_until("docker top to list the exec's holder", LONG, || {
        top_pids(&d, "web").len() == 2
    });
    let before = top_pids(&d, "web");
    let first_vm = qemu_pid(&b);
    d.ok(&["restart", "web"]);
    followed.until("bye", LONG);
    for p in before {
        assert!(
            burrow_tests::exits_within(p, LONG),
            "holder {p} outlived the container's first run"
        );
    }
    let second_vm = qemu_pid(&b);
    assert_ne!(first_vm, second_vm, "restart kept the VM");
    std::fs::remove_file(data.join("count")).expect("reset the counter");
    wait_until("the counter after restart", LONG, || count(&data) >= 1);
    wait_until("both runs in the log", LONG, || {
        d.ok(&["logs", "web"]).matches("started").count() == 2
    });
    // logs -f of the first run ends with it (docker ends a follow at a stop).
    let _ = follow.wait();
    let pids = top_pids(&d, "web");
    assert_eq!(pids.len(), 1, "docker top after restart: {pids:?}");
    assert!(is_holder(&b, pids[0]), "{pids:?}");

    // wait: blocks until the container exits, and prints its code.
    let waiter = d
        .docker(&["wait", "web"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("docker wait");
    d.ok(&["kill", "-s", "TERM", "web"]);
    let out = waiter.wait_with_output().expect("docker wait");
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).trim(), "7");
    d.ok(&["rm", "web"]);
    b.wait_no_vms(LONG);
}

/// A VM sized by `--memory` and `--cpus`, and docker's exit codes for a
/// container that cannot start: 127 (no such command), 126 (not executable),
/// 125 (docker's own refusals, and a runtime's refusal of the spec).
#[test]
fn docker_sizes_vms_and_reports_start_failures() {
    require_root!();
    let (b, d) = Dockerd::with_busybox(false);
    let run = ["run", "--rm", "--runtime", "burrow", "--network", "none"];

    // 2 vCPUs; 512 MiB for the container, a little more for the VM's kernel.
    let mut args = run.to_vec();
    args.extend([
        "--memory",
        "512m",
        "--cpus",
        "2",
        "bb",
        "sh",
        "-c",
        "nproc; grep MemTotal /proc/meminfo; c=$(cat /proc/self/cgroup); cat /sys/fs/cgroup${c#0::}/memory.max",
    ]);
    let out = d.ok(&args);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("2"), "{out}");
    let kib: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("MemTotal: {out}"));
    assert!(
        (512 * 1024..=672 * 1024).contains(&kib),
        "the guest's MemTotal {kib} kB for --memory 512m"
    );
    // And the limit itself is on the container's cgroup in the guest (read by
    // its path: this dockerd gives the container no cgroup namespace).
    assert_eq!(lines.next(), Some("536870912"), "{out}");

    // 127: no such file.
    let mut args = run.to_vec();
    args.extend(["bb", "/nonexistent"]);
    let out = d.run(&args);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));

    // 126: not executable (/etc/passwd is a plain file).
    let mut args = run.to_vec();
    args.extend(["bb", "/etc/passwd"]);
    let out = d.run(&args);
    assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));

    // 125: an unknown runtime, a bad flag, and burrow-runtime refusing the
    // spec (more memory than the host has).
    let out = d.run(&["run", "--rm", "--runtime", "nosuch", "bb", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    let out = d.run(&[
        "run",
        "--rm",
        "--runtime",
        "burrow",
        "--no-such-flag",
        "bb",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    let mut args = run.to_vec();
    args.extend(["--memory", "100000g", "bb", "true"]);
    let out = d.run(&args);
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("memory"),
        "{}",
        text(&out.stderr)
    );

    b.wait_no_vms(LONG);
}
