//! docker on burrow: a private dockerd (its own data root, exec root, socket and
//! containerd, inside the test's network namespace, `--bridge=none`) with burrow
//! registered in its daemon.json, images imported from a busybox tarball. Every
//! container is a microVM: `uname -r` prints the guest's kernel.

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use burrow_tests::oci::Dockerd;
use burrow_tests::{guest_kernel_release, require_root, text, Burrow, Tmux};

/// The harness itself, on docker's own runc: a private dockerd comes up, imports
/// an image and runs a container, and goes away leaving nothing. If this fails,
/// the burrow tests below say nothing about burrow.
#[test]
fn a_private_dockerd_runs_runc_containers() {
    require_root!();
    let b = Burrow::new();
    let dir;
    {
        let d = Dockerd::start(&b, false);
        dir = d.dir.path().to_path_buf();
        d.import_busybox("bb");
        let out = d.ok(&[
            "run",
            "--rm",
            "--runtime",
            "runc",
            "bb",
            "sh",
            "-c",
            "echo hi; exit 0",
        ]);
        assert_eq!(out.trim(), "hi");
        let host = text(
            &std::process::Command::new("uname")
                .arg("-r")
                .output()
                .expect("uname")
                .stdout,
        );
        let out = d.ok(&["run", "--rm", "bb", "uname", "-r"]);
        assert_eq!(
            out.trim(),
            host.trim(),
            "runc containers share the host kernel"
        );
    }
    assert!(!dir.exists(), "dockerd's dirs left behind");
}

