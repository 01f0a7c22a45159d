//! The calls on an existing container that make nothing: state, kill, ps, pause,
//! resume, update, list, events; and the two that need none: features, spec.

use std::io::Read;

use burrow::api::ContainerAnswer;
use burrow_proto::ContainerOp;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::lifecycle::{check_id, op};
use crate::store::Record;
use crate::{Ctx, Status};

/// The runtime-spec version this runtime's `state` speaks.
const OCI_VERSION: &str = "1.0.2";

/// The runtime-spec State of a container (pid: the holder's while it runs).
fn state_json(r: &Record, status: Status) -> Value {
    let pid = match status {
        Status::Stopped | Status::Creating => 0,
        _ => r.holder.map(|h| h.pid).unwrap_or(0),
    };
    json!({
        "ociVersion": OCI_VERSION,
        "id": r.id,
        "status": status.as_str(),
        "pid": pid,
        "bundle": r.bundle,
        "rootfs": r.rootfs,
        "created": r.created,
        "owner": r.owner,
        "annotations": r.annotations,
    })
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

pub async fn state(ctx: &Ctx, a: &liboci_cli::State) -> Result<()> {
    check_id(&a.container_id)?;
    let r = ctx.load(&a.container_id)?;
    let client = ctx.client().await?;
    let status = ctx.status(&client, &r).await?;
    crate::say!("{}", pretty(&state_json(&r, status)));
    Ok(())
}

/// The container must be alive (created, running or paused) for `what`.
async fn live(
    ctx: &Ctx,
    id: &str,
    what: &'static str,
) -> Result<(burrow::api::client::Client, Record, Status)> {
    check_id(id)?;
    let r = ctx.load(id)?;
    let client = ctx.client().await?;
    let status = ctx.status(&client, &r).await?;
    if matches!(status, Status::Stopped | Status::Creating) {
        return Err(Error::WrongState {
            id: id.to_string(),
            status: status.as_str(),
            why: what,
        });
    }
    Ok((client, r, status))
}

pub async fn kill(ctx: &Ctx, a: &liboci_cli::Kill) -> Result<()> {
    let signal = crate::signal::parse(&a.signal)?;
    let (client, r, _) = live(ctx, &a.container_id, "there is no process to signal").await?;
    op(
        &client,
        &r,
        ContainerOp::Kill {
            id: r.id.clone(),
            signal,
            all: a.all,
        },
    )
    .await?;
    Ok(())
}

pub async fn pause(ctx: &Ctx, a: &liboci_cli::Pause) -> Result<()> {
    let (client, r, status) = live(
        ctx,
        &a.container_id,
        "only a running container can be paused",
    )
    .await?;
    if status != Status::Running {
        return Err(Error::WrongState {
            id: r.id.clone(),
            status: status.as_str(),
            why: "only a running container can be paused",
        });
    }
    op(&client, &r, ContainerOp::Pause { id: r.id.clone() }).await?;
    Ok(())
}

pub async fn resume(ctx: &Ctx, a: &liboci_cli::Resume) -> Result<()> {
    let (client, r, status) = live(
        ctx,
        &a.container_id,
        "only a paused container can be resumed",
    )
    .await?;
    if status != Status::Paused {
        return Err(Error::WrongState {
            id: r.id.clone(),
            status: status.as_str(),
            why: "only a paused container can be resumed",
        });
    }
    op(&client, &r, ContainerOp::Resume { id: r.id.clone() }).await?;
    Ok(())
}

/// The guest pids of the container's processes (not host pids: they live in the
/// VM's kernel).
async fn pids(ctx: &Ctx, id: &str) -> Result<Vec<i32>> {
    let (client, r, _) = live(ctx, id, "it has no processes").await?;
    match op(&client, &r, ContainerOp::Ps { id: r.id.clone() }).await? {
        ContainerAnswer::Pids { pids } => Ok(pids),
        _ => Err(Error::Holder(
            "burrowd answered ps with something else".into(),
        )),
    }
}

pub async fn ps(ctx: &Ctx, a: &liboci_cli::Ps) -> Result<()> {
    match a.format.as_str() {
        "json" | "table" => {}
        other => {
            return Err(Error::invalid(
                "--format",
                format!("{other:?} is not one of table, json"),
            ))
        }
    }
    if !a.ps_options.is_empty() {
        return Err(Error::invalid(
            "ps options",
            "not supported: the processes are in the VM, out of the host ps's reach",
        ));
    }
    if a.format == "json" {
        // The host processes that stand for the container's: `docker top`
        // looks these pids up in the host's `ps -ef`, which cannot see the
        // guest's processes.
        let (_, r, _) = live(ctx, &a.container_id, "it has no processes").await?;
        crate::say!("{}", Value::from(r.host_pids()));
    } else {
        // The guest's own pids (in the VM's kernel, not the host's).
        let pids = pids(ctx, &a.container_id).await?;
        crate::say!("PID");
        for p in pids {
            crate::say!("{p}");
        }
    }
    Ok(())
}

pub async fn update(ctx: &Ctx, a: &liboci_cli::Update) -> Result<()> {
    let resources = match &a.resources {
        Some(path) => {
            let mut bytes = Vec::new();
            let read = if path.as_os_str() == "-" {
                std::io::stdin().read_to_end(&mut bytes).map(|_| ())
            } else {
                std::fs::read(path).map(|b| bytes = b)
            };
            read.map_err(|e| Error::invalid("--resources", e.to_string()))?;
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| Error::invalid("--resources", format!("not valid JSON: {e}")))?;
            if !v.is_object() {
                return Err(Error::invalid("--resources", "must be a JSON object"));
            }
            v
        }
        None => resources_from_flags(a)?,
    };
    let (client, r, _) = live(ctx, &a.container_id, "only a live container can be updated").await?;
    op(
        &client,
        &r,
        ContainerOp::Update {
            id: r.id.clone(),
            resources,
        },
    )
    .await?;
    Ok(())
}

