//! burrow's containerd shim (`containerd-shim-burrow-v2`, runtime
//! `io.containerd.burrow.v2`) driven by a private containerd through `ctr`, as
//! users drive it: every task is a microVM whose kernel is the guest's.

use std::io::Write;
use std::time::Duration;

use burrow_tests::containerd::Containerd;
use burrow_tests::oci::busybox_rootfs;
use burrow_tests::{
    guest_kernel_release, kill9, text, wait_child, wait_exit, wait_until, Burrow, LineReader, Tmux,
};

const RUNTIME: &str = "io.containerd.burrow.v2";
const LONG: Duration = Duration::from_secs(120);

/// `ctr run --runtime burrow FLAGS REST`.
fn run<'a>(flags: &[&'a str], rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", "--runtime", RUNTIME];
    args.extend(flags);
    args.extend(rest);
    args
}

/// The STATUS column of `ctr task ls` for task `id` (None when it is not listed).
fn task_status(c: &Containerd, id: &str) -> Option<String> {
    c.ok(&["task", "ls"]).lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&id)).then(|| f.get(2).unwrap_or(&"").to_string())
    })
}

fn no_shims_left(c: &Containerd) {
    wait_until("the burrow shims to exit", LONG, || {
        c.shim_processes().is_empty()
    });
}

/// The task's own process, its stdio, its exit; one from an image and one from a
/// plain root file system.
#[test]
fn ctr_runs_tasks_in_microvms() {
    let b = Burrow::new();
    let rootfs = tempfile::tempdir().expect("tempdir");
    busybox_rootfs(rootfs.path());
    let rootfs = rootfs.path().to_string_lossy().into_owned();
    let Some(c) = Containerd::start(&b) else {
        return;
    };
    let image = c.import_busybox("burrow-test", &["id", "uname", "pwd", "head", "tail"]);

    // The guest's kernel; the spec's environment, user and directory; both
    // outputs; the exit status.
    let out = c.ctr(&run(
        &["--rm", "--env", "A=1", "--cwd", "/tmp"],
        &[
            &image,
            "c1",
            "sh",
            "-c",
            "uname -r; echo $A; id -u; pwd; echo to-stderr >&2; exit 3",
        ],
    ));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(
        lines,
        [guest_kernel_release().as_str(), "1", "0", "/tmp"],
        "stderr: {}",
        text(&out.stderr)
    );
    let host = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .expect("uname -r");
    assert_ne!(lines[0], text(&host.stdout).trim(), "the host's kernel");
    assert!(
        text(&out.stderr).contains("to-stderr"),
        "{}",
        text(&out.stderr)
    );

    // A plain root file system, no image: a program by its path with no PATH
    // (ctr gives none), and standard input to its end.
    let mut child = std::process::Command::new("ctr")
        .arg("--address")
        .arg(&c.address)
        .args(["--namespace", burrow_tests::containerd::NAMESPACE])
        .args(run(&["--rm", "--rootfs", &rootfs], &["c2", "/bin/cat"]))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ctr run");
    {
        use std::io::Write;
        let mut input = child.stdin.take().expect("stdin");
        input.write_all(b"through-stdin\n").expect("write stdin");
    }
    let out = child.wait_with_output().expect("ctr run");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "through-stdin\n");

    // A read-only root: the container cannot write it (the guest's runtime made
    // its mount points first, in a layer of the VM's own).
    let out = c.ok(&run(
        &["--rm", "--read-only"],
        &[
            &image,
            "c4",
            "sh",
            "-c",
            "echo x > /planted || echo refused",
        ],
    ));
    assert_eq!(out.trim(), "refused");

    // The OOM killer strikes in the task's cgroup (tail keeps a line that never
    // ends): containerd hears TaskOOM, then the exit.
    let mut events = c.spawn(&["events"]);
    let event_lines = LineReader::new(events.stdout.take().expect("events' stdout"));
    let out = c.ok(&run(
        &["--rm", "--memory-limit", "33554432"],
        &[
            &image,
            "o1",
            "sh",
            "-c",
            "head -c 200m /dev/zero | tail; echo tail-$?",
        ],
    ));
    assert_eq!(out.trim(), "tail-137");
    let oom = event_lines.until("/tasks/oom", LONG);
    assert!(oom.contains("\"o1\""), "{oom}");
    let exit = event_lines.until("/tasks/exit", LONG);
    assert!(exit.contains("\"o1\""), "{exit}");
    // SAFETY: kill has no memory effects; the pid is our child's.
    unsafe { libc::kill(events.id() as i32, libc::SIGKILL) };
    let _ = events.wait();

    // A logging program (binary://), started by the shim as containerd's own
    // shims start it: stdout on fd 3, stderr on fd 4, ready when fd 5 closes.
    let logs = tempfile::tempdir().expect("tempdir");
    let logger = logs.path().join("logger.sh");
    std::fs::write(
        &logger,
        "#!/bin/sh\nd=$(dirname \"$0\")\necho \"$CONTAINER_ID $CONTAINER_NAMESPACE $*\" > \"$d/env\"\n\
         exec 5>&-\ncat <&3 > \"$d/out\" &\ncat <&4 > \"$d/err\" &\nwait\ntouch \"$d/done\"\n",
    )
    .expect("write the logger");
    std::fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod the logger");
    let uri = format!("binary://{}?tag=a+b", logger.display());
    c.ok(&run(
        &["--rm", "--log-uri", &uri],
        &[&image, "l1", "sh", "-c", "echo to-out; echo to-err >&2"],
    ));
    let done = logs.path().join("done");
    wait_until("the logging program to end", LONG, || done.exists());
    let read = |name: &str| std::fs::read_to_string(logs.path().join(name)).unwrap_or_default();
    assert_eq!(read("out"), "to-out\n");
    assert_eq!(read("err"), "to-err\n");
    assert_eq!(
        read("env").trim(),
        format!("l1 {} tag a b", burrow_tests::containerd::NAMESPACE)
    );

    // A program that cannot run: the error names it; nothing stays.
    let (code, err) = c.fails(&run(&["--rm"], &[&image, "c3", "no-such-program"]));
    assert_ne!(code, 0);
    assert!(err.contains("no-such-program"), "{err}");
    assert!(c.ok(&["container", "ls", "-q"]).trim().is_empty());

    b.wait_no_vms(LONG);
    no_shims_left(&c);
}

