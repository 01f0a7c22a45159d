//! OCI containers: the agent's side. Every libcontainer call happens in the
//! single-threaded OCI helper ([`crate::oci`]); this module spawns it, reads its
//! reports, keeps each container's status, and carries container processes'
//! standard I/O as exec streams.

mod console;
mod durable;
mod helper;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burrow_proto::{
    validate_container_id, AgentError, ContainerAttach, ContainerCreate, ContainerExec,
    ContainerOp, ContainerStatus, ContainerStatusKind, ErrorKind, ExitInfo, Reply, WinSize,
    CONTAINERS_TAG,
};
use libcontainer::oci_spec::runtime::{Process, Spec};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

pub use self::durable::Attachment;

use self::console::receive_master;
use self::durable::Durables;
use self::helper::{helper_garbled, next_report, spawn_helper, stdio_pipes, Report};
use crate::jobs::valid_signal;
use crate::process::{lock, ExitStatus, ExitWaiter, ProcessTable};
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
    durables: Arc<Durables>,
}

impl Containers {
    pub fn new(paths: ContainerPaths) -> Self {
        Containers {
            paths,
            shared_ready: std::sync::atomic::AtomicBool::new(false),
            table: Mutex::default(),
            next: AtomicU64::new(0),
            durables: Arc::default(),
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
                // `all` may sweep up what a stopped container without a pid
                // namespace left running (as runc's `kill --all` does).
                let phase = entry.phase();
                if phase == Phase::Creating || (phase == Phase::Stopped && !all) {
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
            ContainerOp::Stats { .. } => {
                if matches!(entry.phase(), Phase::Creating | Phase::Stopped) {
                    return Err(entry.refuse("report figures"));
                }
                let stats = self.run(table, self.base_args("stats", id), None).await?;
                return Ok(Reply::ContainerStats { stats });
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
                // A stopped container is forced too: its process is gone (its
                // helper reaped it), and libcontainer judges by the pid, which
                // another process may have taken since.
                if force || phase == Phase::Stopped {
                    args.push("--force".into());
                }
                self.run(table, args, None).await?;
                // The status answered is its last: wait for the killed process's
                // exit, which its helper reports.
                let mut stopped = entry.stopped.subscribe();
                let _ = tokio::time::timeout(DELETE_WAIT, stopped.wait_for(|s| *s)).await;
                lock(&self.table).remove(id);
                self.durables.forget(id);
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
        let bytes = std::fs::read(&config).map_err(|e| AgentError::io("config.json", &e))?;
        let bytes = vm_network_sysctls(&config, bytes)?;
        let spec = serde_json::from_slice::<Spec>(&bytes).map_err(|e| {
            AgentError::new(ErrorKind::InvalidArgument, format!("config.json: {e}"))
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
        let opened = Opened::Adopted { proc, on_end };
        if !req.durable {
            return Ok(opened);
        }
        let key = (req.id, String::new());
        Ok(Opened::Durable(self.durables.adopt(key, opened, inputs)?))
    }

    /// A new connection to a durable stream of a container.
    pub fn attach(&self, inputs: &Arc<Inputs>, req: ContainerAttach) -> Result<Opened, AgentError> {
        validate_container_id(&req.id)
            .map_err(|m| AgentError::new(ErrorKind::InvalidArgument, m))?;
        if !req.exec.is_empty() {
            validate_container_id(&req.exec)
                .map_err(|m| AgentError::new(ErrorKind::InvalidArgument, format!("exec: {m}")))?;
        }
        let key = (req.id, req.exec);
        Ok(Opened::Durable(self.durables.attach(&key, inputs)?))
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
        let durable = match &req.exec_id {
            Some(exec) => {
                validate_container_id(exec).map_err(|m| {
                    AgentError::new(ErrorKind::InvalidArgument, format!("exec_id: {m}"))
                })?;
                let key = (req.id.clone(), exec.clone());
                if self.durables.is_live(&key) {
                    return Err(AgentError::new(
                        ErrorKind::AlreadyExists,
                        format!(
                            "exec_id: exec {exec:?} of container {:?} runs already",
                            req.id
                        ),
                    ));
                }
                Some(key)
            }
            None => None,
        };
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
        let opened = Opened::Adopted {
            proc,
            on_end: Box::new(|| {}),
        };
        match durable {
            Some(key) => Ok(Opened::Durable(self.durables.adopt(key, opened, inputs)?)),
            None => Ok(opened),
        }
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
        let oom_killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let oom_flag = Arc::clone(&oom_killed);
        tokio::spawn(async move {
            let exit = match next_report(&mut helper.lines).await {
                Ok(Report::Exit(e)) => e,
                // The helper died without a word: its child is as good as gone.
                _ => ExitInfo {
                    exit_code: 128 + libc::SIGKILL,
                    signal: Some(libc::SIGKILL),
                    timed_out: false,
                    oom_killed: false,
                },
            };
            let _ = helper.exit.wait().await;
            // Recorded before the stream hears of it, so a `state` after the exit
            // event is exact.
            if let Some(entry) = entry {
                entry.stop(exit);
            }
            oom_flag.store(exit.oom_killed, Ordering::SeqCst);
            let status = match exit.signal {
                Some(s) => ExitStatus::Signaled(s),
                None => ExitStatus::Exited(exit.exit_code),
            };
            let _ = tx.send(status);
        });
        Ok(ExecProc::adopt(inputs, pid, exit, io, stdin, oom_killed))
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
/// a mount point. A container VM's initramfs mounts it before the agent runs
/// (after waiting for the device itself), so this only serves a VM booted
/// otherwise: one attempt, whose failure is the answer.
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
    nix::mount::mount(
        Some(CONTAINERS_TAG),
        dir,
        Some("virtiofs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| {
        AgentError::new(
            ErrorKind::Io,
            format!("{shown}: mount of virtio-fs tag {CONTAINERS_TAG:?}: {e}"),
        )
    })
}

fn validate_size(size: Option<WinSize>) -> Result<(), AgentError> {
    if let Some(size) = size {
        size.validate()
            .map_err(|m| AgentError::new(ErrorKind::InvalidArgument, format!("size.{m}")))?;
    }
    Ok(())
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

/// Where the OCI state root is by default in a VM.
pub const DEFAULT_OCI_ROOT: &str = "/run/burrow/oci";

/// A container that shares the VM's network namespace (the host took its own
/// namespace's interface over for the VM) has the VM's network as its own: the
/// spec's `net.*` sysctls are set on the VM here, and taken out of the config
/// libcontainer reads, which refuses them outside a namespace of their own.
/// Returns the config as libcontainer is to read it.
fn vm_network_sysctls(config: &std::path::Path, bytes: Vec<u8>) -> Result<Vec<u8>, AgentError> {
    let invalid = |m: String| AgentError::new(ErrorKind::InvalidArgument, m);
    let mut spec: Value =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("config.json: {e}")))?;
    let own_netns = spec
        .pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .is_some_and(|l| l.iter().any(|n| n["type"] == "network"));
    let Some(sysctl) = spec
        .pointer_mut("/linux/sysctl")
        .and_then(Value::as_object_mut)
    else {
        return Ok(bytes);
    };
    let net: Vec<String> = sysctl
        .keys()
        .filter(|k| k.starts_with("net."))
        .cloned()
        .collect();
    if own_netns || net.is_empty() {
        return Ok(bytes);
    }
    for key in &net {
        let value = sysctl.remove(key).unwrap_or(Value::Null);
        let value = value
            .as_str()
            .ok_or_else(|| invalid(format!("linux.sysctl.{key}: not a string")))?;
        let ok = key.split('.').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
        });
        if !ok {
            return Err(invalid(format!("linux.sysctl.{key}: not a sysctl name")));
        }
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        std::fs::write(&path, value)
            .map_err(|e| invalid(format!("linux.sysctl.{key}: {path}: {e}")))?;
    }
    let out = serde_json::to_vec(&spec).map_err(|e| invalid(format!("config.json: {e}")))?;
    std::fs::write(config, &out).map_err(|e| AgentError::io("config.json", &e))?;
    Ok(out)
}
