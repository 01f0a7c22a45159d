//! Container VMs: one OCI container, one microVM (docs/oci.md).
//!
//! A container VM has no volume. Its virtio-fs device serves a directory of the
//! host, `$STATE/containers/<vm id>/shared`: a small tmpfs (so what the guest
//! writes there is bounded), nosuid,nodev, a mount point of its own with shared
//! propagation, so that bind mounts the host adds under it after the boot reach
//! virtiofsd's mount namespace, and so the guest. In it, per container:
//!
//! ```text
//! <oci id>/rootfs        bind mount of the bundle's root file system (ro if root.readonly)
//! <oci id>/mounts/<n>    bind mount of the source of the spec's n-th mount, when it binds
//!                        a host path (ro if its options say so)
//! <oci id>/config.json   the spec, its paths rewritten for the guest
//! ```
//!
//! Every host-side mount is nosuid,nodev. Destroy stops the VM first (so the guest
//! can no longer move things under the host's feet), then unmounts everything under
//! the VM's directory, deepest first, lazily, and removes it only once
//! /proc/self/mountinfo shows nothing under it.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burrow_proto::{ContainerOp, Op, Reply, CONTAINERS_DIR};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{host_memory_mib, now_rfc3339, Engine, DEFAULT_BOOT_TIMEOUT};
use crate::api::types::{ContainerAnswer, ContainerVmRequest};
use crate::db::{ContainerRef, Kind, State, WorkspaceRecord};
use crate::error::{Error, Result};
use crate::names::new_id;

/// Memory a container VM gets on top of the container's memory limit: the guest
/// kernel, the agent, the container runtime and the root tmpfs.
pub const CONTAINER_OVERHEAD_MIB: u32 = 160;
/// Memory of a container VM whose spec sets no memory limit.
pub const DEFAULT_CONTAINER_MEMORY_MIB: u32 = 512;
/// The kernel's default CFS period (µs), when a spec gives a quota without one.
const DEFAULT_CPU_PERIOD: u64 = 100_000;
/// Size of the shared directory's tmpfs: config.json files and mount points only.
const SHARED_TMPFS: &str = "size=4m,nr_inodes=4096,mode=0755";

/// What a validated request makes: the VM's size and what to share with it.
#[derive(Debug, Clone)]
pub struct Plan {
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The bundle's root file system on the host.
    pub rootfs: PathBuf,
    pub rootfs_readonly: bool,
    pub binds: Vec<Bind>,
    /// config.json as the guest reads it.
    pub guest_spec: Value,
    /// The network namespace the caller made for the container (dockerd's, CNI's):
    /// the VM's interface takes over its interface (see [`crate::vmm::netns`]).
    pub netns: Option<PathBuf>,
}

/// A bind mount of the spec: its index among the spec's mounts, which names it
/// under `mounts/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub index: usize,
    pub source: PathBuf,
    pub dir: bool,
    pub readonly: bool,
    pub recursive: bool,
}

/// The VM's name: `c-` and 12 hex digits of a hash of (root, id), so one id in two
/// OCI roots makes two VMs and a second create in one root finds the first.
pub fn vm_name(root: &str, id: &str) -> String {
    let mut h = Sha256::new();
    h.update(root.as_bytes());
    h.update([0]);
    h.update(id.as_bytes());
    let hex: String = h
        .finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("c-{hex}")
}

/// Checks a request and works out the VM it needs. Touches nothing.
pub fn plan(req: &ContainerVmRequest, host_cpus: u32, host_mib: u32) -> Result<Plan> {
    burrow_proto::validate_container_id(&req.id).map_err(|e| Error::invalid_line("id", e))?;
    if !req.root.starts_with('/') || req.root.contains('\0') {
        return Err(Error::invalid(
            "root",
            format!("{:?} is not an absolute path", req.root),
        ));
    }
    if !req.bundle.is_absolute() {
        return Err(Error::invalid(
            "bundle",
            format!("{} is not an absolute path", req.bundle.display()),
        ));
    }
    if !req.bundle.is_dir() {
        return Err(Error::invalid(
            "bundle",
            format!("{} is not a directory", req.bundle.display()),
        ));
    }
    let Some(spec) = req.spec.as_object() else {
        return Err(Error::invalid(
            "spec",
            "must be a JSON object (config.json)",
        ));
    };
    let root = spec.get("root").and_then(Value::as_object);
    let root_path = root
        .and_then(|r| r.get("path"))
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| Error::invalid("spec.root.path", "missing (a string naming the rootfs)"))?;
    let rootfs = req.bundle.join(root_path);
    if !rootfs.is_dir() {
        return Err(Error::invalid(
            "spec.root.path",
            format!("{} is not a directory", rootfs.display()),
        ));
    }
    let rootfs_readonly = match root.and_then(|r| r.get("readonly")) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(Error::invalid(
                "spec.root.readonly",
                format!("{v} is not a boolean"),
            ))
        }
    };
    let binds = binds(spec.get("mounts"), &req.bundle)?;
    let (vcpus, memory_mib) = size(spec, host_cpus, host_mib)?;

    let netns = network_namespace(spec)?;

    let mut guest_spec = req.spec.clone();
    guest_spec["root"]["path"] = Value::from("rootfs");
    // The guest's CPUs are 0..vcpus and its memory one node: a host cpuset
    // (`docker run --cpuset-cpus 3`) sized the VM, and inside it means all of it.
    if let Some(cpu) = guest_spec
        .pointer_mut("/linux/resources/cpu")
        .and_then(Value::as_object_mut)
    {
        if cpu
            .get("cpus")
            .and_then(Value::as_str)
            .is_some_and(|c| !c.is_empty())
        {
            let all = if vcpus == 1 {
                "0".to_string()
            } else {
                format!("0-{}", vcpus - 1)
            };
            cpu.insert("cpus".into(), Value::from(all));
        }
        if cpu
            .get("mems")
            .and_then(Value::as_str)
            .is_some_and(|m| !m.is_empty())
        {
            cpu.insert("mems".into(), Value::from("0"));
        }
    }
    if netns.is_some() {
        // The host's namespace has no meaning in the guest: the container shares
        // the VM's, whose interface is the one it was given.
        if let Some(list) = guest_spec
            .pointer_mut("/linux/namespaces")
            .and_then(Value::as_array_mut)
        {
            list.retain(|n| n["type"] != "network");
        }
    }
    if let Some(mounts) = guest_spec.get_mut("mounts").and_then(Value::as_array_mut) {
        for b in &binds {
            mounts[b.index]["source"] =
                Value::from(format!("{CONTAINERS_DIR}/{}/mounts/{}", req.id, b.index));
        }
    }
    Ok(Plan {
        vcpus,
        memory_mib,
        rootfs,
        rootfs_readonly,
        binds,
        guest_spec,
        netns,
    })
}

