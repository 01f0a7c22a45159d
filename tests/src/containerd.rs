//! A private containerd (Debian's 1.6 package) for the tests of burrow's
//! containerd shim: its own root, state, sockets and config, inside the
//! [`Burrow`]'s network namespace, driven with `ctr`; images made here, without
//! a registry.
//!
//! Its log level is `info` (shims' own log lines reach it whatever the level);
//! `BURROW_CONTAINERD_LOG_LEVEL=debug` makes containerd log every call and
//! start its shims with `-debug`.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::oci::busybox_rootfs;
use crate::{cmdline_mentions, exits_within, mounts_under, tail_of, text, Burrow};

/// The namespace [`Containerd::ctr`] works in.
pub const NAMESPACE: &str = "burrow-test";
/// The namespace CRI keeps its pods, containers and images in.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The image CRI makes pod sandboxes of (its `sandbox_image`), imported by
/// [`Containerd::import_sandbox_image`]: never pulled.
pub const SANDBOX_IMAGE: &str = "docker.io/library/burrow-pause:latest";
/// The binary containerd runs for runtime `io.containerd.burrow.v2`.
pub const SHIM_BINARY: &str = "containerd-shim-burrow-v2";
/// Where containerd 1.6 has its shims put their ttrpc sockets, whatever its
/// `state` (named by a hash of containerd's address, namespace and shim id).
const SHIM_SOCKET_DIR: &str = "/run/containerd/s";
/// How long the clean-up waits on one `ctr` call: a wedged shim must not hang
/// the test's drop.
const CLEANUP_TIMEOUT: &str = "60s";

/// A private containerd: root, state, gRPC and ttrpc sockets, config and log in
/// a temp dir of its own; its CRI plugin on (runtime handler `burrow` is
/// `io.containerd.burrow.v2`; no CNI, so only pods without networking start),
/// its CRI streaming server on 127.0.0.1 of the [`Burrow`]'s network namespace.
/// `containerd-shim-burrow-v2` is found first on its PATH, in the directory of
/// the built binaries, and the shim inherits the environment that points it at
/// the [`Burrow`]'s burrowd.
///
/// Drop it before the [`Burrow`] (declare it after): its drop deletes every task
/// and container it still has, which needs burrowd; then it stops containerd,
/// ends what is left of its shims, unmounts and removes its directories.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    /// containerd's gRPC socket (what `ctr --address` and a CRI client dial).
    pub address: PathBuf,
    pub ttrpc_address: PathBuf,
    pub pid: i32,
    child: Child,
    log: PathBuf,
    /// The cgroup its runc containers go under ([`Containerd::runc_args`]).
    cgroup: String,
}

