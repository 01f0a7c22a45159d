//! The containerd harness itself, on containerd's own runc shim (no burrow
//! involved): a private containerd comes up in the test's network namespace,
//! imports an image made without a registry, runs containers from it and from
//! a plain root file system, and goes away leaving nothing. If this fails, the
//! shim's tests say nothing about the shim.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use burrow_tests::containerd::{Containerd, CRI_NAMESPACE, SANDBOX_IMAGE};
use burrow_tests::oci::busybox_rootfs;
use burrow_tests::{kill9, process_exists, wait_exit, Burrow};

/// `ctr run FLAGS RUNC REST`: the runc flags between ctr's and the image's.
fn run_args<'a>(runc: &'a [String], flags: &[&'a str], rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run"];
    args.extend(flags);
    args.extend(runc.iter().map(String::as_str));
    args.extend(rest);
    args
}

/// The host pid of task `id`, which must be running.
fn running_pid(c: &Containerd, id: &str) -> i32 {
    let tasks = c.ok(&["task", "ls"]);
    tasks
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id) && f.get(2) == Some(&"RUNNING"))
                .then(|| f[1].parse::<i32>().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("{id} is not running: {tasks}"))
}

#[test]
fn a_private_containerd_runs_runc_containers() {
    let b = Burrow::new();
    let rootfs = tempfile::tempdir().expect("tempdir");
    busybox_rootfs(rootfs.path());
    let rootfs = rootfs.path().to_string_lossy().into_owned();
    let (footprint, sleeper, runc_shim);
    {
        let Some(c) = Containerd::start(&b) else {
            return;
        };
        let netns = b.netns.as_ref().expect("root has network namespaces");
        assert_eq!(
            std::fs::metadata(format!("/proc/{}/ns/net", c.pid))
                .expect("containerd's netns")
                .ino(),
            std::fs::metadata(format!("/run/netns/{}", netns.0))
                .expect("test netns")
                .ino(),
            "containerd runs in the test's network namespace"
        );

        let image = c.import_busybox("burrow-test", &[]);
        assert_eq!(image, "docker.io/library/burrow-test:latest");
        let images = c.ok(&["image", "ls", "-q"]);
        assert!(images.lines().any(|l| l == image), "images: {images}");
        c.import_sandbox_image();
        let images = c.ok_in(CRI_NAMESPACE, &["image", "ls", "-q"]);
        assert!(
            images.lines().any(|l| l == SANDBOX_IMAGE),
            "CRI's images: {images}"
        );

        // From the image: its command, then its environment.
        let runc = c.runc_args("c1");
        let out = c.ok(&run_args(&runc, &["--rm"], &[&image, "c1", "echo", "hi"]));
        assert_eq!(out.trim(), "hi");
        let runc = c.runc_args("c1p");
        let out = c.ok(&run_args(
            &runc,
            &["--rm"],
            &[&image, "c1p", "sh", "-c", "echo $PATH"],
        ));
        assert_eq!(out.trim(), "/bin:/usr/bin", "the image config's Env");

        // From a root file system, no image: ctr sets no PATH then.
        let runc = c.runc_args("c2");
        c.ok(&run_args(
            &runc,
            &["--rm", "--rootfs"],
            &[&rootfs, "c2", "/bin/true"],
        ));
        let runc = c.runc_args("c3");
        let (code, _) = c.fails(&run_args(
            &runc,
            &["--rm", "--rootfs"],
            &[&rootfs, "c3", "/bin/sh", "-c", "exit 3"],
        ));
        assert_eq!(code, 3, "ctr run exits with its task's status");
        assert_eq!(
            c.ok(&["container", "ls", "-q"]).trim(),
            "",
            "--rm left containers"
        );
        assert_eq!(c.ok(&["task", "ls", "-q"]).trim(), "", "--rm left tasks");

        // One left running for the drop to end.
        let runc = c.runc_args("c4");
        c.ok(&run_args(
            &runc,
            &["-d", "--null-io"],
            &[&image, "c4", "sleep", "1000"],
        ));
        sleeper = running_pid(&c, "c4");
        let cgroup = std::fs::read_to_string(format!("/proc/{sleeper}/cgroup")).expect("cgroup");
        let own = runc
            .iter()
            .skip_while(|a| *a != "--cgroup")
            .nth(1)
            .expect("a cgroup in the runc flags");
        assert!(
            cgroup.lines().any(|l| l.ends_with(&format!(":{own}"))),
            "c4 is not in {own}: {cgroup}"
        );
        let shims = c.shim_processes_named("containerd-shim-runc-v2");
        assert_eq!(
            shims.len(),
            1,
            "one runc shim of this containerd: {shims:?}"
        );
        runc_shim = shims[0];
        // Shims inherit containerd's environment: burrow's binaries first on
        // PATH, and what points a shim at this test's burrowd.
        let env = std::fs::read(format!("/proc/{runc_shim}/environ")).expect("shim environ");
        let env: Vec<String> = env
            .split(|&b| b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        let path = format!("PATH={}:", b.bin().display());
        assert!(
            env.iter().any(|v| v.starts_with(&path)),
            "shim's PATH: {env:?}"
        );
        let state = format!("BURROW_STATE_DIR={}", b.state.display());
        assert!(env.contains(&state), "shim's environment: {env:?}");
        assert!(
            c.shim_processes().is_empty(),
            "a runc shim taken for burrow's"
        );
        assert!(
            c.shim_socket("c4").exists(),
            "c4's shim socket is not {}",
            c.shim_socket("c4").display()
        );
        footprint = c.footprint();
    }
    footprint.assert_gone();
    assert!(
        !process_exists(sleeper),
        "c4's process {sleeper} left running"
    );
    assert!(
        !process_exists(runc_shim),
        "c4's shim {runc_shim} left running"
    );
}

/// A containerd that died (kill -9) cannot delete its tasks: the drop still
/// ends its shim and the shim's container, and removes the rest.
#[test]
fn a_killed_containerd_still_leaves_nothing() {
    let b = Burrow::new();
    let (footprint, sleeper);
    {
        let Some(c) = Containerd::start(&b) else {
            return;
        };
        let image = c.import_busybox("burrow-test", &[]);
        let runc = c.runc_args("c1");
        c.ok(&run_args(
            &runc,
            &["-d", "--null-io"],
            &[&image, "c1", "sleep", "1000"],
        ));
        sleeper = running_pid(&c, "c1");
        footprint = c.footprint();
        kill9(c.pid);
        wait_exit("containerd", c.pid, Duration::from_secs(30));
    }
    footprint.assert_gone();
    assert!(
        !process_exists(sleeper),
        "c1's process {sleeper} left running"
    );
}
