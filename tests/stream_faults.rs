//! Faults under live streams, on one VM: burrowd killed with -9 while a CLI follows
//! an exec and another a job (they end with 255 and one error line; the terminal
//! and the job live on, are followed again by the next daemon, and the recording
//! keeps growing), then the VM killed under an `exec -it` (an error line, the
//! local terminal restored) and a plain `exec` (255).

use std::io::Read;
use std::time::Duration;

use burrow_tests::{
    kill9, process_exists, require_root, stty_cooked, text, wait_child, wait_exit, wait_until,
    Burrow, LineReader, Tmux,
};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(120);

#[test]
fn streams_survive_or_fail_cleanly() {
    require_root!();
    let b = Burrow::new();
    b.ok(&["create", "--name", "dev"]);
    daemon_killed_mid_stream(&b);
    vm_killed_mid_stream(&b);
}

/// The highest N of the `PREFIX-N` words in `s`.
fn highest(s: &str, prefix: &str) -> u64 {
    s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter_map(|w| w.strip_prefix(prefix)?.parse().ok())
        .max()
        .unwrap_or(0)
}

fn recording(b: &Burrow) -> String {
    let cast = b.ok(&["terminal", "record", "dev", "ticker"]);
    cast.lines()
        .skip(1)
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e[1] == "o")
        .filter_map(|e| e[2].as_str().map(str::to_string))
        .collect()
}

/// A CLI's remaining stderr, once it has exited.
fn stderr_of(c: &mut std::process::Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = c.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

fn daemon_killed_mid_stream(b: &Burrow) {
    b.ok(&[
        "terminal",
        "new",
        "dev",
        "--name",
        "ticker",
        "--",
        "sh",
        "-c",
        "i=0; while :; do i=$((i+1)); echo tock-$i; sleep 0.3; done",
    ]);
    b.ok(&[
        "job",
        "start",
        "dev",
        "--name",
        "jt",
        "--",
        "sh",
        "-c",
        "i=0; while :; do i=$((i+1)); echo jtick-$i; sleep 0.3; done",
    ]);
    let mut exec = b.spawn(&[
        "exec",
        "dev",
        "--",
        "sh",
        "-c",
        "while :; do echo tick; sleep 0.2; done",
    ]);
    let exec_out = LineReader::new(exec.stdout.take().expect("stdout"));
    let mut follow = b.spawn(&["job", "logs", "dev", "jt", "-f"]);
    let follow_out = LineReader::new(follow.stdout.take().expect("stdout"));
    assert_eq!(exec_out.next("tick", LONG), "tick");
    follow_out.until("jtick-", LONG);
    wait_until("the recording to start", LONG, || {
        highest(&recording(b), "tock-") > 0
    });

    let daemon = b.daemon_pid().expect("daemon pid");
    kill9(daemon);
    wait_exit("burrowd", daemon, Duration::from_secs(10));
    let job_seen = highest(
        &follow_out.rest("job logs -f to end", LONG).join("\n"),
        "jtick-",
    );
    exec_out.rest("exec to end", LONG);
    for (what, c) in [("exec", &mut exec), ("job logs -f", &mut follow)] {
        assert_eq!(wait_child(what, c, LONG), 255, "{what}");
        let err = stderr_of(c);
        assert_eq!(err.trim().lines().count(), 1, "{what}: {err:?}");
        assert!(err.starts_with("burrow: "), "{what}: {err:?}");
    }

    // The next command starts a daemon; the session and the job lived on.
    let out = b.run(&["terminal", "ls", "dev", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("started burrowd"));
    let list: Value = serde_json::from_slice(&out.stdout).expect("json");
    let ticker = list
        .as_array()
        .expect("array")
        .iter()
        .find(|t| t["name"] == "ticker")
        .cloned()
        .unwrap_or_else(|| panic!("ticker gone: {list}"));
    assert_eq!(ticker["alive"], true, "{ticker}");
    let jobs = b.json(&["job", "ls", "dev", "--json"]);
    assert!(
        jobs.as_array()
            .expect("array")
            .iter()
            .any(|j| j["name"] == "jt" && j["running"] == true),
        "{jobs}"
    );

    // Followed again: new lines.
    let mut follow = b.spawn(&["job", "logs", "dev", "jt", "-f"]);
    let out = LineReader::new(follow.stdout.take().expect("stdout"));
    let want = format!("jtick-{}", job_seen + 2);
    out.until(&want, LONG);
    kill9(follow.id() as i32);
    let _ = follow.wait();
    let mut watch = b.spawn(&["terminal", "attach", "dev", "ticker", "--read-only"]);
    let out = LineReader::new(watch.stdout.take().expect("stdout"));
    out.until("tock-", LONG);
    kill9(watch.id() as i32);
    let _ = watch.wait();

    // The recording goes on past the restart.
    let at_restart = highest(&recording(b), "tock-");
    wait_until("the recording to grow after the restart", LONG, || {
        highest(&recording(b), "tock-") >= at_restart + 5
    });
    let rec = recording(b);
    for i in 1..=highest(&rec, "tock-") {
        assert!(
            rec.contains(&format!("tock-{i}\r\n")),
            "tock-{i} missing from the recording"
        );
    }
    b.ok(&["job", "kill", "dev", "jt"]);
    b.ok(&["terminal", "kill", "dev", "ticker"]);
}

fn vm_killed_mid_stream(b: &Burrow) {
    let mut tmux = Tmux::new();
    let exec = b.shell_line(&[
        "exec",
        "-it",
        "dev",
        "--",
        "sh",
        "-c",
        "echo ready-$((1+1)); exec sleep 1000",
    ]);
    tmux.start("x", 100, 30, &format!("{exec}; echo cli-rc=$?; stty -a"));
    tmux.wait_for("x", "ready-2", LONG);
    let mut plain = b.spawn(&["exec", "dev", "--", "sh", "-c", "echo up; sleep 1000"]);
    let plain_out = LineReader::new(plain.stdout.take().expect("stdout"));
    assert_eq!(plain_out.next("up", LONG), "up");

    let qemu = b.info("dev")["pids"]["qemu"].as_i64().expect("qemu pid") as i32;
    kill9(qemu);
    wait_exit("qemu", qemu, Duration::from_secs(10));
    assert!(!process_exists(qemu));

    assert_eq!(wait_child("exec", &mut plain, LONG), 255);
    let err = stderr_of(&mut plain);
    assert_eq!(err.trim().lines().count(), 1, "{err:?}");
    assert!(err.starts_with("burrow: "), "{err:?}");

    let screen = tmux.wait_for("x", "cli-rc=", LONG);
    let i = screen.rfind("cli-rc=").expect("cli-rc");
    assert!(screen[i..].starts_with("cli-rc=255"), "{screen}");
    assert!(screen[..i].contains("burrow: "), "no error line:\n{screen}");
    let screen = tmux.wait_for("x", "speed", LONG);
    let i = screen.rfind("cli-rc=").expect("cli-rc");
    assert!(
        stty_cooked(&screen[i..]),
        "the local terminal was left raw:\n{screen}"
    );
    wait_until("the workspace to be reported stopped", LONG, || {
        b.info("dev")["state"] == "stopped"
    });
    b.ok(&["destroy", "dev"]);
}
