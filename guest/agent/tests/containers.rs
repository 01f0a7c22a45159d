//! OCI containers, driven against the real `burrow-agent` binary on a Unix socket
//! (`--no-init --listen unix:PATH --containers-dir D --oci-root R`), with bundles
//! made from the host's static busybox and `runc spec`. Root only: containers need
//! namespaces, mounts and cgroups. One agent serves every assertion.
//!
//! The agent's libcontainer is built for cgroup v2 (as the guest mounts it). A host
//! with the hybrid layout (v1 at /sys/fs/cgroup, v2 at /sys/fs/cgroup/unified) runs
//! the agent in a mount namespace of its own where the v2 hierarchy is bind-mounted
//! on /sys/fs/cgroup.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use burrow_proto::{
    read_message, write_message, AgentError, ContainerAttach, ContainerCreate, ContainerExec,
    ContainerOp, ContainerStatus, ContainerStatusKind, ErrorKind, ExitInfo, GuestFrame, Hello,
    HelloReply, HostFrame, Op, Reply, Request, Response, StreamControl, StreamEvent, StreamOpen,
    WinSize, PROTOCOL_VERSION,
};
use serde_json::{json, Value};
use tokio::net::UnixStream;

struct AgentProcess {
    child: Child,
    sock: PathBuf,
    dir: tempfile::TempDir,
    /// The v2 hierarchy as this test sees it.
    cgroup_root: PathBuf,
}