/// Checks the request of a container added to a running container VM of
/// `vm_vcpus` CPUs (a pod's member, sharing the VM with the VM's container). Its
/// namespace paths name namespaces inside the VM, another container's
/// (`/proc/<guest pid>/ns/<kind>`): they are kept for the guest, never looked up
/// on the host. Touches nothing.
pub fn member_plan(req: &ContainerVmRequest, vm_vcpus: u32) -> Result<Plan> {
    let mut host_view = req.clone();
    let mut paths = Vec::new();
    if let Some(list) = host_view
        .spec
        .pointer_mut("/linux/namespaces")
        .and_then(Value::as_array_mut)
    {
        for (i, n) in list.iter_mut().enumerate() {
            let Some(o) = n.as_object_mut() else { continue };
            let Some(p) = o.remove("path") else { continue };
            match p.as_str() {
                _ if p.is_null() || p == "" => {}
                Some(s) if is_guest_namespace(s) => paths.push((i, s.to_string())),
                _ => {
                    return Err(Error::invalid(
                        "spec.linux.namespaces",
                        format!(
                            "[{i}].path: {p} is not a namespace inside the VM (/proc/<guest pid>/ns/<kind>)"
                        ),
                    ))
                }
            }
        }
    }
    let mut plan = plan(&host_view, vm_vcpus, u32::MAX)?;
    for (i, path) in paths {
        plan.guest_spec["linux"]["namespaces"][i]["path"] = Value::from(path);
    }
    Ok(plan)
}

/// `/proc/<pid>/ns/<kind>`: a namespace of a process of the guest.
fn is_guest_namespace(p: &str) -> bool {
    let Some(rest) = p.strip_prefix("/proc/") else {
        return false;
    };
    let Some((pid, kind)) = rest.split_once("/ns/") else {
        return false;
    };
    !pid.is_empty()
        && pid.len() <= 10
        && pid.bytes().all(|b| b.is_ascii_digit())
        && matches!(
            kind,
            "net" | "ipc" | "uts" | "pid" | "mnt" | "cgroup" | "user" | "time"
        )
}

/// The path of the spec's network namespace, when it names an existing one.
fn network_namespace(spec: &serde_json::Map<String, Value>) -> Result<Option<PathBuf>> {
    let list = match spec.get("linux").and_then(|l| l.get("namespaces")) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(l)) => l,
        Some(v) => {
            return Err(Error::invalid(
                "spec.linux.namespaces",
                format!("{v} is not a list"),
            ))
        }
    };
    let Some(net) = list.iter().find(|n| n["type"] == "network") else {
        return Ok(None);
    };
    match net.get("path") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(p)) if p.is_empty() => Ok(None),
        Some(Value::String(p)) => {
            let path = PathBuf::from(p);
            if !path.is_absolute() || !path.exists() {
                return Err(Error::invalid(
                    "spec.linux.namespaces",
                    format!("network namespace {p} does not exist"),
                ));
            }
            Ok(Some(path))
        }
        Some(v) => Err(Error::invalid(
            "spec.linux.namespaces",
            format!("network path {v} is not a string"),
        )),
    }
}

