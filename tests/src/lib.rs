//! Harness for burrow's integration tests.
//!
//! Each test gets its own state dir (so its own daemon) and drives the real `burrow`
//! binary as a user would. The image cache is shared (`BURROW_CACHE_DIR`, default
//! /var/cache/burrow) so images are built once. Dropping a [`Burrow`] destroys its
//! workspaces, stops its daemon and kills, by pid, anything it left running, so a
//! failing test does not leak VMs into the next one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod containerd;
pub mod cri;
pub mod oci;
pub mod transfer;

/// Skips the test, saying why, when not root: the runtime needs root for now
/// (virtiofsd serving a root file system with its owners, /dev/kvm probing).
#[macro_export]
macro_rules! require_root {
    () => {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: this test boots VMs and needs root");
            return;
        }
    };
}

/// Directory holding the built `burrow`, `burrowd` and `burrow-agent`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BURROW_BIN_DIR") {
        return PathBuf::from(d);
    }
    // target/<profile>/deps/<test binary> → target/<profile>
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    for b in ["burrow", "burrowd"] {
        assert!(
            dir.join(b).exists(),
            "{} missing: build the binaries first (cargo build --workspace --bins)",
            dir.join(b).display()
        );
    }
    dir
}

/// The static agent that goes into the initramfs: `BURROW_AGENT` if set, else the
/// static build of `bin`'s profile (`make agent-debug` builds it), else
/// `bin/burrow-agent` (an installed layout).
pub fn agent_bin(bin: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("BURROW_AGENT") {
        return PathBuf::from(p);
    }
    if let Some(p) = burrow::image::cargo_static_agent(bin) {
        return p;
    }
    let p = bin.join("burrow-agent");
    let profile = bin.file_name().and_then(|p| p.to_str()).unwrap_or("debug");
    let flag = if profile == "release" {
        " --release"
    } else {
        ""
    };
    assert!(
        p.exists() && profile != "debug" && profile != "release",
        "no static agent for {}: build it first (RUSTFLAGS='-C target-feature=+crt-static' \
         cargo build -p burrow-agent --target {}{flag})",
        bin.display(),
        burrow::image::AGENT_TARGET
    );
    p
}

/// Process names (as /proc/PID/comm shows them) of a VM's processes.
const VM_COMMANDS: &[&str] = &[
    "qemu-system-x86",
    "virtiofsd",
    "vhost-device-vs",
    "burrow-console",
];

/// A Python TCP server on port 8000 that sends `greeting` and closes each
/// connection; it prints `up` once it listens.
pub fn guest_tcp_server(greeting: &str) -> String {
    format!(
        "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', 8000)); s.listen(); print('up', flush=True)\n\
         while True:\n  c=s.accept()[0]; c.sendall(b'{greeting}'); c.close()"
    )
}

pub struct Burrow {
    _tmp: tempfile::TempDir,
    /// The instance's own network namespace: its burrow-netd works in it, so no
    /// test touches the host's network (or another test's).
    pub netns: Option<Netns>,
    pub state: PathBuf,
    bin: PathBuf,
    /// Extra environment for every command (and so for the daemon it starts).
    env: Vec<(String, String)>,
}

impl Default for Burrow {
    fn default() -> Self {
        Self::new()
    }
}

