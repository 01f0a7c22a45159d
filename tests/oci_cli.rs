//! The runc command line of burrow-runtime, driven directly: the sequence
//! containerd's runc shim uses (create with a pid file and pipes or a console
//! socket, start, state, exec --process --detach, kill, delete), the one
//! BuildKit's runc executor uses (`run --bundle B ID` in the foreground, with
//! pipes or a terminal), and every bad input: one line, exit 1, a JSON line in
//! `--log`, nothing left behind.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::time::Duration;

use burrow_tests::oci::{
    become_subreaper, bundle, ppid, reap, resize, spec, ConsoleSocket, Reaped, Runtime,
};
use burrow_tests::{require_root, text, wait_until, Burrow, Tmux};
use serde_json::json;

fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("oc")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

/// No VM of this instance, and nothing under the runtime's root.
fn nothing_left(b: &Burrow, rt: &Runtime) {
    let vms = b.json(&["ls", "--json"]);
    assert_eq!(vms.as_array().map(Vec::len), Some(0), "VMs left: {vms}");
    assert!(b.vm_processes().is_empty(), "VM processes left");
    assert!(
        rt.root_entries().is_empty(),
        "left under --root: {:?}",
        rt.root_entries()
    );
}

/// The exec holders the runtime's record of `id` holds.
fn execs_recorded(rt: &Runtime, id: &str) -> serde_json::Value {
    let path = rt.root.join(id).join("state.json");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("state.json")).expect("JSON");
    record["execs"].clone()
}

/// Each bad input of the command line is refused with one line naming what was
/// wrong, exit 1 and the same message in the JSON log, before anything is made.
#[test]
fn bad_input_is_one_line_and_leaves_nothing() {
    require_root!();
    let b = Burrow::new();
    let tmp = tmpdir();
    let rt = Runtime::new(&b, tmp.path());
    let ok = bundle(&tmp.path().join("ok"), &spec(&["true"], false));
    let ok = ok.to_string_lossy().into_owned();

    // The bundle.
    let none = tmp.path().join("none");
    std::fs::create_dir_all(&none).expect("dir");
    let none = none.to_string_lossy().into_owned();
    rt.refused(
        &["create", "--bundle", &none, "c1"],
        "config.json: cannot read",
    );
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(bad.join("rootfs")).expect("dir");
    std::fs::write(bad.join("config.json"), "{\"ociVersion\": ").expect("write");
    let bad_s = bad.to_string_lossy().into_owned();
    rt.refused(
        &["create", "--bundle", &bad_s, "c1"],
        "config.json: not valid JSON",
    );
    let norootfs = tmp.path().join("norootfs");
    std::fs::create_dir_all(&norootfs).expect("dir");
    std::fs::write(
        norootfs.join("config.json"),
        spec(&["true"], false).to_string(),
    )
    .expect("write");
    rt.refused(
        &["create", "--bundle", &norootfs.to_string_lossy(), "c1"],
        "root.path:",
    );
    // A spec of `true` changed by `edit`, written as bundle `name`: refused
    // with `want`.
    let refused_spec = |name: &str, edit: &dyn Fn(&mut serde_json::Value), want: &str| {
        let mut s = spec(&["true"], false);
        edit(&mut s);
        let dir = bundle(&tmp.path().join(name), &s);
        rt.refused(&["create", "--bundle", &dir.to_string_lossy(), "c1"], want);
    };
    refused_spec(
        "nomount",
        &|s| {
            s["mounts"].as_array_mut().expect("mounts").push(
                json!({"destination": "/data", "type": "bind", "source": "/nonexistent/src", "options": ["rbind"]}),
            )
        },
        "mounts[3].source: /nonexistent/src does not exist",
    );
    refused_spec(
        "noargs",
        &|s| s["process"]["args"] = json!([]),
        "process.args: missing or empty",
    );
    // Hooks: a malformed one, one that cannot run on the host, and a prestart
    // hook that fails (after the holder exists: it is taken down with the rest).
    refused_spec(
        "relhook",
        &|s| s["hooks"] = json!({"prestart": [{"path": "rel/hook"}]}),
        "hooks.prestart[0].path: \"rel/hook\" is not an absolute path",
    );
    refused_spec(
        "inside",
        &|s| s["hooks"] = json!({"createContainer": [{"path": "/bin/true"}]}),
        "hooks.createContainer: not supported",
    );
    refused_spec(
        "failing",
        &|s| {
            s["hooks"] = json!({"prestart": [{"path": "/bin/sh",
                "args": ["sh", "-c", "echo no network >&2; exit 4"]}]})
        },
        "hooks.prestart[0]: /bin/sh failed (exit status 4): no network",
    );
    // A host namespace other than the network's cannot be joined from a VM.
    refused_spec(
        "hostpid",
        &|s| s["linux"]["namespaces"][0] = json!({"type": "pid", "path": "/proc/1/ns/pid"}),
        "linux.namespaces[0].path: cannot join the pid namespace /proc/1/ns/pid",
    );
    // A terminal with nowhere to send it.
    let tty = bundle(&tmp.path().join("tty"), &spec(&["sh"], true));
    rt.refused(
        &["create", "--bundle", &tty.to_string_lossy(), "c1"],
        "--console-socket: required",
    );
    // Ids.
    rt.refused(&["create", "--bundle", &ok, "../x"], "container id:");
    rt.refused(&["create", "--bundle", &ok, "-x"], "");
    // Unknown containers.
    for args in [
        vec!["start", "nope"],
        vec!["state", "nope"],
        vec!["kill", "nope", "TERM"],
        vec!["delete", "nope"],
        vec!["pause", "nope"],
        vec!["resume", "nope"],
        vec!["ps", "nope"],
        vec!["exec", "nope", "true"],
    ] {
        rt.refused(&args, "container \"nope\" does not exist");
    }
    // A forced delete of what does not exist succeeds, as runc's.
    rt.ok(&["delete", "--force", "nope"]);
    // Bad signals are refused before the container is looked up.
    for sig in ["FOO", "0", "65", "SIGNOPE"] {
        rt.refused(&["kill", "nope", sig], "signal: unknown signal");
    }
    let out = std::process::Command::new(rt.binary())
        .arg("--root")
        .arg(&rt.root)
        .args(["--log-format", "xml", "state", "nope"])
        .output()
        .expect("burrow-runtime");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr).trim().lines().count(), 1);
    assert!(text(&out.stderr).contains("--log-format: \"xml\" is not one of text, json"));
    rt.refused(&["ps", "--format", "yaml", "nope"], "--format");
    nothing_left(&b, &rt);
}