impl Containerd {
    /// Starts one and waits until it answers; `None`, saying why, when not
    /// root or containerd is not installed.
    pub fn start(burrow: &Burrow) -> Option<Containerd> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: a private containerd needs root");
            return None;
        }
        let (Some(binary), Some(_)) = (find_program("containerd"), find_program("ctr")) else {
            eprintln!("SKIPPED: containerd is not installed (apt-get install containerd)");
            return None;
        };
        // Short paths under /tmp: Unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("ctd")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let d = dir.path().to_path_buf();
        let name = d
            .file_name()
            .and_then(|n| n.to_str())
            .expect("temp dir name")
            .to_string();
        let address = d.join("containerd.sock");
        let ttrpc_address = d.join("containerd.ttrpc.sock");
        let config = d.join("config.toml");
        std::fs::write(&config, config_toml(&d, &address, &ttrpc_address)).expect("config.toml");
        let log = d.join("containerd.log");
        let child = spawn(&binary, burrow, &config, &log);
        let containerd = Containerd {
            pid: child.id() as i32,
            child,
            dir,
            address,
            ttrpc_address,
            log,
            cgroup: format!("burrow-{name}"),
        };
        containerd.wait_ready();
        Some(containerd)
    }

    /// Stops containerd (SIGTERM, as a service manager does) and starts it again
    /// on the same configuration: its shims, and so its tasks, keep running.
    pub fn restart(&mut self, burrow: &Burrow) {
        // SAFETY: kill has no memory effects; the pid is our child's.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let _ = self.child.wait();
        let binary = find_program("containerd").expect("containerd");
        let config = self.dir.path().join("config.toml");
        self.child = spawn(&binary, burrow, &config, &self.log);
        self.pid = self.child.id() as i32;
        self.wait_ready();
    }

    /// containerd answers on its socket once it has loaded its plugins (CRI's
    /// included); a containerd that exits fails the test with its log.
    fn wait_ready(&self) {
        crate::wait_until_explained(
            "containerd to answer `ctr version`",
            Duration::from_secs(60),
            || {
                assert!(
                    !exits_within(self.pid, Duration::ZERO),
                    "containerd exited while starting:\n{}",
                    self.log_tail(30)
                );
                self.address.exists() && self.ctr(&["version"]).status.success()
            },
            || self.log_tail(30),
        );
        // containerd serves even when a plugin failed to load (a config key
        // it refused): the tests need CRI's.
        let plugins = self.ok(&["plugins", "ls"]);
        assert!(
            plugins.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1) == Some(&"cri") && f.last() == Some(&"ok")
            }),
            "containerd's CRI plugin did not load:\n{plugins}\n{}",
            self.log_tail(30)
        );
    }

    /// The last `n` lines of containerd's log (its shims' logs included), for
    /// assertion messages.
    pub fn log_tail(&self, n: usize) -> String {
        tail_of(&self.log, n)
    }

    /// `ctr ARGS` on this containerd, in namespace [`NAMESPACE`].
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_in(NAMESPACE, args)
    }

    /// `ctr ARGS` on this containerd, in namespace `ns`.
    pub fn ctr_in(&self, ns: &str, args: &[&str]) -> Output {
        self.command(ns, args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    /// `ctr ARGS` (namespace [`NAMESPACE`]) started with its stdin and stdout
    /// piped to the test.
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        self.command(NAMESPACE, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start ctr")
    }

    fn command(&self, ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&self.address)
            .args(["--connect-timeout", "10s", "--namespace", ns])
            .args(args);
        c
    }

    /// Runs `ctr ARGS` (namespace [`NAMESPACE`]), which must succeed; returns
    /// its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        self.ok_in(NAMESPACE, args)
    }

    /// [`Containerd::ok`] in namespace `ns`.
    pub fn ok_in(&self, ns: &str, args: &[&str]) -> String {
        let out = self.ctr_in(ns, args);
        assert!(
            out.status.success(),
            "ctr -n {ns} {args:?} failed ({}): {}\ncontainerd's log:\n{}",
            out.status,
            text(&out.stderr),
            self.log_tail(20)
        );
        text(&out.stdout)
    }

    /// Runs `ctr ARGS` (namespace [`NAMESPACE`]), which must fail; returns
    /// (exit code, stderr). `ctr run` exits with its task's status.
    pub fn fails(&self, args: &[&str]) -> (i32, String) {
        let out = self.ctr(args);
        assert!(
            !out.status.success(),
            "ctr {args:?} succeeded unexpectedly: {}",
            text(&out.stdout)
        );
        (out.status.code().unwrap_or(-1), text(&out.stderr))
    }

    /// The `ctr run` flags that keep a runc container (containerd's own shim)
    /// of this containerd apart from other tests': runc's state under this
    /// dir and its cgroup under this instance's parent. ctr's defaults,
    /// /run/containerd/runc/NAMESPACE/ID and cgroup /NAMESPACE/ID, are shared
    /// by every containerd of the host.
    pub fn runc_args(&self, id: &str) -> Vec<String> {
        vec![
            "--runc-root".into(),
            self.dir.path().join("runc").display().to_string(),
            "--cgroup".into(),
            format!("/{}/{id}", self.cgroup),
        ]
    }

    /// Imports, in namespace [`NAMESPACE`], an image holding a busybox root
    /// file system ([`busybox_rootfs`], plus links for `applets`), with
    /// `PATH=/bin:/usr/bin` and command `sh`. `name` may be short
    /// (`burrow-test`); returns the full name containerd knows it by
    /// (`docker.io/library/burrow-test:latest`), which `ctr run` wants.
    pub fn import_busybox(&self, name: &str, applets: &[&str]) -> String {
        self.import_image(NAMESPACE, name, applets, &["sh"])
    }

    /// [`Containerd::import_busybox`] into namespace `ns` ([`CRI_NAMESPACE`]
    /// for CRI's containers).
    pub fn import_busybox_in(&self, ns: &str, name: &str, applets: &[&str]) -> String {
        self.import_image(ns, name, applets, &["sh"])
    }

    /// Imports [`SANDBOX_IMAGE`] for CRI: busybox sleeping for ever, as
    /// Kubernetes' pause image does.
    pub fn import_sandbox_image(&self) {
        self.import_image(CRI_NAMESPACE, SANDBOX_IMAGE, &[], &["sleep", "infinity"]);
    }

    fn import_image(&self, ns: &str, name: &str, applets: &[&str], cmd: &[&str]) -> String {
        let name = full_image_name(name);
        let work = tempfile::tempdir_in(self.dir.path()).expect("image work dir");
        let root = work.path().join("rootfs");
        busybox_rootfs(&root);
        for a in applets {
            let link = root.join("bin").join(a);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink("busybox", link).expect("applet link");
            }
        }
        let archive = work.path().join("image.tar");
        std::fs::write(&archive, oci_archive(&name, &tar_tree(&root), cmd)).expect("image.tar");
        self.ok_in(ns, &["image", "import", &archive.to_string_lossy()]);
        name
    }

    /// Pids of the live `containerd-shim-burrow-v2` processes of this
    /// containerd: its shims are re-parented to init, so their command line
    /// (`-address <this containerd's socket>`) is what ties them to it.
    pub fn shim_processes(&self) -> Vec<i32> {
        self.shim_processes_named(SHIM_BINARY)
    }

    /// Pids of the live shims of this containerd whose binary is named
    /// `binary` (`containerd-shim-runc-v2` for its own).
    pub fn shim_processes_named(&self, binary: &str) -> Vec<i32> {
        let address = self.address.as_os_str().as_encoded_bytes();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let argv: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            let is_shim = argv
                .first()
                .and_then(|a0| Path::new(std::ffi::OsStr::from_bytes(a0)).file_name())
                .is_some_and(|n| n == binary);
            let ours = argv
                .windows(2)
                .any(|w| w[0] == b"-address" && w[1] == address);
            if is_shim && ours && !crate::is_zombie(pid) {
                out.push(pid);
            }
        }
        out.sort();
        out
    }

    /// The ttrpc socket of the shim that containerd knows by `id` in namespace
    /// [`NAMESPACE`] (a container's id, or its pod sandbox's when the shim
    /// groups a pod): there while the shim serves, gone after its delete.
    pub fn shim_socket(&self, id: &str) -> PathBuf {
        self.shim_socket_in(NAMESPACE, id)
    }

    /// [`Containerd::shim_socket`] in namespace `ns`.
    pub fn shim_socket_in(&self, ns: &str, id: &str) -> PathBuf {
        // containerd 1.6's shim.SocketAddress: sha256 of "<address>/<ns>/<id>".
        let key = self.address.join(ns).join(id);
        let digest = Sha256::digest(key.as_os_str().as_encoded_bytes());
        Path::new(SHIM_SOCKET_DIR).join(format!("{digest:x}"))
    }

    /// What this containerd has on the host now, to check after its drop that
    /// nothing of it is left.
    pub fn footprint(&self) -> Footprint {
        let mut sockets = Vec::new();
        for ns in self.list(None, &["namespaces", "ls", "-q"]) {
            for id in self.list(Some(&ns), &["container", "ls", "-q"]) {
                sockets.push(self.shim_socket_in(&ns, &id));
            }
        }
        Footprint {
            dir: self.dir.path().to_path_buf(),
            cgroup: self.cgroup.clone(),
            shim_sockets: sockets,
        }
    }

    /// The lines `ctr ARGS` prints, each trimmed; none when it fails or takes
    /// longer than the clean-up allows. `ns` None: ctr's default namespace
    /// (for the namespace-less `namespaces ls`).
    fn list(&self, ns: Option<&str>, args: &[&str]) -> Vec<String> {
        self.bounded(ns.unwrap_or("default"), args)
            .filter(|o| o.status.success())
            .map(|o| {
                text(&o.stdout)
                    .lines()
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `ctr ARGS` under the clean-up's timeout.
    fn bounded(&self, ns: &str, args: &[&str]) -> Option<Output> {
        let mut c = self.command(ns, &[]);
        c.args(["--timeout", CLEANUP_TIMEOUT])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()
    }

    /// Deletes every task and container of every namespace, as a user would.
    fn delete_all(&self) -> Vec<PathBuf> {
        let mut sockets = Vec::new();
        for ns in self.list(None, &["namespaces", "ls", "-q"]) {
            for id in self.list(Some(&ns), &["task", "ls", "-q"]) {
                self.bounded(&ns, &["task", "kill", "-s", "KILL", &id]);
                self.bounded(&ns, &["task", "delete", "-f", &id]);
            }
            for id in self.list(Some(&ns), &["container", "ls", "-q"]) {
                sockets.push(self.shim_socket_in(&ns, &id));
                self.bounded(&ns, &["container", "rm", &id]);
            }
        }
        sockets
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let d = self.dir.path().to_path_buf();
        // Tasks and containers first, through containerd, so that each shim
        // cleans up after itself (a runc shim's container processes do not
        // name our dir, and outlive a killed shim).
        let sockets = if exits_within(self.pid, Duration::ZERO) {
            Vec::new()
        } else {
            self.delete_all()
        };
        // SAFETY: kill has no memory effects; the pid is our child, not reaped yet.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        if !exits_within(self.pid, Duration::from_secs(30)) {
            // SAFETY: as above.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        let _ = self.child.wait();
        // Whatever still names our dir (a shim containerd could not make
        // exit: its `-address` is in it) is ours.
        let left: Vec<i32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| cmdline_mentions(pid, &d))
            .collect();
        for &pid in &left {
            // SAFETY: kill has no memory effects; the process names our dir.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for &pid in &left {
            exits_within(pid, Duration::from_secs(10));
        }
        // The runc containers of shims that were killed, by runc's state here.
        for ns in std::fs::read_dir(d.join("runc"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for c in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(ns.path())
                    .args(["delete", "-f"])
                    .arg(c.file_name())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        // Sockets of shims that did not delete theirs (their names hash our
        // address: no one else's), known by what containerd listed or, when it
        // could not answer, by the bundles of the tasks it did not delete.
        let bundles = d.join("state/io.containerd.runtime.v2.task");
        let mut sockets = sockets;
        for ns in std::fs::read_dir(bundles).into_iter().flatten().flatten() {
            for task in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                sockets.push(self.shim_socket_in(
                    &ns.file_name().to_string_lossy(),
                    &task.file_name().to_string_lossy(),
                ));
            }
        }
        for s in sockets {
            let _ = std::fs::remove_file(s);
        }
        // Snapshots, bundle root file systems, CRI's netns files, deepest first.
        for m in mounts_under(&d) {
            if let Ok(c) = std::ffi::CString::new(m) {
                // SAFETY: umount2 with a NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        for cg in cgroup_dirs(&self.cgroup) {
            remove_cgroup(&cg);
        }
        // The temp dir goes with the struct's fields.
    }
}

/// What a [`Containerd`] had on the host, noted while it ran.
pub struct Footprint {
    pub dir: PathBuf,
    cgroup: String,
    shim_sockets: Vec<PathBuf>,
}

impl Footprint {
    /// Nothing of it is left: no directory, process naming it, mount under it,
    /// runc cgroup or shim socket.
    pub fn assert_gone(&self) {
        let procs: Vec<i32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| cmdline_mentions(pid, &self.dir))
            .collect();
        assert!(procs.is_empty(), "processes of containerd left: {procs:?}");
        let mounts = mounts_under(&self.dir);
        assert!(mounts.is_empty(), "mounts left: {mounts:?}");
        assert!(!self.dir.exists(), "{} left behind", self.dir.display());
        let cgroups: Vec<PathBuf> = cgroup_dirs(&self.cgroup)
            .into_iter()
            .filter(|c| c.exists())
            .collect();
        assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
        let sockets: Vec<&PathBuf> = self.shim_sockets.iter().filter(|s| s.exists()).collect();
        assert!(sockets.is_empty(), "shim sockets left: {sockets:?}");
    }
}

/// containerd's config: only the plugins the tests use (so it starts in a
/// fraction of a second and touches nothing outside `dir`), CRI kept.
fn config_toml(dir: &Path, address: &Path, ttrpc: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
# Snapshotters that probe the host or want a dedicated device; opt, which
# would make /opt/containerd and put it on the shims' PATH. (Not the legacy
# runtime io.containerd.runtime.v1.linux: 1.6's tasks service, and so CRI,
# fail to load without it.)
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.native",
  "io.containerd.internal.v1.opt",
]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{ttrpc}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  # Pods' network namespace files under state (unmounted with it), not /var/run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{d}/runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.burrow]
      runtime_type = "io.containerd.burrow.v2"
  # CNI's reference plugins; no network configuration (not the host's
  # /etc/cni) until a test writes one ([`Containerd::enable_cni`]).
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{d}/cni/net.d"
  # No mirrors or credentials of the host's.
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"
"#,
        address = address.display(),
        ttrpc = ttrpc.display(),
    )
}

