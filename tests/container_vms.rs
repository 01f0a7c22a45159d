//! Container VMs (`POST /v1/containers`): a VM with no volume whose shared
//! directory carries an OCI bundle's root file system and bind mounts. One VM boot:
//! what the guest sees (through the agent's file requests, as no container runs
//! yet), read-only and read-write mounts, a mount added after the boot, the kind in
//! `ls` and `info`, what a container VM refuses, bad requests that leave nothing,
//! a kill -9 of burrowd (re-adopted; a leftover shared dir with no record is
//! unmounted and removed without touching the host files mounted in it), and a
//! destroy that leaves no mount, dir, record or process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use burrow::api::client::{Client, ClientError};
use burrow::api::types::{ContainerOp, ContainerVmRequest};
use burrow_tests::{kill9, process_exists, require_root, text, wait_exit, Burrow, Netns};
use serde_json::{json, Value};

const SHARED: &str = "/run/burrow/shared";

/// Mount points at or under `dir` in this (the daemon's) mount namespace.
fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let prefix = dir.to_string_lossy().into_owned();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == prefix || m.starts_with(&format!("{prefix}/")))
        .map(str::to_string)
        .collect()
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(out.status.success(), "{cmd:?}: {}", text(&out.stderr));
}

struct Host {
    _tmp: tempfile::TempDir,
    bundle: PathBuf,
    ro_dir: PathBuf,
    rw_dir: PathBuf,
    file: PathBuf,
}

fn host_side() -> Host {
    let tmp = tempfile::Builder::new()
        .prefix("bundle")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let bundle = tmp.path().join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs/etc")).expect("rootfs");
    std::fs::write(
        bundle.join("rootfs/etc/greeting"),
        "hello from the rootfs\n",
    )
    .expect("w");
    let ro_dir = tmp.path().join("ro");
    std::fs::create_dir(&ro_dir).expect("ro");
    std::fs::write(ro_dir.join("conf"), "read only\n").expect("w");
    let rw_dir = tmp.path().join("rw");
    std::fs::create_dir(&rw_dir).expect("rw");
    let file = tmp.path().join("hosts");
    std::fs::write(&file, "127.0.0.1 localhost\n").expect("w");
    Host {
        _tmp: tmp,
        bundle,
        ro_dir,
        rw_dir,
        file,
    }
}

fn spec(h: &Host) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "cwd": "/"},
        "root": {"path": "rootfs", "readonly": true},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/conf", "type": "bind", "source": h.ro_dir, "options": ["rbind", "ro"]},
            {"destination": "/data", "source": h.rw_dir, "options": ["rbind", "rw"]},
            {"destination": "/etc/hosts", "type": "bind", "source": h.file, "options": ["bind", "ro"]},
        ],
        "linux": {"resources": {"memory": {"limit": 64 << 20}, "cpu": {"quota": 50000, "period": 100000}}}
    })
}

