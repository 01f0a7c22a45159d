//! The Task service containerd calls: each task is a container in its own
//! microVM, made and driven through burrowd; each process's stdio is relayed
//! between containerd's FIFOs and the process's stream on burrowd.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use burrow::api::client::{Client, ClientError};
use burrow::api::stream::ClientStream;
use burrow::api::{ContainerAnswer, ContainerVmRequest};
use burrow::paths::{StateDir, DEFAULT_CACHE_DIR, DEFAULT_STATE_DIR};
use burrow_oci::bundle::{check_process, Bundle};
use burrow_proto::{
    ContainerAttach, ContainerCreate, ContainerExec, ContainerOp, StreamControl, StreamOpen,
    WinSize,
};
use containerd_shim::api;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Task, TtrpcContext, TtrpcResult};
use serde_json::Value;
use tokio::sync::{mpsc, watch, OnceCell};

use crate::io::{self, Ended, Stdio, Up};
use crate::rootfs;

/// The runtime id containerd knows burrow by.
pub const RUNTIME_ID: &str = "io.containerd.burrow.v2";

/// How long a process whose stream broke waits for burrowd to answer again.
const REATTACH_FOR: Duration = Duration::from_secs(60);

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn not_found(what: impl std::fmt::Display) -> ttrpc::Error {
    status(Code::NOT_FOUND, format!("{what}: not found"))
}

fn client_error(e: ClientError) -> ttrpc::Error {
    match e {
        ClientError::Api {
            status: 404,
            message,
        } => status(Code::NOT_FOUND, message),
        ClientError::Api {
            status: 409,
            message,
        } => status(Code::FAILED_PRECONDITION, message),
        ClientError::Api {
            status: 400,
            message,
        } => status(Code::INVALID_ARGUMENT, message),
        ClientError::Api { message, .. } => status(Code::UNKNOWN, message),
        e => status(Code::UNAVAILABLE, e.to_string()),
    }
}

/// Whether burrowd did not answer (not running, restarting) rather than refuse.
fn unanswered(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::NotRunning { .. }
            | ClientError::Transport(_)
            | ClientError::Api { status: 503, .. }
    )
}

fn timestamp(t: SystemTime) -> MessageField<Timestamp> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    MessageField::some(Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    })
}

/// The root that scopes container ids on burrowd: one per containerd (its
/// socket) and namespace, as a runc root is.
pub fn root_of(address: &str, namespace: &str) -> String {
    let address = address.strip_prefix("unix://").unwrap_or(address);
    let address = if address.starts_with('/') {
        address.to_string()
    } else {
        format!("/{address}")
    };
    format!("{address}/{namespace}")
}