/// Where Debian's containernetworking-plugins puts CNI's reference plugins.
pub const CNI_BIN: &str = "/usr/lib/cni";

/// The CNI network [`Containerd::enable_cni`] configures.
pub const CNI_SUBNET: &str = "10.77.0.0/24";
pub const CNI_GATEWAY: &str = "10.77.0.1";

impl Containerd {
    /// Gives pods that do not use the host's network one of their own from CNI:
    /// the bridge plugin's bridge `cni-burrow` (in this containerd's network
    /// namespace, the [`Burrow`]'s) with gateway [`CNI_GATEWAY`], addresses from
    /// [`CNI_SUBNET`] kept under this containerd's dir. `None`, saying why, when
    /// the plugins are not installed.
    pub fn enable_cni(&self) -> Option<()> {
        if !Path::new(CNI_BIN).join("bridge").exists() {
            eprintln!("SKIPPED: CNI's plugins are not installed (apt-get install containernetworking-plugins)");
            return None;
        }
        let d = self.dir.path();
        let conf = d.join("cni/net.d");
        std::fs::create_dir_all(&conf).expect("CNI conf dir");
        let list = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "burrow-test",
            "plugins": [{
                "type": "bridge",
                "bridge": "cni-burrow",
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": CNI_SUBNET, "gateway": CNI_GATEWAY}]],
                    "dataDir": d.join("cni/ipam"),
                },
            }],
        });
        std::fs::write(conf.join("10-burrow-test.conflist"), list.to_string())
            .expect("CNI conflist");
        Some(())
    }
}

