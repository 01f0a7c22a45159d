//! Terminals driven as a person would, in a real terminal (tmux), against one VM:
//! a persistent session attached, typed into, resized, interrupted, detached and
//! re-attached (its screen comes back); a read-only second viewer; `exec -it`
//! restoring the local terminal; the recording as asciicast v2 that asciinema
//! plays; kill, duplicate names, an ended session; and a viewer that stops reading
//! while another reads everything.

use std::time::Duration;

use burrow::api::client::Client;
use burrow::api::stream::{ServerEvent, StreamMessage};
use burrow_proto::{Spawn, StreamControl, StreamOpen, WinSize};
use burrow_tests::{require_root, shell_quote, stty_cooked, text, wait_until, Burrow, Tmux};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(120);

#[test]
fn terminals_end_to_end() {
    require_root!();
    let b = Burrow::new();
    b.ok(&["create", "--name", "dev"]);
    let mut tmux = Tmux::new();

    attach_type_resize_interrupt_detach(&b, &mut tmux);
    reattach_and_a_read_only_viewer(&b, &mut tmux);
    exec_it_restores_the_terminal(&b, &mut tmux);
    recording_is_asciicast(&b, &mut tmux);
    kill_names_and_ended_sessions(&b);
    slow_viewer_is_dropped_others_read_on(&b);
    resize_without_a_terminal(&b);
}

fn terminal(b: &Burrow, name: &str) -> Option<Value> {
    let list = b.json(&["terminal", "ls", "dev", "--json"]);
    list.as_array()
        .expect("array")
        .iter()
        .find(|t| t["name"] == name)
        .cloned()
}

/// The pane's text after its last `cli-rc=` line: what the pane's script ran after
/// the CLI exited.
fn after_exit(screen: &str) -> &str {
    let i = screen.rfind("cli-rc=").expect("cli-rc in the pane");
    &screen[i..]
}

fn attach_type_resize_interrupt_detach(b: &Burrow, tmux: &mut Tmux) {
    assert_eq!(
        b.ok(&["terminal", "new", "dev", "--name", "main"]).trim(),
        "main"
    );
    let attach = b.shell_line(&["terminal", "attach", "dev", "main"]);
    tmux.start("w1", 100, 30, &format!("{attach}; echo cli-rc=$?"));
    tmux.wait_for(
        "w1",
        "burrow: attached to main in dev; detach with Ctrl-] d",
        LONG,
    );

    tmux.type_text("w1", "echo hello-$((6*7))");
    tmux.send_keys("w1", &["Enter"]);
    tmux.wait_for("w1", "hello-42", LONG);

    // The writer's window is the terminal's; a resize follows.
    tmux.type_text("w1", "echo size=$(stty size)");
    tmux.send_keys("w1", &["Enter"]);
    tmux.wait_for("w1", "size=30 100", LONG);
    tmux.resize("w1", 120, 40);
    wait_until("the terminal to take the new size", LONG, || {
        terminal(b, "main").expect("main")["size"] == serde_json::json!({"rows": 40, "cols": 120})
    });
    tmux.type_text("w1", "echo size=$(stty size)");
    tmux.send_keys("w1", &["Enter"]);
    tmux.wait_for("w1", "size=40 120", LONG);

    // Ctrl-C reaches the foreground job.
    tmux.type_text("w1", "sleep 100");
    tmux.send_keys("w1", &["Enter"]);
    wait_until("sleep to run in the terminal", LONG, || {
        !b.guest_pgrep("dev", "^sleep 100$").is_empty()
    });
    tmux.send_keys("w1", &["C-c"]);
    tmux.type_text("w1", "echo rc=$?");
    tmux.send_keys("w1", &["Enter"]);
    tmux.wait_for("w1", "rc=130", LONG);
    assert!(b.guest_pgrep("dev", "^sleep 100$").is_empty());

    // Ctrl-] d detaches; the session lives on, with no viewer.
    tmux.send_keys("w1", &["C-]", "d"]);
    let screen = tmux.wait_for("w1", "cli-rc=", LONG);
    assert!(
        screen.contains("burrow: detached from main; it lives on"),
        "{screen}"
    );
    assert!(after_exit(&screen).starts_with("cli-rc=0"), "{screen}");
    wait_until("the viewer to be gone", LONG, || {
        terminal(b, "main").expect("main")["viewers"] == 0
    });
    let t = terminal(b, "main").expect("main");
    assert_eq!(t["alive"], true, "{t}");
    assert!(t["output_bytes"].as_u64().unwrap_or(0) > 0, "{t}");
    assert!(t["argv"].as_array().is_some_and(|a| !a.is_empty()), "{t}");
    assert!(t["created_at"].as_i64().unwrap_or(0) > 0, "{t}");
    tmux.kill_session("w1");
}