/// Reads lines from a child's pipe on a thread.
fn lines(r: impl Read + Send + 'static) -> burrow_tests::LineReader {
    burrow_tests::LineReader::new(r)
}

/// containerd's runc shim's sequence, with pipes: the pid file names a holder
/// that stays the caller's descendant, relays stdio, exits with the container's
/// status; exec --detach gets a holder of its own; the refusals that need a
/// live container; delete leaves nothing.
#[test]
fn the_shim_sequence_with_pipes() {
    require_root!();
    become_subreaper();
    let b = Burrow::new();
    let tmp = tmpdir();
    let rt = Runtime::new(&b, tmp.path());
    let script = "echo out; echo err >&2; read line; echo in:$line; \
                  trap 'echo term; exit 3' TERM; sleep 1000 & wait";
    let bdir = bundle(&tmp.path().join("b"), &spec(&["sh", "-c", script], false));
    let bdir = bdir.to_string_lossy().into_owned();
    let pid_file = tmp.path().join("c1.pid");
    let mut create = rt
        .command(&[
            "create",
            "--bundle",
            &bdir,
            "--pid-file",
            &pid_file.to_string_lossy(),
            "c1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("create");
    let mut stdin = create.stdin.take().expect("stdin");
    let out = lines(create.stdout.take().expect("stdout"));
    let err = lines(create.stderr.take().expect("stderr"));
    let status = burrow_tests::wait_child("create", &mut create, Duration::from_secs(180));
    assert_eq!(
        status,
        0,
        "create failed: {}",
        text(&std::fs::read(&rt.log).unwrap_or_default())
    );
    let holder: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid");
    // The holder is this process's now (create exited; we are a subreaper), not
    // burrowd's.
    assert_eq!(ppid(holder), std::process::id() as i32);
    let st = rt.state("c1");
    assert_eq!(st["status"], "created", "{st}");
    assert_eq!(st["pid"], holder);
    assert_eq!(st["id"], "c1");
    assert_eq!(st["bundle"], bdir.as_str());
    // Refusals that need it to exist.
    rt.refused(&["create", "--bundle", &bdir, "c1"], "already exists");
    rt.ok(&["start", "c1"]);
    assert_eq!(out.next("stdout", Duration::from_secs(60)), "out");
    assert_eq!(err.next("stderr", Duration::from_secs(60)), "err");
    stdin.write_all(b"hello\n").expect("stdin");
    assert_eq!(out.next("stdout", Duration::from_secs(60)), "in:hello");
    assert_eq!(rt.state("c1")["status"], "running");
    rt.refused(&["start", "c1"], "is running");
    rt.refused(&["delete", "c1"], "is running");

    // exec --process --detach --pid-file, as the shim runs `docker exec`.
    let process = json!({"args": ["sh", "-c", "echo exec-out; exit 7"], "cwd": "/", "env": ["PATH=/bin"],
                         "user": {"uid": 0, "gid": 0}, "terminal": false});
    let pf = tmp.path().join("p.json");
    std::fs::write(&pf, process.to_string()).expect("process.json");
    let epid_file = tmp.path().join("e.pid");
    let exec = rt
        .command(&[
            "exec",
            "--process",
            &pf.to_string_lossy(),
            "--detach",
            "--pid-file",
            &epid_file.to_string_lossy(),
            "c1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("exec");
    let eout = exec.wait_with_output().expect("exec");
    assert!(eout.status.success(), "exec: {}", text(&eout.stderr));
    assert_eq!(text(&eout.stdout), "exec-out\n");
    let epid: i32 = std::fs::read_to_string(&epid_file)
        .expect("exec pid file")
        .trim()
        .parse()
        .expect("pid");
    assert_eq!(reap(epid), Reaped::Exited(7));
    // The exec's holder took itself out of the record as its process ended.
    assert_eq!(execs_recorded(&rt, "c1"), json!([]));

    // ps --format json: the host pids that stand for the container's processes
    // (what docker top looks up in the host's ps): the holder, and the holder of
    // each exec that still runs.
    let ps = |rt: &Runtime| -> serde_json::Value {
        serde_json::from_str(&rt.ok(&["ps", "--format", "json", "c1"])).expect("ps json")
    };
    assert_eq!(ps(&rt), json!([holder]));
    let long = json!({"args": ["sleep", "1000"], "cwd": "/", "env": ["PATH=/bin"],
                      "user": {"uid": 0, "gid": 0}, "terminal": false});
    std::fs::write(&pf, long.to_string()).expect("process.json");
    let started = rt.run(&[
        "exec",
        "--process",
        &pf.to_string_lossy(),
        "--detach",
        "--pid-file",
        &epid_file.to_string_lossy(),
        "c1",
    ]);
    assert!(started.status.success(), "exec: {}", text(&started.stderr));
    let long_pid: i32 = std::fs::read_to_string(&epid_file)
        .expect("exec pid file")
        .trim()
        .parse()
        .expect("pid");
    assert_eq!(ps(&rt), json!([holder, long_pid]));
    // The table: the guest's pids.
    let table = rt.ok(&["ps", "c1"]);
    assert_eq!(table.lines().next(), Some("PID"), "{table}");

    // pause and resume; no exec into a paused container (as runc).
    rt.ok(&["pause", "c1"]);
    assert_eq!(rt.state("c1")["status"], "paused");
    rt.refused(&["pause", "c1"], "is paused");
    rt.refused(&["exec", "c1", "true"], "is paused");
    rt.ok(&["resume", "c1"]);
    assert_eq!(rt.state("c1")["status"], "running");

    // SIGTERM to the holder itself (docker stop's path is `kill ID 15`, which
    // tests/docker.rs takes) reaches the container's process: its trap exits 3,
    // and so does the holder.
    // SAFETY: kill has no memory effects; the holder is this test's child.
    assert_eq!(unsafe { libc::kill(holder, libc::SIGTERM) }, 0);
    assert_eq!(out.next("stdout", Duration::from_secs(60)), "term");
    assert_eq!(reap(holder), Reaped::Exited(3));
    // The exec's process went with the container's pid namespace, and its
    // holder with it, out of the record.
    assert!(
        burrow_tests::exits_within(long_pid, Duration::from_secs(60)),
        "the exec's holder outlived the container"
    );
    reap(long_pid);
    assert_eq!(execs_recorded(&rt, "c1"), json!([]));
    let st = rt.state("c1");
    assert_eq!(st["status"], "stopped", "{st}");
    assert_eq!(st["pid"], 0);
    rt.refused(&["exec", "c1", "true"], "is stopped");
    rt.refused(&["kill", "c1", "9"], "is stopped");
    rt.ok(&["delete", "c1"]);
    nothing_left(&b, &rt);
}

/// A terminal through --console-socket: the holder sends the pty master as runc
/// does; keys typed on it reach the container's shell, the master's size is the
/// shell's, and kill 9 ends the holder by SIGKILL (the shim's 137).
#[test]
fn the_shim_sequence_with_a_console_socket() {
    require_root!();
    become_subreaper();
    let b = Burrow::new();
    let tmp = tmpdir();
    let rt = Runtime::new(&b, tmp.path());
    // Hooks that record the state they are given, as docker's libnetwork-setkey
    // reads it to find the container's network namespace.
    let mut s = spec(&["sh"], true);
    let hook = |name: &str| {
        let f = tmp.path().join(name);
        json!({"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}", f.display())]})
    };
    s["hooks"] = json!({
        "prestart": [hook("prestart.json")],
        "createRuntime": [hook("createRuntime.json")],
        // A failing poststart hook is a warning: the next one still runs.
        "poststart": [{"path": "/bin/false"}, hook("poststart.json")],
        "poststop": [hook("poststop.json")],
    });
    let bdir = bundle(&tmp.path().join("b"), &s);
    let hook_state = |name: &str| -> serde_json::Value {
        let f = tmp.path().join(name);
        serde_json::from_slice(&std::fs::read(&f).expect("the hook ran")).expect("state json")
    };
    let console = ConsoleSocket::new(&tmp.path().join("console.sock"));
    let pid_file = tmp.path().join("c.pid");
    let create = rt
        .command(&[
            "create",
            "--bundle",
            &bdir.to_string_lossy(),
            "--console-socket",
            &console.path.to_string_lossy(),
            "--pid-file",
            &pid_file.to_string_lossy(),
            "t1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("create");
    let master = console.receive();
    // create's output is read to its end, as go-runc reads it: the holder must
    // not hold it open.
    let out = create.wait_with_output().expect("create");
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    let holder: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    // prestart and createRuntime ran before create returned, with the holder
    // as the container's pid; the holder has a network namespace of its own,
    // the one the spec asked for (hooks set it up; the VM takes it over).
    for h in ["prestart.json", "createRuntime.json"] {
        let st = hook_state(h);
        assert_eq!(st["pid"], holder, "{h}: {st}");
        assert_eq!(st["id"], "t1");
        assert_eq!(st["status"], "creating");
    }
    let netns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("netns");
    assert_ne!(netns(&holder.to_string()), netns("self"));
    assert!(!tmp.path().join("poststart.json").exists());
    resize(&master, 33, 101);
    let started = rt.run(&["start", "t1"]);
    assert!(started.status.success(), "{}", text(&started.stderr));
    assert!(
        text(&started.stderr).contains("warning: hooks.poststart[0]: /bin/false failed"),
        "{}",
        text(&started.stderr)
    );
    assert_eq!(hook_state("poststart.json")["status"], "running");
    let mut m = std::fs::File::from(master.try_clone().expect("dup"));
    m.write_all(b"stty size; echo mark-$((6*7))\r")
        .expect("type");
    let reader = BufReader::new(m.try_clone().expect("dup"));
    let mut seen = String::new();
    for line in reader.lines() {
        let line = line.expect("read the pty");
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("mark-42") {
            break;
        }
    }
    assert!(seen.contains("33 101"), "{seen}");
    rt.ok(&["kill", "t1", "KILL"]);
    assert_eq!(reap(holder), Reaped::Signaled(libc::SIGKILL));
    assert_eq!(rt.state("t1")["status"], "stopped");
    drop(m);
    let _ = master.as_raw_fd();
    assert!(!tmp.path().join("poststop.json").exists());
    rt.ok(&["delete", "t1"]);
    assert_eq!(hook_state("poststop.json")["status"], "stopped");
    nothing_left(&b, &rt);
}

/// SIGKILLed holder, then SIGKILLed caller in the middle of a create: delete
/// --force leaves nothing either way.
#[test]
fn delete_force_after_kill_9() {
    require_root!();
    become_subreaper();
    let b = Burrow::new();
    let tmp = tmpdir();
    let rt = Runtime::new(&b, tmp.path());
    let bdir = bundle(&tmp.path().join("b"), &spec(&["sleep", "1000"], false));
    let bdir = bdir.to_string_lossy().into_owned();
    let pid_file = tmp.path().join("k.pid");
    rt.ok(&[
        "create",
        "--bundle",
        &bdir,
        "--pid-file",
        &pid_file.to_string_lossy(),
        "k1",
    ]);
    rt.ok(&["start", "k1"]);
    let holder: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    burrow_tests::kill9(holder);
    assert_eq!(reap(holder), Reaped::Signaled(libc::SIGKILL));
    assert_eq!(rt.state("k1")["status"], "stopped");
    rt.ok(&["delete", "--force", "k1"]);
    nothing_left(&b, &rt);

    // The caller killed while the VM boots.
    let mut create = rt
        .command(&["create", "--bundle", &bdir, "k2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("create");
    wait_until("k2's VM to be asked for", Duration::from_secs(60), || {
        b.json(&["ls", "--json"])
            .as_array()
            .is_some_and(|a| !a.is_empty())
    });
    burrow_tests::kill9(create.id() as i32);
    let _ = create.wait();
    rt.ok(&["delete", "--force", "k2"]);
    nothing_left(&b, &rt);
}

/// BuildKit's runc executor: `run --bundle B ID` in the foreground with pipes
/// exits with the container's status and, without --keep, leaves nothing;
/// with --keep the stopped container stays for `state` and `delete`; `exec
/// --process` reaches a container while its `run` lasts.
#[test]
fn the_buildkit_sequence() {
    require_root!();
    let b = Burrow::new();
    let tmp = tmpdir();
    let rt = Runtime::new(&b, tmp.path());
    let bdir = bundle(
        &tmp.path().join("b"),
        &spec(&["sh", "-c", "cat; echo done; exit 4"], false),
    );
    let bdir = bdir.to_string_lossy().into_owned();
    let mut run = rt
        .command(&["run", "--bundle", &bdir, "r1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let mut stdin = run.stdin.take().expect("stdin");
    let out = lines(run.stdout.take().expect("stdout"));
    stdin.write_all(b"from-stdin\n").expect("write");
    assert_eq!(out.next("stdout", Duration::from_secs(180)), "from-stdin");
    // While it runs: state, then exec --process (the executor's exec).
    assert_eq!(rt.state("r1")["status"], "running");
    let pf = tmp.path().join("p.json");
    std::fs::write(
        &pf,
        json!({"args": ["echo", "exec'd"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}).to_string(),
    )
    .expect("p");
    assert_eq!(
        rt.ok(&["exec", "--process", &pf.to_string_lossy(), "r1"]),
        "exec'd\n"
    );
    drop(stdin);
    assert_eq!(out.next("stdout", Duration::from_secs(60)), "done");
    let code = burrow_tests::wait_child("run", &mut run, Duration::from_secs(60));
    assert_eq!(code, 4);
    nothing_left(&b, &rt);

    // --keep: stopped, then deleted.
    let kdir = bundle(&tmp.path().join("k"), &spec(&["true"], false));
    let out = rt.run(&["run", "--keep", "--bundle", &kdir.to_string_lossy(), "r2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(rt.state("r2")["status"], "stopped");
    rt.ok(&["delete", "r2"]);
    nothing_left(&b, &rt);
}

/// BuildKit with a terminal: `run` on a tty relays it raw, reads its size, and
/// follows SIGWINCH (tmux resizing the pane).
#[test]
fn run_in_the_foreground_on_a_terminal() {
    require_root!();
    let b = Burrow::new();
    let tmp = tmpdir();
    let rt = Runtime::new(&b, tmp.path());
    let bdir = bundle(&tmp.path().join("b"), &spec(&["sh"], true));
    let mut line = vec!["env".to_string()];
    for (k, v) in b.daemon_env() {
        line.push(burrow_tests::shell_quote(&format!("{k}={v}")));
    }
    line.push(burrow_tests::shell_quote(&rt.binary().to_string_lossy()));
    for a in [
        "--root",
        &rt.root.to_string_lossy(),
        "run",
        "--bundle",
        &bdir.to_string_lossy(),
        "p1",
    ] {
        line.push(burrow_tests::shell_quote(a));
    }
    let line = format!("{}; echo run-exited-$?", line.join(" "));
    let mut tmux = Tmux::new();
    tmux.start("p", 90, 25, &line);
    tmux.type_text("p", "stty size\r");
    tmux.wait_for("p", "25 90", Duration::from_secs(180));
    tmux.resize("p", 120, 40);
    wait_until(
        "the new size in the container",
        Duration::from_secs(60),
        || {
            tmux.type_text("p", "stty size\r");
            std::thread::sleep(Duration::from_millis(300));
            tmux.capture("p").contains("40 120")
        },
    );
    tmux.type_text("p", "exit 6\r");
    tmux.wait_for("p", "run-exited-6", Duration::from_secs(60));
    nothing_left(&b, &rt);
}