/// The spec's mounts that bind a host path (`type` bind, or an option bind/rbind).
fn binds(mounts: Option<&Value>, bundle: &Path) -> Result<Vec<Bind>> {
    let mounts = match mounts {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(m)) => m,
        Some(_) => return Err(Error::invalid("spec.mounts", "must be an array")),
    };
    let mut out = Vec::new();
    for (index, m) in mounts.iter().enumerate() {
        let bad = |why: String| Error::invalid("spec.mounts", format!("[{index}]: {why}"));
        let Some(m) = m.as_object() else {
            return Err(bad("must be an object".into()));
        };
        if m.get("destination")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(bad("destination: missing".into()));
        }
        let options: Vec<&str> = match m.get("options") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(o)) => o
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| bad(format!("options: {v} is not a string")))
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(bad("options: must be an array of strings".into())),
        };
        let kind = match m.get("type") {
            None | Some(Value::Null) => "",
            Some(Value::String(t)) => t.as_str(),
            Some(v) => return Err(bad(format!("type: {v} is not a string"))),
        };
        let is_bind = kind == "bind" || options.iter().any(|o| matches!(*o, "bind" | "rbind"));
        if !is_bind {
            continue;
        }
        let source = m
            .get("source")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("source: a bind mount needs one".into()))?;
        if source.contains('\0') {
            return Err(bad("source: contains a NUL byte".into()));
        }
        // The runtime spec lets a bind source be relative to the bundle.
        let source = bundle.join(source);
        let meta = std::fs::metadata(&source)
            .map_err(|e| bad(format!("source {}: {e}", source.display())))?;
        // The last of ro/rw wins, as in mount(8).
        let readonly = options
            .iter()
            .rev()
            .find(|o| matches!(**o, "ro" | "rw"))
            .is_some_and(|o| *o == "ro");
        out.push(Bind {
            index,
            source,
            dir: meta.is_dir(),
            readonly,
            recursive: options.contains(&"rbind"),
        });
    }
    Ok(out)
}

/// vCPUs and memory (MiB) of the VM, from the spec's `linux.resources`.
fn size(
    spec: &serde_json::Map<String, Value>,
    host_cpus: u32,
    host_mib: u32,
) -> Result<(u32, u32)> {
    const F: &str = "spec.linux.resources";
    let res = match spec.get("linux").and_then(|l| l.get("resources")) {
        None | Some(Value::Null) => return Ok((1, DEFAULT_CONTAINER_MEMORY_MIB)),
        Some(Value::Object(r)) => r,
        Some(_) => return Err(Error::invalid(F, "must be an object")),
    };
    let int = |group: &str, key: &str| -> Result<Option<i64>> {
        match res.get(group).and_then(|g| g.get(key)) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| Error::invalid(F, format!("{group}.{key}: {v} is not an integer"))),
        }
    };
    let at_least = |group: &str, key: &str, min: i64| -> Result<Option<i64>> {
        match int(group, key)? {
            Some(n) if n < min => Err(Error::invalid(
                F,
                format!("{group}.{key}: {n} is below {min}"),
            )),
            n => Ok(n),
        }
    };
    for g in ["memory", "cpu", "pids"] {
        if let Some(v) = res.get(g) {
            if !v.is_object() && !v.is_null() {
                return Err(Error::invalid(F, format!("{g}: must be an object")));
            }
        }
    }
    // -1 is "no limit" wherever the runtime spec allows a limit.
    let limit = at_least("memory", "limit", -1)?;
    at_least("memory", "reservation", -1)?;
    at_least("memory", "swap", -1)?;
    at_least("pids", "limit", -1)?;
    at_least("cpu", "shares", 0)?;
    let quota = at_least("cpu", "quota", -1)?;
    let period = match at_least("cpu", "period", 0)? {
        None | Some(0) => None,
        Some(p) if !(1000..=1_000_000).contains(&p) => {
            return Err(Error::invalid(
                F,
                format!("cpu.period: {p} µs is outside 1000..=1000000"),
            ))
        }
        Some(p) => Some(p as u64),
    };
    let cpus = match res.get("cpu").and_then(|c| c.get("cpus")) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(
            cpuset_count(s)
                .ok_or_else(|| Error::invalid(F, format!("cpu.cpus: {s:?} is not a CPU list")))?,
        ),
        Some(v) => return Err(Error::invalid(F, format!("cpu.cpus: {v} is not a string"))),
    };
    let vcpus = match quota {
        Some(q) if q > 0 => {
            let period = period.unwrap_or(DEFAULT_CPU_PERIOD);
            (q as u64).div_ceil(period)
        }
        _ => cpus.map(u64::from).unwrap_or(1),
    };
    let vcpus = vcpus.clamp(1, u64::from(host_cpus.max(1))) as u32;
    let memory_mib = match limit {
        Some(l) if l > 0 => {
            let mib = (l as u64).div_ceil(1 << 20) + u64::from(CONTAINER_OVERHEAD_MIB);
            if mib > u64::from(host_mib) {
                return Err(Error::invalid(
                    F,
                    format!(
                        "memory.limit: {l} bytes and {CONTAINER_OVERHEAD_MIB} MiB for the guest is more than the host's {host_mib} MiB"
                    ),
                ));
            }
            mib as u32
        }
        _ => DEFAULT_CONTAINER_MEMORY_MIB.min(host_mib),
    };
    Ok((vcpus, memory_mib))
}

/// How many CPUs a cpuset list (`0-3,5`) names; None if it does not parse.
fn cpuset_count(s: &str) -> Option<u32> {
    let mut n = 0u32;
    for part in s.split(',') {
        let part = part.trim();
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let a = part.parse::<u32>().ok()?;
                (a, a)
            }
        };
        if b < a || b > 8191 {
            return None;
        }
        n = n.checked_add(b - a + 1)?;
    }
    Some(n)
}

