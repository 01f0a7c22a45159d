//! Live streams through the CLI, against one real VM: output arrives as it is
//! written and input as it is sent, end of input, exit codes and signals, timeouts
//! that leave nothing behind, output with no cap, named jobs, a client killed
//! mid-stream, `exec -t` without a terminal, and `logs -f` that ends when the
//! workspace stops. (1 GiB through `cat` is the stream_round_trip suite.)

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use burrow_tests::transfer::hex;
use burrow_tests::{kill9, require_root, text, wait_child, wait_until, Burrow, LineReader};
use sha2::{Digest, Sha256};

const LONG: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

#[test]
fn streams_end_to_end() {
    require_root!();
    let b = Burrow::new();
    b.ok(&["create", "--name", "dev"]);

    live_arrival(&b);
    end_of_input_and_exit_codes(&b);
    timeout_kills_the_group(&b);
    output_has_no_cap(&b);
    named_jobs(&b);
    client_killed_mid_stream(&b);
    tty_needs_a_terminal(&b);
    logs_follow_ends_when_the_workspace_stops(&b);
}

/// Output is read from the CLI before the command has finished, and before the
/// input it waits for has been sent; lines written a second apart arrive apart.
fn live_arrival(b: &Burrow) {
    let mut cli = b.spawn(&[
        "exec",
        "-i",
        "dev",
        "--",
        "sh",
        "-c",
        "echo first; read x; echo second-$x",
    ]);
    let out = LineReader::new(cli.stdout.take().expect("stdout"));
    assert_eq!(out.next("the first line", LONG), "first");
    let mut stdin = cli.stdin.take().expect("stdin");
    stdin.write_all(b"go\n").expect("write stdin");
    stdin.flush().expect("flush");
    assert_eq!(out.next("the second line", LONG), "second-go");
    drop(stdin);
    assert_eq!(wait_child("exec -i", &mut cli, LONG), 0);

    let mut cli = b.spawn(&[
        "exec",
        "dev",
        "--",
        "sh",
        "-c",
        "for i in 1 2 3; do echo $i; sleep 1; done",
    ]);
    let out = LineReader::new(cli.stdout.take().expect("stdout"));
    let lines: Vec<(Instant, String)> = (1..=3)
        .map(|i| {
            out.next_timed(&format!("line {i}"), LONG)
                .expect("a line per second")
        })
        .collect();
    let texts: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(texts, ["1", "2", "3"]);
    let spread = lines[2].0 - lines[0].0;
    // Two `sleep 1` lie between them in the guest: buffered output would arrive at
    // once, at the end.
    assert!(
        spread >= Duration::from_millis(1500),
        "lines 1 and 3 arrived {spread:?} apart: not live"
    );
    assert_eq!(wait_child("exec", &mut cli, LONG), 0);
}

fn end_of_input_and_exit_codes(b: &Burrow) {
    let out = b.run_with_stdin(&["exec", "-i", "dev", "--", "wc", "-c"], b"abc");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "3");

    let code = |args: &[&str]| b.run(args).status.code();
    assert_eq!(code(&["exec", "dev", "--", "sh", "-c", "exit 3"]), Some(3));
    assert_eq!(
        code(&["exec", "dev", "--", "sh", "-c", "kill -9 $$"]),
        Some(137)
    );
    // stderr streams apart from stdout.
    let out = b.run(&["exec", "dev", "--", "sh", "-c", "echo out; echo err >&2"]);
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
}