fn request(h: &Host, id: &str, spec: Value) -> ContainerVmRequest {
    ContainerVmRequest {
        id: id.into(),
        root: "/run/test-oci-root".into(),
        bundle: h.bundle.clone(),
        spec,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_vm_shares_the_bundle_and_leaves_nothing() {
    require_root!();
    let b = Burrow::new();
    b.ok(&["daemon", "start"]);
    let client = Client::new(b.state.join("burrowd.sock"));
    let h = host_side();
    let containers = b.state.join("containers");

    // Bad requests: one line naming the field, and nothing made.
    let bad = |f: &dyn Fn(&mut ContainerVmRequest)| {
        let mut r = request(&h, "c1", spec(&h));
        f(&mut r);
        r
    };
    let cases: Vec<(ContainerVmRequest, &str)> = vec![
        (bad(&|r| r.id = "../x".into()), "invalid id"),
        (bad(&|r| r.root = "relative".into()), "invalid root"),
        (bad(&|r| r.bundle = "bundle".into()), "invalid bundle"),
        (bad(&|r| r.bundle = h.file.clone()), "invalid bundle"),
        (bad(&|r| r.spec = json!("x")), "invalid spec"),
        (
            bad(&|r| r.spec["root"]["path"] = json!("nope")),
            "invalid spec.root.path",
        ),
        (
            bad(&|r| r.spec["mounts"][1]["source"] = json!("/nonexistent/conf")),
            "invalid spec.mounts: [1]: source /nonexistent/conf",
        ),
        (
            bad(&|r| r.spec["linux"]["resources"]["cpu"]["period"] = json!(1)),
            "cpu.period",
        ),
        (
            bad(&|r| r.spec["linux"]["resources"]["memory"]["limit"] = json!(1u64 << 52)),
            "memory.limit",
        ),
    ];
    for (r, want) in cases {
        match client.container_vm_create(&r).await {
            Err(ClientError::Api { status, message }) => {
                assert_eq!(status, 400, "{message}");
                assert!(message.contains(want), "{want:?} not in {message:?}");
                assert_eq!(message.lines().count(), 1, "{message}");
            }
            other => panic!("{want}: expected a refusal, got {other:?}"),
        }
    }
    assert!(b
        .json(&["ls", "--json"])
        .as_array()
        .expect("list")
        .is_empty());
    let left: Vec<_> = std::fs::read_dir(&containers)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "a refused create left {left:?}");
    assert!(mounts_under(&containers).is_empty());

    // The network namespace dockerd would have made: a veth (.2) whose peer (.1)
    // is in a "bridge side" namespace.
    let pid = std::process::id();
    let outer = Netns::new(&format!("bvo{pid}")).expect("outer netns");
    let ctr = Netns::new(&format!("bvc{pid}")).expect("container netns");
    for (ns, args) in [
        (
            &outer,
            vec![
                "link", "add", "vo", "type", "veth", "peer", "name", "eth0", "netns", &ctr.0,
            ],
        ),
        (&outer, vec!["addr", "add", "172.30.8.1/24", "dev", "vo"]),
        (&outer, vec!["link", "set", "vo", "up"]),
        (&ctr, vec!["addr", "add", "172.30.8.2/24", "dev", "eth0"]),
        (
            &ctr,
            vec!["link", "set", "eth0", "address", "02:42:ac:1e:08:02", "up"],
        ),
        (&ctr, vec!["route", "add", "default", "via", "172.30.8.1"]),
    ] {
        sh(Command::new("ip").args(["-n", &ns.0]).args(args));
    }
    let mut with_net = spec(&h);
    with_net["linux"]["namespaces"] = json!([
        {"type": "pid"},
        {"type": "network", "path": format!("/run/netns/{}", ctr.0)},
        {"type": "mount"}
    ]);
    let mut missing_ns = request(&h, "c1", with_net.clone());
    missing_ns.spec["linux"]["namespaces"][1]["path"] = json!("/run/netns/no-such-burrow-ns");
    match client.container_vm_create(&missing_ns).await {
        Err(ClientError::Api { message, .. }) => {
            assert!(message.contains("spec.linux.namespaces"), "{message}")
        }
        other => panic!("a missing network namespace: {other:?}"),
    }

    // The VM: its size from the spec, its kind and container recorded.
    let info = client
        .container_vm_create(&request(&h, "c1", with_net))
        .await
        .expect("create a container VM");
    let vm = info.name.clone();
    assert!(vm.starts_with("c-"), "{vm}");
    assert_eq!(
        (info.vcpus, info.memory_mib),
        (1, 64 + burrow::engine::CONTAINER_OVERHEAD_MIB)
    );
    let json = b.info(&vm);
    assert_eq!(json["kind"], "container");
    assert_eq!(json["container"]["id"], "c1");
    assert_eq!(json["container"]["root"], "/run/test-oci-root");
    assert_eq!(
        json["container"]["bundle"],
        h.bundle.to_str().expect("utf-8")
    );
    let listed = b.json(&["ls", "--json"]);
    assert_eq!(listed[0]["kind"], "container");
    let table = b.ok(&["ls"]);
    assert!(
        table.lines().next().is_some_and(|l| l.contains("KIND")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains(&vm) && l.contains("container")),
        "{table}"
    );
    assert!(b.ok(&["info", &vm]).contains("kind:       container"));

    // The shared dir is a mount point with shared propagation, nosuid,nodev.
    let shared = containers.join(&info.id).join("shared");
    let info_line = std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .find(|l| l.split(' ').nth(4) == shared.to_str())
        .map(str::to_string)
        .expect("the shared dir is a mount point");
    assert!(info_line.contains("shared:"), "{info_line}");
    let opts = info_line.split(' ').nth(5).unwrap_or_default();
    assert!(
        opts.contains("nosuid") && opts.contains("nodev"),
        "{info_line}"
    );

    // Every host-side mount in it is nosuid,nodev; the read-only ones are ro.
    let info_text = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let opts_of = |rel: &str| -> String {
        let p = shared.join(rel);
        info_text
            .lines()
            .find(|l| l.split(' ').nth(4) == p.to_str())
            .and_then(|l| l.split(' ').nth(5))
            .unwrap_or_else(|| panic!("{} is not a mount point", p.display()))
            .to_string()
    };
    // The read-only root is an overlay: the bundle's rootfs, bound read-only,
    // under a small writable layer of the VM's own (the guest's container runtime
    // makes its mount points there, then makes the root read-only).
    let rootfs_line = info_text
        .lines()
        .find(|l| l.split(' ').nth(4) == shared.join("c1/rootfs").to_str())
        .expect("c1/rootfs is a mount point");
    assert!(rootfs_line.contains(" - overlay "), "{rootfs_line}");
    let lower = shared.parent().expect("vm dir").join("rw/c1/lower");
    let lower_line = info_text
        .lines()
        .find(|l| l.split(' ').nth(4) == lower.to_str())
        .unwrap_or_else(|| panic!("{} is not a mount point", lower.display()));
    let lower_opts: Vec<&str> = lower_line
        .split(' ')
        .nth(5)
        .unwrap_or_default()
        .split(',')
        .collect();
    assert!(
        lower_opts.contains(&"ro") && lower_opts.contains(&"nosuid"),
        "{lower_line}"
    );
    for (rel, ro) in [
        ("c1/mounts/1", true),
        ("c1/mounts/2", false),
        ("c1/mounts/3", true),
    ] {
        let o: Vec<String> = opts_of(rel).split(',').map(str::to_string).collect();
        assert!(
            o.contains(&"nosuid".into()) && o.contains(&"nodev".into()),
            "{rel}: {o:?}"
        );
        assert_eq!(o.contains(&"ro".into()), ro, "{rel}: {o:?}");
    }

    // What the guest sees.
    let c = format!("{SHARED}/c1");
    assert_eq!(
        b.ok(&["file", "read", &vm, &format!("{c}/rootfs/etc/greeting")]),
        "hello from the rootfs\n"
    );
    assert_eq!(
        b.ok(&["file", "read", &vm, &format!("{c}/mounts/1/conf")]),
        "read only\n"
    );
    assert_eq!(
        b.ok(&["file", "read", &vm, &format!("{c}/mounts/3")]),
        "127.0.0.1 localhost\n"
    );
    let config: Value =
        serde_json::from_str(&b.ok(&["file", "read", &vm, &format!("{c}/config.json")]))
            .expect("config.json");
    assert_eq!(config["root"]["path"], "rootfs");
    // The container shares the VM's network namespace, whose interface is the one
    // dockerd gave it: the bridge side's TCP reaches the guest's kernel through
    // the veth and the TAP (a reset, "refused", comes back: not a timeout).
    assert_eq!(
        config["linux"]["namespaces"],
        json!([{"type": "pid"}, {"type": "mount"}])
    );
    let knock = Command::new("ip")
        .args(["netns", "exec", &outer.0, "timeout", "20", "bash", "-c"])
        .arg("exec 3<>/dev/tcp/172.30.8.2/1")
        .output()
        .expect("knock");
    assert!(
        text(&knock.stderr).contains("Connection refused"),
        "the guest did not answer on the container's address: {}",
        text(&knock.stderr)
    );
    assert_eq!(config["mounts"][0]["source"], "proc");
    assert_eq!(config["mounts"][1]["source"], format!("{c}/mounts/1"));
    assert_eq!(config["mounts"][2]["source"], format!("{c}/mounts/2"));
    assert_eq!(config["mounts"][3]["source"], format!("{c}/mounts/3"));
    // A root guest cannot write through a read-only mount, to a dir or a file.
    let (_, err) = b.fails(&["file", "write", &vm, &format!("{c}/mounts/1/planted")]);
    assert!(err.to_lowercase().contains("read-only"), "{err}");
    assert!(!h.ro_dir.join("planted").exists());
    b.fails(&["file", "write", &vm, &format!("{c}/mounts/3")]);
    // A write into the read-only root lands in the VM's layer, never the bundle.
    let _ = b.run(&["file", "write", &vm, &format!("{c}/rootfs/etc/planted")]);
    assert!(!h.bundle.join("rootfs/etc/planted").exists());
    assert_eq!(
        std::fs::read_to_string(&h.file).expect("r"),
        "127.0.0.1 localhost\n"
    );
    // The read-write one's writes reach the host.
    b.run_with_stdin(
        &["file", "write", &vm, &format!("{c}/mounts/2/out")],
        b"from the guest",
    );
    assert_eq!(
        std::fs::read_to_string(h.rw_dir.join("out")).expect("r"),
        "from the guest"
    );

    // A mount the host adds after the boot reaches the guest (what a warm VM needs).
    let late_src = h.bundle.parent().expect("tmp").join("late");
    std::fs::create_dir(&late_src).expect("late");
    std::fs::write(late_src.join("x"), "added after boot\n").expect("w");
    let late = shared.join("late");
    std::fs::create_dir(&late).expect("mkdir late");
    sh(Command::new("mount")
        .arg("--bind")
        .arg(&late_src)
        .arg(&late));
    assert_eq!(
        b.ok(&["file", "read", &vm, &format!("{SHARED}/late/x")]),
        "added after boot\n"
    );

    // What a container VM refuses, and a second create of one (root, id).
    b.assert_refused(&[
        (
            vec!["snapshot", "create", vm.as_str(), "s1"],
            "is a container VM",
        ),
        (vec!["snapshot", "ls", vm.as_str()], "is a container VM"),
    ]);
    match client
        .container_vm_create(&request(&h, "c1", spec(&h)))
        .await
    {
        Err(ClientError::Api {
            status: 409,
            message,
        }) => {
            assert!(message.contains("already exists"), "{message}")
        }
        other => panic!("a second create: {other:?}"),
    }
    let mut other_root = request(&h, "c1", spec(&h));
    other_root.root = "/run/another-root".into();
    // (Not created: only the name it would get differs.)
    assert_ne!(
        burrow::engine::container_vm_name(&other_root.root, "c1"),
        vm
    );

    // Container requests go to the guest's agent: an unknown container is its
    // error, one line; a bad id is refused before it.
    for (op, status) in [
        (ContainerOp::State { id: "nope".into() }, None),
        (ContainerOp::Start { id: "../x".into() }, Some(400)),
    ] {
        match client.container_op(&vm, &op).await {
            Err(ClientError::Api {
                status: got,
                message,
            }) => {
                assert_eq!(message.lines().count(), 1, "{message}");
                if let Some(want) = status {
                    assert_eq!(got, want, "{message}");
                    assert!(message.contains("invalid id"), "{message}");
                }
            }
            other => panic!("{op:?}: expected an error, got {other:?}"),
        }
    }

    // kill -9 of burrowd: the VM runs on; the next daemon re-adopts it. A shared
    // dir left with no record (a crash mid-destroy) is unmounted and removed, and
    // the host files that were mounted in it are untouched.
    let qemu = info.pids.as_ref().expect("pids").qemu;
    let daemon = b.daemon_pid().expect("daemon pid");
    kill9(daemon);
    wait_exit("daemon", daemon, Duration::from_secs(10));
    let stray = containers.join("000000000000");
    let stray_shared = stray.join("shared");
    std::fs::create_dir_all(stray_shared.join("m")).expect("stray dir");
    sh(Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&stray_shared));
    std::fs::create_dir(stray_shared.join("m")).expect("mkdir");
    sh(Command::new("mount")
        .arg("--bind")
        .arg(&h.rw_dir)
        .arg(stray_shared.join("m")));
    let readopted = b.json(&["ls", "--json"]);
    assert_eq!(readopted.as_array().map(Vec::len), Some(1), "{readopted}");
    assert_eq!(readopted[0]["state"], "running");
    assert_eq!(readopted[0]["pids"]["qemu"], qemu);
    assert!(
        mounts_under(&stray).is_empty(),
        "{:?}",
        mounts_under(&stray)
    );
    assert!(!stray.exists(), "the stray shared dir was not removed");
    assert_eq!(
        std::fs::read_to_string(h.rw_dir.join("out")).expect("r"),
        "from the guest"
    );
    assert_eq!(
        b.ok(&["file", "read", &vm, &format!("{c}/rootfs/etc/greeting")]),
        "hello from the rootfs\n"
    );

    // The guest is root and the shared dir is its to write: it plants links to
    // host paths where the host's clean-up walks (in the container's dir, at
    // the top of the shared dir, deeper down, and in place of config.json).
    // Destroy removes the links, never what they name.
    let canary = h.bundle.parent().expect("tmp").join("canary");
    std::fs::create_dir(&canary).expect("canary");
    std::fs::write(canary.join("keep"), "host file\n").expect("w");
    std::fs::copy("/bin/busybox", h.rw_dir.join("busybox")).expect("busybox");
    let bb = format!("{c}/mounts/2/busybox");
    let in_guest = |args: &[&str]| {
        let mut argv = vec!["exec", vm.as_str(), "--", bb.as_str()];
        argv.extend(args);
        b.ok(&argv);
    };
    let (dir, file) = (canary.to_string_lossy(), canary.join("keep"));
    let file = file.to_string_lossy();
    in_guest(&["ln", "-s", &dir, &format!("{c}/evil-dir")]);
    in_guest(&["ln", "-s", &file, &format!("{SHARED}/evil-file")]);
    in_guest(&["mkdir", "-p", &format!("{c}/deep/a")]);
    in_guest(&["ln", "-s", &dir, &format!("{c}/deep/a/link")]);
    in_guest(&["rm", "-f", &format!("{c}/config.json")]);
    in_guest(&["ln", "-s", &file, &format!("{c}/config.json")]);
    assert!(std::fs::symlink_metadata(shared.join("c1/config.json"))
        .expect("planted")
        .file_type()
        .is_symlink());

    // Destroy: no mount, dir, record or process.
    b.ok(&["destroy", &vm]);
    assert!(!process_exists(qemu) || burrow_tests::is_zombie(qemu));
    assert!(
        mounts_under(&containers).is_empty(),
        "{:?}",
        mounts_under(&containers)
    );
    assert!(!containers.join(&info.id).exists());
    assert!(b
        .json(&["ls", "--json"])
        .as_array()
        .expect("list")
        .is_empty());
    b.assert_gone(&info.id);
    // The host's files are all still there.
    assert_eq!(
        std::fs::read_to_string(h.ro_dir.join("conf")).expect("r"),
        "read only\n"
    );
    assert!(h.bundle.join("rootfs/etc/greeting").exists());
    assert!(late_src.join("x").exists());
    assert!(h.rw_dir.join("busybox").exists());
    assert_eq!(
        std::fs::read_to_string(canary.join("keep")).expect("the canary file"),
        "host file\n"
    );
}