/// `program` on this process's PATH.
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Directory `name` at the top of every cgroup hierarchy (the v2 one and each
/// v1 controller's).
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let top = Path::new("/sys/fs/cgroup");
    let mut dirs = vec![top.join(name)];
    dirs.extend(
        std::fs::read_dir(top)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path().join(name)),
    );
    dirs
}

/// Removes an empty cgroup and its empty children (rmdir, deepest first).
fn remove_cgroup(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// `name` as containerd stores it: `docker.io/library/NAME:latest` for a bare
/// `NAME`.
fn full_image_name(name: &str) -> String {
    let mut full = if name.contains('/') {
        name.to_string()
    } else {
        format!("docker.io/library/{name}")
    };
    let last = full.rsplit('/').next().unwrap_or_default();
    if !last.contains(':') && !last.contains('@') {
        full.push_str(":latest");
    }
    full
}

/// The Go architecture name of this host, as image platforms name it.
fn image_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

fn digest(blob: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(blob))
}

fn descriptor(media_type: &str, blob: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": digest(blob), "size": blob.len()})
}

/// An OCI image layout, as a tar archive, of one image: one uncompressed
/// `layer`, a config running `cmd`, named `name` (full) as `ctr image import`
/// reads it from the index's `io.containerd.image.name` annotation.
fn oci_archive(name: &str, layer: &[u8], cmd: &[&str]) -> Vec<u8> {
    let config = json!({
        "architecture": image_arch(),
        "os": "linux",
        "config": {"Env": ["PATH=/bin:/usr/bin"], "Cmd": cmd},
        // Uncompressed: the layer's digest is its diff id.
        "rootfs": {"type": "layers", "diff_ids": [digest(layer)]},
    })
    .to_string()
    .into_bytes();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": descriptor(CONFIG, &config),
        "layers": [descriptor(LAYER, layer)],
    })
    .to_string()
    .into_bytes();
    let tag = name.rsplit(':').next().unwrap_or("latest");
    let mut entry = descriptor(MANIFEST, &manifest);
    entry["platform"] = json!({"architecture": image_arch(), "os": "linux"});
    entry["annotations"] = json!({
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": tag,
    });
    let index = json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": [entry]});

    let mut tar = Tar::default();
    tar.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#);
    tar.file("index.json", 0o644, index.to_string().as_bytes());
    tar.dir("blobs/", 0o755);
    tar.dir("blobs/sha256/", 0o755);
    for blob in [layer, config.as_slice(), manifest.as_slice()] {
        let hex = digest(blob).trim_start_matches("sha256:").to_string();
        tar.file(&format!("blobs/sha256/{hex}"), 0o644, blob);
    }
    tar.finish()
}

