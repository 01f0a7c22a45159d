//! The engine: workspaces and their lifecycle.
//!
//! Every front door (the daemon's HTTP API today) calls into [`Engine`]. Each
//! operation on a workspace holds that workspace's lock, so a stop never races a
//! start. Records go to the database before resources are made, and
//! [`Engine::open`] reconciles what a crashed daemon left behind.

mod containers;
mod guest_ops;
mod network;
mod reconcile;
mod recording;
mod snapshots;
mod state_lock;
mod store_watch;
mod streams;
mod teams;
mod vm;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burrow_fs::{BtrfsImage, ImageSource, Store};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tracing::Instrument;

pub use containers::{
    vm_name as container_vm_name, CONTAINER_OVERHEAD_MIB, DEFAULT_CONTAINER_MEMORY_MIB,
};
pub use guest_ops::LogKind;
pub use network::PolicyChange;
pub use snapshots::{Diff, DiffPath, ForkParams, SnapshotInfo, MAX_FORKS};
pub use state_lock::StateLock;
pub use streams::{validate_control, validate_open};
pub use teams::{TeamMember, TeamParams};

pub use crate::db::{ContainerRef, Kind};
use crate::db::{Db, ForkedFrom, ProcId, State, VmPids, WorkspaceRecord};
use crate::error::{Error, Result};
use crate::guest::GuestClient;
use crate::image::{ImageCache, Progress, DEFAULT_IMAGE};
use crate::names::{new_id, validate_name};
use crate::paths::{CacheDir, StateDir};
use crate::storage::{self, StoreKind};
use crate::vmm::{Accel, Limits, VmPaths, VmmConfig};

pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEMORY_MIB: u32 = 512;
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(90);
const MIN_MEMORY_MIB: u32 = 128;
/// Disk limit of a workspace created without `disk_gb`, in GiB.
pub const DEFAULT_DISK_GB: u32 = 10;
/// Largest `disk_gb` accepted.
pub const MAX_DISK_GB: u32 = 16 * 1024;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateParams {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u32>,
    #[serde(default)]
    pub image: Option<String>,
    /// Seconds the guest may take to come up before the create fails.
    #[serde(default)]
    pub boot_timeout_secs: Option<u64>,
    /// Most GiB its disk may hold (default [`DEFAULT_DISK_GB`] where the store
    /// can limit a volume).
    #[serde(default)]
    pub disk_gb: Option<u32>,
}

/// A workspace as front doors show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkspaceInfo {
    pub id: String,
    pub name: String,
    pub state: State,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub accel: Option<String>,
    pub image: String,
    pub created_at: String,
    pub store: String,
    pub volume: PathBuf,
    /// Host processes of the running VM.
    pub pids: Option<PidsInfo>,
    /// The snapshot this workspace was forked from.
    #[serde(default)]
    pub forked_from: Option<ForkedFrom>,
    /// Its address on the workspaces' network (kept while it exists).
    #[serde(default)]
    pub ip: Option<String>,
    /// The CPU, memory and pids limits of its VM's cgroup (none without cgroups).
    #[serde(default)]
    pub limits: Option<Limits>,
    /// Bytes its disk holds, counted as its limit counts them (see
    /// docs/storage.md: Btrfs counts all the guest sees, FUSE what the volume
    /// wrote since it was made, forked, restored or snapshotted).
    #[serde(default)]
    pub disk_used_bytes: Option<u64>,
    #[serde(default)]
    pub disk_limit_bytes: Option<u64>,
    /// `workspace`, or `container` for a VM made for one OCI container (no
    /// volume: `volume` is the directory it shares with the guest).
    #[serde(default)]
    pub kind: Kind,
    /// The OCI container a container VM serves.
    #[serde(default)]
    pub container: Option<ContainerRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PidsInfo {
    pub qemu: i32,
    pub virtiofsd: i32,
    pub vsock: i32,
    #[serde(default)]
    pub console: Option<i32>,
}