/// burrowd, started if it is not running (the state dir as the CLI's).
pub async fn connect() -> Result<Client, String> {
    let state_dir = std::env::var_os("BURROW_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| DEFAULT_STATE_DIR.into());
    let cache_dir = std::env::var_os("BURROW_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| DEFAULT_CACHE_DIR.into());
    let state = StateDir::new(&state_dir).map_err(|e| format!("{}: {e}", state_dir.display()))?;
    burrow::api::connect::connect(&state, &cache_dir)
        .await
        .map(|(c, _)| c)
        .map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    Stopped,
}

#[derive(Debug, Clone, Copy)]
struct Exit {
    code: u32,
    at: SystemTime,
}

/// One process of a task: the container's own (exec id "") or an exec.
struct Proc {
    exec_id: String,
    stdio: Stdio,
    /// An exec's runtime-spec Process.
    spec: Option<Value>,
    state: Mutex<ProcState>,
    /// Set once, to the exit, when the process ends.
    exited: watch::Sender<Option<Exit>>,
}

struct ProcState {
    phase: Phase,
    pid: u32,
    /// What the task service sends the running process's stream.
    up: Option<mpsc::Sender<Up>>,
}

impl Proc {
    fn new(exec_id: &str, stdio: Stdio, spec: Option<Value>) -> Arc<Proc> {
        Arc::new(Proc {
            exec_id: exec_id.to_string(),
            stdio,
            spec,
            state: Mutex::new(ProcState {
                phase: Phase::Created,
                pid: 0,
                up: None,
            }),
            exited: watch::channel(None).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn phase(&self) -> Phase {
        self.lock().phase
    }

    fn pid(&self) -> u32 {
        self.lock().pid
    }

    fn exit(&self) -> Option<Exit> {
        *self.exited.borrow()
    }

    async fn send(&self, up: Up) -> TtrpcResult<()> {
        let tx = self.lock().up.clone();
        match tx {
            Some(tx) => tx
                .send(up)
                .await
                .map_err(|_| status(Code::NOT_FOUND, "process already finished")),
            None => Err(status(
                Code::FAILED_PRECONDITION,
                "the process has not started or has finished",
            )),
        }
    }
}

/// A task: a container in its VM.
struct Container {
    id: String,
    bundle: PathBuf,
    /// burrowd's name for the container's VM.
    vm: String,
    /// A pod's member: a container added to its sandbox's VM (deleting it
    /// leaves the VM to the sandbox).
    member: bool,
    /// Whether the shim mounted the task's rootfs (containerd's mounts) itself.
    mounted_rootfs: bool,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    paused: Mutex<bool>,
}

impl Container {
    fn process(&self, exec_id: &str) -> TtrpcResult<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| not_found(format!("exec {exec_id:?} of task {:?}", self.id)))
    }

    fn is_paused(&self) -> bool {
        *lock(&self.paused)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The task service of one shim.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    /// Scopes container ids on burrowd (see [`root_of`]).
    root: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    client: OnceCell<Client>,
    tasks: Mutex<HashMap<String, Arc<Container>>>,
}

impl Service {
    pub fn new(
        namespace: &str,
        address: &str,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Service {
        Service {
            inner: Arc::new(Inner {
                namespace: namespace.to_string(),
                root: root_of(address, namespace),
                publisher,
                exit,
                client: OnceCell::new(),
                tasks: Mutex::new(HashMap::new()),
            }),
        }
    }

    async fn client(&self) -> TtrpcResult<&Client> {
        self.inner
            .client
            .get_or_try_init(connect)
            .await
            .map_err(|e| status(Code::UNAVAILABLE, format!("burrowd: {e}")))
    }

    fn task(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        lock(&self.inner.tasks)
            .get(id)
            .cloned()
            .ok_or_else(|| not_found(format!("task {id:?}")))
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let ctx = ttrpc::context::Context::default();
        if let Err(e) = self
            .inner
            .publisher
            .publish(ctx, topic, &self.inner.namespace, event)
            .await
        {
            log::warn!("publish {topic}: {e}");
        }
    }

    async fn op(&self, c: &Container, op: ContainerOp) -> TtrpcResult<ContainerAnswer> {
        self.client()
            .await?
            .container_op(&c.vm, &op)
            .await
            .map_err(client_error)
    }

    /// Opens a process's stream and starts relaying it: `open` makes the
    /// process in the guest (the container's, created; or an exec's, running).
    async fn launch(
        &self,
        c: &Arc<Container>,
        p: &Arc<Proc>,
        open: impl FnOnce(bool, Option<WinSize>) -> StreamOpen,
    ) -> TtrpcResult<u32> {
        let opened = io::open(&p.stdio, (&c.id, &self.inner.namespace))
            .await
            .map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        let size = p.stdio.terminal.then_some(WinSize { rows: 24, cols: 80 });
        let stream = self
            .client()
            .await?
            .open_stream(&c.vm, &open(opened.has_stdin(), size))
            .await
            .map_err(client_error)?;
        let pid = stream.pid.and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
        let (up_tx, up_rx) = mpsc::channel(16);
        {
            let mut st = p.lock();
            st.pid = pid;
            st.up = Some(up_tx.clone());
            if !p.exec_id.is_empty() {
                st.phase = Phase::Running;
            }
        }
        let (svc, c, p) = (self.clone(), c.clone(), p.clone());
        let attach = StreamOpen::ContainerAttach(ContainerAttach {
            id: c.id.clone(),
            exec: p.exec_id.clone(),
        });
        let reattach = {
            let (svc, vm) = (svc.clone(), c.vm.clone());
            move |why: String| {
                let (svc, vm, attach) = (svc.clone(), vm.clone(), attach.clone());
                async move { svc.reattach(&vm, &attach, why).await }
            }
        };
        tokio::spawn(async move {
            let ended = io::relay(stream, opened, up_rx, up_tx, reattach).await;
            svc.exited(&c, &p, ended).await;
        });
        Ok(pid)
    }

    /// Opens a process's stream again after it broke. burrowd may be gone or
    /// restarting: for [`REATTACH_FOR`] it is started if nothing serves its
    /// socket and asked again while it does not answer; an answer (the VM or
    /// the process is gone) ends it.
    async fn reattach(
        &self,
        vm: &str,
        attach: &StreamOpen,
        why: String,
    ) -> Result<ClientStream, String> {
        log::warn!("{vm}: {why}; attaching to the process again");
        let client = self.client().await.map_err(|e| format!("{why}; {e}"))?;
        let deadline = tokio::time::Instant::now() + REATTACH_FOR;
        let mut pause = Duration::from_millis(50);
        loop {
            match client.open_stream(vm, attach).await {
                Ok(s) => return Ok(s),
                // Nothing serves burrowd's socket: start burrowd, as every door
                // does; it adopts the running VMs again. (Another process may be
                // starting it too: then this start fails and the next try finds it.)
                Err(ClientError::NotRunning { .. }) if tokio::time::Instant::now() < deadline => {
                    if let Err(e) = connect().await {
                        log::warn!("starting burrowd: {e}");
                        tokio::time::sleep(pause).await;
                    }
                }
                Err(e) if unanswered(&e) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(format!("{why}; attaching again: {e}")),
            }
        }
    }

    /// A process ended: its exit is kept for Wait, State and Delete, and told
    /// to containerd.
    async fn exited(&self, c: &Container, p: &Proc, ended: Ended) {
        if matches!(&ended, Ended::Exit(x) if x.oom_killed) {
            // Before the exit, as runc's shim's cgroup watch tells it.
            self.publish(
                topics::TASK_OOM_EVENT_TOPIC,
                Box::new(TaskOOM {
                    container_id: c.id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        }
        let code = match ended {
            Ended::Exit(x) => match x.signal {
                Some(s) if (1..=64).contains(&s) => 128 + s as u32,
                _ => u32::try_from(x.exit_code)
                    .ok()
                    .filter(|c| *c <= 255)
                    .unwrap_or(255),
            },
            Ended::Lost(why) => {
                log::error!("task {} exec {:?}: {why}", c.id, p.exec_id);
                255
            }
        };
        let exit = Exit {
            code,
            at: SystemTime::now(),
        };
        let pid = {
            let mut st = p.lock();
            st.phase = Phase::Stopped;
            st.up = None;
            st.pid
        };
        p.exited.send_replace(Some(exit));
        let id = if p.exec_id.is_empty() {
            c.id.clone()
        } else {
            p.exec_id.clone()
        };
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: c.id.clone(),
                id,
                pid,
                exit_status: code,
                exited_at: timestamp(exit.at),
                ..Default::default()
            }),
        )
        .await;
    }

    async fn create_task(&self, req: &api::CreateTaskRequest) -> TtrpcResult<u32> {
        let id = req.id.clone();
        burrow_proto::validate_container_id(&id).map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        if lock(&self.inner.tasks).contains_key(&id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("task {id:?} already exists"),
            ));
        }
        if !req.checkpoint.is_empty() {
            return Err(status(
                Code::UNIMPLEMENTED,
                "checkpoint: restoring a checkpoint is not implemented: burrow has no memory snapshots yet",
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let mounted = rootfs::mount(&bundle, &req.rootfs)
            .await
            .map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        let made = self.make(&id, &bundle, mounted, req).await;
        if made.is_err() && mounted {
            rootfs::unmount(&bundle).await;
        }
        made
    }

    /// The sandbox whose VM a CRI container of `spec` joins, when it is one.
    fn sandbox_for(&self, spec: &Value) -> TtrpcResult<Option<Arc<Container>>> {
        let annotation = |k: &str| {
            spec.pointer(&format!("/annotations/{}", k.replace('/', "~1")))
                .and_then(Value::as_str)
        };
        if annotation(CONTAINER_TYPE) != Some("container") {
            return Ok(None);
        }
        let Some(sandbox) = annotation(SANDBOX_ID) else {
            return Ok(None);
        };
        let c = lock(&self.inner.tasks).get(sandbox).cloned();
        match c {
            Some(c) if c.init.phase() == Phase::Running => Ok(Some(c)),
            _ => Err(status(
                Code::FAILED_PRECONDITION,
                format!(
                    "annotations.{SANDBOX_ID}: sandbox {sandbox:?} is not running in this shim"
                ),
            )),
        }
    }

    async fn make(
        &self,
        id: &str,
        bundle: &Path,
        mounted: bool,
        req: &api::CreateTaskRequest,
    ) -> TtrpcResult<u32> {
        let invalid = |e: burrow_oci::error::Error| status(Code::INVALID_ARGUMENT, e.to_string());
        let path = bundle.join("config.json");
        let raw: Value = std::fs::read(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("not valid JSON: {e}")))
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("config.json: {e}")))?;
        let sandbox = self.sandbox_for(&raw)?;
        // A pod's member names the sandbox's namespaces by host paths
        // (/proc/<pid>/ns/<kind>, a CNI netns file): inside the VM they are the
        // sandbox container's.
        let (b, spec) = match &sandbox {
            Some(s) => {
                let spec = join_namespaces(&raw, s.init.pid());
                let mut checked = spec.clone();
                if let Some(list) = checked
                    .pointer_mut("/linux/namespaces")
                    .and_then(Value::as_array_mut)
                {
                    for n in list.iter_mut().filter_map(Value::as_object_mut) {
                        n.remove("path");
                    }
                }
                (Bundle::from_spec(bundle, checked).map_err(invalid)?, spec)
            }
            None => {
                let b = Bundle::load(bundle).map_err(invalid)?;
                let spec = b.spec.clone();
                (b, spec)
            }
        };
        if !b.hooks.is_empty() {
            return Err(status(
                Code::INVALID_ARGUMENT,
                "hooks: burrow's shim does not run OCI hooks (the container runs in a VM; \
                 use burrow-runtime through containerd's runc shim for hooks)",
            ));
        }
        let client = self.client().await?.clone();
        let vm_req = ContainerVmRequest {
            id: id.to_string(),
            root: self.inner.root.clone(),
            bundle: b.dir.clone(),
            spec,
        };
        let vm = match &sandbox {
            Some(s) => {
                client
                    .container_share(&s.vm, &vm_req)
                    .await
                    .map_err(client_error)?;
                s.vm.clone()
            }
            None => {
                client
                    .container_vm_create(&vm_req)
                    .await
                    .map_err(client_error)?
                    .id
            }
        };
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let c = Arc::new(Container {
            id: id.to_string(),
            bundle: bundle.to_path_buf(),
            vm: vm.clone(),
            member: sandbox.is_some(),
            mounted_rootfs: mounted,
            init: Proc::new("", stdio, None),
            execs: Mutex::new(HashMap::new()),
            paused: Mutex::new(false),
        });
        let cid = id.to_string();
        let launched = self
            .launch(&c, &c.init.clone(), move |stdin, size| {
                StreamOpen::ContainerCreate(ContainerCreate {
                    id: cid,
                    stdin,
                    size,
                    durable: true,
                })
            })
            .await;
        let pid = match launched {
            Ok(pid) => pid,
            Err(e) => {
                self.remove(&c).await;
                return Err(e);
            }
        };
        lock(&self.inner.tasks).insert(id.to_string(), c.clone());
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: id.to_string(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(pid)
    }

    /// Destroys a task's VM and unmounts its rootfs.
    async fn remove(&self, c: &Container) {
        match self.client().await {
            Ok(client) if c.member => {
                let op = ContainerOp::Delete {
                    id: c.id.clone(),
                    force: true,
                };
                match client.container_op(&c.vm, &op).await {
                    Ok(_) | Err(ClientError::Api { status: 404, .. }) => {}
                    Err(e) => log::error!("task {}: delete in VM {}: {e}", c.id, c.vm),
                }
                match client.container_unshare(&c.vm, &c.id).await {
                    Ok(_) | Err(ClientError::Api { status: 404, .. }) => {}
                    Err(e) => log::error!("task {}: unshare from VM {}: {e}", c.id, c.vm),
                }
            }
            Ok(client) => match client.destroy(&c.vm).await {
                Ok(_) | Err(ClientError::Api { status: 404, .. }) => {}
                Err(e) => log::error!("task {}: destroy VM {}: {e}", c.id, c.vm),
            },
            Err(e) => log::error!("task {}: {e}", c.id),
        }
        if c.mounted_rootfs {
            rootfs::unmount(&c.bundle).await;
        }
    }
}

/// The annotation CRI puts on every container of a pod: its sandbox's id.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// CRI's annotation saying whether a container is a pod's sandbox or a member.
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

/// `spec` with every namespace it names by path made the one of guest process
/// `pid` (the sandbox container's) of the same kind.
fn join_namespaces(spec: &Value, pid: u32) -> Value {
    let mut spec = spec.clone();
    if let Some(list) = spec
        .pointer_mut("/linux/namespaces")
        .and_then(Value::as_array_mut)
    {
        for n in list.iter_mut() {
            let named = n
                .get("path")
                .and_then(Value::as_str)
                .is_some_and(|p| !p.is_empty());
            let file = match n.get("type").and_then(Value::as_str) {
                Some("network") => "net",
                Some("mount") => "mnt",
                Some(k @ ("ipc" | "uts" | "pid" | "cgroup" | "user" | "time")) => k,
                _ => continue,
            };
            if named {
                n["path"] = Value::from(format!("/proc/{pid}/ns/{file}"));
            }
        }
    }
    spec
}

fn exit_fields(p: &Proc) -> (u32, MessageField<Timestamp>) {
    match p.exit() {
        Some(e) => (e.code, timestamp(e.at)),
        None => (0, MessageField::none()),
    }
}

/// The JSON inside an `Any` containerd sends (a runtime-spec Process or LinuxResources).
fn any_json(field: &str, any: &MessageField<Any>) -> TtrpcResult<Value> {
    let Some(a) = any.as_ref() else {
        return Err(status(Code::INVALID_ARGUMENT, format!("{field}: missing")));
    };
    serde_json::from_slice(&a.value).map_err(|e| {
        status(
            Code::INVALID_ARGUMENT,
            format!("{field}: not a JSON object: {e}"),
        )
    })
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = self.create_task(&req).await?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let c = self.task(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if p.phase() != Phase::Created {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("task {:?} exec {:?}: already started", req.id, req.exec_id),
            ));
        }
        if req.exec_id.is_empty() {
            self.op(&c, ContainerOp::Start { id: c.id.clone() }).await?;
            {
                // Its exit may have come first (a quick `true`): it stays stopped.
                let mut st = p.lock();
                if st.phase == Phase::Created {
                    st.phase = Phase::Running;
                }
            }
            let pid = p.pid();
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: c.id.clone(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
            return Ok(api::StartResponse {
                pid,
                ..Default::default()
            });
        }
        if c.init.phase() != Phase::Running {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("task {:?} is not running", req.id),
            ));
        }
        let (cid, spec) = (c.id.clone(), p.spec.clone().unwrap_or(Value::Null));
        let exec_id = p.exec_id.clone();
        let pid = self
            .launch(&c, &p, move |stdin, size| {
                StreamOpen::ContainerExec(ContainerExec {
                    id: cid,
                    process: spec,
                    stdin,
                    size,
                    exec_id: Some(exec_id),
                })
            })
            .await?;
        self.publish(
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(TaskExecStarted {
                container_id: c.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let c = self.task(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let st = match p.phase() {
            Phase::Created => api::Status::CREATED,
            Phase::Running if c.is_paused() => api::Status::PAUSED,
            Phase::Running => api::Status::RUNNING,
            Phase::Stopped => api::Status::STOPPED,
        };
        let (exit_status, exited_at) = exit_fields(&p);
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.display().to_string(),
            pid: p.pid(),
            status: st.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status,
            exited_at,
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let c = self.task(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if p.phase() == Phase::Running {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!(
                    "task {:?} exec {:?} is running: kill it first",
                    req.id, req.exec_id
                ),
            ));
        }
        let (exit_status, exited_at) = exit_fields(&p);
        let pid = p.pid();
        if !req.exec_id.is_empty() {
            lock(&c.execs).remove(&req.exec_id);
        } else {
            lock(&self.inner.tasks).remove(&req.id);
            self.remove(&c).await;
            self.publish(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(TaskDelete {
                    container_id: c.id.clone(),
                    pid,
                    exit_status,
                    exited_at: exited_at.clone(),
                    id: c.id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        }
        Ok(api::DeleteResponse {
            pid,
            exit_status,
            exited_at,
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let c = self.task(&req.id)?;
        let pids = match self.op(&c, ContainerOp::Ps { id: c.id.clone() }).await? {
            ContainerAnswer::Pids { pids } => pids,
            _ => Vec::new(),
        };
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .filter_map(|p| u32::try_from(p).ok())
                .map(|pid| containerd_shim::protos::api::ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let c = self.task(&req.id)?;
        self.op(&c, ContainerOp::Pause { id: c.id.clone() }).await?;
        *lock(&c.paused) = true;
        self.publish(
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(TaskPaused {
                container_id: c.id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.task(&req.id)?;
        self.op(&c, ContainerOp::Resume { id: c.id.clone() })
            .await?;
        *lock(&c.paused) = false;
        self.publish(
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(TaskResumed {
                container_id: c.id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(status(
            Code::UNIMPLEMENTED,
            "checkpoint: not implemented: burrow has no memory snapshots yet",
        ))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let c = self.task(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let signal = i32::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| {
                status(
                    Code::INVALID_ARGUMENT,
                    format!("signal: {} is not a signal number", req.signal),
                )
            })?;
        if p.phase() == Phase::Stopped {
            return Err(status(Code::NOT_FOUND, "process already finished"));
        }
        if req.exec_id.is_empty() {
            self.op(
                &c,
                ContainerOp::Kill {
                    id: c.id.clone(),
                    signal,
                    all: req.all,
                },
            )
            .await?;
        } else {
            p.send(Up::Control(StreamControl::Signal { signal }))
                .await?;
        }
        Ok(api::Empty::new())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.task(&req.id)?;
        if req.exec_id.is_empty() {
            return Err(status(Code::INVALID_ARGUMENT, "exec_id: empty"));
        }
        if c.init.phase() != Phase::Running {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("task {:?} is not running", req.id),
            ));
        }
        let spec = any_json("spec", &req.spec)?;
        check_process(&spec, "spec").map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        {
            let mut execs = lock(&c.execs);
            if execs.contains_key(&req.exec_id) {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("exec {:?} of task {:?} already exists", req.exec_id, req.id),
                ));
            }
            execs.insert(
                req.exec_id.clone(),
                Proc::new(&req.exec_id, stdio, Some(spec)),
            );
        }
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: c.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.task(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let (Ok(cols), Ok(rows)) = (u16::try_from(req.width), u16::try_from(req.height)) else {
            return Err(status(
                Code::INVALID_ARGUMENT,
                "width, height: beyond 65535",
            ));
        };
        if !p.stdio.terminal {
            return Err(status(
                Code::FAILED_PRECONDITION,
                "the process has no terminal",
            ));
        }
        p.send(Up::Control(StreamControl::Resize(WinSize { rows, cols })))
            .await?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.task(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if req.stdin {
            // A process that already ended has no input to close.
            if p.phase() != Phase::Stopped {
                p.send(Up::Eof).await?;
            }
        }
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.task(&req.id)?;
        let resources = any_json("resources", &req.resources)?;
        self.op(
            &c,
            ContainerOp::Update {
                id: c.id.clone(),
                resources,
            },
        )
        .await?;
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let c = self.task(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let mut rx = p.exited.subscribe();
        let exit = match rx.wait_for(Option::is_some).await {
            Ok(e) => (*e).unwrap_or(Exit {
                code: 255,
                at: SystemTime::now(),
            }),
            Err(_) => return Err(status(Code::UNAVAILABLE, "the shim is shutting down")),
        };
        Ok(api::WaitResponse {
            exit_status: exit.code,
            exited_at: timestamp(exit.at),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let c = self.task(&req.id)?;
        let stats = match self.op(&c, ContainerOp::Stats { id: c.id.clone() }).await? {
            ContainerAnswer::Stats { stats } => stats,
            _ => {
                return Err(status(
                    Code::INTERNAL,
                    "burrowd answered stats with something else",
                ))
            }
        };
        let any = crate::metrics::to_any(&stats).map_err(|e| status(Code::INTERNAL, e))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.task(&req.id).map(|c| c.init.pid()).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        if lock(&self.inner.tasks).is_empty() {
            self.inner.exit.signal();
        }
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_member_joins_the_sandboxs_namespaces_it_names() {
        let spec = json!({"linux": {"namespaces": [
            {"type": "network", "path": "/var/run/netns/cni-1234"},
            {"type": "ipc", "path": "/proc/4242/ns/ipc"},
            {"type": "uts", "path": "/proc/4242/ns/uts"},
            {"type": "pid"},
            {"type": "mount", "path": ""},
        ]}});
        let joined = join_namespaces(&spec, 98);
        assert_eq!(
            joined["linux"]["namespaces"],
            json!([
                {"type": "network", "path": "/proc/98/ns/net"},
                {"type": "ipc", "path": "/proc/98/ns/ipc"},
                {"type": "uts", "path": "/proc/98/ns/uts"},
                {"type": "pid"},
                {"type": "mount", "path": ""},
            ])
        );
    }

    #[test]
    fn roots_scope_ids_by_containerd_and_namespace() {
        assert_eq!(
            root_of("/run/containerd/containerd.sock", "k8s.io"),
            "/run/containerd/containerd.sock/k8s.io"
        );
        assert_eq!(
            root_of("unix:///tmp/c.sock", "default"),
            "/tmp/c.sock/default"
        );
        assert_ne!(root_of("/a.sock", "x"), root_of("/b.sock", "x"));
    }
}