/// The tree under `root` as a tar archive (paths relative to it, sorted).
fn tar_tree(root: &Path) -> Vec<u8> {
    fn walk(tar: &mut Tar, root: &Path, dir: &Path) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("read rootfs")
            .map(|e| e.expect("rootfs entry").path())
            .collect();
        entries.sort();
        for path in entries {
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            let meta = std::fs::symlink_metadata(&path).expect("rootfs entry");
            let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).expect("readlink");
                tar.symlink(&rel, &target.to_string_lossy());
            } else if meta.is_dir() {
                tar.dir(&format!("{rel}/"), mode);
                walk(tar, root, &path);
            } else {
                tar.file(&rel, mode, &std::fs::read(&path).expect("read rootfs file"));
            }
        }
    }
    let mut tar = Tar::default();
    walk(&mut tar, root, root);
    tar.finish()
}

/// A POSIX ustar archive built in memory: directories, files and symlinks,
/// owned by root, mtime 0 (the same tree always gives the same digest). Names
/// fit in the header's 100 bytes: no long-name extensions.
#[derive(Default)]
struct Tar(Vec<u8>);

impl Tar {
    fn dir(&mut self, path: &str, mode: u32) {
        self.entry(path, b'5', mode, &[], "");
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, b'0', mode, data, "");
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, b'2', 0o777, &[], target);
    }

    fn entry(&mut self, path: &str, kind: u8, mode: u32, data: &[u8], link: &str) {
        assert!(
            path.len() <= 100 && link.len() <= 100,
            "tar name too long: {path} -> {link}"
        );
        let mut h = [0u8; 512];
        h[..path.len()].copy_from_slice(path.as_bytes());
        octal(&mut h[100..108], u64::from(mode)); // mode
        octal(&mut h[108..116], 0); // uid
        octal(&mut h[116..124], 0); // gid
        octal(&mut h[124..136], data.len() as u64); // size
        octal(&mut h[136..148], 0); // mtime
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        // The checksum counts its own field as spaces.
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        self.0.extend_from_slice(&h);
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.resize(self.0.len() + pad, 0);
    }

    /// The archive with its end: two zero blocks.
    fn finish(mut self) -> Vec<u8> {
        self.0.resize(self.0.len() + 1024, 0);
        self.0
    }
}