impl Engine {
    /// `POST /v1/containers`: boots a VM for one OCI container. Nothing is made
    /// before the request passes its checks; a failure leaves nothing behind.
    pub async fn container_vm_create(
        self: &Arc<Self>,
        req: ContainerVmRequest,
    ) -> Result<super::WorkspaceInfo> {
        let host_cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let plan = plan(&req, host_cpus, host_memory_mib())?;
        let netns = plan.netns.clone();
        let name = vm_name(&req.root, &req.id);
        let exists = |vm: String| Error::ContainerExists {
            id: req.id.clone(),
            root: req.root.clone(),
            vm,
        };
        if self.db.resolve(&name).is_ok_and(|r| r.name == name) {
            return Err(exists(name));
        }
        let id = new_id()?;
        let rec = WorkspaceRecord {
            id: id.clone(),
            name: name.clone(),
            state: State::Creating,
            vcpus: plan.vcpus,
            memory_mib: plan.memory_mib,
            image: String::new(),
            created_at: now_rfc3339(),
            accel: None,
            store: "none".into(),
            volume: self.state.container_dir(&id).join("shared"),
            pids: None,
            forked_from: None,
            disk_limit: None,
            kind: Kind::Container,
            container: Some(ContainerRef {
                id: req.id.clone(),
                root: req.root.clone(),
                bundle: req.bundle.clone(),
            }),
        };
        let lock = self.lock_for(&id);
        let _held = lock.lock().await;
        match self.db.insert(&rec) {
            Err(Error::NameTaken(_)) => return Err(exists(name)),
            r => r?,
        }
        let made = async {
            let dir = self.state.container_dir(&id);
            let root = self.state.containers_root();
            let oci = req.id.clone();
            tokio::task::spawn_blocking(move || share(&root, &dir, &oci, &plan))
                .await
                .map_err(|e| Error::Vmm(format!("share task: {e}")))??;
            self.db.set_state(&id, State::Stopped)?;
            if let Some(ns) = netns {
                lock_map(&self.container_netns).insert(id.clone(), ns);
            }
            let booted = self.start_locked(&rec, DEFAULT_BOOT_TIMEOUT, None).await;
            lock_map(&self.container_netns).remove(&id);
            booted
        }
        .await;
        match made {
            Ok(()) => self.info(&id),
            Err(e) => {
                tracing::warn!(workspace = %id, "container VM create failed, undoing: {e}");
                if let Err(e2) = self.remove_locked(&rec).await {
                    tracing::error!("undoing the failed create: {e2}");
                }
                Err(e)
            }
        }
    }

    /// The interface a container VM boots with: the one of the network namespace
    /// its create named (a TAP in it, redirected to and from its veth), if any.
    pub(super) async fn container_net(&self, id: &str) -> Result<Option<crate::vmm::VmNet>> {
        let Some(ns) = lock_map(&self.container_netns).get(id).cloned() else {
            return Ok(None);
        };
        let link = tokio::task::spawn_blocking(move || crate::vmm::netns::attach(&ns))
            .await
            .map_err(|e| Error::Vmm(format!("network task: {e}")))?
            .map_err(Error::Vmm)?;
        Ok(link.map(|l| {
            tracing::info!(workspace = %id, ip = %l.ip, veth = %l.veth, "container network");
            crate::vmm::VmNet {
                tap: std::sync::Arc::new(l.tap),
                mac: l.mac,
                ip: l.ip,
                prefix: l.prefix,
                gateway: l.gateway.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
            }
        }))
    }

    /// `POST /v1/workspaces/{ws}/containers`: a request on a container in the VM,
    /// relayed to its agent.
    pub async fn container_op(&self, reference: &str, op: ContainerOp) -> Result<ContainerAnswer> {
        burrow_proto::validate_container_id(op.id()).map_err(|e| Error::invalid_line("id", e))?;
        let (_, guest) = self.running(reference)?;
        match guest.call(Op::Container(op), None).await? {
            Reply::Container(s) => Ok(ContainerAnswer::Status(s)),
            Reply::Pids { pids } => Ok(ContainerAnswer::Pids { pids }),
            Reply::ContainerStats { stats } => Ok(ContainerAnswer::Stats { stats }),
            r => Err(super::guest_ops::unexpected("container", r)),
        }
    }