/// runc's update flags as a runtime-spec LinuxResources object.
fn resources_from_flags(a: &liboci_cli::Update) -> Result<Value> {
    if a.l3_cache_schema.is_some() || a.mem_bw_schema.is_some() {
        return Err(Error::invalid(
            "--l3-cache-schema/--mem-bw-schema",
            "Intel RDT is not available in a container's VM",
        ));
    }
    let mut r = json!({});
    let mut set = |path: &[&str], v: Value| {
        let mut cur = &mut r;
        for p in &path[..path.len() - 1] {
            cur = cur
                .as_object_mut()
                .map(|o| o.entry(p.to_string()).or_insert_with(|| json!({})))
                .expect("objects all the way down");
        }
        cur[path[path.len() - 1]] = v;
    };
    if let Some(v) = a.memory {
        set(&["memory", "limit"], v.into());
    }
    if let Some(v) = a.memory_reservation {
        set(&["memory", "reservation"], v.into());
    }
    if let Some(v) = a.memory_swap {
        set(&["memory", "swap"], v.into());
    }
    if let Some(v) = a.cpu_share {
        set(&["cpu", "shares"], v.into());
    }
    if let Some(v) = a.cpu_quota {
        set(&["cpu", "quota"], v.into());
    }
    if let Some(v) = a.cpu_period {
        set(&["cpu", "period"], v.into());
    }
    if let Some(v) = a.cpu_rt_runtime {
        set(&["cpu", "realtimeRuntime"], v.into());
    }
    if let Some(v) = a.cpu_rt_period {
        set(&["cpu", "realtimePeriod"], v.into());
    }
    if let Some(v) = &a.cpuset_cpus {
        set(&["cpu", "cpus"], v.clone().into());
    }
    if let Some(v) = &a.cpuset_mems {
        set(&["cpu", "mems"], v.clone().into());
    }
    if let Some(v) = a.blkio_weight {
        set(&["blockIO", "weight"], v.into());
    }
    if let Some(v) = a.pids_limit {
        set(&["pids", "limit"], v.into());
    }
    Ok(r)
}