impl AgentProcess {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("a.sock");
        let containers = dir.path().join("containers");
        let oci = dir.path().join("oci");
        fs::create_dir_all(&containers).expect("containers dir");
        let log = fs::File::create(dir.path().join("agent.log")).expect("log file");
        // BURROW_TEST_AGENT runs these against another build (the static one the
        // container VMs boot).
        let agent = std::env::var("BURROW_TEST_AGENT")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_burrow-agent").to_string());
        let args = format!(
            "--no-init --listen unix:{} --containers-dir {} --oci-root {}",
            sock.display(),
            containers.display(),
            oci.display()
        );
        let (mut cmd, cgroup_root) = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            let mut c = Command::new(agent);
            c.args(args.split(' '));
            (c, PathBuf::from("/sys/fs/cgroup"))
        } else {
            let unified = Path::new("/sys/fs/cgroup/unified");
            assert!(
                unified.join("cgroup.controllers").exists(),
                "no cgroup v2 hierarchy on this host"
            );
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(format!(
                    "mount --bind {} /sys/fs/cgroup && exec {agent} {args}",
                    unified.display()
                ));
            (c, unified.to_path_buf())
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn burrow-agent");
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line);
        }
        let agent = AgentProcess {
            child,
            sock,
            dir,
            cgroup_root,
        };
        assert_eq!(line.trim(), "ready", "agent not ready: {}", agent.log());
        agent
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn containers(&self) -> PathBuf {
        self.dir.path().join("containers")
    }

    fn oci_root(&self) -> PathBuf {
        self.dir.path().join("oci")
    }

    async fn connect(&self) -> UnixStream {
        let mut stream = UnixStream::connect(&self.sock).await.expect("connect");
        write_message(
            &mut stream,
            &Hello {
                version: PROTOCOL_VERSION,
                client: "containers-test".into(),
            },
        )
        .await
        .expect("hello");
        let reply: HelloReply = read_message(&mut stream).await.expect("hello reply");
        assert_eq!(reply.error, None);
        stream
    }

    async fn call(&self, op: Op) -> Result<Reply, AgentError> {
        let mut s = self.connect().await;
        write_message(&mut s, &Request { id: 1, op })
            .await
            .expect("send");
        let resp: Response = read_message(&mut s).await.expect("response");
        resp.outcome.into()
    }

    async fn op(&self, op: ContainerOp) -> Result<ContainerStatus, AgentError> {
        match self.call(Op::Container(op)).await? {
            Reply::Container(s) => Ok(s),
            other => panic!("unexpected {other:?}"),
        }
    }

    async fn ok(&self, op: ContainerOp) -> ContainerStatus {
        let what = format!("{op:?}");
        self.op(op)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}\nagent log:\n{}", self.log()))
    }

    async fn err(&self, op: ContainerOp) -> AgentError {
        match self.op(op).await {
            Ok(s) => panic!("unexpected success {s:?}"),
            Err(e) => e,
        }
    }

    async fn state(&self, id: &str) -> ContainerStatus {
        self.ok(ContainerOp::State { id: id.into() }).await
    }

    async fn stream(&self, open: StreamOpen) -> Result<(UnixStream, Option<i32>), AgentError> {
        self.stream_with_input(open)
            .await
            .map(|(s, pid, _)| (s, pid))
    }

    /// Opens a stream; returns the connection, the pid and the input token.
    async fn stream_with_input(
        &self,
        open: StreamOpen,
    ) -> Result<(UnixStream, Option<i32>, Option<u64>), AgentError> {
        let mut s = self.connect().await;
        write_message(
            &mut s,
            &Request {
                id: 7,
                op: Op::Stream(open),
            },
        )
        .await
        .expect("send");
        let resp: Response = read_message(&mut s).await.expect("response");
        match Result::<Reply, AgentError>::from(resp.outcome)? {
            Reply::StreamStarted { pid, input } => Ok((s, pid, input)),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Writes a bundle for `id` (config from `runc spec`, then `edit`) and opens its
    /// creation stream.
    async fn create(
        &self,
        id: &str,
        edit: impl FnOnce(&mut Value),
        stdin: bool,
    ) -> (UnixStream, i32) {
        self.bundle(id, edit);
        let (s, pid) = self
            .stream(StreamOpen::ContainerCreate(ContainerCreate {
                id: id.into(),
                stdin,
                size: Some(WinSize { rows: 24, cols: 80 }),
                durable: false,
            }))
            .await
            .unwrap_or_else(|e| panic!("create {id}: {e}\nagent log:\n{}", self.log()));
        (s, pid.expect("create answers the container's pid"))
    }

    fn bundle(&self, id: &str, edit: impl FnOnce(&mut Value)) {
        let dir = self.containers().join(id);
        fs::create_dir_all(&dir).expect("bundle dir");
        let mut spec = runc_spec(self.dir.path());
        spec["root"]["path"] = json!(rootfs(self.dir.path()));
        spec["process"]["terminal"] = json!(false);
        spec["linux"]["cgroupsPath"] = json!(self.cgroup_name(id));
        edit(&mut spec);
        fs::write(dir.join("config.json"), spec.to_string()).expect("config.json");
    }

    fn cgroup_name(&self, id: &str) -> String {
        format!("/burrow-test-{}-{id}", std::process::id())
    }

    fn cgroup(&self, id: &str) -> PathBuf {
        self.cgroup_root
            .join(self.cgroup_name(id).trim_start_matches('/'))
    }

    /// Asserts that nothing of `id` is left: no state dir, no cgroup.
    fn assert_gone(&self, id: &str) {
        assert!(
            !self.oci_root().join(id).exists(),
            "state dir of {id} left behind"
        );
        assert!(!self.cgroup(id).exists(), "cgroup of {id} left behind");
    }
}

impl AgentProcess {
    /// Shuts the agent down as a developer would (SIGTERM) and waits for it.
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill has no memory effects; the pid is our unreaped child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `runc spec`'s default config (made once per test run).
fn runc_spec(dir: &Path) -> Value {
    let path = dir.join("runc-spec");
    if !path.join("config.json").exists() {
        fs::create_dir_all(&path).expect("spec dir");
        let st = Command::new("runc")
            .arg("spec")
            .current_dir(&path)
            .status()
            .expect("runc spec");
        assert!(st.success(), "runc spec failed");
    }
    serde_json::from_slice(&fs::read(path.join("config.json")).expect("read spec"))
        .expect("spec json")
}

/// A root file system of the host's static busybox and its applets.
fn rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    if root.exists() {
        return root;
    }
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        fs::create_dir_all(root.join(d)).expect("rootfs dir");
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy busybox");
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    root
}

fn args(spec: &mut Value, argv: &[&str]) {
    spec["process"]["args"] = json!(argv);
}

/// Removes the pid namespace: the process is then not an init, so SIGTERM kills it.
fn no_pid_ns(spec: &mut Value) {
    if let Some(ns) = spec["linux"]["namespaces"].as_array_mut() {
        ns.retain(|n| n["type"] != "pid");
    }
}

#[derive(Default, Debug)]
struct Collected {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<ExitInfo>,
}

async fn frame(s: &mut UnixStream) -> GuestFrame {
    tokio::time::timeout(Duration::from_secs(60), GuestFrame::read(s))
        .await
        .expect("a stream frame within 60 s")
        .expect("stream frame")
}

async fn collect(s: &mut UnixStream) -> Collected {
    let mut c = Collected::default();
    loop {
        match frame(s).await {
            GuestFrame::Stdout(d) => c.stdout.extend(d),
            GuestFrame::Stderr(d) => c.stderr.extend(d),
            GuestFrame::Record { data, .. } => c.stdout.extend(data),
            GuestFrame::Event(StreamEvent::Exit(e)) => {
                c.exit = Some(e);
                return c;
            }
            GuestFrame::Event(e) => panic!("unexpected event {e:?}"),
        }
    }
}

async fn read_until(s: &mut UnixStream, needle: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while !out.windows(needle.len()).any(|w| w == needle) {
        match frame(s).await {
            GuestFrame::Stdout(d) | GuestFrame::Stderr(d) => out.extend(d),
            other => panic!(
                "{other:?} before {:?} in {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&out)
            ),
        }
    }
    out
}

async fn send(s: &mut UnixStream, f: HostFrame) {
    f.write(s).await.expect("send frame");
}

fn exit(code: i32, signal: Option<i32>) -> Option<ExitInfo> {
    Some(ExitInfo {
        exit_code: code,
        signal,
        timed_out: false,
        oom_killed: false,
    })
}

/// Waits, bounded, for `pid` to exit, on a pidfd (readable once it has).
async fn wait_gone(pid: i32) {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return; // already gone (and reaped)
    }
    // SAFETY: a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the fd is owned by the AsyncFd from here on and closed with it.
    let fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }.expect("pidfd");
    let exited = tokio::time::timeout(Duration::from_secs(20), fd.readable()).await;
    assert!(exited.is_ok(), "pid {pid} still alive");
}

fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn process(argv: &[&str], terminal: bool) -> Value {
    json!({
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": argv,
        "env": ["PATH=/bin", "TERM=xterm"],
        "cwd": "/",
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no side effects.
    unsafe { libc::geteuid() == 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_from_create_to_delete() {
    if !is_root() {
        eprintln!("skipped: containers need root (namespaces, mounts, cgroups)");
        return;
    }
    let mut agent = AgentProcess::start();

    // create → created with its pid → start → output, exit 3 → stopped → delete.
    let (mut s, pid) = agent
        .create(
            "c1",
            |sp| args(sp, &["sh", "-c", "echo out; echo err >&2; exit 3"]),
            false,
        )
        .await;
    let st = agent.state("c1").await;
    assert_eq!(st.status, ContainerStatusKind::Created);
    assert_eq!(st.pid, Some(pid));
    assert!(alive(pid), "the created process waits for start");
    assert!(agent.cgroup("c1").exists(), "cgroup under cgroupsPath");
    // Bad input on a created container.
    let e = agent
        .err(ContainerOp::Kill {
            id: "c1".into(),
            signal: 0,
            all: false,
        })
        .await;
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.starts_with("signal:"), "{e}");
    let e = agent
        .err(ContainerOp::Kill {
            id: "c1".into(),
            signal: 99,
            all: false,
        })
        .await;
    assert!(e.message.starts_with("signal:"), "{e}");
    let e = agent.err(ContainerOp::Pause { id: "c1".into() }).await;
    assert!(e.message.starts_with("id:"), "{e}");
    // A program this short may be over before the answer.
    let started = agent
        .ok(ContainerOp::Start { id: "c1".into() })
        .await
        .status;
    assert!(
        matches!(
            started,
            ContainerStatusKind::Running | ContainerStatusKind::Stopped
        ),
        "{started:?}"
    );
    let c = collect(&mut s).await;
    assert_eq!(c.stdout, b"out\n");
    assert_eq!(c.stderr, b"err\n");
    assert_eq!(c.exit, exit(3, None));
    let e = agent
        .err(ContainerOp::Kill {
            id: "c1".into(),
            signal: libc::SIGTERM,
            all: false,
        })
        .await;
    assert!(e.message.contains("stopped"), "{e}");
    agent
        .ok(ContainerOp::Kill {
            id: "c1".into(),
            signal: libc::SIGKILL,
            all: true,
        })
        .await;
    // Its helper reaped it before reporting the exit.
    assert!(!alive(pid), "container process {pid} outlived its exit");
    let st = agent.state("c1").await;
    assert_eq!(st.status, ContainerStatusKind::Stopped);
    assert_eq!(st.exit, exit(3, None));
    let e = agent.err(ContainerOp::Start { id: "c1".into() }).await;
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.starts_with("id:"), "{e}");
    let e = agent
        .stream(StreamOpen::ContainerExec(ContainerExec {
            id: "c1".into(),
            process: process(&["true"], false),
            stdin: false,
            size: None,
            exec_id: None,
        }))
        .await
        .expect_err("exec into a stopped container");
    assert!(
        e.message.starts_with("id:") && e.message.contains("stopped"),
        "{e}"
    );
    let st = agent
        .ok(ContainerOp::Delete {
            id: "c1".into(),
            force: false,
        })
        .await;
    assert_eq!(st.status, ContainerStatusKind::Stopped);
    assert_eq!(
        agent.err(ContainerOp::State { id: "c1".into() }).await.kind,
        ErrorKind::NotFound
    );
    agent.assert_gone("c1");

    // env, user 1000, cwd.
    let (mut s, _) = agent
        .create(
            "c2",
            |sp| {
                args(
                    sp,
                    &[
                        "sh",
                        "-c",
                        "echo $A; id -u; id -g; pwd; hostname; \
                         grep NoNewPrivs /proc/self/status",
                    ],
                );
                sp["process"]["env"] = json!(["PATH=/bin", "A=1"]);
                sp["process"]["user"] = json!({"uid": 1000, "gid": 1000});
                sp["process"]["cwd"] = json!("/tmp");
            },
            false,
        )
        .await;
    agent.ok(ContainerOp::Start { id: "c2".into() }).await;
    let c = collect(&mut s).await;
    // As the spec says: env, user, cwd, host name (runc spec's "runc"),
    // no_new_privileges.
    assert_eq!(
        String::from_utf8_lossy(&c.stdout),
        "1\n1000\n1000\n/tmp\nrunc\nNoNewPrivs:\t1\n"
    );
    assert_eq!(c.exit, exit(0, None));
    agent
        .ok(ContainerOp::Delete {
            id: "c2".into(),
            force: false,
        })
        .await;
    agent.assert_gone("c2");

    // Standard input through the input connection (as the host sends it); its
    // end is the end of input.
    agent.bundle("c3", |sp| args(sp, &["cat"]));
    let (mut s, _, token) = agent
        .stream_with_input(StreamOpen::ContainerCreate(ContainerCreate {
            id: "c3".into(),
            stdin: true,
            size: None,
            durable: false,
        }))
        .await
        .expect("create c3");
    let (mut input, _, _) = agent
        .stream_with_input(StreamOpen::Input {
            token: token.expect("an input token"),
        })
        .await
        .expect("input connection");
    agent.ok(ContainerOp::Start { id: "c3".into() }).await;
    send(&mut input, HostFrame::Stdin(b"hello\n".to_vec())).await;
    assert_eq!(read_until(&mut s, b"hello\n").await, b"hello\n");
    send(&mut input, HostFrame::Stdin(b"world\n".to_vec())).await;
    drop(input);
    let c = collect(&mut s).await;
    assert_eq!(c.stdout, b"world\n");
    assert_eq!(c.exit, exit(0, None));
    agent
        .ok(ContainerOp::Delete {
            id: "c3".into(),
            force: false,
        })
        .await;

    // A terminal: the process's tty, the size given, then a resize.
    let (mut s, _) = agent
        .create(
            "c4",
            |sp| {
                args(sp, &["sh"]);
                sp["process"]["terminal"] = json!(true);
            },
            true,
        )
        .await;
    agent.ok(ContainerOp::Start { id: "c4".into() }).await;
    send(&mut s, HostFrame::Stdin(b"tty; stty size\r".to_vec())).await;
    let out = read_until(&mut s, b"24 80").await;
    assert!(
        String::from_utf8_lossy(&out).contains("/dev/pts/"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    send(
        &mut s,
        HostFrame::Control(StreamControl::Resize(WinSize {
            rows: 30,
            cols: 100,
        })),
    )
    .await;
    send(&mut s, HostFrame::Stdin(b"stty size\r".to_vec())).await;
    read_until(&mut s, b"30 100").await;
    send(&mut s, HostFrame::Stdin(b"exit 5\r".to_vec())).await;
    let c = collect(&mut s).await;
    assert_eq!(c.exit, exit(5, None));
    agent
        .ok(ContainerOp::Delete {
            id: "c4".into(),
            force: false,
        })
        .await;
    agent.assert_gone("c4");

    // A long-running container: ps, exec (pipes, tty), pause/resume, update, SIGTERM.
    let (mut s5, pid5) = agent
        .create(
            "c5",
            |sp| {
                no_pid_ns(sp);
                args(sp, &["sleep", "1000"]);
            },
            false,
        )
        .await;
    agent.ok(ContainerOp::Start { id: "c5".into() }).await;
    match agent
        .call(Op::Container(ContainerOp::Ps { id: "c5".into() }))
        .await
    {
        Ok(Reply::Pids { pids }) => assert!(pids.contains(&pid5), "{pids:?} lacks {pid5}"),
        other => panic!("ps: {other:?}"),
    }
    let (mut e, epid) = agent
        .stream(StreamOpen::ContainerExec(ContainerExec {
            id: "c5".into(),
            // As root, yet the spec's root is read-only.
            process: process(
                &[
                    "sh",
                    "-c",
                    "echo exec; touch /x 2>/dev/null || echo ro; echo oops >&2; exit 4",
                ],
                false,
            ),
            stdin: false,
            size: None,
            exec_id: None,
        }))
        .await
        .unwrap_or_else(|e| panic!("exec: {e}\n{}", agent.log()));
    assert!(epid.is_some());
    let c = collect(&mut e).await;
    assert_eq!(c.stdout, b"exec\nro\n");
    assert_eq!(c.stderr, b"oops\n");
    assert_eq!(c.exit, exit(4, None));
    let (mut e, _) = agent
        .stream(StreamOpen::ContainerExec(ContainerExec {
            id: "c5".into(),
            process: process(&["tty"], true),
            stdin: false,
            size: Some(WinSize { rows: 24, cols: 80 }),
            exec_id: None,
        }))
        .await
        .unwrap_or_else(|e| panic!("tty exec: {e}\n{}", agent.log()));
    let c = collect(&mut e).await;
    assert!(
        String::from_utf8_lossy(&c.stdout).contains("/dev/pts/"),
        "{:?}",
        String::from_utf8_lossy(&c.stdout)
    );
    assert_eq!(c.exit, exit(0, None));
    let e = agent
        .stream(StreamOpen::ContainerExec(ContainerExec {
            id: "c5".into(),
            process: json!({"args": 5}),
            stdin: false,
            size: None,
            exec_id: None,
        }))
        .await
        .expect_err("malformed process");
    assert!(e.message.starts_with("process:"), "{e}");
    let events = agent.cgroup("c5").join("cgroup.events");
    assert_eq!(
        agent
            .ok(ContainerOp::Pause { id: "c5".into() })
            .await
            .status,
        ContainerStatusKind::Paused
    );
    assert!(
        fs::read_to_string(&events)
            .expect("cgroup.events")
            .contains("frozen 1"),
        "paused container not frozen"
    );
    assert_eq!(agent.state("c5").await.status, ContainerStatusKind::Paused);
    assert_eq!(
        agent
            .ok(ContainerOp::Resume { id: "c5".into() })
            .await
            .status,
        ContainerStatusKind::Running
    );
    assert!(fs::read_to_string(&events)
        .expect("cgroup.events")
        .contains("frozen 0"));
    agent
        .ok(ContainerOp::Update {
            id: "c5".into(),
            resources: json!({}),
        })
        .await;
    let e = agent
        .err(ContainerOp::Update {
            id: "c5".into(),
            resources: json!([1]),
        })
        .await;
    assert!(e.message.starts_with("resources:"), "{e}");
    let e = agent
        .err(ContainerOp::Update {
            id: "c5".into(),
            resources: json!({"pids": {"limit": "many"}}),
        })
        .await;
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.starts_with("resources:"), "{e}");
    let e = agent
        .err(ContainerOp::Delete {
            id: "c5".into(),
            force: false,
        })
        .await;
    assert!(e.message.contains("running"), "{e}");
    agent
        .ok(ContainerOp::Kill {
            id: "c5".into(),
            signal: libc::SIGTERM,
            all: false,
        })
        .await;
    let c = collect(&mut s5).await;
    assert_eq!(c.exit, exit(143, Some(libc::SIGTERM)));
    assert!(!alive(pid5));
    agent
        .ok(ContainerOp::Delete {
            id: "c5".into(),
            force: false,
        })
        .await;
    agent.assert_gone("c5");

    // SIGKILL, and delete --force of a running container.
    let (mut s6, _) = agent
        .create("c6", |sp| args(sp, &["sleep", "1000"]), false)
        .await;
    agent.ok(ContainerOp::Start { id: "c6".into() }).await;
    agent
        .ok(ContainerOp::Kill {
            id: "c6".into(),
            signal: libc::SIGKILL,
            all: true,
        })
        .await;
    assert_eq!(collect(&mut s6).await.exit, exit(137, Some(libc::SIGKILL)));
    agent
        .ok(ContainerOp::Delete {
            id: "c6".into(),
            force: false,
        })
        .await;
    let (mut s7, pid7) = agent
        .create("c7", |sp| args(sp, &["sleep", "1000"]), false)
        .await;
    agent.ok(ContainerOp::Start { id: "c7".into() }).await;
    let st = agent
        .ok(ContainerOp::Delete {
            id: "c7".into(),
            force: true,
        })
        .await;
    assert_eq!(st.status, ContainerStatusKind::Stopped);
    assert_eq!(st.exit, exit(137, Some(libc::SIGKILL)));
    assert_eq!(collect(&mut s7).await.exit, exit(137, Some(libc::SIGKILL)));
    wait_gone(pid7).await;
    agent.assert_gone("c6");
    agent.assert_gone("c7");

    // A creation stream whose host goes away takes its container with it.
    let (s8, pid8) = agent
        .create("c8", |sp| args(sp, &["sleep", "1000"]), false)
        .await;
    agent.ok(ContainerOp::Start { id: "c8".into() }).await;
    drop(s8);
    wait_gone(pid8).await;
    agent
        .ok(ContainerOp::Delete {
            id: "c8".into(),
            force: true,
        })
        .await;
    agent.assert_gone("c8");

    // Bad input: one line naming the field, nothing left behind.
    let (_s9, _) = agent.create("c9", |sp| args(sp, &["true"]), false).await;
    agent.bundle("c9", |sp| args(sp, &["true"]));
    let e = agent
        .stream(StreamOpen::ContainerCreate(ContainerCreate {
            id: "c9".into(),
            stdin: false,
            size: None,
            durable: false,
        }))
        .await
        .expect_err("create of an existing id");
    assert_eq!(e.kind, ErrorKind::AlreadyExists, "{e}");
    assert!(e.message.starts_with("id:"), "{e}");
    agent
        .ok(ContainerOp::Delete {
            id: "c9".into(),
            force: false,
        })
        .await;
    agent.assert_gone("c9");
    for bad in ["../x", "-x", ""] {
        let e = agent
            .stream(StreamOpen::ContainerCreate(ContainerCreate {
                id: bad.into(),
                stdin: false,
                size: None,
                durable: false,
            }))
            .await
            .expect_err("bad id");
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.starts_with("id:"), "{e}");
        let e = agent.err(ContainerOp::State { id: bad.into() }).await;
        assert!(e.message.starts_with("id:"), "{e}");
    }
    let e = agent.err(ContainerOp::Start { id: "nope".into() }).await;
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.starts_with("id:"), "{e}");
    fs::create_dir_all(agent.containers().join("c10")).expect("dir");
    fs::write(agent.containers().join("c10/config.json"), "{not json").expect("write");
    let e = agent
        .stream(StreamOpen::ContainerCreate(ContainerCreate {
            id: "c10".into(),
            stdin: false,
            size: None,
            durable: false,
        }))
        .await
        .expect_err("malformed config.json");
    assert!(e.message.starts_with("config.json:"), "{e}");
    agent.assert_gone("c10");
    let e = agent
        .stream(StreamOpen::ContainerCreate(ContainerCreate {
            id: "c11".into(),
            stdin: false,
            size: None,
            durable: false,
        }))
        .await
        .expect_err("no bundle");
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    assert!(e.message.starts_with("config.json:"), "{e}");
    // A create libcontainer refuses late (a missing program): nothing stays.
    agent.bundle("c12", |sp| args(sp, &["/nope"]));
    let e = agent
        .stream(StreamOpen::ContainerCreate(ContainerCreate {
            id: "c12".into(),
            stdin: false,
            size: None,
            durable: false,
        }))
        .await
        .expect_err("missing program");
    assert!(!e.message.is_empty());
    agent.assert_gone("c12");
    assert_eq!(
        agent
            .err(ContainerOp::State { id: "c12".into() })
            .await
            .kind,
        ErrorKind::NotFound
    );

    // Nothing of ours is left: no helper or container process, no state dirs, no
    // console sockets or process files.
    let children: String = fs::read_dir(format!("/proc/{}/task", agent.child.id()))
        .expect("agent tasks")
        .filter_map(|t| t.ok())
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .collect();
    assert_eq!(children.trim(), "", "the agent still has children");
    for sub in ["", ".console", ".exec"] {
        let dir = agent.oci_root().join(sub);
        let left: Vec<_> = fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "{} holds {left:?}", dir.display());
    }

    // An agent shut down with a container alive takes it down: process, cgroup,
    // state dir.
    let (_s13, pid13) = agent
        .create("c13", |sp| args(sp, &["sleep", "1000"]), false)
        .await;
    agent.ok(ContainerOp::Start { id: "c13".into() }).await;
    let cgroup13 = agent.cgroup("c13");
    let state13 = agent.oci_root().join("c13");
    assert!(cgroup13.exists() && state13.exists());
    agent.stop();
    wait_gone(pid13).await;
    assert!(!cgroup13.exists(), "cgroup left after shutdown");
    assert!(!state13.exists(), "state dir left after shutdown");
}