    /// `POST /v1/workspaces/{ws}/containers/share`: shares a container's files
    /// (its rootfs and bind sources, its config.json for the guest) with running
    /// container VM `reference`, for the guest to make it there: a pod's member
    /// beside the VM's own container. Everything shared lives under the VM's
    /// directory, so the VM's destroy removes it even if no unshare comes.
    pub async fn container_share(
        &self,
        reference: &str,
        req: ContainerVmRequest,
    ) -> Result<crate::api::types::ContainerShared> {
        let (rec, _) = self.running(reference)?;
        if rec.kind != Kind::Container {
            return Err(Error::invalid(
                "workspace",
                format!("{} is a workspace, not a container VM", rec.name),
            ));
        }
        let plan = member_plan(&req, rec.vcpus)?;
        let lock = self.lock_for(&rec.id);
        let _held = lock.lock().await;
        let shared = self.state.container_dir(&rec.id).join("shared");
        let taken = rec.container.as_ref().is_some_and(|c| c.id == req.id)
            || std::fs::symlink_metadata(shared.join(&req.id)).is_ok();
        if taken {
            return Err(Error::ContainerExists {
                id: req.id.clone(),
                root: req.root.clone(),
                vm: rec.name.clone(),
            });
        }
        let id = req.id.clone();
        let shared2 = shared.clone();
        let made = tokio::task::spawn_blocking(move || share_container(&shared2, &id, &plan))
            .await
            .map_err(|e| Error::Vmm(format!("share task: {e}")))?;
        if let Err(e) = made {
            let vm_dir = self.state.container_dir(&rec.id);
            let oci = req.id.clone();
            let undone = tokio::task::spawn_blocking(move || unshare_member(&vm_dir, &oci)).await;
            if let Ok(Err(e2)) = undone {
                tracing::error!("undoing a failed share: {e2}");
            }
            return Err(e);
        }
        Ok(crate::api::types::ContainerShared {
            id: req.id,
            vm: rec.id,
        })
    }

    /// `DELETE /v1/workspaces/{ws}/containers/share/{id}`: unmounts and removes
    /// what [`Engine::container_share`] shared (the guest deleted the container
    /// first). The VM's own container goes with the VM only.
    pub async fn container_unshare(&self, reference: &str, oci_id: &str) -> Result<()> {
        burrow_proto::validate_container_id(oci_id).map_err(|e| Error::invalid_line("id", e))?;
        let rec = self.db.resolve(reference)?;
        if rec.kind != Kind::Container || rec.container.as_ref().is_some_and(|c| c.id == oci_id) {
            return Err(Error::invalid(
                "id",
                format!("{oci_id:?} is not a container added to {}", rec.name),
            ));
        }
        let lock = self.lock_for(&rec.id);
        let _held = lock.lock().await;
        let vm_dir = self.state.container_dir(&rec.id);
        if std::fs::symlink_metadata(vm_dir.join("shared").join(oci_id)).is_err() {
            return Err(Error::invalid(
                "id",
                format!("{oci_id:?} is not shared with {}", rec.name),
            ));
        }
        let oci = oci_id.to_string();
        tokio::task::spawn_blocking(move || unshare_member(&vm_dir, &oci))
            .await
            .map_err(|e| Error::Vmm(format!("unshare task: {e}")))?
    }

    /// Unmounts and removes what a container VM shared (its VM must be down).
    pub(super) async fn unshare_container(&self, id: &str) -> Result<()> {
        let dir = self.state.container_dir(id);
        tokio::task::spawn_blocking(move || unshare(&dir))
            .await
            .map_err(|e| Error::Vmm(format!("unshare task: {e}")))?
    }

    /// Directories of container VMs that have no record (a crash between the
    /// record's removal and theirs, or a record lost): unmounted and removed.
    pub(super) async fn sweep_container_dirs(&self) {
        let root = self.state.containers_root();
        let Ok(rd) = std::fs::read_dir(&root) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if matches!(self.db.get(&name), Ok(Some(_))) {
                continue;
            }
            tracing::info!(vm = %name, "reconcile: removing a container VM's leftover shared dir");
            if let Err(err) = self.unshare_container(&name).await {
                tracing::warn!("{err}");
            }
        }
    }
}

/// Returns an error if `rec` has no volume (a container VM) for `what`.
pub(super) fn has_volume(rec: &WorkspaceRecord, what: &'static str) -> Result<()> {
    match rec.kind {
        Kind::Workspace => Ok(()),
        Kind::Container => Err(Error::NoVolume {
            name: rec.name.clone(),
            what,
        }),
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::io(what, e)
}

/// Makes `dir/shared` (the VM's virtio-fs directory) and the container's part of
/// it. On an error, what was made stays for the caller's unwinding ([`unshare`]).
fn share(root: &Path, dir: &Path, oci_id: &str, plan: &Plan) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    for d in [root, dir] {
        match std::fs::DirBuilder::new().mode(0o700).create(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && d == root => {}
            Err(e) => return Err(Error::io(format!("create {}", d.display()), e)),
        }
    }
    let shared = dir.join("shared");
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&shared)
        .map_err(io(format!("create {}", shared.display())))?;
    // A tmpfs of its own: a mount point (propagation is a property of mounts) whose
    // size bounds what the guest can write here.
    mount(
        Some("tmpfs".as_ref()),
        &shared,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(SHARED_TMPFS),
    )?;
    // Its own peer group, not the host's: mounts made under it propagate to
    // virtiofsd's namespace (a slave copy), and nowhere else.
    mount(None, &shared, None, libc::MS_PRIVATE, None)?;
    mount(None, &shared, None, libc::MS_SHARED, None)?;
    share_container(&shared, oci_id, plan)
}