fn reattach_and_a_read_only_viewer(b: &Burrow, tmux: &mut Tmux) {
    // The screen comes back on re-attach.
    let attach = b.shell_line(&["terminal", "attach", "dev", "main"]);
    tmux.start("w2", 100, 30, &format!("{attach}; echo cli-rc=$?"));
    tmux.wait_for("w2", "hello-42", LONG);

    let watch = b.shell_line(&["terminal", "attach", "dev", "main", "--read-only"]);
    tmux.start("v", 100, 30, &format!("{watch}; echo cli-rc=$?"));
    tmux.wait_for("v", "attached to main in dev (read-only)", LONG);
    wait_until("two viewers", LONG, || {
        terminal(b, "main").expect("main")["viewers"] == 2
    });

    // The viewer sees what the writer types; its own keys go nowhere.
    tmux.type_text("w2", "echo both-$((2*3))");
    tmux.send_keys("w2", &["Enter"]);
    tmux.wait_for("w2", "both-6", LONG);
    tmux.wait_for("v", "both-6", LONG);
    tmux.type_text("v", "echo ro-$((5*5))");
    tmux.send_keys("v", &["Enter"]);
    tmux.type_text("w2", "echo after-$((3*3))");
    tmux.send_keys("w2", &["Enter"]);
    tmux.wait_for("w2", "after-9", LONG);
    tmux.wait_for("v", "after-9", LONG);
    for pane in ["w2", "v"] {
        let screen = tmux.capture(pane);
        assert!(
            !screen.contains("ro-25") && !screen.contains("ro-$(("),
            "a read-only viewer's keys reached the terminal:\n{screen}"
        );
    }

    for pane in ["v", "w2"] {
        tmux.send_keys(pane, &["C-]", "d"]);
        let screen = tmux.wait_for(pane, "cli-rc=", LONG);
        assert!(after_exit(&screen).starts_with("cli-rc=0"), "{screen}");
        tmux.kill_session(pane);
    }
}

fn exec_it_restores_the_terminal(b: &Burrow, tmux: &mut Tmux) {
    let exec = b.shell_line(&["exec", "-it", "dev", "--", "sh", "-c", "tty; exit 7"]);
    tmux.start("x", 100, 30, &format!("{exec}; echo cli-rc=$?; stty -a"));
    let screen = tmux.wait_for("x", "cli-rc=", LONG);
    assert!(screen.contains("/dev/pts/"), "{screen}");
    let after = after_exit(&screen);
    assert!(after.starts_with("cli-rc=7"), "{screen}");
    // `stty -a` prints after the CLI: give it the time to.
    let screen = tmux.wait_for("x", "speed", LONG);
    assert!(
        stty_cooked(after_exit(&screen)),
        "the local terminal was left raw:\n{screen}"
    );
    tmux.kill_session("x");
}