/// A container VM whose boot fails (an agent that cannot run in it) leaves
/// nothing: no record, mount, dir or process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_container_vm_boot_leaves_nothing() {
    require_root!();
    let h = host_side();
    // A #! script whose interpreter a container VM's root does not have: the
    // guest's init fails, the kernel panics, QEMU exits.
    let agent = h.bundle.parent().expect("tmp").join("broken-agent");
    std::fs::write(&agent, "#!/bin/sh\nexit 1\n").expect("w");
    let b = Burrow::new().with_env("BURROW_AGENT", agent.to_str().expect("utf-8"));
    b.ok(&["daemon", "start"]);
    let client = Client::new(b.state.join("burrowd.sock"));
    let containers = b.state.join("containers");
    let e = client
        .container_vm_create(&request(&h, "c1", spec(&h)))
        .await
        .expect_err("a boot that fails");
    assert!(e.to_string().contains("failed to boot"), "{e}");
    assert!(b
        .json(&["ls", "--json"])
        .as_array()
        .expect("list")
        .is_empty());
    assert!(
        mounts_under(&containers).is_empty(),
        "{:?}",
        mounts_under(&containers)
    );
    let left: Vec<_> = std::fs::read_dir(&containers)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "a failed create left {left:?}");
    assert!(b.vm_processes().is_empty(), "{:?}", b.vm_processes());
    assert!(h.rw_dir.exists() && h.ro_dir.join("conf").exists());
}