/// `--timeout` ends the command with 124 and kills its whole process group.
fn timeout_kills_the_group(b: &Burrow) {
    let out = b.run(&[
        "exec",
        "dev",
        "--timeout",
        "2",
        "--",
        "sh",
        "-c",
        "sleep 100; true",
    ]);
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("timed out"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(
        b.guest_pgrep("dev", "[s]leep 100"),
        Vec::<String>::new(),
        "the timed-out command's group lives on"
    );
}

/// A 64 MiB file streams out whole (the buffered exec caps output; this does not).
fn output_has_no_cap(b: &Burrow) {
    let sum = b.ok(&[
        "exec",
        "dev",
        "--",
        "sh",
        "-c",
        "head -c 67108864 /dev/urandom > /big && sha256sum /big",
    ]);
    let want = sum.split_whitespace().next().expect("sha256").to_string();
    let mut cli = b.spawn(&["exec", "dev", "--", "cat", "/big"]);
    drop(cli.stdin.take());
    let mut stdout = cli.stdout.take().expect("stdout");
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let k = stdout.read(&mut buf).expect("read");
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    assert_eq!(wait_child("exec cat /big", &mut cli, LONG), 0);
    assert_eq!(n, 64 * MIB);
    assert_eq!(hex(&h.finalize()), want);
    b.ok(&["exec", "dev", "--", "rm", "/big"]);
}

fn named_jobs(b: &Burrow) {
    // A job that writes, waits for a gate, writes again and exits 4.
    b.ok(&[
        "job",
        "start",
        "dev",
        "--name",
        "build",
        "--",
        "sh",
        "-c",
        "echo live-1; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo live-2; exit 4",
    ]);
    b.assert_refused(&[(
        ["job", "start", "dev", "--name", "build", "--", "true"],
        "already exists",
    )]);
    // Followed: the first line arrives while the job waits, the second once the
    // gate opens, and the follow ends with the job.
    let mut follow = b.spawn(&["job", "logs", "dev", "build", "-f"]);
    let out = LineReader::new(follow.stdout.take().expect("stdout"));
    assert_eq!(out.next("live-1", LONG), "live-1");
    // Without -f, a running job's logs end with what is kept.
    let kept = b.run(&["job", "logs", "dev", "build"]);
    assert_eq!(kept.status.code(), Some(0), "{}", text(&kept.stderr));
    assert_eq!(text(&kept.stdout), "live-1\n");
    assert!(follow.try_wait().expect("try_wait").is_none());
    b.ok(&["exec", "dev", "--", "touch", "/tmp/go"]);
    assert_eq!(out.next("live-2", LONG), "live-2");
    assert!(out.rest("the end of job logs -f", LONG).is_empty());
    assert_eq!(wait_child("job logs -f", &mut follow, LONG), 0);
    assert_eq!(
        b.run(&["job", "wait", "dev", "build"]).status.code(),
        Some(4)
    );

    // Signalled: `job wait` says 128 + 15.
    b.ok(&[
        "job", "start", "dev", "--name", "sleeper", "--", "sleep", "1000",
    ]);
    let jobs = b.json(&["job", "ls", "dev", "--json"]);
    let sleeper = jobs
        .as_array()
        .expect("array")
        .iter()
        .find(|j| j["name"] == "sleeper")
        .unwrap_or_else(|| panic!("sleeper not listed: {jobs}"));
    assert_eq!(sleeper["running"], true, "{jobs}");
    b.ok(&["job", "signal", "dev", "sleeper", "TERM"]);
    assert_eq!(
        b.run(&["job", "wait", "dev", "sleeper"]).status.code(),
        Some(143)
    );

    b.assert_refused(&[
        (&["job", "logs", "dev", "nosuch"][..], "no such job"),
        (&["job", "logs", "dev", "nosuch", "-f"][..], "no such job"),
        (&["job", "wait", "dev", "nosuch"][..], "no such job"),
        (
            &["job", "signal", "dev", "nosuch", "TERM"][..],
            "no such job",
        ),
        (&["job", "signal", "dev", "build", "NOPE"][..], "signal"),
    ]);
}

/// kill -9 of the CLI: an exec's process is killed, a job and a terminal live on.
fn client_killed_mid_stream(b: &Burrow) {
    b.ok(&[
        "job", "start", "dev", "--name", "survivor", "--", "sleep", "1002",
    ]);
    b.ok(&[
        "terminal", "new", "dev", "--name", "lasting", "--", "sleep", "1003",
    ]);
    let mut exec = b.spawn(&["exec", "dev", "--", "sleep", "1001"]);
    let mut logs = b.spawn(&["job", "logs", "dev", "survivor", "-f"]);
    let mut viewer = b.spawn(&["terminal", "attach", "dev", "lasting", "--read-only"]);
    wait_until("the exec'd sleep to run", LONG, || {
        !b.guest_pgrep("dev", "[s]leep 1001").is_empty()
    });
    wait_until("the viewer to be counted", LONG, || {
        terminal(b, "lasting")["viewers"] == 1
    });
    for c in [&mut exec, &mut logs, &mut viewer] {
        kill9(c.id() as i32);
        let _ = c.wait();
    }
    wait_until("the exec'd sleep to be killed", LONG, || {
        b.guest_pgrep("dev", "[s]leep 1001").is_empty()
    });
    wait_until("the viewer to be gone", LONG, || {
        terminal(b, "lasting")["viewers"] == 0
    });
    assert_eq!(terminal(b, "lasting")["alive"], true);
    assert_eq!(
        b.guest_pgrep("dev", "[s]leep 1002").len(),
        1,
        "the job died"
    );
    assert_eq!(
        b.guest_pgrep("dev", "[s]leep 1003").len(),
        1,
        "the terminal's process died"
    );
    b.ok(&["job", "kill", "dev", "survivor"]);
    b.ok(&["terminal", "kill", "dev", "lasting"]);
}

fn terminal(b: &Burrow, name: &str) -> serde_json::Value {
    let list = b.json(&["terminal", "ls", "dev", "--json"]);
    list.as_array()
        .expect("array")
        .iter()
        .find(|t| t["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("terminal {name} not listed: {list}"))
}

fn tty_needs_a_terminal(b: &Burrow) {
    b.assert_refused(&[
        (&["exec", "-t", "dev", "--", "true"][..], "terminal"),
        (&["exec", "-it", "dev", "--", "true"][..], "terminal"),
    ]);
}

/// `logs -f` prints the log and new lines, and ends once the workspace stops.
fn logs_follow_ends_when_the_workspace_stops(b: &Burrow) {
    let mut follow = b.spawn(&["logs", "dev", "-f"]);
    let out = LineReader::new(follow.stdout.take().expect("stdout"));
    let first = out.next("a console line", LONG);
    assert!(!first.is_empty());
    b.ok(&["stop", "dev"]);
    let rest = out.rest("the end of logs -f", LONG);
    assert_eq!(wait_child("logs -f", &mut follow, LONG), 0, "{rest:?}");
    b.ok(&["destroy", "dev"]);
}
