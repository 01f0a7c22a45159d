//! OCI containers: the agent's side. Every libcontainer call happens in the
//! single-threaded OCI helper ([`crate::oci`]); this module spawns it, reads its
//! reports, keeps each container's status, and carries container processes'
//! standard I/O as exec streams.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burrow_proto::{
    validate_container_id, AgentError, ContainerCreate, ContainerExec, ContainerOp,
    ContainerStatus, ContainerStatusKind, ErrorKind, ExitInfo, Reply, WinSize, CONTAINERS_TAG,
};
use libcontainer::oci_spec::runtime::{Process, Spec};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::pipe;
use tokio::sync::watch;

use crate::jobs::valid_signal;
use crate::oci::STDIO_FDS;
use crate::process::{lock, ExitStatus, ExitWaiter, ProcessTable};
use crate::pty::PtyMaster;
use crate::streams::{AdoptedIo, ExecProc, Inputs, Opened};

/// Where containers live in the guest.
#[derive(Debug, Clone)]
pub struct ContainerPaths {
    /// The shared directory: `<dir>/<id>/config.json` is a container's bundle.
    pub dir: PathBuf,
    /// libcontainer's state root; the agent's console sockets and exec process
    /// files live in its `.console` and `.exec` (ids never start with '.').
    pub oci_root: PathBuf,
    /// Whether to mount the virtio-fs tag [`CONTAINERS_TAG`] on `dir` before the
    /// first container, unless something is mounted there already (the agent as
    /// a VM's init).
    pub mount_shared: bool,
}

/// How long a console socket may take to receive a terminal whose process the
/// helper has already reported (it is sent before that report, so this only
/// bounds a broken helper).
const CONSOLE_WAIT: Duration = Duration::from_secs(10);

/// How long a forced delete waits for the killed process's exit to be reported.
const DELETE_WAIT: Duration = Duration::from_secs(10);

/// A container's status as the agent keeps it. `Creating` reserves the id while
/// the helper builds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl Phase {
    fn kind(self) -> ContainerStatusKind {
        match self {
            Phase::Creating | Phase::Created => ContainerStatusKind::Created,
            Phase::Running => ContainerStatusKind::Running,
            Phase::Paused => ContainerStatusKind::Paused,
            Phase::Stopped => ContainerStatusKind::Stopped,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Phase::Creating => "being created",
            p => p.kind().as_str(),
        }
    }
}

#[derive(Debug, Clone)]
struct Record {
    phase: Phase,
    pid: Option<i32>,
    exit: Option<ExitInfo>,
}

struct Entry {
    id: String,
    record: Mutex<Record>,
    /// Set once the container's process has ended (its exit recorded).
    stopped: watch::Sender<bool>,
    /// Held across each helper run on this container: libcontainer rewrites its
    /// state file in place (truncate, write), so two at once could read a torn one.
    ops: tokio::sync::Mutex<()>,
}

impl Entry {
    fn status(&self) -> ContainerStatus {
        let r = lock(&self.record).clone();
        ContainerStatus {
            id: self.id.clone(),
            status: r.phase.kind(),
            pid: r.pid.filter(|_| r.phase != Phase::Stopped),
            exit: r.exit,
        }
    }

    fn phase(&self) -> Phase {
        lock(&self.record).phase
    }

    /// Moves from `from` to `to`; a container that stopped meanwhile stays stopped.
    fn advance(&self, from: &[Phase], to: Phase) {
        let mut r = lock(&self.record);
        if from.contains(&r.phase) {
            r.phase = to;
        }
    }

    fn stop(&self, exit: ExitInfo) {
        {
            let mut r = lock(&self.record);
            r.phase = Phase::Stopped;
            r.exit = Some(exit);
        }
        self.stopped.send_replace(true);
    }

    fn refuse(&self, what: &str) -> AgentError {
        AgentError::new(
            ErrorKind::InvalidArgument,
            format!(
                "id: container {:?} is {}, cannot {what}",
                self.id,
                self.phase().name()
            ),
        )
    }
}