/// A detached task: exec (with and without a terminal), ps, metrics, pause and
/// resume, a containerd restart, kill, delete; then nothing of it stays.
#[test]
fn ctr_drives_a_detached_task() {
    let b = Burrow::new();
    let Some(mut c) = Containerd::start(&b) else {
        return;
    };
    let image = c.import_busybox("burrow-test", &["ps", "stty"]);
    c.ok(&run(&["-d"], &[&image, "d1", "sleep", "1000"]));
    assert_eq!(task_status(&c, "d1").as_deref(), Some("RUNNING"));

    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "d1",
        "sh",
        "-c",
        "echo in-exec; exit 5",
    ]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "in-exec\n");

    // ps lists the container's processes (guest pids): the sleep is one.
    let ps = c.ok(&["task", "ps", "d1"]);
    assert!(ps.lines().count() >= 2, "{ps}");

    // metrics: the guest cgroup's figures, in containerd's cgroups v2 types.
    let metrics = c.ok(&["task", "metrics", "d1"]);
    let figure = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse().unwrap_or(0)))
            .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
    };
    assert!(figure("pids.current ") >= 1, "{metrics}");
    assert!(figure("memory.usage ") > 0, "{metrics}");
    assert!(figure("cpu.usage_usec ") > 0, "{metrics}");

    c.ok(&["task", "pause", "d1"]);
    assert_eq!(task_status(&c, "d1").as_deref(), Some("PAUSED"));
    c.ok(&["task", "resume", "d1"]);
    assert_eq!(task_status(&c, "d1").as_deref(), Some("RUNNING"));

    // A terminal: an exec with -t under tmux, sized from the pane, then resized.
    let mut tmux = Tmux::new();
    let line = format!(
        "ctr --address {} --namespace {} task exec -t --exec-id t1 d1 sh; echo exec-exit-$?",
        c.address.display(),
        burrow_tests::containerd::NAMESPACE
    );
    tmux.start("t", 100, 30, &line);
    tmux.type_text("t", "stty size; echo mark-$((6*7))\r");
    let screen = tmux.wait_for("t", "mark-42", LONG);
    assert!(screen.contains("30 100"), "{screen}");
    tmux.resize("t", 90, 20);
    tmux.type_text("t", "stty size; echo mark-$((7*7))\r");
    let screen = tmux.wait_for("t", "mark-49", LONG);
    assert!(screen.contains("20 90"), "{screen}");
    tmux.type_text("t", "exit 4\r");
    tmux.wait_for("t", "exec-exit-4", LONG);
    drop(tmux);

    // containerd restarted: the shim and its task keep running; containerd
    // finds them again (the shim's address in the bundle) and drives them.
    let shim = c.shim_processes();
    c.restart(&b);
    assert_eq!(c.shim_processes(), shim, "the same shim serves the task");
    assert_eq!(task_status(&c, "d1").as_deref(), Some("RUNNING"));
    let out = c.ok(&[
        "task",
        "exec",
        "--exec-id",
        "e2",
        "d1",
        "echo",
        "after-restart",
    ]);
    assert_eq!(out, "after-restart\n");

    // burrowd killed (-9) while the task runs and an exec waits for input: the
    // shim's streams break; the shim starts burrowd again, which adopts the VM,
    // and attaches to its processes again. The exec's input, output and exit
    // come through, and so does the task's own exit below.
    let mut exec = c.spawn(&[
        "task",
        "exec",
        "--exec-id",
        "e3",
        "d1",
        "sh",
        "-c",
        "echo ready; read x; echo got-$x; exit 6",
    ]);
    let lines = LineReader::new(exec.stdout.take().expect("stdout"));
    assert_eq!(lines.next("the exec's first line", LONG), "ready");
    let daemon = b.daemon_pid().expect("burrowd's pid");
    kill9(daemon);
    // Input written once burrowd is gone (input burrowd had taken but not yet
    // passed on when it died is lost with it).
    wait_exit("burrowd", daemon, LONG);
    let mut stdin = exec.stdin.take().expect("stdin");
    stdin.write_all(b"x\n").expect("write the exec's input");
    assert_eq!(lines.next("the exec's answer", LONG), "got-x");
    drop(stdin);
    assert_eq!(wait_child("the exec", &mut exec, LONG), 6);
    assert_ne!(b.daemon_pid(), Some(daemon), "a new burrowd serves");
    assert_eq!(task_status(&c, "d1").as_deref(), Some("RUNNING"));
    let out = c.ok(&[
        "task",
        "exec",
        "--exec-id",
        "e4",
        "d1",
        "echo",
        "new-burrowd",
    ]);
    assert_eq!(out, "new-burrowd\n");

    // sleep is PID 1 of its namespace: TERM has no handler there and is ignored
    // (as under runc); KILL ends it.
    c.ok(&["task", "kill", "-s", "KILL", "d1"]);
    wait_until("d1 to stop", LONG, || {
        task_status(&c, "d1").as_deref() == Some("STOPPED")
    });
    // Its exit came through the stream attached again: killed by signal 9.
    let deleted = c.ctr(&["task", "delete", "d1"]);
    assert!(deleted.status.success(), "{}", text(&deleted.stderr));
    assert!(
        text(&deleted.stderr).contains("137"),
        "{}",
        text(&deleted.stderr)
    );
    // A stopped task cannot be killed again: containerd's NotFound.
    let (_, err) = c.fails(&["task", "kill", "-s", "KILL", "d1"]);
    assert!(
        err.contains("not found") || err.contains("finished"),
        "{err}"
    );
    c.ok(&["container", "rm", "d1"]);
    b.wait_no_vms(LONG);
    no_shims_left(&c);
}