impl From<WorkspaceRecord> for WorkspaceInfo {
    fn from(r: WorkspaceRecord) -> Self {
        WorkspaceInfo {
            id: r.id,
            name: r.name,
            state: r.state,
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
            accel: r.accel,
            image: r.image,
            created_at: r.created_at,
            store: r.store,
            volume: r.volume,
            pids: r.pids.map(|p| PidsInfo {
                qemu: p.qemu.pid,
                virtiofsd: p.virtiofsd.pid,
                vsock: p.vsock.pid,
                console: p.console.map(|c| c.pid),
            }),
            forked_from: r.forked_from,
            ip: None,
            limits: None,
            disk_used_bytes: None,
            disk_limit_bytes: r.disk_limit,
            kind: r.kind,
            container: r.container,
        }
    }
}

/// What a new volume starts from.
#[derive(Debug, Clone)]
pub(super) enum VolumeSource {
    Image(ImageSource),
    Snapshot { workspace_id: String, name: String },
}

pub struct Engine {
    state: StateDir,
    /// This engine's hold on the state dir, from [`Engine::open`] to the end of
    /// [`Engine::close`] (or the engine's drop).
    lock: Mutex<Option<StateLock>>,
    db: Db,
    store: Arc<dyn Store>,
    /// burrow-netd, or why this host gives workspaces no network (then no
    /// workspace boots, and create says why).
    net: std::result::Result<crate::net::Network, String>,
    /// The loop-mounted Btrfs the store lives on, if it has one.
    mount: Option<BtrfsImage>,
    /// Background preparations of the store, awaited before the daemon exits.
    prepares: Mutex<Vec<JoinHandle<()>>>,
    images: ImageCache,
    accel: tokio::sync::OnceCell<Accel>,
    /// One lock per workspace id, held for the length of any operation on it.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The task watching each running VM's processes.
    watchers: Mutex<HashMap<String, JoinHandle<()>>>,
    /// How VMs are confined (user, jail, cgroups) and where their consoles go.
    vmm: VmmConfig,
    /// The task watching the store's server, if it has one.
    store_watch: Mutex<Option<JoinHandle<()>>>,
    /// A container VM's network namespace, from its create until its boot took it.
    container_netns: Mutex<HashMap<String, PathBuf>>,
    /// The recorders of terminal sessions.
    recordings: recording::Recordings,
}

impl Engine {
    /// Opens the state dir and reconciles it with the processes that really run.
    ///
    /// One engine serves a state dir at a time: while another holds it (in this
    /// process or another), this is refused with [`Error::AlreadyServed`] before
    /// anything in the state dir is touched.
    pub async fn open(
        state: StateDir,
        cache: CacheDir,
        agent: PathBuf,
        store: StoreKind,
    ) -> Result<Arc<Engine>> {
        let root = state.root();
        std::fs::create_dir_all(root)
            .map_err(|e| Error::io(format!("create {}", root.display()), e))?;
        // Dropped (released) on every early return below.
        let lock = StateLock::acquire(&state)?;
        for dir in [state.run_root(), state.volumes()] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
        let db = Db::open(&state.database())?;
        let vmm = VmmConfig::from_env(state.root()).map_err(Error::Confinement)?;
        match &vmm.confine {
            Some(u) => tracing::info!(user = %u.name, "VMMs run jailed and unprivileged"),
            None => tracing::warn!("VMMs run unconfined, as the daemon's user"),
        }
        match &vmm.cgroups {
            Some(c) => tracing::info!(version = c.version(), "per-workspace cgroups"),
            None => {
                tracing::warn!("no cgroups: workspaces run without CPU, memory and pids limits")
            }
        }
        let opened = {
            let state = state.clone();
            tokio::task::spawn_blocking(move || storage::open(&state, store))
                .await
                .map_err(|e| Error::Vmm(format!("store task: {e}")))??
        };
        tracing::info!(store = opened.store.kind(), "volume store");
        let net = {
            let state = state.clone();
            tokio::task::spawn_blocking(move || crate::net::Network::open(&state))
                .await
                .map_err(|e| Error::Vmm(format!("network task: {e}")))?
        };
        let engine = Arc::new(Engine {
            state,
            lock: Mutex::new(Some(lock)),
            db,
            store: opened.store,
            net,
            mount: opened.mount,
            prepares: Mutex::new(Vec::new()),
            images: ImageCache::new(cache, agent),
            accel: tokio::sync::OnceCell::new(),
            locks: Mutex::new(HashMap::new()),
            watchers: Mutex::new(HashMap::new()),
            vmm,
            store_watch: Mutex::new(None),
            container_netns: Mutex::new(HashMap::new()),
            recordings: recording::Recordings::default(),
        });
        engine.reconcile().await?;
        engine.resume_recordings();
        engine.watch_store();
        engine.recover_store_replaced_at_open();
        if let Some(source) = engine.image_source(DEFAULT_IMAGE) {
            engine.prepare_volume(source);
        }
        Ok(engine)
    }