pub struct Containers {
    paths: ContainerPaths,
    /// Set once the shared directory is known to be mounted.
    shared_ready: std::sync::atomic::AtomicBool,
    table: Mutex<HashMap<String, Arc<Entry>>>,
    next: AtomicU64,
}

/// A running helper: its report lines and its exit.
struct Helper {
    lines: Lines<BufReader<pipe::Receiver>>,
    exit: ExitWaiter,
}

/// One report of the helper.
enum Report {
    Ok(Value),
    Exit(ExitInfo),
}

impl Containers {
    pub fn new(paths: ContainerPaths) -> Self {
        Containers {
            paths,
            shared_ready: std::sync::atomic::AtomicBool::new(false),
            table: Mutex::default(),
            next: AtomicU64::new(0),
        }
    }

    fn get(&self, id: &str) -> Result<Arc<Entry>, AgentError> {
        validate_container_id(id).map_err(|m| AgentError::new(ErrorKind::InvalidArgument, m))?;
        lock(&self.table)
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::new(ErrorKind::NotFound, format!("id: no container {id:?}")))
    }

    fn base_args(&self, verb: &str, id: &str) -> Vec<OsString> {
        vec![
            "oci".into(),
            verb.into(),
            "--root".into(),
            self.paths.oci_root.clone().into(),
            "--id".into(),
            id.into(),
        ]
    }

    /// A file of the agent's own under the state root (`.console`, `.exec`).
    fn private_path(&self, sub: &str, id: &str, ext: &str) -> Result<PathBuf, AgentError> {
        let dir = self.paths.oci_root.join(sub);
        std::fs::create_dir_all(&dir).map_err(|e| AgentError::io(&dir.to_string_lossy(), &e))?;
        let _ = std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700));
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Ok(dir.join(format!("{id}.{n}.{ext}")))
    }

    /// Serves a request on an existing container.
    pub async fn op(&self, table: &ProcessTable, op: ContainerOp) -> Result<Reply, AgentError> {
        let entry = self.get(op.id())?;
        let id = entry.id.as_str();
        let _serial = match op {
            ContainerOp::State { .. } => None,
            _ => Some(entry.ops.lock().await),
        };
        match op {
            ContainerOp::State { .. } => {}
            ContainerOp::Start { .. } => {
                if entry.phase() != Phase::Created {
                    return Err(entry.refuse("start"));
                }
                self.run(table, self.base_args("start", id), None).await?;
                entry.advance(&[Phase::Created], Phase::Running);
            }
            ContainerOp::Kill { signal, all, .. } => {
                if !valid_signal(signal) {
                    return Err(AgentError::new(
                        ErrorKind::InvalidArgument,
                        format!("signal: {signal} is not a signal number (1 to SIGRTMAX)"),
                    ));
                }
                if matches!(entry.phase(), Phase::Creating | Phase::Stopped) {
                    return Err(entry.refuse("be signalled"));
                }
                let mut args = self.base_args("kill", id);
                args.extend(["--signal".into(), signal.to_string().into()]);
                if all {
                    args.push("--all".into());
                }
                self.run(table, args, None).await?;
            }
            ContainerOp::Pause { .. } => {
                if entry.phase() != Phase::Running {
                    return Err(entry.refuse("pause"));
                }
                self.run(table, self.base_args("pause", id), None).await?;
                entry.advance(&[Phase::Running], Phase::Paused);
            }
            ContainerOp::Resume { .. } => {
                if entry.phase() != Phase::Paused {
                    return Err(entry.refuse("resume"));
                }
                self.run(table, self.base_args("resume", id), None).await?;
                entry.advance(&[Phase::Paused], Phase::Running);
            }
            ContainerOp::Ps { .. } => {
                if matches!(entry.phase(), Phase::Creating | Phase::Stopped) {
                    return Ok(Reply::Pids { pids: Vec::new() });
                }
                let v = self.run(table, self.base_args("ps", id), None).await?;
                let pids: Vec<i32> = serde_json::from_value(v).map_err(helper_garbled)?;
                return Ok(Reply::Pids { pids });
            }
            ContainerOp::Update { resources, .. } => {
                if matches!(entry.phase(), Phase::Creating | Phase::Stopped) {
                    return Err(entry.refuse("update"));
                }
                if !resources.is_object() {
                    return Err(AgentError::new(
                        ErrorKind::InvalidArgument,
                        "resources: must be an object (runtime-spec LinuxResources)",
                    ));
                }
                let body = serde_json::to_vec(&resources).map_err(helper_garbled)?;
                self.run(table, self.base_args("update", id), Some(body))
                    .await?;
            }
            ContainerOp::Delete { force, .. } => {
                let phase = entry.phase();
                if phase == Phase::Creating
                    || (!force && matches!(phase, Phase::Running | Phase::Paused))
                {
                    return Err(entry.refuse("be deleted without force"));
                }
                let mut args = self.base_args("delete", id);
                if force {
                    args.push("--force".into());
                }
                self.run(table, args, None).await?;
                // The status answered is its last: wait for the killed process's
                // exit, which its helper reports.
                let mut stopped = entry.stopped.subscribe();
                let _ = tokio::time::timeout(DELETE_WAIT, stopped.wait_for(|s| *s)).await;
                lock(&self.table).remove(id);
            }
        }
        Ok(Reply::Container(entry.status()))
    }

    /// Runs a helper command to its end and returns its `ok` value.
    async fn run(
        &self,
        table: &ProcessTable,
        args: Vec<OsString>,
        input: Option<Vec<u8>>,
    ) -> Result<Value, AgentError> {
        let (mut helper, stdin) = spawn_helper(table, args, None, input.is_some())?;
        if let (Some(mut w), Some(body)) = (stdin, input) {
            let _ = w.write_all(&body).await;
            drop(w);
        }
        let first = next_report(&mut helper.lines).await;
        let _ = helper.exit.wait().await;
        match first? {
            Report::Ok(v) => Ok(v),
            Report::Exit(_) => Err(helper_garbled("an exit before the answer")),
        }
    }

    /// Creates a container from `<dir>/<id>/config.json`; its process waits for
    /// `Start`. The stream carries its standard I/O and its exit.
    pub async fn create(
        self: &Arc<Self>,
        table: &Arc<ProcessTable>,
        inputs: &Arc<Inputs>,
        req: ContainerCreate,
    ) -> Result<Opened, AgentError> {
        validate_container_id(&req.id)
            .map_err(|m| AgentError::new(ErrorKind::InvalidArgument, m))?;
        validate_size(req.size)?;
        self.ensure_shared().await?;
        let bundle = self.paths.dir.join(&req.id);
        let config = bundle.join("config.json");
        let spec = std::fs::read(&config)
            .map_err(|e| AgentError::io("config.json", &e))
            .and_then(|b| {
                serde_json::from_slice::<Spec>(&b).map_err(|e| {
                    AgentError::new(ErrorKind::InvalidArgument, format!("config.json: {e}"))
                })
            })?;
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        let entry = {
            let mut t = lock(&self.table);
            if t.contains_key(&req.id) {
                return Err(AgentError::new(
                    ErrorKind::AlreadyExists,
                    format!("id: container {:?} already exists", req.id),
                ));
            }
            let entry = Arc::new(Entry {
                id: req.id.clone(),
                record: Mutex::new(Record {
                    phase: Phase::Creating,
                    pid: None,
                    exit: None,
                }),
                stopped: watch::channel(false).0,
                ops: tokio::sync::Mutex::new(()),
            });
            t.insert(req.id.clone(), Arc::clone(&entry));
            entry
        };
        let mut args = self.base_args("create", &req.id);
        args.extend(["--bundle".into(), bundle.into()]);
        let started = self
            .start_process(table, inputs, &entry, args, terminal, req.stdin, req.size)
            .await;
        let proc = match started {
            Ok(p) => p,
            Err(e) => {
                // A failure after libcontainer made it (the terminal never came):
                // take down what exists.
                if self.paths.oci_root.join(&req.id).exists() {
                    let mut args = self.base_args("delete", &req.id);
                    args.push("--force".into());
                    let _ = self.run(table, args, None).await;
                }
                lock(&self.table).remove(&req.id);
                return Err(e);
            }
        };
        entry.advance(&[Phase::Creating], Phase::Created);
        // A creation stream whose host goes away takes its container with it.
        let containers = Arc::clone(self);
        let table = Arc::clone(table);
        let on_end = Box::new(move || {
            if entry.phase() != Phase::Stopped {
                tokio::spawn(async move {
                    let _serial = entry.ops.lock().await;
                    if entry.phase() == Phase::Stopped {
                        return;
                    }
                    let mut args = containers.base_args("kill", &entry.id);
                    args.extend(["--signal".into(), "9".into(), "--all".into()]);
                    if let Err(e) = containers.run(&table, args, None).await {
                        tracing::warn!("container {}: kill: {e}", entry.id);
                    }
                });
            }
        });
        Ok(Opened::Adopted { proc, on_end })
    }

    /// Mounts the shared directory if the agent is to and nothing is there yet.
    async fn ensure_shared(&self) -> Result<(), AgentError> {
        if !self.paths.mount_shared || self.shared_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let dir = self.paths.dir.clone();
        tokio::task::spawn_blocking(move || mount_shared(&dir))
            .await
            .map_err(|e| helper_garbled(e.to_string()))??;
        self.shared_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Runs another process in a running container.
    pub async fn exec(
        &self,
        table: &Arc<ProcessTable>,
        inputs: &Arc<Inputs>,
        req: ContainerExec,
    ) -> Result<Opened, AgentError> {
        let entry = self.get(&req.id)?;
        validate_size(req.size)?;
        let process: Process = serde_json::from_value(req.process.clone())
            .map_err(|e| AgentError::new(ErrorKind::InvalidArgument, format!("process: {e}")))?;
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(AgentError::new(
                ErrorKind::InvalidArgument,
                "process.args: must not be empty",
            ));
        }
        if entry.phase() != Phase::Running {
            return Err(entry.refuse("exec"));
        }
        let terminal = process.terminal().unwrap_or(false);
        let file = self.private_path(".exec", &req.id, "json")?;
        let body = serde_json::to_vec(&req.process).map_err(helper_garbled)?;
        std::fs::write(&file, body).map_err(|e| AgentError::io(&file.to_string_lossy(), &e))?;
        let _file = RemoveOnDrop(file.clone());
        let mut args = self.base_args("exec", &req.id);
        args.extend(["--process".into(), file.into()]);
        // Until its process exists (libcontainer reads the container's state).
        let _serial = entry.ops.lock().await;
        let proc = self
            .start_process(table, inputs, &entry, args, terminal, req.stdin, req.size)
            .await?;
        Ok(Opened::Adopted {
            proc,
            on_end: Box::new(|| {}),
        })
    }

    /// Spawns a `create` or `exec` helper with the process's standard I/O, reads
    /// its pid, and leaves a task that delivers its exit. For `create`, the exit
    /// also stops `entry`.
    #[allow(clippy::too_many_arguments)]
    async fn start_process(
        &self,
        table: &Arc<ProcessTable>,
        inputs: &Arc<Inputs>,
        entry: &Arc<Entry>,
        mut args: Vec<OsString>,
        terminal: bool,
        stdin: bool,
        size: Option<WinSize>,
    ) -> Result<ExecProc, AgentError> {
        let create = args.get(1).is_some_and(|v| v == "create");
        let mut console = None;
        let mut ours = None;
        let mut theirs = None;
        if terminal {
            let path = self.private_path(".console", &entry.id, "sock")?;
            let listener = tokio::net::UnixListener::bind(&path)
                .map_err(|e| AgentError::io(&path.to_string_lossy(), &e))?;
            args.extend(["--console-socket".into(), path.clone().into()]);
            // Received (and sized) as soon as the container sends it, before the
            // helper reports: an exec's process runs from then on, and should
            // find its terminal at its size.
            let recv = AbortOnDrop(tokio::spawn(receive_master(listener, size)));
            console = Some((recv, RemoveOnDrop(path)));
        } else {
            let (ours_, theirs_) = stdio_pipes(stdin)?;
            ours = Some(ours_);
            theirs = Some(theirs_);
            args.push("--stdio".into());
        }
        let (mut helper, _) = spawn_helper(table, args, theirs, false)?;
        let pid = match next_report(&mut helper.lines).await {
            Ok(Report::Ok(v)) => v
                .get("pid")
                .and_then(Value::as_i64)
                .and_then(|p| i32::try_from(p).ok())
                .filter(|p| *p > 1)
                .ok_or_else(|| helper_garbled("no pid")),
            Ok(Report::Exit(_)) => Err(helper_garbled("an exit before the pid")),
            Err(e) => Err(e),
        };
        let pid = match pid {
            Ok(p) => p,
            Err(e) => {
                let _ = helper.exit.wait().await;
                return Err(e);
            }
        };
        let io = match (console, ours) {
            (Some((mut recv, _path)), _) => match (&mut recv.0)
                .await
                .unwrap_or_else(|e| Err(helper_garbled(e.to_string())))
            {
                Ok(m) => AdoptedIo::Pty(Arc::new(m)),
                Err(e) => {
                    crate::process::signal_group(pid, libc::SIGKILL);
                    return Err(e);
                }
            },
            (None, Some(io)) => io,
            (None, None) => return Err(helper_garbled("no standard I/O")),
        };
        if create {
            lock(&entry.record).pid = Some(pid);
        }
        let (tx, exit) = ExitWaiter::channel();
        let entry = create.then(|| Arc::clone(entry));
        tokio::spawn(async move {
            let exit = match next_report(&mut helper.lines).await {
                Ok(Report::Exit(e)) => e,
                // The helper died without a word: its child is as good as gone.
                _ => ExitInfo {
                    exit_code: 128 + libc::SIGKILL,
                    signal: Some(libc::SIGKILL),
                    timed_out: false,
                },
            };
            let _ = helper.exit.wait().await;
            // Recorded before the stream hears of it, so a `state` after the exit
            // event is exact.
            if let Some(entry) = entry {
                entry.stop(exit);
            }
            let status = match exit.signal {
                Some(s) => ExitStatus::Signaled(s),
                None => ExitStatus::Exited(exit.exit_code),
            };
            let _ = tx.send(status);
        });
        Ok(ExecProc::adopt(inputs, pid, exit, io, stdin))
    }

    /// Kills every container still alive and forgets it (dev-mode shutdown), so
    /// nothing the agent made outlives it.
    pub async fn shutdown(&self, table: &ProcessTable) {
        let ids: Vec<String> = lock(&self.table).keys().cloned().collect();
        for id in ids {
            let mut args = self.base_args("delete", &id);
            args.push("--force".into());
            if let Err(e) = self.run(table, args, None).await {
                tracing::warn!("container {id}: delete: {e}");
            }
        }
    }
}