/// The shim killed with -9 while its task runs: containerd's `task delete`
/// runs the shim's delete action, which destroys the VM and unmounts the
/// task's root file system; nothing stays.
#[test]
fn a_killed_shim_leaves_nothing_behind() {
    let b = Burrow::new();
    let Some(c) = Containerd::start(&b) else {
        return;
    };
    let image = c.import_busybox("burrow-test", &[]);
    c.ok(&run(&["-d"], &[&image, "k1", "sleep", "1000"]));
    let shims = c.shim_processes();
    assert_eq!(shims.len(), 1, "{shims:?}");
    let socket = c.shim_socket("k1");
    assert!(socket.exists(), "{}", socket.display());
    assert!(!b.vm_processes().is_empty(), "the task's VM runs");
    kill9(shims[0]);
    wait_until("containerd to see the shim go", LONG, || {
        task_status(&c, "k1").as_deref() != Some("RUNNING")
    });
    let _ = c.ctr(&["task", "delete", "-f", "k1"]);
    c.ok(&["container", "rm", "k1"]);
    b.wait_no_vms(LONG);
    // The shim's delete action removes the dead shim's socket after the VM.
    wait_until("the dead shim's socket to go", LONG, || !socket.exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let dir = c.dir.path().to_string_lossy().into_owned();
    assert!(
        !mounts.lines().any(|l| l.contains(&dir) && l.contains("k1")),
        "the task's rootfs is still mounted:\n{mounts}"
    );
    no_shims_left(&c);
}

/// The namespace inodes (`net:[4026532023]`) a task's exec sees, by kind.
fn namespaces(c: &Containerd, task: &str, exec_id: &str) -> Vec<String> {
    c.ok(&[
        "task",
        "exec",
        "--exec-id",
        exec_id,
        task,
        "sh",
        "-c",
        "for n in net uts ipc pid mnt; do readlink /proc/self/ns/$n; done",
    ])
    .lines()
    .map(str::to_string)
    .collect()
}

/// A pod as CRI makes one (its annotations, its members naming the sandbox's
/// namespaces by host paths): one shim and one VM; a member joins the
/// namespaces it names, inside the VM, and keeps its own others; deleting it
/// leaves the pod; deleting the sandbox ends the VM. A member whose sandbox is
/// not there is refused by name.
#[test]
fn a_pod_is_one_vm() {
    let b = Burrow::new();
    let Some(c) = Containerd::start(&b) else {
        return;
    };
    let image = c.import_busybox("burrow-test", &["readlink"]);
    let sandbox = [
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod1",
        "-d",
    ];
    c.ok(&run(&sandbox, &[&image, "pod1", "sleep", "1000"]));
    // CRI names the sandbox's namespaces by host paths: the pause process's
    // /proc/<pid>/ns/..., a CNI netns file. They mean the sandbox's in the VM.
    let member = [
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod1",
        "--with-ns",
        "network:/proc/4242/ns/net",
        "--with-ns",
        "uts:/proc/4242/ns/uts",
        "--with-ns",
        "ipc:/proc/4242/ns/ipc",
        "-d",
    ];
    c.ok(&run(&member, &[&image, "app1", "sleep", "1000"]));
    assert_eq!(task_status(&c, "app1").as_deref(), Some("RUNNING"));
    assert_eq!(c.shim_processes().len(), 1, "one shim per pod");
    let vms = b.json(&["ls", "--json"]);
    assert_eq!(
        vms.as_array().map(Vec::len),
        Some(1),
        "one VM per pod: {vms}"
    );

    let pod = namespaces(&c, "pod1", "n1");
    let app = namespaces(&c, "app1", "n2");
    assert_eq!(pod.len(), 5, "{pod:?}");
    assert_eq!(pod[..3], app[..3], "net, uts and ipc are the sandbox's");
    assert_ne!(pod[3], app[3], "its own pid namespace");
    assert_ne!(pod[4], app[4], "its own mount namespace");

    // The member goes; the pod stays.
    c.ok(&["task", "kill", "-s", "KILL", "app1"]);
    wait_until("app1 to stop", LONG, || {
        task_status(&c, "app1").as_deref() == Some("STOPPED")
    });
    c.ok(&["task", "delete", "app1"]);
    c.ok(&["container", "rm", "app1"]);
    assert_eq!(task_status(&c, "pod1").as_deref(), Some("RUNNING"));
    assert_eq!(namespaces(&c, "pod1", "n3"), pod);

    // A member of a pod that is not there.
    let orphan = [
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=nopod",
    ];
    let (_, err) = c.fails(&run(&orphan, &["--rm", &image, "app2", "true"]));
    assert!(err.contains("nopod") && err.contains("sandbox"), "{err}");

    c.ok(&["task", "kill", "-s", "KILL", "pod1"]);
    wait_until("pod1 to stop", LONG, || {
        task_status(&c, "pod1").as_deref() == Some("STOPPED")
    });
    c.ok(&["task", "delete", "pod1"]);
    c.ok(&["container", "rm", "pod1"]);
    b.wait_no_vms(LONG);
    no_shims_left(&c);
}