/// `value` in octal, zero-padded, NUL-terminated, filling `field`.
fn octal(field: &mut [u8], value: u64) {
    let s = format!("{value:0width$o}\0", width = field.len() - 1);
    assert_eq!(s.len(), field.len(), "{value} does not fit a tar field");
    field.copy_from_slice(s.as_bytes());
}

/// Starts containerd on `config`, its output appended to `log`, in the
/// [`Burrow`]'s network namespace, with the shim first on its PATH.
fn spawn(binary: &Path, burrow: &Burrow, config: &Path, log: &Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("containerd.log");
    let path = format!(
        "{}:{}",
        burrow.bin().display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    let mut cmd = Command::new(binary);
    cmd.arg("--config")
        .arg(config)
        .arg("--log-level")
        .arg(std::env::var("BURROW_CONTAINERD_LOG_LEVEL").unwrap_or_else(|_| "info".into()))
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log fd"))
        .stderr(out);
    for (k, v) in burrow.daemon_env() {
        cmd.env(k, v);
    }
    // Into the test's network namespace (CRI's streaming server listens on
    // TCP) by setns, as the Dockerd harness does and for its reason: `ip
    // netns exec` also mounts a fresh /sys, hiding the cgroup hierarchies.
    let netns_file = burrow.netns.as_ref().map(|ns| ns.enter_on_spawn(&mut cmd));
    let child = cmd.spawn().expect("start containerd");
    drop(netns_file);
    child
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_are_completed_as_containerd_stores_them() {
        assert_eq!(full_image_name("bb"), "docker.io/library/bb:latest");
        assert_eq!(full_image_name("bb:1"), "docker.io/library/bb:1");
        assert_eq!(
            full_image_name("docker.io/library/burrow-test:latest"),
            "docker.io/library/burrow-test:latest"
        );
        assert_eq!(
            full_image_name("localhost:5000/x"),
            "localhost:5000/x:latest"
        );
    }

    #[test]
    fn tar_headers_are_ustar_with_a_valid_checksum() {
        let mut t = Tar::default();
        t.file("a", 0o644, b"hello");
        let out = t.finish();
        assert_eq!(out.len(), 512 + 512 + 1024);
        let h = &out[..512];
        assert_eq!(&h[257..263], b"ustar\0");
        let stored = u32::from_str_radix(text(&h[148..154]).trim(), 8).expect("octal");
        let sum: u32 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(b)
                }
            })
            .sum();
        assert_eq!(stored, sum);
        assert_eq!(&out[512..517], b"hello");
    }
}