impl Burrow {
    pub fn new() -> Burrow {
        // Short paths under /tmp: Unix socket paths are limited to 108 bytes.
        let tmp = tempfile::Builder::new()
            .prefix("bt")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let state = tmp.path().join("s");
        // Named after the temp dir, which is unique among concurrent tests.
        let netns = tmp
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| Netns::new(&n.replace('.', "")));
        let env = netns
            .iter()
            .map(|n| ("BURROW_NETNS".to_string(), n.0.clone()))
            .collect();
        Burrow {
            state,
            _tmp: tmp,
            netns,
            bin: bin_dir(),
            env,
        }
    }

    /// Sets an environment variable for every command of this instance.
    pub fn with_env(mut self, key: &str, value: &str) -> Burrow {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(self.bin.join("burrow"));
        c.arg("--state-dir").arg(&self.state);
        c.env_remove("BURROW_STATE_DIR");
        c.env("BURROWD", self.bin.join("burrowd"));
        c.env("BURROW_AGENT", agent_bin(&self.bin));
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with_stdin(args, b"")
    }

    pub fn run_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = self
            .command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn burrow");
        let mut stdin = child.stdin.take().expect("stdin");
        // Fed from a thread while the output is read: a command streams its
        // input and output at once. It may stop reading early (a refused
        // write): a broken pipe is its answer, not the test's failure.
        let input = input.to_vec();
        let feeder = std::thread::spawn(move || match stdin.write_all(&input) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("write stdin: {e}"),
            _ => {}
        });
        let out = child.wait_with_output().expect("wait burrow");
        feeder.join().expect("stdin feeder");
        out
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "burrow {args:?} failed ({}): {}",
            out.status,
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Runs a command that must fail; returns (exit code, stderr).
    pub fn fails(&self, args: &[&str]) -> (i32, String) {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "burrow {args:?} succeeded unexpectedly: {}",
            text(&out.stdout)
        );
        (out.status.code().unwrap_or(-1), text(&out.stderr))
    }

    /// Starts Python `script` as a job in `ws` and waits for the `up` it prints
    /// once it listens.
    pub fn start_guest_server(&self, ws: &str, script: &str) {
        let job = self
            .ok(&["job", "start", ws, "--", "python3", "-c", script])
            .trim()
            .to_string();
        wait_until("a server to listen", Duration::from_secs(60), || {
            let s = self.json(&["job", "poll", ws, &job, "--json"]);
            assert_eq!(s["running"], true, "the server ended: {s}");
            s["stdout"].as_str().is_some_and(|o| o.contains("up"))
        });
    }

    /// Each command fails with one line on stderr that contains its expected text.
    pub fn assert_refused<'a, A: AsRef<[&'a str]>>(&self, cases: &[(A, &str)]) {
        for (args, want) in cases {
            let args = args.as_ref();
            let (_, err) = self.fails(args);
            assert!(
                err.contains(want),
                "burrow {args:?}: expected {want:?} in {err:?}"
            );
            assert_eq!(
                err.trim().lines().count(),
                1,
                "burrow {args:?}: not one line: {err:?}"
            );
        }
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let s = self.ok(args);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("burrow {args:?}: not JSON ({e}): {s}"))
    }

    pub fn info(&self, ws: &str) -> Value {
        self.json(&["info", ws, "--json"])
    }

    pub fn daemon_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.state.join("burrowd.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Where the state dir's store may keep volumes: `volumes/` (copy store),
    /// `btrfs/store/volumes/` (loop-mounted Btrfs), `store/volumes/` (Btrfs state dir).
    pub fn volume_dirs(&self) -> Vec<PathBuf> {
        [
            "volumes",
            "btrfs/store/volumes",
            "store/volumes",
            "fuse/mnt/volumes",
        ]
        .iter()
        .map(|d| self.state.join(d))
        .collect()
    }

    /// The volumes of this state dir (not the store's own hidden entries).
    pub fn volumes(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .volume_dirs()
            .iter()
            .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        out.sort();
        out
    }

    pub fn run_root(&self) -> PathBuf {
        self.state.join("run")
    }

    /// Pids of VM processes (by name) that name a path in this state dir.
    pub fn vm_processes(&self) -> Vec<i32> {
        let needles: Vec<Vec<u8>> = [self.state.clone()]
            .into_iter()
            .map(|d| {
                let mut n = d.into_os_string().into_encoded_bytes();
                n.push(b'/');
                n
            })
            .collect();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            // The VM's processes only, not the store's helpers (a `cp` preparing the
            // next volume).
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            if !VM_COMMANDS.contains(&comm.trim()) {
                continue;
            }
            if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
                if needles
                    .iter()
                    .any(|n| c.windows(n.len()).any(|w| w == n.as_slice()))
                    && !is_zombie(pid)
                {
                    out.push(pid);
                }
            }
        }
        out
    }

    /// Waits until this daemon lists no VM (the workspaces and container VMs
    /// its callers removed are gone).
    pub fn wait_no_vms(&self, timeout: Duration) {
        wait_until("burrow to have no VMs", timeout, || {
            self.json(&["ls", "--json"])
                .as_array()
                .is_some_and(|a| a.is_empty())
        });
    }

    /// Asserts that nothing of workspace `id` is left: no process, run dir, socket,
    /// volume or logs.
    pub fn assert_gone(&self, id: &str) {
        let run = self.run_root().join(id);
        assert!(!run.exists(), "run dir {} left behind", run.display());
        for dir in self.volume_dirs() {
            let vol = dir.join(id);
            assert!(!vol.exists(), "volume {} left behind", vol.display());
        }
        let logs = self.state.join("logs").join(id);
        assert!(!logs.exists(), "logs {} left behind", logs.display());
        let procs: Vec<i32> = self.vm_processes();
        assert!(procs.is_empty(), "VM processes left running: {procs:?}");
    }
}