/// Shares one container's files with its VM: `<shared>/<oci id>/` (see the
/// module's doc). The container VM's own container, or one added to the VM later
/// (a pod's member): the guest reads it through the same virtio-fs device.
fn share_container(shared: &Path, oci_id: &str, plan: &Plan) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let cdir = shared.join(oci_id);
    let mkdir = |p: &Path| {
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(p)
            .map_err(io(format!("create {}", p.display())))
    };
    mkdir(&cdir)?;
    let rootfs = cdir.join("rootfs");
    mkdir(&rootfs)?;
    if plan.rootfs_readonly {
        let vm_dir = shared.parent().unwrap_or(shared);
        readonly_root(&plan.rootfs, &vm_dir.join("rw").join(oci_id), &rootfs)?;
    } else {
        bind(&plan.rootfs, &rootfs, false, true)?;
    }
    let mounts = cdir.join("mounts");
    mkdir(&mounts)?;
    for b in &plan.binds {
        let target = mounts.join(b.index.to_string());
        if b.dir {
            mkdir(&target)?;
        } else {
            std::fs::File::options()
                .write(true)
                .create_new(true)
                .open(&target)
                .map_err(io(format!("create {}", target.display())))?;
        }
        bind(&b.source, &target, b.readonly, b.recursive)?;
    }
    let config = serde_json::to_vec_pretty(&plan.guest_spec)
        .map_err(|e| Error::Vmm(format!("encode config.json: {e}")))?;
    let path = cdir.join("config.json");
    std::fs::write(&path, config).map_err(io(format!("write {}", path.display())))
}

/// Size of the writable layer over a read-only root: the mount points the
/// guest's container runtime makes in it (`/etc/resolv.conf`, `/run`), no more.
const ROOT_LAYER_TMPFS: &str = "size=16m,nr_inodes=4096,mode=0700";

/// A read-only root, as the guest needs it: the container's runtime in the guest
/// (as runc does) first makes the spec's mount points in the root, then makes the
/// root read-only for the container. So the guest gets an overlay whose lower
/// layer is the bundle's rootfs (read-only, never written) and whose upper layer
/// is a small tmpfs of its own in `layer` (the VM's directory, not the shared
/// one): the bundle on the host is never written, whatever the guest does.
fn readonly_root(rootfs: &Path, layer: &Path, target: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let mkdir = |p: &Path| {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(p)
            .map_err(io(format!("create {}", p.display())))
    };
    // overlay's options are split on ',' and ':'; ours are made of validated ids.
    if layer
        .as_os_str()
        .as_bytes()
        .iter()
        .any(|b| matches!(b, b',' | b':' | b'\\'))
    {
        return bind(rootfs, target, true, true);
    }
    mkdir(layer)?;
    mount(
        Some("tmpfs".as_ref()),
        layer,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(ROOT_LAYER_TMPFS),
    )?;
    let (lower, upper, work) = (layer.join("lower"), layer.join("upper"), layer.join("work"));
    for d in [&lower, &upper, &work] {
        mkdir(d)?;
    }
    bind(rootfs, &lower, true, true)?;
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay".as_ref()),
        target,
        Some("overlay"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&options),
    )
}

/// Unmounts and removes what was shared for container `oci_id` of the VM whose
/// directory is `vm_dir`: its files and its root's writable layer, if any.
fn unshare_member(vm_dir: &Path, oci_id: &str) -> Result<()> {
    unshare(&vm_dir.join("shared").join(oci_id))?;
    unshare(&vm_dir.join("rw").join(oci_id))
}

/// Bind-mounts `source` on `target`, then makes the new mount nosuid,nodev (and
/// read-only when asked), keeping the source's noexec and atime flags.
pub fn bind(source: &Path, target: &Path, readonly: bool, recursive: bool) -> Result<()> {
    let mut flags = libc::MS_BIND;
    if recursive {
        flags |= libc::MS_REC;
    }
    mount(Some(source.as_os_str()), target, None, flags, None)?;
    let mut keep = source_flags(source);
    keep |= libc::MS_NOSUID | libc::MS_NODEV;
    if readonly {
        keep |= libc::MS_RDONLY;
    }
    let r = mount(
        None,
        target,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | keep,
        None,
    );
    if r.is_err() {
        // SAFETY: a plain syscall on a C string we own.
        unsafe { libc::umount2(cstr(target.as_os_str())?.as_ptr(), libc::MNT_DETACH) };
    }
    r
}

/// The per-mount flags of the mount `path` is on that a bind should keep.
fn source_flags(path: &Path) -> libc::c_ulong {
    let Ok(c) = cstr(path.as_os_str()) else {
        return 0;
    };
    // SAFETY: statvfs fills the struct we pass.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string, st a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    let mut out = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            out |= ms_flag;
        }
    }
    out
}

fn cstr(s: &std::ffi::OsStr) -> Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        Error::invalid(
            "path",
            format!("{} contains a NUL byte", Path::new(s).display()),
        )
    })
}