/// Mounts the virtio-fs tag [`CONTAINERS_TAG`] on `dir` unless `dir` already is
/// a mount point. The device may still be probing right after boot, so a missing
/// tag is retried for a bounded time.
fn mount_shared(dir: &std::path::Path) -> Result<(), AgentError> {
    use std::os::unix::fs::MetadataExt;
    let shown = dir.to_string_lossy();
    std::fs::create_dir_all(dir).map_err(|e| AgentError::io(&shown, &e))?;
    let parent = dir.parent().unwrap_or(std::path::Path::new("/"));
    let (Ok(d), Ok(p)) = (std::fs::metadata(dir), std::fs::metadata(parent)) else {
        return Err(AgentError::new(
            ErrorKind::Io,
            format!("{shown}: cannot stat"),
        ));
    };
    if d.dev() != p.dev() {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        match nix::mount::mount(
            Some(CONTAINERS_TAG),
            dir,
            Some("virtiofs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        ) {
            Ok(()) => return Ok(()),
            Err(e)
                if std::time::Instant::now() < deadline
                    && matches!(e, nix::errno::Errno::ENOENT | nix::errno::Errno::ENODEV) =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(AgentError::new(
                    ErrorKind::Io,
                    format!("{shown}: mount of virtio-fs tag {CONTAINERS_TAG:?}: {e}"),
                ))
            }
        }
    }
}