fn recording_is_asciicast(b: &Burrow, tmux: &mut Tmux) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("main.cast");
    let f = file.to_str().expect("utf-8 path");
    // The daemon records as the session writes: wait until it has the greeting.
    wait_until("the recording to hold hello-42", LONG, || {
        b.ok(&["terminal", "record", "dev", "main", "-o", f]);
        cast_output(&std::fs::read_to_string(&file).expect("cast")).contains("hello-42")
    });
    let cast = std::fs::read_to_string(&file).expect("cast");
    let mut lines = cast.lines();
    let header: Value = serde_json::from_str(lines.next().expect("header")).expect("header JSON");
    assert_eq!(header["version"], 2, "{header}");
    assert!(header["width"].as_u64().is_some(), "{header}");
    assert!(header["height"].as_u64().is_some(), "{header}");
    let mut last = 0.0f64;
    let mut outputs = 0;
    for l in lines {
        let e: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("event {l}: {e}"));
        let e = e
            .as_array()
            .unwrap_or_else(|| panic!("event not an array: {l}"));
        assert_eq!(e.len(), 3, "{l}");
        let t = e[0].as_f64().unwrap_or_else(|| panic!("time: {l}"));
        assert!(t >= last, "time goes back: {l} after {last}");
        last = t;
        assert!(e[1].is_string() && e[2].is_string(), "{l}");
        if e[1] == "o" {
            outputs += 1;
        }
    }
    assert!(outputs > 0);
    // Replayed by asciinema itself (which wants a terminal).
    tmux.start(
        "cat",
        100,
        30,
        &format!("asciinema cat {}; echo cat-rc=$?", shell_quote(f)),
    );
    let screen = tmux.wait_for("cat", "cat-rc=", LONG);
    assert!(
        screen.contains("cat-rc=0"),
        "asciinema cat failed:\n{screen}"
    );
    assert!(screen.contains("hello-42"), "{screen}");
    assert!(screen.contains("both-6"), "{screen}");
    tmux.kill_session("cat");
}

/// The text of a recording's "o" events, concatenated.
fn cast_output(cast: &str) -> String {
    cast.lines()
        .skip(1)
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e[1] == "o")
        .filter_map(|e| e[2].as_str().map(str::to_string))
        .collect()
}