pub async fn list(ctx: &Ctx, a: &liboci_cli::List) -> Result<()> {
    match a.format.as_str() {
        "json" | "table" => {}
        other => {
            return Err(Error::invalid(
                "--format",
                format!("{other:?} is not one of table, json"),
            ))
        }
    }
    let mut states = Vec::new();
    let ids = ctx.root.ids()?;
    let client = if ids.is_empty() {
        None
    } else {
        Some(ctx.client().await?)
    };
    for id in ids {
        let Ok(Some(r)) = ctx.root.load(&id) else {
            continue;
        };
        let status = match &client {
            Some(c) => ctx.status(c, &r).await.unwrap_or(Status::Stopped),
            None => Status::Stopped,
        };
        states.push(state_json(&r, status));
    }
    if a.quiet {
        for s in &states {
            crate::say!("{}", s["id"].as_str().unwrap_or_default());
        }
    } else if a.format == "json" {
        crate::say!("{}", Value::from(states));
    } else {
        crate::say!(
            "{:<20} {:<8} {:<10} {:<40} {:<32} OWNER",
            "ID",
            "PID",
            "STATUS",
            "BUNDLE",
            "CREATED"
        );
        for s in &states {
            crate::say!(
                "{:<20} {:<8} {:<10} {:<40} {:<32} {}",
                s["id"].as_str().unwrap_or_default(),
                s["pid"],
                s["status"].as_str().unwrap_or_default(),
                s["bundle"].as_str().unwrap_or_default(),
                s["created"].as_str().unwrap_or_default(),
                if s["owner"].as_str().unwrap_or_default().is_empty() {
                    "root"
                } else {
                    s["owner"].as_str().unwrap_or_default()
                },
            );
        }
    }
    Ok(())
}

/// `events --stats`: one stats event (the guest's pid count). Without
/// `--stats`, one such event every `--interval` seconds until the container
/// stops; OOM and other kernel events of the guest are not reported.
pub async fn events(ctx: &Ctx, a: &liboci_cli::Events) -> Result<()> {
    if a.interval == 0 {
        return Err(Error::invalid("--interval", "must be at least 1 second"));
    }
    loop {
        let pids = pids(ctx, &a.container_id).await?;
        let e = json!({
            "type": "stats",
            "id": a.container_id,
            "data": {"pids": {"current": pids.len()}},
        });
        crate::say!("{e}");
        if a.stats {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_secs(u64::from(a.interval))).await;
    }
}

/// `features`: what this runtime does with a spec, in runc's shape.
pub fn features() -> Value {
    json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.1.0",
        "hooks": [],
        "mountOptions": [
            "bind", "rbind", "ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec",
            "private", "rprivate", "shared", "rshared", "slave", "rslave",
            "relatime", "norelatime", "strictatime", "nostrictatime", "remount"
        ],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
            "capabilities": CAPABILITIES,
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false, "rdma": false},
            "seccomp": {"enabled": false},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
            "intelRdt": {"enabled": false},
        },
        "annotations": {
            "io.github.burrow.isolation": "vm",
            "io.github.burrow.network": "none",
        }
    })
}

const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// `spec`: writes runc's default config.json into the bundle dir (the current
/// one by default), never over an existing one.
pub fn spec(a: &liboci_cli::Spec) -> Result<()> {
    if a.rootless {
        return Err(Error::invalid(
            "--rootless",
            "not supported: a container runs as root in its own VM, whose kernel is the boundary",
        ));
    }
    let dir = a.bundle.clone().unwrap_or_else(|| ".".into());
    let path = dir.join("config.json");
    if path.exists() {
        return Err(Error::invalid(
            "config.json",
            format!("{} exists: remove it first", path.display()),
        ));
    }
    let body = pretty(&crate::bundle::default_spec());
    std::fs::write(&path, body + "\n").map_err(Error::io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct U {
        #[command(flatten)]
        u: liboci_cli::Update,
    }

    #[test]
    fn update_flags_become_linux_resources() {
        let u = U::parse_from([
            "x",
            "--memory",
            "1048576",
            "--cpu-quota",
            "50000",
            "--pids-limit",
            "10",
            "c1",
        ]);
        let r = resources_from_flags(&u.u).expect("resources");
        assert_eq!(
            r,
            json!({"memory": {"limit": 1048576}, "cpu": {"quota": 50000}, "pids": {"limit": 10}})
        );
    }
}