impl Drop for Burrow {
    fn drop(&mut self) {
        if self.daemon_pid().is_some() && self.state.join("burrowd.sock").exists() {
            if let Ok(out) = self.command().args(["ls", "--json"]).output() {
                if let Ok(Value::Array(list)) = serde_json::from_slice::<Value>(&out.stdout) {
                    for w in list {
                        if let Some(id) = w["id"].as_str() {
                            let _ = self.command().args(["destroy", id]).output();
                        }
                    }
                }
            }
            let _ = self.command().args(["daemon", "stop"]).output();
        }
        // Whatever is still running was started by this test: end it by pid.
        if let Some(pid) = self.daemon_pid() {
            if cmdline_mentions(pid, &self.state) {
                // SAFETY: kill has no memory effects.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for pid in self.vm_processes() {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // A daemon that stops cleanly stops its FUSE server and unmounts its
        // loop-mounted store; one that a failed test left dead does not. They are
        // this test's: end the server by its pid, detach the mounts.
        for pid_file in ["netd.pid"] {
            if let Some(pid) = std::fs::read_to_string(self.state.join(pid_file))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                if cmdline_mentions(pid, &self.state) {
                    // SAFETY: kill has no memory effects.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let fuse = self.state.join("fuse");
        if let Some(pid) = std::fs::read_to_string(fuse.join("cowfs.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            if cmdline_mentions(pid, &self.state) {
                // SAFETY: kill has no memory effects.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for mnt in [
            fuse.join("mnt"),
            fuse.join("images"),
            fuse.join("layers"),
            self.state.join("btrfs"),
        ] {
            if is_mountpoint(&mnt) {
                if let Ok(c) = std::ffi::CString::new(mnt.into_os_string().into_encoded_bytes()) {
                    // SAFETY: umount2 with a NUL-terminated path.
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
            }
        }
    }
}

/// A network namespace (`ip netns`), deleted on drop.
pub struct Netns(pub String);

impl Netns {
    /// None when namespaces cannot be made (not root).
    pub fn new(name: &str) -> Option<Netns> {
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let ns = ok.then(|| Netns(name.to_string()))?;
        // Loopback up, as in any host's namespace (clients of port forwards use it).
        let _ = Command::new("ip")
            .args(["-n", name, "link", "set", "lo", "up"])
            .status();
        Some(ns)
    }

    /// Makes `cmd` start inside the namespace: setns before exec, not `ip netns
    /// exec`, which also mounts a fresh /sys and hides the cgroup hierarchies a
    /// daemon needs. Keep the returned file open until `cmd` has been spawned.
    pub fn enter_on_spawn(&self, cmd: &mut Command) -> std::fs::File {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(format!("/run/netns/{}", self.0)).expect("netns file");
        let fd = f.as_raw_fd();
        // SAFETY: setns is async-signal-safe; the fd is open in the child.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(cmd, move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        f
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .expect("ip netns exec")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Mount points under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = format!("{}/", dir.display());
    let mut mounts: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    mounts
}

/// Whether `path` is a mount point (field 5 of /proc/self/mountinfo).
pub fn is_mountpoint(path: &Path) -> bool {
    let want = path.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
        info.lines()
            .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
    })
}

pub fn cmdline_mentions(pid: i32, dir: &Path) -> bool {
    let needle = dir.as_os_str().as_encoded_bytes();
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
}

pub fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .unwrap_or(true)
}

pub fn process_exists(pid: i32) -> bool {
    !is_zombie(pid) && Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether process `pid` exits within `timeout`, waiting on a pidfd (readable
/// once it has exited, reaped or not; a child too).
pub fn exits_within(pid: i32, timeout: Duration) -> bool {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return true; // already gone (and reaped)
    }
    // SAFETY: a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd that lives across the call.
    let ready = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
    ready > 0
}

/// Waits until process `pid` has exited, failing the test after `timeout`.
/// `what` names it in the failure.
pub fn wait_exit(what: &str, pid: i32, timeout: Duration) {
    assert!(
        exits_within(pid, timeout),
        "timed out after {timeout:?} waiting for {what} (pid {pid}) to exit"
    );
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Retries `check` until it holds or `timeout` passes; for outcomes the test can only
/// observe from outside (a daemon noticing a dead VM), never as a stand-in for a
/// readiness signal the test could wait on.
pub fn wait_until(what: &str, timeout: Duration, check: impl FnMut() -> bool) {
    wait_until_explained(what, timeout, check, String::new);
}

/// [`wait_until`], whose failure message adds what `explain` says then (the
/// state that was waited on, logs).
pub fn wait_until_explained(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
    explain: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                explain()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last `n` lines of the text file at `path` (empty when it cannot be read).
pub fn tail_of(path: &Path, n: usize) -> String {
    let all = std::fs::read(path).map(|b| text(&b)).unwrap_or_default();
    let lines: Vec<&str> = all.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Kills `pid` with SIGKILL; the test started it (through burrow).
pub fn kill9(pid: i32) {
    // SAFETY: kill has no memory effects.
    let r = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(r, 0, "kill -9 {pid}: {}", std::io::Error::last_os_error());
}

/// The guest kernel release the image cache holds (what `uname -r` must print).
pub fn guest_kernel_release() -> String {
    let cache = std::env::var("BURROW_CACHE_DIR").unwrap_or_else(|_| "/var/cache/burrow".into());
    std::fs::read_to_string(Path::new(&cache).join("kernel/version"))
        .expect("kernel version in the cache")
        .trim()
        .to_string()
}

/// A file of `pid`'s cgroup for `controller`: the unified hierarchy's if
/// /sys/fs/cgroup is one, else the controller's own v1 hierarchy.
pub fn cgroup_file(pid: i32, controller: &str, file: &str) -> PathBuf {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let unified = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    for line in own.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrls, path) = (
            f.next().unwrap_or(""),
            f.next().unwrap_or(""),
            f.next().unwrap_or(""),
        );
        let path = path.trim_start_matches('/');
        if unified && ctrls.is_empty() {
            return Path::new("/sys/fs/cgroup").join(path).join(file);
        }
        if !unified && ctrls.split(',').any(|c| c == controller) {
            return Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(path)
                .join(file);
        }
    }
    panic!("no {controller} cgroup for {pid}: {own}");
}

/// Quotes `s` for a POSIX shell (tmux runs a pane's command through one).
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Burrow {
    /// The shell command line that runs `burrow ARGS` as [`Burrow::command`] does
    /// (same binary, state dir and environment), for a tmux pane.
    pub fn shell_line(&self, args: &[&str]) -> String {
        let mut words = vec!["env".to_string(), "-u".into(), "BURROW_STATE_DIR".into()];
        let mut env = vec![
            ("BURROWD".to_string(), self.bin.join("burrowd")),
            ("BURROW_AGENT".to_string(), agent_bin(&self.bin)),
        ];
        env.extend(self.env.iter().map(|(k, v)| (k.clone(), PathBuf::from(v))));
        for (k, v) in env {
            words.push(shell_quote(&format!("{k}={}", v.display())));
        }
        words.push(shell_quote(&self.bin.join("burrow").to_string_lossy()));
        words.push("--state-dir".into());
        words.push(shell_quote(&self.state.to_string_lossy()));
        words.extend(args.iter().map(|a| shell_quote(a)));
        words.join(" ")
    }

    /// The environment that points a front door (`burrow-runtime`, dockerd's
    /// runtimes) at this instance: its state dir and daemon binaries.
    pub fn daemon_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "BURROW_STATE_DIR".to_string(),
                self.state.display().to_string(),
            ),
            (
                "BURROWD".to_string(),
                self.bin.join("burrowd").display().to_string(),
            ),
            (
                "BURROW_AGENT".to_string(),
                agent_bin(&self.bin).display().to_string(),
            ),
        ];
        env.extend(self.env.iter().cloned());
        env
    }

    /// Directory of the built binaries this instance runs.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Starts `burrow ARGS` with piped standard streams; the caller owns the child.
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        self.command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn burrow")
    }

    /// Pids (as the guest's pgrep prints them) of the guest processes whose command
    /// line matches `pattern` (`pgrep -f`; write it as `[s]leep 1001` so that it does
    /// not match the pgrep itself).
    pub fn guest_pgrep(&self, ws: &str, pattern: &str) -> Vec<String> {
        let out = self.run(&["exec", ws, "--", "pgrep", "-f", pattern]);
        match out.status.code() {
            Some(0) | Some(1) => text(&out.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect(),
            _ => panic!("pgrep in {ws} failed: {}", text(&out.stderr)),
        }
    }
}

/// The lines a child writes, read on a thread of their own as they arrive, each
/// with the moment it arrived.
pub struct LineReader {
    rx: std::sync::mpsc::Receiver<(Instant, String)>,
}

impl LineReader {
    pub fn new(r: impl std::io::Read + Send + 'static) -> LineReader {
        use std::io::BufRead;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(r);
            loop {
                let mut line = Vec::new();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let l = text(&line).trim_end_matches(['\n', '\r']).to_string();
                        if tx.send((Instant::now(), l)).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        LineReader { rx }
    }

    /// The next line with its arrival time; `None` at end of output. Fails the test
    /// after `timeout`.
    pub fn next_timed(&self, what: &str, timeout: Duration) -> Option<(Instant, String)> {
        match self.rx.recv_timeout(timeout) {
            Ok(l) => Some(l),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => None,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("timed out after {timeout:?} waiting for {what}")
            }
        }
    }

    /// The next line; fails the test at end of output or after `timeout`.
    pub fn next(&self, what: &str, timeout: Duration) -> String {
        self.next_timed(what, timeout)
            .unwrap_or_else(|| panic!("output ended while waiting for {what}"))
            .1
    }

    /// Reads lines until one contains `needle`; returns it.
    pub fn until(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self.next(needle, left);
            if l.contains(needle) {
                return l;
            }
        }
    }

    /// Every remaining line, once the writer has closed its end.
    pub fn rest(&self, what: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while let Some((_, l)) =
            self.next_timed(what, deadline.saturating_duration_since(Instant::now()))
        {
            out.push(l);
        }
        out
    }
}

/// Waits for a child to exit and returns its exit code; kills it and fails the
/// test after `timeout`.
pub fn wait_child(what: &str, child: &mut std::process::Child, timeout: Duration) -> i32 {
    if !exits_within(child.id() as i32, timeout) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("timed out after {timeout:?} waiting for {what} to exit");
    }
    child.wait().expect("wait").code().unwrap_or(-1)
}

/// A tmux server of its own (`tmux -S <tmp>/sock`), for driving programs that need
/// a real terminal; its server is killed, by pid, on drop.
pub struct Tmux {
    dir: tempfile::TempDir,
    server: Option<i32>,
}

impl Default for Tmux {
    fn default() -> Self {
        Self::new()
    }
}

impl Tmux {
    pub fn new() -> Tmux {
        let dir = tempfile::Builder::new()
            .prefix("tmux")
            .tempdir_in("/tmp")
            .expect("tempdir");
        // A server that stays when its last session goes, no status line (the
        // window is the pane), panes that stay after their command exits (so its
        // last words can be read), a long history.
        std::fs::write(
            dir.path().join("conf"),
            "set -s exit-empty off\nset -g status off\nset -g remain-on-exit on\nset -g history-limit 50000\n\
             set -g default-terminal screen\nset -g escape-time 0\n",
        )
        .expect("tmux conf");
        Tmux { dir, server: None }
    }