fn kill_names_and_ended_sessions(b: &Burrow) {
    b.assert_refused(&[
        (
            &["terminal", "new", "dev", "--name", "main"][..],
            "a terminal named \"main\" is running",
        ),
        (&["terminal", "new", "dev", "--name", "../x"][..], "name"),
        (&["terminal", "attach", "dev", "main"][..], "terminal"),
        (
            &["terminal", "attach", "dev", "nosuch", "--read-only"][..],
            "no such session",
        ),
        (
            &["terminal", "kill", "dev", "nosuch"][..],
            "no such session",
        ),
        (&["terminal", "record", "dev", "nosuch"][..], "nosuch"),
    ]);

    b.ok(&["terminal", "kill", "dev", "main"]);
    assert!(terminal(b, "main").is_none(), "killed but listed");
    b.assert_refused(&[(
        &["terminal", "attach", "dev", "main", "--read-only"][..],
        "no such session",
    )]);
    // Its recording stays.
    assert!(cast_output(&b.ok(&["terminal", "record", "dev", "main"])).contains("hello-42"));

    // An ended session: its output and its exit code, then a clean exit.
    b.ok(&[
        "terminal",
        "new",
        "dev",
        "--name",
        "short",
        "--",
        "sh",
        "-c",
        "echo bye; exit 5",
    ]);
    wait_until("the short session to end", LONG, || {
        terminal(b, "short").expect("short")["alive"] == false
    });
    let t = terminal(b, "short").expect("short");
    assert_eq!(t["exit_code"], 5, "{t}");
    let out = b.run(&["terminal", "attach", "dev", "short", "--read-only"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("bye"), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("burrow: terminal short ended with exit code 5"),
        "{}",
        text(&out.stderr)
    );
}

/// A viewer that never reads while the terminal writes 3 MB is dropped with a
/// message; a viewer that reads gets every byte, to the end.
fn slow_viewer_is_dropped_others_read_on(b: &Burrow) {
    b.ok(&[
        "terminal",
        "new",
        "dev",
        "--name",
        "flood",
        "--",
        "sh",
        "-c",
        "read go; yes | head -c 3000000; echo flood-$((40+2)); exec sleep 1000",
    ]);
    let client = Client::new(b.state.join("burrowd.sock"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let attach = |read_only| StreamOpen::TerminalAttach {
            name: "flood".into(),
            read_only,
            size: None,
        };
        let mut slow = client
            .open_stream("dev", &attach(true))
            .await
            .expect("slow viewer");
        let mut fast = client
            .open_stream("dev", &attach(false))
            .await
            .expect("reading viewer");
        fast.sender.stdin(b"go\n".to_vec()).await.expect("send go");
        let mut ys = 0usize;
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let msg = tokio::time::timeout(LONG, fast.receiver.next())
                .await
                .expect("the reading viewer stalled");
            match msg.expect("reading viewer") {
                Some(StreamMessage::Stdout(d)) => {
                    ys += d.iter().filter(|&&c| c == b'y').count();
                    tail.extend_from_slice(&d);
                    if tail.windows(8).any(|w| w == b"flood-42") {
                        break;
                    }
                    let keep = tail.len().saturating_sub(8);
                    tail.drain(..keep);
                }
                Some(StreamMessage::Event(ServerEvent::Gap { .. })) => {}
                other => panic!("the reading viewer got {other:?}"),
            }
        }
        assert_eq!(ys, 1_500_000, "the reading viewer missed output");

        let mut slow_ys = 0usize;
        let reason = loop {
            let msg = tokio::time::timeout(LONG, slow.receiver.next())
                .await
                .expect("the slow viewer was never told");
            match msg.expect("slow viewer") {
                Some(StreamMessage::Stdout(d)) => {
                    slow_ys += d.iter().filter(|&&c| c == b'y').count()
                }
                Some(StreamMessage::Event(ServerEvent::Dropped { reason })) => break reason,
                other => panic!("the slow viewer got {other:?}"),
            }
        };
        assert!(slow_ys < 1_500_000, "the slow viewer was not dropped");
        assert!(reason.contains("behind"), "{reason}");
        eprintln!("slow viewer dropped after {slow_ys} of 1500000 lines: {reason}");
    });
    let t = terminal(b, "flood").expect("flood");
    assert_eq!(t["alive"], true, "{t}");
    b.ok(&["terminal", "kill", "dev", "flood"]);
}

/// A resize (good or bad) of a stream without a terminal changes nothing: the
/// process reads its input and ends as it would have.
fn resize_without_a_terminal(b: &Burrow) {
    let client = Client::new(b.state.join("burrowd.sock"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let open = StreamOpen::Exec(Spawn {
            argv: vec!["sh".into(), "-c".into(), "read x; echo got-$x".into()],
            stdin: true,
            ..Default::default()
        });
        let mut s = client.open_stream("dev", &open).await.expect("exec stream");
        for size in [
            WinSize {
                rows: 40,
                cols: 100,
            },
            WinSize {
                rows: 0,
                cols: 5000,
            },
        ] {
            s.sender
                .control(&StreamControl::Resize(size))
                .await
                .expect("send resize");
        }
        s.sender.stdin(b"a\n".to_vec()).await.expect("stdin");
        s.sender
            .control(&StreamControl::CloseStdin)
            .await
            .expect("close stdin");
        let mut out = Vec::new();
        let exit = loop {
            let msg = tokio::time::timeout(LONG, s.receiver.next())
                .await
                .expect("the exec stalled");
            match msg.expect("exec stream") {
                Some(StreamMessage::Stdout(d)) => out.extend_from_slice(&d),
                Some(StreamMessage::Event(ServerEvent::Exit(x))) => break x,
                other => panic!("the exec stream got {other:?}"),
            }
        };
        assert_eq!(text(&out), "got-a\n");
        assert_eq!(exit.exit_code, 0, "{exit:?}");
    });
}