fn mount(
    source: Option<&std::ffi::OsStr>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<()> {
    let src = source.map(cstr).transpose()?;
    let tgt = cstr(target.as_os_str())?;
    let fst = fstype.map(|f| cstr(f.as_ref())).transpose()?;
    let dat = data.map(|d| cstr(d.as_ref())).transpose()?;
    // SAFETY: every pointer is a valid C string or null, alive for the call.
    let r = unsafe {
        libc::mount(
            src.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            tgt.as_ptr(),
            fst.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            dat.as_ref().map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    };
    if r != 0 {
        let what = match source {
            Some(s) => format!("mount {} on {}", Path::new(s).display(), target.display()),
            None => format!("mount (flags {flags:#x}) {}", target.display()),
        };
        return Err(Error::io(what, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Mount points at or under `dir`, from /proc/self/mountinfo, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = text
        .split(|b| *b == b'\n')
        .filter_map(|l| l.split(|b| *b == b' ').nth(4))
        .map(|p| PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(p))))
        .filter(|p| p.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' && i + 3 < s.len() {
            let oct = &s[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct.iter().fold(0u32, |a, c| a * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// Unmounts everything at or under `dir` (lazily, deepest first, without
/// following a final symlink), then removes `dir` once nothing is mounted there.
fn unshare(dir: &Path) -> Result<()> {
    // Each pass takes one layer off every stack of mounts; a mount point holds at
    // most a few (the tmpfs, a bind on it), so a few passes do.
    for _ in 0..16 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            break;
        }
        for m in mounts {
            let c = cstr(m.as_os_str())?;
            // SAFETY: a plain syscall on a C string we own.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } != 0 {
                let e = std::io::Error::last_os_error();
                tracing::debug!("umount {}: {e}", m.display());
            }
        }
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        // Never remove files through a mount that is still there: it may be a
        // user's directory.
        return Err(Error::Vmm(format!(
            "{} still has {} mount(s), e.g. {}: not removed",
            dir.display(),
            left.len(),
            left[0].display()
        )));
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", dir.display()), e)),
    }
}

fn lock_map<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn bundle() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(t.path().join("rootfs")).expect("rootfs");
        std::fs::write(t.path().join("file"), "x").expect("file");
        let p = t.path().to_path_buf();
        (t, p)
    }

    fn req(bundle: &Path, spec: Value) -> ContainerVmRequest {
        ContainerVmRequest {
            id: "c1".into(),
            root: "/run/burrow-runtime".into(),
            bundle: bundle.to_path_buf(),
            spec,
        }
    }

    #[test]
    fn names_differ_by_root_and_id() {
        let a = vm_name("/r1", "x");
        assert_eq!(a.len(), 14);
        assert!(a.starts_with("c-"));
        assert_ne!(a, vm_name("/r2", "x"));
        assert_ne!(a, vm_name("/r1", "y"));
        assert_eq!(a, vm_name("/r1", "x"));
    }

    #[test]
    fn a_plan_rewrites_paths_and_sizes_the_vm() {
        let (_t, b) = bundle();
        let src = b.join("file");
        let spec = json!({
            "root": {"path": "rootfs", "readonly": true},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": b.to_str(), "options": ["rbind", "rw"]},
                {"destination": "/f", "source": src.to_str(), "options": ["bind", "ro"]},
            ],
            "linux": {"resources": {"memory": {"limit": 256 << 20}, "cpu": {"quota": 150000, "period": 100000}}}
        });
        let p = plan(&req(&b, spec), 2, 4096).expect("plan");
        assert_eq!((p.vcpus, p.memory_mib), (2, 256 + CONTAINER_OVERHEAD_MIB));
        assert!(p.rootfs_readonly);
        assert_eq!(
            p.binds,
            vec![
                Bind {
                    index: 1,
                    source: b.clone(),
                    dir: true,
                    readonly: false,
                    recursive: true
                },
                Bind {
                    index: 2,
                    source: src,
                    dir: false,
                    readonly: true,
                    recursive: false
                },
            ]
        );
        assert_eq!(p.guest_spec["root"]["path"], "rootfs");
        assert_eq!(p.guest_spec["mounts"][0]["source"], "proc");
        assert_eq!(
            p.guest_spec["mounts"][1]["source"],
            "/run/burrow/shared/c1/mounts/1"
        );
        assert_eq!(
            p.guest_spec["mounts"][2]["source"],
            "/run/burrow/shared/c1/mounts/2"
        );
    }

    #[test]
    fn vcpus_come_from_the_cpuset_and_are_capped() {
        let (_t, b) = bundle();
        let spec = |r: Value| json!({"root": {"path": "rootfs"}, "linux": {"resources": r}});
        let size_of = |r: Value| {
            let p = plan(&req(&b, spec(r)), 2, 4096).expect("plan");
            (p.vcpus, p.memory_mib)
        };
        assert_eq!(
            size_of(json!({"cpu": {"cpus": "0-1"}})),
            (2, DEFAULT_CONTAINER_MEMORY_MIB)
        );
        assert_eq!(size_of(json!({"cpu": {"cpus": "0-7"}})).0, 2);
        assert_eq!(
            size_of(json!({"cpu": {"quota": 1000, "period": 100000}})).0,
            1
        );
        assert_eq!(size_of(json!({})), (1, DEFAULT_CONTAINER_MEMORY_MIB));
        // The host's CPU list sized the VM; in the guest it is the VM's CPUs
        // (a quota of half a CPU on host CPUs 0-1 is one vCPU: CPU 0).
        let cpus_in_guest = |r: Value| {
            let p = plan(&req(&b, spec(r)), 2, 4096).expect("plan");
            p.guest_spec["linux"]["resources"]["cpu"].clone()
        };
        let g = cpus_in_guest(
            json!({"cpu": {"cpus": "0-1", "quota": 50000, "period": 100000, "mems": "1"}}),
        );
        assert_eq!(
            (g["cpus"].as_str(), g["mems"].as_str()),
            (Some("0"), Some("0"))
        );
        assert_eq!(
            cpus_in_guest(json!({"cpu": {"cpus": "3,5"}}))["cpus"],
            "0-1"
        );
        assert!(cpus_in_guest(json!({"cpu": {"shares": 2}}))["cpus"].is_null());
        assert_eq!(
            size_of(json!({"memory": {"limit": -1}})).1,
            DEFAULT_CONTAINER_MEMORY_MIB
        );
    }

    #[test]
    fn bad_requests_name_their_field() {
        let (_t, b) = bundle();
        let ok = json!({"root": {"path": "rootfs"}});
        let cases: Vec<(ContainerVmRequest, &str)> = vec![
            (
                ContainerVmRequest {
                    id: "-x".into(),
                    ..req(&b, ok.clone())
                },
                "invalid id",
            ),
            (
                ContainerVmRequest {
                    root: "rel".into(),
                    ..req(&b, ok.clone())
                },
                "invalid root",
            ),
            (
                ContainerVmRequest {
                    bundle: "rel".into(),
                    ..req(&b, ok.clone())
                },
                "invalid bundle",
            ),
            (
                ContainerVmRequest {
                    bundle: b.join("file"),
                    ..req(&b, ok.clone())
                },
                "invalid bundle",
            ),
            (req(&b, json!([1])), "invalid spec"),
            (req(&b, json!({"root": {}})), "invalid spec.root.path"),
            (
                req(&b, json!({"root": {"path": "nope"}})),
                "invalid spec.root.path",
            ),
            (
                req(&b, json!({"root": {"path": "file"}})),
                "invalid spec.root.path",
            ),
            (
                req(&b, json!({"root": {"path": "rootfs"}, "mounts": {}})),
                "invalid spec.mounts",
            ),
            (
                req(
                    &b,
                    json!({"root": {"path": "rootfs"}, "mounts": [{"destination": "/x", "type": "bind", "source": "/nonexistent/x"}]}),
                ),
                "invalid spec.mounts: [0]: source /nonexistent/x",
            ),
            (
                req(
                    &b,
                    json!({"root": {"path": "rootfs"}, "mounts": [{"destination": "/x", "options": ["rbind"]}]}),
                ),
                "invalid spec.mounts: [0]: source",
            ),
            (
                req(
                    &b,
                    json!({"root": {"path": "rootfs"}, "linux": {"resources": {"memory": {"limit": -5}}}}),
                ),
                "memory.limit: -5 is below -1",
            ),
            (
                req(
                    &b,
                    json!({"root": {"path": "rootfs"}, "linux": {"resources": {"memory": {"limit": 1u64 << 50}}}}),
                ),
                "more than the host",
            ),
            (
                req(
                    &b,
                    json!({"root": {"path": "rootfs"}, "linux": {"resources": {"cpu": {"period": 5}}}}),
                ),
                "cpu.period",
            ),
            (
                req(
                    &b,
                    json!({"root": {"path": "rootfs"}, "linux": {"resources": {"cpu": {"cpus": "3-1"}}}}),
                ),
                "cpu.cpus",
            ),
            (
                req(
                    &b,
                    json!({"root": {"path": "rootfs"}, "linux": {"resources": {"cpu": {"quota": "x"}}}}),
                ),
                "cpu.quota",
            ),
        ];
        for (r, want) in cases {
            let e = plan(&r, 2, 4096).expect_err(want).to_string();
            assert!(e.contains(want), "{want:?} not in {e:?}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    /// A pod's member names its sandbox's namespaces inside the VM: those paths
    /// go to the guest as they are; a host path (which would mean nothing in the
    /// guest) is refused; its CPUs are the VM's.
    #[test]
    fn a_members_namespaces_are_the_guests() {
        let (_t, dir) = bundle();
        let spec = json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"args": ["true"], "cwd": "/"},
            "linux": {
                "namespaces": [
                    {"type": "network", "path": "/proc/97/ns/net"},
                    {"type": "uts", "path": "/proc/97/ns/uts"},
                    {"type": "pid"},
                ],
                "resources": {"cpu": {"cpus": "0-7"}},
            },
        });
        let plan = member_plan(&req(&dir, spec.clone()), 2).expect("member plan");
        assert_eq!(plan.netns, None);
        assert_eq!(
            plan.guest_spec["linux"]["namespaces"],
            spec["linux"]["namespaces"]
        );
        assert_eq!(plan.guest_spec["linux"]["resources"]["cpu"]["cpus"], "0-1");

        for bad in [
            "/var/run/netns/cni-1",
            "/proc/97/ns/../../etc",
            "/proc/x/ns/net",
            "/proc/1/ns/nope",
        ] {
            let mut s = spec.clone();
            s["linux"]["namespaces"][0]["path"] = Value::from(bad);
            let e = member_plan(&req(&dir, s), 2).expect_err(bad).to_string();
            assert!(
                e.contains("spec.linux.namespaces") && e.contains("[0].path"),
                "{e}"
            );
        }
    }

    #[test]
    fn mountinfo_names_are_unescaped() {
        assert_eq!(unescape(br"/a\040b\134c"), b"/a b\\c".to_vec());
        assert_eq!(unescape(br"/a\04"), br"/a\04".to_vec());
    }
}