    pub fn images(&self) -> &ImageCache {
        &self.images
    }

    pub fn state_dir(&self) -> &StateDir {
        &self.state
    }

    pub fn accel(&self) -> Option<Accel> {
        self.accel.get().copied()
    }

    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id.to_string()).or_default().clone()
    }

    /// Resolves `reference` and takes the workspace's lock. The record is read again
    /// under the lock: whoever held it before may have changed or removed it.
    async fn lock_workspace(
        &self,
        reference: &str,
    ) -> Result<(tokio::sync::OwnedMutexGuard<()>, WorkspaceRecord)> {
        let id = self.db.resolve(reference)?.id;
        let held = self.lock_for(&id).lock_owned().await;
        let rec = self
            .db
            .get(&id)?
            .ok_or_else(|| Error::WorkspaceNotFound(reference.to_string()))?;
        Ok((held, rec))
    }

    fn paths(&self, id: &str) -> VmPaths {
        VmPaths::new(self.state.run_dir(id), self.state.log_dir(id))
    }

    fn guest(&self, rec: &WorkspaceRecord) -> GuestClient {
        GuestClient::new(self.paths(&rec.id).vsock_uds(), rec.name.clone())
    }

    pub fn list(&self, state: Option<State>) -> Result<Vec<WorkspaceInfo>> {
        let all = self.db.list()?;
        Ok(all
            .into_iter()
            .filter(|r| state.is_none_or(|s| r.state == s))
            .map(Into::into)
            .collect())
    }

    pub fn info(&self, reference: &str) -> Result<WorkspaceInfo> {
        let mut info: WorkspaceInfo = self.db.resolve(reference)?.into();
        if self.vmm.cgroups.is_some() {
            info.limits = Some(Limits::for_vm(info.vcpus, info.memory_mib));
        }
        if self.store.limits_disk() && info.state != State::Creating && info.kind == Kind::Workspace
        {
            match self.store.disk_usage(&info.id) {
                Ok(u) => {
                    info.disk_used_bytes = Some(u.used_bytes);
                    info.disk_limit_bytes = u.limit_bytes.or(info.disk_limit_bytes);
                }
                Err(e) => tracing::debug!(workspace = %info.id, "disk usage: {e}"),
            }
        }
        if let Ok(net) = &self.net {
            info.ip = net
                .leases()
                .into_iter()
                .find(|l| l.workspace == info.id)
                .map(|l| l.ip.to_string());
        }
        Ok(info)
    }

    /// Creates a workspace and boots it. On any failure nothing is left behind.
    pub async fn create(
        self: &Arc<Self>,
        params: CreateParams,
        progress: Option<&Progress>,
    ) -> Result<WorkspaceInfo> {
        let vcpus = params.vcpus.unwrap_or(DEFAULT_VCPUS);
        let host_cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        if vcpus == 0 || vcpus > host_cpus {
            return Err(Error::invalid(
                "vcpus",
                format!("{vcpus} is outside 1..={host_cpus} (the host's CPUs)"),
            ));
        }
        let memory_mib = params.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
        let host_mib = host_memory_mib();
        if memory_mib < MIN_MEMORY_MIB || memory_mib > host_mib {
            return Err(Error::invalid(
                "memory",
                format!("{memory_mib} MiB is outside {MIN_MEMORY_MIB}..={host_mib} MiB"),
            ));
        }
        let image = params.image.unwrap_or_else(|| DEFAULT_IMAGE.to_string());
        ImageCache::validate(&image)?;
        // A workspace without its network is refused, not made silently.
        self.network()?;
        let boot_timeout = boot_timeout(params.boot_timeout_secs)?;
        let disk_limit = self.disk_limit(params.disk_gb, Some(DEFAULT_DISK_GB))?;
        let id = new_id()?;
        let name = match params.name {
            Some(n) => {
                validate_name("name", &n)?;
                n
            }
            None => format!("ws-{}", &id[..6]),
        };
        if self.db.resolve(&name).is_ok_and(|r| r.name == name) {
            return Err(Error::NameTaken(name));
        }
        let Some(source) = self.image_source(&image) else {
            return Err(Error::ImageNotFound(image));
        };
        let rec = WorkspaceRecord {
            id: id.clone(),
            name,
            state: State::Creating,
            vcpus,
            memory_mib,
            image: image.clone(),
            created_at: now_rfc3339(),
            accel: None,
            store: self.store.kind().to_string(),
            volume: self.store.volume_path(&id),
            pids: None,
            forked_from: None,
            disk_limit,
            kind: Kind::Workspace,
            container: None,
        };
        self.materialize(rec, VolumeSource::Image(source), boot_timeout, progress)
            .await
    }

    /// Records `rec`, makes its volume from `source` and boots it. On any failure
    /// nothing is left behind.
    pub(super) async fn materialize(
        self: &Arc<Self>,
        rec: WorkspaceRecord,
        source: VolumeSource,
        boot_timeout: Duration,
        progress: Option<&Progress>,
    ) -> Result<WorkspaceInfo> {
        let id = rec.id.clone();
        let lock = self.lock_for(&id);
        let _held = lock.lock().await;
        self.db.insert(&rec)?;
        let span = tracing::info_span!("create", workspace = %id, name = %rec.name);
        let made = async {
            let store = self.store.clone();
            let vid = id.clone();
            let src = source.clone();
            tokio::task::spawn_blocking(move || match src {
                VolumeSource::Image(image) => store.create(&vid, &image),
                VolumeSource::Snapshot { workspace_id, name } => {
                    store.clone_snapshot(&workspace_id, &name, &vid)
                }
            })
            .await
            .map_err(|e| Error::Vmm(format!("volume task: {e}")))??;
            match source {
                VolumeSource::Image(image) => self.prepare_volume(image),
                VolumeSource::Snapshot { name, .. } => {
                    if let Some(f) = &rec.forked_from {
                        self.db.set_head(&id, &format!("{}@{name}", f.workspace))?;
                    }
                }
            }
            self.db.set_state(&id, State::Stopped)?;
            self.start_locked(&rec, boot_timeout, progress).await
        }
        .instrument(span)
        .await;
        match made {
            Ok(()) => self.info(&id),
            Err(e) => {
                tracing::warn!("create failed, undoing: {e}");
                if let Err(e2) = self.remove_locked(&rec).await {
                    tracing::error!("undoing the failed create: {e2}");
                }
                Err(e)
            }
        }
    }

    /// The disk limit in bytes for `disk_gb` (else `default`), or none where
    /// the store cannot limit a volume (then asking for one is an error).
    pub(super) fn disk_limit(
        &self,
        disk_gb: Option<u32>,
        default: Option<u32>,
    ) -> Result<Option<u64>> {
        if let Some(gb) = disk_gb {
            if gb == 0 || gb > MAX_DISK_GB {
                return Err(Error::invalid(
                    "disk_gb",
                    format!("{gb} is outside 1..={MAX_DISK_GB} GiB"),
                ));
            }
            if !self.store.limits_disk() {
                return Err(Error::invalid(
                    "disk_gb",
                    format!(
                        "the {} store cannot limit a workspace's disk",
                        self.store.kind()
                    ),
                ));
            }
        }
        if !self.store.limits_disk() {
            return Ok(None);
        }
        Ok(disk_gb.or(default).map(|gb| u64::from(gb) << 30))
    }

    /// Puts the recorded disk limit on a workspace's volume (at every boot: a
    /// restore or a store's restart may have made it anew).
    pub(super) async fn apply_disk_limit(&self, rec: &WorkspaceRecord) -> Result<()> {
        let Some(bytes) = rec.disk_limit else {
            return Ok(());
        };
        if !self.store.limits_disk() {
            return Ok(());
        }
        let store = self.store.clone();
        let id = rec.id.clone();
        tokio::task::spawn_blocking(move || store.set_disk_limit(&id, Some(bytes)))
            .await
            .map_err(|e| Error::Vmm(format!("volume task: {e}")))??;
        Ok(())
    }

    fn image_source(&self, image: &str) -> Option<ImageSource> {
        let info = self.images.info(image)?;
        Some(ImageSource {
            key: format!("{}-{}", info.name, info.built_at),
            root: info.path,
        })
    }

    /// Lets the store get the next create from `source` ready, in the background.
    fn prepare_volume(&self, source: ImageSource) {
        let store = self.store.clone();
        let task = tokio::task::spawn_blocking(move || {
            if let Err(e) = store.prepare(&source) {
                tracing::warn!("preparing a volume of {}: {e}", source.key);
            }
        });
        let mut prepares = self.prepares.lock().unwrap_or_else(|p| p.into_inner());
        prepares.retain(|t| !t.is_finished());
        prepares.push(task);
    }

    /// Called as the daemon exits: lets background work finish and, when no VM
    /// needs it, stops the store's FUSE server and unmounts its loop-mounted Btrfs
    /// (the next start brings them back), so that a stopped daemon leaves no mount
    /// or process behind. Last, it lets go of the state dir, which another engine
    /// may open from then on: this is the engine's last call.
    pub async fn close(&self) {
        self.close_store().await;
        self.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    async fn close_store(&self) {
        let tasks: Vec<_> =
            std::mem::take(&mut *self.prepares.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
        let busy = self
            .db
            .list()
            .map(|l| l.iter().any(|w| w.pids.is_some()))
            .unwrap_or(true);
        // From here on the server's exit is wanted (or the daemon's own).
        self.unwatch_store();
        if busy {
            tracing::info!("VMs run on the volume store: it stays mounted");
            return;
        }
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.shutdown()).await {
            Ok(Err(e)) => tracing::warn!("volume store shutdown: {e}"),
            Err(e) => tracing::warn!("volume store shutdown: {e}"),
            Ok(Ok(())) => {}
        }
        if let Ok(net) = &self.net {
            net.shutdown();
        }
        if let Some(c) = &self.vmm.cgroups {
            c.remove_parent();
        }
        if let Some(mount) = &self.mount {
            if let Err(e) = mount.unmount() {
                tracing::warn!("unmount {}: {e}", mount.mountpoint.display());
            }
        }
    }

    pub fn store_kind(&self) -> &'static str {
        self.store.kind()
    }

    pub async fn start(
        self: &Arc<Self>,
        reference: &str,
        boot_timeout_secs: Option<u64>,
    ) -> Result<WorkspaceInfo> {
        let boot_timeout = boot_timeout(boot_timeout_secs)?;
        let (_held, rec) = self.lock_workspace(reference).await?;
        match rec.state {
            State::Running => return self.info(&rec.id),
            // Its mounts were made for one boot; the OCI runtime makes a new VM.
            State::Stopped if rec.kind == Kind::Container => {
                return Err(Error::invalid(
                    "workspace",
                    format!(
                        "{} is a stopped container VM: it cannot start again; destroy it",
                        rec.name
                    ),
                ))
            }
            State::Stopped => {}
            s => return Err(wrong_state(&rec, s, "start", "stopped")),
        }
        self.start_locked(&rec, boot_timeout, None).await?;
        self.info(&rec.id)
    }

    pub async fn stop(self: &Arc<Self>, reference: &str) -> Result<WorkspaceInfo> {
        let (_held, rec) = self.lock_workspace(reference).await?;
        match rec.state {
            State::Stopped => return self.info(&rec.id),
            State::Running => {}
            s => return Err(wrong_state(&rec, s, "stop", "running")),
        }
        self.stop_locked(&rec).await?;
        self.info(&rec.id)
    }

    /// Stops the VM if it runs and removes the workspace: volume, run dir, logs, record.
    pub async fn destroy(self: &Arc<Self>, reference: &str) -> Result<()> {
        let (_held, rec) = self.lock_workspace(reference).await?;
        self.db.set_state(&rec.id, State::Destroying)?;
        self.remove_locked(&rec).await?;
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&rec.id);
        Ok(())
    }

    async fn remove_locked(&self, rec: &WorkspaceRecord) -> Result<()> {
        self.cancel_watcher(&rec.id);
        self.stop_recordings(&rec.id);
        for snap in self.db.snapshots(Some(&rec.id))? {
            self.delete_snapshot_locked(&rec.id, &snap.name).await?;
        }
        if let Some(pids) = self.db.get(&rec.id)?.and_then(|r| r.pids) {
            self.shutdown_vm(rec, &pids).await;
        }
        self.release_cgroup(&rec.id).await;
        self.clear_run_dir(&rec.id);
        if rec.kind == Kind::Container {
            // The VM is down: nothing in the guest can move the mounts now.
            self.unshare_container(&rec.id).await?;
        } else {
            if let Ok(net) = &self.net {
                net.release(&rec.id);
            }
            let store = self.store.clone();
            let id = rec.id.clone();
            tokio::task::spawn_blocking(move || store.delete(&id))
                .await
                .map_err(|e| Error::Vmm(format!("volume task: {e}")))??;
        }
        let logs = self.state.log_dir(&rec.id);
        if let Err(e) = std::fs::remove_dir_all(&logs) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(Error::io(format!("remove {}", logs.display()), e));
            }
        }
        self.db.delete(&rec.id)
    }

    /// A running workspace and a client for its agent.
    fn running(&self, reference: &str) -> Result<(WorkspaceRecord, GuestClient)> {
        let rec = self.db.resolve(reference)?;
        if rec.state != State::Running {
            return Err(wrong_state(&rec, rec.state, "this", "running"));
        }
        let guest = self.guest(&rec);
        Ok((rec, guest))
    }
}

fn wrong_state(
    rec: &WorkspaceRecord,
    state: State,
    action: &'static str,
    wanted: &'static str,
) -> Error {
    Error::WrongState {
        name: rec.name.clone(),
        state: state.to_string(),
        action,
        wanted,
    }
}

fn boot_timeout(secs: Option<u64>) -> Result<Duration> {
    match secs {
        None => Ok(DEFAULT_BOOT_TIMEOUT),
        Some(0) => Err(Error::invalid("boot_timeout", "must be at least 1 second")),
        Some(s) if s > 3600 => Err(Error::invalid(
            "boot_timeout",
            format!("{s} s is over an hour"),
        )),
        Some(s) => Ok(Duration::from_secs(s)),
    }
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

pub(super) fn host_memory_mib() -> u32 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| (kb / 1024) as u32)
        .unwrap_or(u32::MAX)
}

/// Kept for reconcile: all three processes of a recorded VM still run.
fn all_alive(pids: &VmPids) -> bool {
    pids.all().iter().all(ProcId::is_alive)
}