#[test]
fn docker_runs_containers_in_microvms() {
    require_root!();
    let (b, d) = Dockerd::with_busybox(false);
    let burrow = ["run", "--rm", "--runtime", "burrow"];

    // The guest's kernel, not the host's; `--network none` brings docker's
    // libnetwork-setkey prestart hook, which the guest must not run.
    let mut args = burrow.to_vec();
    args.extend(["--network", "none", "bb", "uname", "-r"]);
    assert_eq!(d.ok(&args).trim(), guest_kernel_release());

    // Environment, user, working directory and exit status.
    let mut args = burrow.to_vec();
    args.extend([
        "-e",
        "A=1",
        "-u",
        "1000:1000",
        "-w",
        "/tmp",
        "bb",
        "sh",
        "-c",
        "echo $A; id -u; pwd; exit 3",
    ]);
    let out = d.run(&args);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "1\n1000\n/tmp\n");

    // Standard input.
    let mut args = burrow.to_vec();
    args.extend(["-i", "bb", "cat"]);
    let mut child = d
        .docker(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("docker run -i");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"hi\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "hi\n");

    // Bind mounts, read-write and read-only.
    let data = d.dir.path().join("srv-data");
    let conf = d.dir.path().join("srv-conf");
    std::fs::create_dir_all(&data).expect("data");
    std::fs::create_dir_all(&conf).expect("conf");
    std::fs::write(conf.join("c"), "conf\n").expect("conf file");
    let vdata = format!("{}:/data", data.display());
    let vconf = format!("{}:/conf:ro", conf.display());
    let mut args = burrow.to_vec();
    args.extend([
        "-v",
        &vdata,
        "-v",
        &vconf,
        "bb",
        "sh",
        "-c",
        "echo w > /data/x && cat /conf/c && ! touch /conf/y 2>/dev/null && echo ro",
    ]);
    assert_eq!(d.ok(&args), "conf\nro\n");
    assert_eq!(
        std::fs::read_to_string(data.join("x")).expect("written"),
        "w\n"
    );
    assert!(!conf.join("y").exists());

    // Detached: exec, logs, stop, rm -f.
    let id = d
        .ok(&[
            "run",
            "-d",
            "--name",
            "web",
            "--runtime",
            "burrow",
            "bb",
            "sh",
            "-c",
            "echo started; trap 'echo bye; exit 0' TERM; sleep 1000 & wait",
        ])
        .trim()
        .to_string();
    assert!(!id.is_empty());
    assert_eq!(d.ok(&["exec", "web", "echo", "inside"]).trim(), "inside");
    let out = d.run(&["exec", "web", "sh", "-c", "exit 5"]);
    assert_eq!(out.status.code(), Some(5));
    burrow_tests::wait_until(
        "the container's first line in its log",
        Duration::from_secs(60),
        || d.ok(&["logs", "web"]).contains("started"),
    );
    d.ok(&["stop", "web"]);
    assert!(d.ok(&["logs", "web"]).contains("bye"));
    let status = d.ok(&["inspect", "-f", "{{.State.ExitCode}}", "web"]);
    assert_eq!(status.trim(), "0");
    d.ok(&["rm", "-f", "web"]);

    // docker stop of a container that ignores SIGTERM: SIGKILL after the
    // grace period, 137.
    let out = d.ok(&[
        "run",
        "-d",
        "--runtime",
        "burrow",
        "bb",
        "sh",
        "-c",
        "trap '' TERM; echo ready; sleep 1000",
    ]);
    let stubborn = out.trim();
    burrow_tests::wait_until(
        "the container's first line",
        Duration::from_secs(60),
        || d.ok(&["logs", stubborn]).contains("ready"),
    );
    d.ok(&["stop", "-t", "1", stubborn]);
    let code = d.ok(&["inspect", "-f", "{{.State.ExitCode}}", stubborn]);
    assert_eq!(code.trim(), "137");
    d.ok(&["rm", "-f", stubborn]);

    // Killed: 137.
    let out = d.ok(&["run", "-d", "--runtime", "burrow", "bb", "sleep", "1000"]);
    let id = out.trim();
    d.ok(&["kill", id]);
    let code = d.ok(&["wait", id]);
    assert_eq!(code.trim(), "137");
    d.ok(&["rm", "-f", id]);

    // A terminal: docker run -it under tmux.
    let mut tmux = Tmux::new();
    tmux.start(
        "it",
        100,
        30,
        &d.shell_line(&[
            "run",
            "--rm",
            "-it",
            "--name",
            "it",
            "--runtime",
            "burrow",
            "bb",
            "sh",
        ]),
    );
    tmux.type_text("it", "stty size; echo mark-$((6*7))\r");
    tmux.wait_for("it", "mark-42", Duration::from_secs(120));
    // Ctrl-C reaches the foreground program in the guest, not the shell.
    tmux.type_text("it", "sleep 1000\r");
    // Once `sleep` runs (its shell made it the terminal's foreground first).
    burrow_tests::wait_until(
        "sleep to run in the container",
        Duration::from_secs(60),
        || {
            d.run(&["exec", "it", "ps"])
                .stdout
                .windows(10)
                .any(|w| w == b"sleep 1000")
        },
    );
    tmux.send_keys("it", &["C-c"]);
    tmux.type_text("it", "echo after-$((1+1))\r");
    tmux.wait_for("it", "after-2", Duration::from_secs(120));
    tmux.type_text("it", "exit\r");
    drop(tmux);

    // Nothing left in burrow once docker removed them all.
    b.wait_no_vms(Duration::from_secs(60));
}

/// `DOCKER_BUILDKIT=1 docker build`: BuildKit inside dockerd runs the `runc` on
/// dockerd's PATH, here burrow-runtime (`run --bundle B ID` in the foreground):
/// each RUN step is a microVM, whose kernel is the guest's.
#[test]
fn buildkit_runs_dockerfile_steps_through_burrow_runtime() {
    require_root!();
    let (_b, d) = Dockerd::with_busybox(true);
    let ctx = d.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("context");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM bb\nRUN uname -r > /kernel\nRUN echo two >> /steps\nRUN echo three >> /steps\n",
    )
    .expect("Dockerfile");
    let out = d
        .docker(&[
            "build",
            "--network",
            "none",
            "--progress",
            "plain",
            "-t",
            "built",
            &ctx.to_string_lossy(),
        ])
        .env("DOCKER_BUILDKIT", "1")
        .stdin(Stdio::null())
        .output()
        .expect("docker build");
    assert!(
        out.status.success(),
        "docker build failed: {}\n{}",
        text(&out.stderr),
        burrow_tests::tail_of(&d.dir.path().join("dockerd.err"), 20)
    );
    // Read back through burrow too (runc on this dockerd's PATH is burrow-runtime).
    let out = d.ok(&["run", "--rm", "built", "cat", "/kernel", "/steps"]);
    assert_eq!(out, format!("{}\ntwo\nthree\n", guest_kernel_release()));
}