fn validate_size(size: Option<WinSize>) -> Result<(), AgentError> {
    if let Some(size) = size {
        size.validate()
            .map_err(|m| AgentError::new(ErrorKind::InvalidArgument, format!("size.{m}")))?;
    }
    Ok(())
}

fn helper_garbled(what: impl std::fmt::Display) -> AgentError {
    AgentError::new(ErrorKind::Io, format!("oci helper: {what}"))
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The pipes of a process's standard I/O: the agent's ends, and the helper's
/// (stdin, stdout, stderr; stdin is /dev/null without input).
fn stdio_pipes(stdin: bool) -> Result<(AdoptedIo, [OwnedFd; 3]), AgentError> {
    let pipe = || std::io::pipe().map_err(|e| AgentError::io("pipe", &e));
    let (in_r, in_w) = if stdin {
        let (r, w) = pipe()?;
        (OwnedFd::from(r), Some(OwnedFd::from(w)))
    } else {
        let null = std::fs::File::open("/dev/null").map_err(|e| AgentError::io("/dev/null", &e))?;
        (OwnedFd::from(null), None)
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    Ok((
        AdoptedIo::Pipes {
            stdin: in_w,
            stdout: out_r.into(),
            stderr: err_r.into(),
        },
        [in_r, out_w.into(), err_w.into()],
    ))
}

/// Starts `/proc/self/exe oci ...` in a process group of its own, reporting on a
/// pipe; `stdio` become its fds 3–5. Returns it and, with `input`, its stdin.
fn spawn_helper(
    table: &ProcessTable,
    args: Vec<OsString>,
    stdio: Option<[OwnedFd; 3]>,
    input: bool,
) -> Result<(Helper, Option<pipe::Sender>), AgentError> {
    // /proc/self/exe, not the path we were started from: it stays valid even if
    // the file was replaced or removed since.
    let mut cmd = Command::new("/proc/self/exe");
    cmd.args(args)
        .process_group(0)
        .stdin(if input { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(fds) = &stdio {
        let raw = fds.each_ref().map(|f| f.as_raw_fd());
        // SAFETY: the closure makes only async-signal-safe calls (fcntl, dup2,
        // close) on descriptors that exist in the child.
        unsafe {
            cmd.pre_exec(move || {
                // Out of the way first: a source may already sit on 3, 4 or 5.
                let mut high = [0; 3];
                for (h, fd) in high.iter_mut().zip(raw) {
                    *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                    if *h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (h, target) in high.into_iter().zip(STDIO_FDS) {
                    // dup2 leaves the target without close-on-exec.
                    if libc::dup2(h, target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(h);
                }
                Ok(())
            });
        }
    }
    let (mut child, exit) = table
        .spawn(&mut cmd)
        .map_err(|e| AgentError::new(ErrorKind::Io, format!("oci helper: {e}")))?;
    // The helper has its copies now; ours must go so that end of file works.
    drop(stdio);
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| helper_garbled("no stdout"))?;
    let stdout = pipe::Receiver::from_owned_fd(OwnedFd::from(stdout))
        .map_err(|e| helper_garbled(e.to_string()))?;
    let stdin = match child.stdin.take() {
        Some(s) => Some(
            pipe::Sender::from_owned_fd(OwnedFd::from(s))
                .map_err(|e| helper_garbled(e.to_string()))?,
        ),
        None => None,
    };
    Ok((
        Helper {
            lines: BufReader::new(stdout).lines(),
            exit,
        },
        stdin,
    ))
}

/// Reads the helper's next report. An `error` report becomes that error.
async fn next_report(lines: &mut Lines<BufReader<pipe::Receiver>>) -> Result<Report, AgentError> {
    let line = match lines.next_line().await {
        Ok(Some(l)) => l,
        Ok(None) => return Err(helper_garbled("ended without a report")),
        Err(e) => return Err(helper_garbled(e)),
    };
    parse_report(&line)
}

fn parse_report(line: &str) -> Result<Report, AgentError> {
    let v: Value = serde_json::from_str(line).map_err(helper_garbled)?;
    if let Some(ok) = v.get("ok") {
        return Ok(Report::Ok(ok.clone()));
    }
    if let Some(exit) = v.get("exit") {
        return serde_json::from_value::<ExitInfo>(exit.clone())
            .map(Report::Exit)
            .map_err(helper_garbled);
    }
    if let Some(err) = v.get("error") {
        return Err(serde_json::from_value::<AgentError>(err.clone()).map_err(helper_garbled)?);
    }
    Err(helper_garbled("unknown report"))
}

/// Receives a container's terminal master on its console socket
/// (libcontainer sends it with SCM_RIGHTS) and sets its size.
async fn receive_master(
    listener: tokio::net::UnixListener,
    size: Option<WinSize>,
) -> Result<PtyMaster, AgentError> {
    let stream = tokio::time::timeout(CONSOLE_WAIT, listener.accept())
        .await
        .map_err(|_| helper_garbled("no terminal on the console socket"))?
        .map_err(|e| helper_garbled(format!("console socket: {e}")))?
        .0
        .into_std()
        .map_err(|e| helper_garbled(format!("console socket: {e}")))?;
    let fd = tokio::task::spawn_blocking(move || recv_fd(stream))
        .await
        .map_err(|e| helper_garbled(e.to_string()))??;
    PtyMaster::adopt(fd, size).map_err(|e| helper_garbled(format!("terminal: {e}")))
}

fn recv_fd(stream: std::os::unix::net::UnixStream) -> Result<OwnedFd, AgentError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let err = |e: String| helper_garbled(format!("console socket: {e}"));
    stream
        .set_nonblocking(false)
        .and_then(|_| stream.set_read_timeout(Some(CONSOLE_WAIT)))
        .map_err(|e| err(e.to_string()))?;
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| err(e.to_string()))?;
    let mut got = None;
    for cmsg in msg.cmsgs().map_err(|e| err(e.to_string()))? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel just installed this descriptor in our table
                // for us; nothing else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if got.is_none() {
                    got = Some(owned);
                }
            }
        }
    }
    got.ok_or_else(|| err("no terminal received".into()))
}

/// Where the OCI state root is by default in a VM.
pub const DEFAULT_OCI_ROOT: &str = "/run/burrow/oci";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_parsed() {
        assert!(matches!(
            parse_report(r#"{"ok":{"pid":42}}"#),
            Ok(Report::Ok(v)) if v["pid"] == 42
        ));
        assert!(matches!(
            parse_report(r#"{"exit":{"exit_code":137,"signal":9}}"#),
            Ok(Report::Exit(e)) if e.exit_code == 137 && e.signal == Some(9)
        ));
        let e = match parse_report(
            r#"{"error":{"kind":"not_found","message":"id: no container \"a\""}}"#,
        ) {
            Err(e) => e,
            Ok(_) => panic!("an error report must be an error"),
        };
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert_eq!(e.message, "id: no container \"a\"");
        assert!(parse_report("garbage").is_err());
        assert!(parse_report("{}").is_err());
    }
}