/// Opens the durable stream `(id, exec)` again: the connection, the pid and a
/// new input token.
async fn attach(
    agent: &AgentProcess,
    id: &str,
    exec: &str,
) -> Result<(UnixStream, Option<i32>, Option<u64>), AgentError> {
    agent
        .stream_with_input(StreamOpen::ContainerAttach(ContainerAttach {
            id: id.into(),
            exec: exec.into(),
        }))
        .await
}

async fn input(agent: &AgentProcess, token: Option<u64>) -> UnixStream {
    let token = token.expect("an input token");
    let (s, _, _) = agent
        .stream_with_input(StreamOpen::Input { token })
        .await
        .expect("input connection");
    s
}

/// A durable stream's connections break (as when burrowd restarts): the
/// process goes on, what it wrote meanwhile and its exit come on the next
/// attachment, input keeps flowing, and only `close_stdin` ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_streams_outlive_their_connections() {
    if !is_root() {
        eprintln!("skipped: containers need root (namespaces, mounts, cgroups)");
        return;
    }
    let agent = AgentProcess::start();
    agent.bundle("d1", |sp| args(sp, &["cat"]));
    let (s, pid, token) = agent
        .stream_with_input(StreamOpen::ContainerCreate(ContainerCreate {
            id: "d1".into(),
            stdin: true,
            size: None,
            durable: true,
        }))
        .await
        .unwrap_or_else(|e| panic!("create d1: {e}\n{}", agent.log()));
    let pid = pid.expect("a pid");
    let mut s = s;
    let mut inp = input(&agent, token).await;
    agent.ok(ContainerOp::Start { id: "d1".into() }).await;
    send(&mut inp, HostFrame::Stdin(b"one\n".to_vec())).await;
    assert_eq!(read_until(&mut s, b"one\n").await, b"one\n");

    // Both connections break without a word; input sent on the old input
    // connection after the stream connection broke is still the process's, and
    // its echo waits for the next attachment.
    drop(s);
    send(&mut inp, HostFrame::Stdin(b"two\n".to_vec())).await;
    drop(inp);
    let (mut s, again, token) = attach(&agent, "d1", "")
        .await
        .unwrap_or_else(|e| panic!("attach d1: {e}\n{}", agent.log()));
    assert_eq!(again, Some(pid), "the same process");
    assert_eq!(read_until(&mut s, b"two\n").await, b"two\n");
    let mut inp = input(&agent, token).await;
    send(&mut inp, HostFrame::Stdin(b"three\n".to_vec())).await;
    assert_eq!(read_until(&mut s, b"three\n").await, b"three\n");

    // Once more, the older connections gone first (as when burrowd died).
    drop((s, inp));
    let (mut newer, _, token) = attach(&agent, "d1", "").await.expect("attach again");
    let mut inp2 = input(&agent, token).await;
    send(&mut inp2, HostFrame::Stdin(b"four\n".to_vec())).await;
    assert_eq!(read_until(&mut newer, b"four\n").await, b"four\n");

    // The end of input is said, not a connection's end: cat exits 0.
    send(&mut inp2, HostFrame::Control(StreamControl::CloseStdin)).await;
    let c = collect(&mut newer).await;
    assert_eq!(c.stdout, b"");
    assert_eq!(c.exit, exit(0, None));
    // An attach after the exit was delivered hears the exit again.
    let (mut late, pid_late, token) = attach(&agent, "d1", "").await.expect("late attach");
    assert_eq!((pid_late, token), (None, None));
    assert_eq!(collect(&mut late).await.exit, exit(0, None));

    // A named exec is durable too; its name is taken while it runs.
    agent.bundle("d2", |sp| args(sp, &["sleep", "1000"]));
    let (_d2, _) = agent
        .stream(StreamOpen::ContainerCreate(ContainerCreate {
            id: "d2".into(),
            stdin: false,
            size: None,
            durable: true,
        }))
        .await
        .expect("create d2");
    agent.ok(ContainerOp::Start { id: "d2".into() }).await;
    let exec = |stdin: bool| {
        StreamOpen::ContainerExec(ContainerExec {
            id: "d2".into(),
            process: process(&["sh", "-c", "echo start; read x; echo got-$x"], false),
            stdin,
            size: None,
            exec_id: Some("e1".into()),
        })
    };
    let (mut e, epid, _) = agent.stream_with_input(exec(true)).await.expect("exec e1");
    assert_eq!(read_until(&mut e, b"start\n").await, b"start\n");
    let dup = agent.stream(exec(false)).await.expect_err("a second e1");
    assert_eq!(dup.kind, ErrorKind::AlreadyExists, "{dup}");
    drop(e);
    let (mut e, again, token) = attach(&agent, "d2", "e1").await.expect("attach e1");
    assert_eq!(again, epid);
    let mut inp = input(&agent, token).await;
    send(&mut inp, HostFrame::Stdin(b"x\n".to_vec())).await;
    let c = collect(&mut e).await;
    assert_eq!(c.stdout, b"got-x\n");
    assert_eq!(c.exit, exit(0, None));

    // A detached exec dies with its container's forced delete.
    let (e, epid, _) = agent
        .stream_with_input(StreamOpen::ContainerExec(ContainerExec {
            id: "d2".into(),
            process: process(&["sleep", "1000"], false),
            stdin: false,
            size: None,
            exec_id: Some("e2".into()),
        }))
        .await
        .expect("exec e2");
    drop(e);
    agent
        .ok(ContainerOp::Delete {
            id: "d2".into(),
            force: true,
        })
        .await;
    wait_gone(epid.expect("exec pid")).await;
    let gone = attach(&agent, "d2", "e2")
        .await
        .expect_err("attach after delete");
    assert_eq!(gone.kind, ErrorKind::NotFound, "{gone}");
    let bad = attach(&agent, "d2", "../x")
        .await
        .expect_err("a bad exec id");
    assert!(bad.message.starts_with("exec: "), "{bad}");
    agent
        .ok(ContainerOp::Delete {
            id: "d1".into(),
            force: false,
        })
        .await;
    agent.assert_gone("d1");
    agent.assert_gone("d2");
}