    fn command(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S")
            .arg(self.dir.path().join("sock"))
            .arg("-f")
            .arg(self.dir.path().join("conf"));
        c
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().expect("run tmux");
        assert!(
            out.status.success(),
            "tmux {args:?} failed: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Runs shell command line `cmd` in a new session `name` of `cols`×`rows`.
    /// The pane's shell then waits (reading its terminal) until the session is
    /// killed: tmux 3.3 may lose the last output of a pane whose process has
    /// exited, so a pane never exits by itself.
    pub fn start(&mut self, name: &str, cols: u16, rows: u16, cmd: &str) {
        let cmd = format!("{cmd}\nexec cat >/dev/null");
        self.tmux(&[
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
            &cmd,
        ]);
        // The server outlives its sessions (exit-empty off: a new session must not
        // race a server exiting with the last one); note it for the clean-up.
        self.server = self
            .tmux(&["display-message", "-p", "-t", name, "#{pid}"])
            .trim()
            .parse()
            .ok();
    }

    /// Types `text` literally into the pane.
    pub fn type_text(&self, name: &str, text: &str) {
        self.tmux(&["send-keys", "-t", name, "-l", text]);
    }

    /// Sends tmux key names (`Enter`, `C-c`, `C-]`).
    pub fn send_keys(&self, name: &str, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", name];
        args.extend_from_slice(keys);
        self.tmux(&args);
    }

    /// The pane's screen and history, wrapped lines joined.
    pub fn capture(&self, name: &str) -> String {
        self.tmux(&["capture-pane", "-p", "-J", "-S", "-", "-t", name])
    }

    /// Waits until the pane shows `needle` (a readiness wait on another program's
    /// screen); returns the capture.
    pub fn wait_for(&self, name: &str, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.capture(name);
            if screen.contains(needle) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {needle:?} in tmux {name}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn resize(&self, name: &str, cols: u16, rows: u16) {
        self.tmux(&[
            "resize-window",
            "-t",
            name,
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
        ]);
    }

    pub fn kill_session(&self, name: &str) {
        self.tmux(&["kill-session", "-t", name]);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // Only while it is still this server (its command line names our socket
        // dir): a server that exited with its last session left its pid free.
        if let Some(pid) = self
            .server
            .filter(|&p| cmdline_mentions(p, self.dir.path()))
        {
            // SAFETY: kill has no memory effects; the pid is this server's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Whether `stty -a` output (as a pane shows it) says canonical mode and echo are on.
pub fn stty_cooked(stty: &str) -> bool {
    let words: Vec<&str> = stty
        .split(|c: char| c.is_whitespace() || c == ';')
        .collect();
    words.contains(&"icanon") && words.contains(&"echo")
}
