//! create, start, run, exec and delete: the calls that make and unmake a
//! container, its VM and its holder.

use std::os::fd::AsRawFd;
use std::path::Path;

use burrow::api::client::{Client, ClientError};
use burrow::api::{ContainerAnswer, ContainerVmRequest};
use burrow::db::ProcId;
use burrow_proto::{ContainerCreate, ContainerExec, ContainerOp, StreamOpen};
use serde_json::Value;

use crate::bundle::{check_process, Bundle, Netns};
use crate::error::{Error, Result};
use crate::holder::{self, Ended, Io, Kill, Orders};
use crate::store::{write_atomic, IdLock, Record};
use crate::{hooks, term, Ctx, Status};

/// Everything `create` and `run` share: a checked bundle and a recorded,
/// booted VM, its record saved under the id's lock.
struct Made {
    client: Client,
    record: Record,
    lock: IdLock,
}

/// Checks the id and records the container, with no VM or holder yet; the
/// record is saved under the id's lock, which `made` holds.
async fn record_new(ctx: &Ctx, id: &str, bundle: &Bundle) -> Result<Made> {
    let lock = ctx.root.lock(id)?;
    if ctx.root.load(id)?.is_some() {
        return Err(Error::Exists(id.to_string()));
    }
    let client = ctx.client().await?;
    let record = Record {
        id: id.to_string(),
        bundle: bundle.dir.clone(),
        rootfs: bundle.rootfs.clone(),
        vm: None,
        holder: None,
        created: crate::log::now(),
        annotations: bundle.annotations.clone(),
        owner: String::new(),
        terminal: bundle.terminal,
        hooks: bundle.hooks.clone(),
        execs: Vec::new(),
    };
    if let Err(e) = ctx.root.save(&record) {
        lock.release_and_remove();
        return Err(e);
    }
    Ok(Made {
        client,
        record,
        lock,
    })
}

/// Records the holder, runs the hooks that prepare the container (prestart,
/// then createRuntime, with the holder's pid) and boots the VM, on the
/// holder's network namespace when the spec asks for a new one. On failure the
/// caller undoes `made`.
async fn prepare_and_boot(
    ctx: &Ctx,
    made: &mut Made,
    bundle: &Bundle,
    holder: ProcId,
) -> Result<()> {
    let id = made.record.id.clone();
    made.record.holder = Some(holder);
    ctx.root.save(&made.record)?;
    let state = hooks::State {
        id: &id,
        status: "creating",
        pid: Some(holder.pid),
        bundle: &bundle.dir,
        annotations: &bundle.annotations,
    };
    hooks::run("prestart", &bundle.hooks.prestart, &state).await?;
    hooks::run("createRuntime", &bundle.hooks.create_runtime, &state).await?;
    let mut spec = bundle.spec.clone();
    if let Some(o) = spec.as_object_mut() {
        // Host commands: they ran here, the guest could only fail them.
        o.remove("hooks");
    }
    if bundle.netns == Netns::New {
        set_netns_path(&mut spec, &format!("/proc/{}/ns/net", holder.pid));
    }
    let req = ContainerVmRequest {
        id: id.clone(),
        root: ctx.root.path().to_string_lossy().into_owned(),
        bundle: bundle.dir.clone(),
        spec,
    };
    ctx.log.debug(&format!("{id}: booting its VM"));
    let info = made.client.container_vm_create(&req).await?;
    made.record.vm = Some(info.id);
    ctx.root.save(&made.record)
}

/// Names `path` as the spec's network namespace (burrowd takes its interface
/// over for the VM).
fn set_netns_path(spec: &mut Value, path: &str) {
    if let Some(list) = spec
        .pointer_mut("/linux/namespaces")
        .and_then(Value::as_array_mut)
    {
        for n in list.iter_mut().filter(|n| n["type"] == "network") {
            n["path"] = Value::from(path);
        }
    }
}

/// Removes what a failed create made (holder, VM, record, lock); returns `e`.
async fn undo(ctx: &Ctx, made: Made, e: Error) -> Error {
    ctx.log
        .debug(&format!("{}: undoing the create: {e}", made.record.id));
    teardown(ctx, &made.client, &made.record).await;
    made.lock.release_and_remove();
    e
}

/// Kills the holders (the container's and its execs'), destroys the VM and
/// removes the record, whatever is left of them; errors are logged, not
/// returned (a forced delete goes on).
async fn teardown(ctx: &Ctx, client: &Client, r: &Record) {
    for h in r.holder.iter().chain(&r.execs) {
        // Not itself: a foreground `run` deleting after its container exited.
        if h.pid != std::process::id() as i32 && h.is_alive() {
            h.signal(libc::SIGKILL);
            h.exited().await;
        }
    }
    if let Some(vm) = vm_of(ctx, client, r).await {
        let vm = &vm;
        match client.destroy(vm).await {
            Ok(_) | Err(ClientError::Api { status: 404, .. }) => {}
            Err(e) => ctx.log.error(&format!("{}: destroy VM {vm}: {e}", r.id)),
        }
    }
    if !r.hooks.poststop.is_empty() {
        let state = hooks::State {
            id: &r.id,
            status: "stopped",
            pid: None,
            bundle: &r.bundle,
            annotations: &r.annotations,
        };
        // A failed poststop hook is a warning; the others and the delete go on.
        hooks::run_all("poststop", &r.hooks.poststop, &state, |e| {
            ctx.log.warn(&e.to_string())
        })
        .await;
    }
    if let Err(e) = ctx.root.remove(&r.id) {
        ctx.log.error(&e.to_string());
    }
}

/// The container's VM: as recorded, else (a create that died before it recorded
/// burrowd's answer) the one burrowd made for this (root, id), if any.
async fn vm_of(ctx: &Ctx, client: &Client, r: &Record) -> Option<String> {
    if let Some(vm) = &r.vm {
        return Some(vm.clone());
    }
    let root = ctx.root.path().to_string_lossy();
    client.container_vm(&root, &r.id).await.ok().flatten()
}

pub fn check_id(id: &str) -> Result<()> {
    burrow_proto::validate_container_id(id).map_err(|m| {
        let m = m.strip_prefix("id: ").unwrap_or(&m).to_string();
        Error::invalid("container id", m)
    })
}

fn write_pid_file(path: Option<&Path>, pid: i32) -> Result<()> {
    match path {
        Some(p) => {
            let p = std::path::absolute(p).map_err(Error::io(p))?;
            write_atomic(&p, pid.to_string().as_bytes(), 0o644)
        }
        None => Ok(()),
    }
}

fn refuse_preserve_fds(n: i32) -> Result<()> {
    if n != 0 {
        return Err(Error::invalid(
            "--preserve-fds",
            "host fds cannot be passed into a container's VM",
        ));
    }
    Ok(())
}

pub async fn create(ctx: &Ctx, a: &liboci_cli::Create) -> Result<()> {
    refuse_preserve_fds(a.preserve_fds)?;
    create_detached(
        ctx,
        &a.container_id,
        &a.bundle,
        a.console_socket.as_deref(),
        a.pid_file.as_deref(),
    )
    .await
}

/// `create`: the VM, then a holder that returns once the container's process
/// exists; the pid file names the holder.
async fn create_detached(
    ctx: &Ctx,
    id: &str,
    bundle: &Path,
    console_socket: Option<&Path>,
    pid_file: Option<&Path>,
) -> Result<()> {
    check_id(id)?;
    let console_socket = console_socket
        .map(|p| std::path::absolute(p).map_err(Error::io(p)))
        .transpose()?;
    let bundle = Bundle::load(bundle)?;
    // Checked before the VM boots: a detached terminal needs somewhere to go.
    if bundle.terminal && console_socket.is_none() {
        return Err(Error::invalid(
            "--console-socket",
            "required: the spec's process.terminal is true and the container runs detached",
        ));
    }
    let mut made = record_new(ctx, id, &bundle).await?;
    let pending = match holder::start(ctx.globals(), bundle.terminal, &bundle.netns) {
        Ok(p) => p,
        Err(e) => return Err(undo(ctx, made, e).await),
    };
    if let Err(e) = prepare_and_boot(ctx, &mut made, &bundle, pending.id).await {
        return Err(undo(ctx, made, e).await);
    }
    let orders = Orders {
        socket: made.client.socket().to_path_buf(),
        vm: made.record.vm.clone().unwrap_or_default(),
        id: id.to_string(),
        exec: None,
        terminal: made.record.terminal,
        console_socket,
        root: None,
    };
    if let Err(e) = pending.give(&orders).await {
        return Err(undo(ctx, made, e).await);
    }
    let holder = made.record.holder.map(|h| h.pid).unwrap_or_default();
    if let Err(e) = write_pid_file(pid_file, holder) {
        return Err(undo(ctx, made, e).await);
    }
    ctx.log
        .debug(&format!("{id}: created; holder pid {holder}"));
    Ok(())
}

pub async fn start(ctx: &Ctx, a: &liboci_cli::Start) -> Result<()> {
    let id = &a.container_id;
    check_id(id)?;
    let _lock = ctx.root.lock(id)?;
    let r = ctx.load(id)?;
    let client = ctx.client().await?;
    match ctx.status(&client, &r).await? {
        Status::Created => {}
        other => {
            return Err(Error::WrongState {
                id: id.clone(),
                status: other.as_str(),
                why: "only a created container can be started",
            })
        }
    }
    op(&client, &r, ContainerOp::Start { id: id.clone() }).await?;
    poststart(ctx, &r).await;
    Ok(())
}

/// Runs the poststart hooks; a failure is a warning, the others still run.
async fn poststart(ctx: &Ctx, r: &Record) {
    if r.hooks.poststart.is_empty() {
        return;
    }
    let state = hooks::State {
        id: &r.id,
        status: "running",
        pid: r.holder.map(|h| h.pid),
        bundle: &r.bundle,
        annotations: &r.annotations,
    };
    hooks::run_all("poststart", &r.hooks.poststart, &state, |e| {
        ctx.log.warn(&e.to_string())
    })
    .await;
}

/// One request on the container's VM.
pub async fn op(client: &Client, r: &Record, op: ContainerOp) -> Result<ContainerAnswer> {
    let vm =
        r.vm.as_deref()
            .ok_or_else(|| Error::Holder(format!("container {:?} has no VM yet", r.id)))?;
    Ok(client.container_op(vm, &op).await?)
}

pub async fn run(ctx: &Ctx, a: &liboci_cli::Run) -> Result<()> {
    refuse_preserve_fds(a.preserve_fds)?;
    let id = &a.container_id;
    if a.detach {
        create_detached(
            ctx,
            id,
            &a.bundle,
            a.console_socket.as_deref(),
            a.pid_file.as_deref(),
        )
        .await?;
        return start(
            ctx,
            &liboci_cli::Start {
                container_id: id.clone(),
            },
        )
        .await;
    }
    if a.console_socket.is_some() {
        return Err(Error::invalid(
            "--console-socket",
            "only with --detach: a foreground run relays the terminal itself",
        ));
    }
    // In the foreground this process is the holder: it relays the container's
    // stdio and exits as the container's process does.
    check_id(id)?;
    let bundle = Bundle::load(&a.bundle)?;
    let mut made = record_new(ctx, id, &bundle).await?;
    let Some(me) = ProcId::of(std::process::id() as i32) else {
        return Err(undo(ctx, made, Error::Holder("own process identity".into())).await);
    };
    let joined = match &bundle.netns {
        Netns::Join(p) => Some(std::fs::File::open(p).map_err(Error::io(p))),
        _ => None,
    };
    if let Some(f) = joined {
        // As a holder does (see below for why this thread).
        let joined = f.and_then(|f| {
            // SAFETY: setns takes an open namespace fd and changes only this thread.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(Error::Holder(format!(
                    "join the network namespace: {}",
                    std::io::Error::last_os_error()
                )));
            }
            Ok(())
        });
        if let Err(e) = joined {
            return Err(undo(ctx, made, e).await);
        }
    }
    if bundle.netns == Netns::New {
        // This thread is the process's first (block_on runs the call on it),
        // so /proc/<pid>/ns/net is the namespace made here; burrowd is reached
        // through a socket path, which no network namespace hides.
        // SAFETY: unshare takes flags and changes only this thread's namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let e = Error::Holder(format!(
                "new network namespace: {}",
                std::io::Error::last_os_error()
            ));
            return Err(undo(ctx, made, e).await);
        }
    }
    if let Err(e) = prepare_and_boot(ctx, &mut made, &bundle, me).await {
        return Err(undo(ctx, made, e).await);
    }
    let io = if bundle.terminal {
        let raw = if term::is_terminal(0) {
            match term::RawMode::enter(0) {
                Ok(r) => Some(r),
                Err(e) => {
                    return Err(undo(ctx, made, Error::Holder(format!("raw mode: {e}"))).await)
                }
            }
        } else {
            None
        };
        Io::Terminal(raw)
    } else {
        Io::Pipes
    };
    let vm = made.record.vm.clone().unwrap_or_default();
    let open = StreamOpen::ContainerCreate(ContainerCreate {
        id: id.clone(),
        stdin: true,
        size: io.window_size(),
        durable: false,
    });
    let stream = match made.client.open_stream(&vm, &open).await {
        Ok(s) => s,
        Err(e) => return Err(undo(ctx, made, e.into()).await),
    };
    let pid = std::process::id() as i32;
    if let Err(e) = write_pid_file(a.pid_file.as_deref(), pid) {
        return Err(undo(ctx, made, e).await);
    }
    if let Err(e) = op(
        &made.client,
        &made.record,
        ContainerOp::Start { id: id.clone() },
    )
    .await
    {
        return Err(undo(ctx, made, e).await);
    }
    poststart(ctx, &made.record).await;
    let Made { client, lock, .. } = made;
    // Others (state, kill, exec) may act on it while it runs.
    drop(lock);
    let kill = Kill::Container {
        client: client.clone(),
        vm,
        id: id.clone(),
    };
    let ended = holder::relay(stream, io, kill).await;
    if !a.keep {
        let lock = ctx.root.lock(id)?;
        // A `delete` while it ran may have taken it already.
        if let Some(r) = ctx.root.load(id)? {
            teardown(ctx, &client, &r).await;
        }
        lock.release_and_remove();
    }
    holder::exit_as(ended, &ctx.log)
}

pub async fn exec(ctx: &Ctx, a: &liboci_cli::Exec) -> Result<()> {
    let id = &a.container_id;
    check_id(id)?;
    refuse_preserve_fds(a.preserve_fds)?;
    let process = exec_process(a)?;
    let r = ctx.load(id)?;
    let client = ctx.client().await?;
    let status = ctx.status(&client, &r).await?;
    let allowed = status == Status::Running || (status == Status::Paused && a.ignore_paused);
    if !allowed {
        // As runc: a paused container takes an exec only with --ignore-paused,
        // a created or stopped one none.
        return Err(Error::WrongState {
            id: id.clone(),
            status: status.as_str(),
            why: if status == Status::Paused {
                "exec needs a running container (or --ignore-paused)"
            } else {
                "exec needs a running container"
            },
        });
    }
    let terminal = process
        .get("terminal")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let vm = r.vm.clone().unwrap_or_default();
    let console_socket = a
        .console_socket
        .as_deref()
        .map(|p| std::path::absolute(p).map_err(Error::io(p)))
        .transpose()?;
    if a.detach {
        if terminal && console_socket.is_none() {
            return Err(Error::invalid(
                "--console-socket",
                "required: the process has a terminal and runs detached",
            ));
        }
        let orders = Orders {
            socket: client.socket().to_path_buf(),
            vm,
            id: id.clone(),
            exec: Some(process),
            terminal,
            console_socket,
            root: Some(ctx.root.path().to_path_buf()),
        };
        // Recorded before its stream opens, so that `ps` and `delete` know it.
        let h = holder::spawn(&orders, ctx.globals(), |h| ctx.root.note_exec(id, h, true)).await?;
        return write_pid_file(a.pid_file.as_deref(), h.pid);
    }
    if console_socket.is_some() {
        return Err(Error::invalid(
            "--console-socket",
            "only with --detach: a foreground exec relays the terminal itself",
        ));
    }
    let io = if terminal {
        let raw = if term::is_terminal(0) {
            Some(term::RawMode::enter(0).map_err(|e| Error::Holder(format!("raw mode: {e}")))?)
        } else {
            None
        };
        Io::Terminal(raw)
    } else {
        Io::Pipes
    };
    let open = StreamOpen::ContainerExec(ContainerExec {
        id: id.clone(),
        process,
        stdin: true,
        size: io.window_size(),
        exec_id: None,
    });
    // This process is the exec's holder: recorded while it relays.
    let me = ProcId::of(std::process::id() as i32)
        .ok_or_else(|| Error::Holder("cannot read this process's start time".into()))?;
    ctx.root.note_exec(id, me, true)?;
    let opened = client.open_stream(&vm, &open).await.map_err(Error::from);
    let opened = opened.and_then(|stream| {
        write_pid_file(a.pid_file.as_deref(), std::process::id() as i32).map(|()| stream)
    });
    let stream = match opened {
        Ok(s) => s,
        Err(e) => {
            holder::forget_exec(ctx.root.path(), id, &ctx.log);
            return Err(e);
        }
    };
    let ended: Ended = holder::relay(stream, io, Kill::Stream).await;
    holder::forget_exec(ctx.root.path(), id, &ctx.log);
    holder::exit_as(ended, &ctx.log)
}

/// The process an exec runs: `--process` as given, or the flags and arguments
/// made into one (cwd `/`, the caller's user unless `--user`).
fn exec_process(a: &liboci_cli::Exec) -> Result<Value> {
    if let Some(path) = &a.process {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::invalid("--process", format!("cannot read {}: {e}", path.display()))
        })?;
        let mut p: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::invalid("--process", format!("not valid JSON: {e}")))?;
        if !p.is_object() {
            return Err(Error::invalid("--process", "must be a JSON object"));
        }
        check_process(&p, "--process")?;
        if a.tty {
            p["terminal"] = Value::Bool(true);
        }
        return Ok(p);
    }
    if a.command.is_empty() {
        return Err(Error::invalid(
            "command",
            "missing: give the command after the container id, or --process",
        ));
    }
    let (uid, gid) = a.user.map(|(u, g)| (u, g.unwrap_or(0))).unwrap_or((0, 0));
    let mut env =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
    env.extend(a.env.iter().map(|(k, v)| format!("{k}={v}")));
    let mut p = serde_json::json!({
        "terminal": a.tty,
        "args": a.command,
        "env": env,
        "cwd": a.cwd.as_ref().map(|c| c.to_string_lossy().into_owned()).unwrap_or_else(|| "/".into()),
        "user": {"uid": uid, "gid": gid, "additionalGids": a.additional_gids},
        "noNewPrivileges": a.no_new_privs,
    });
    if !a.cap.is_empty() {
        p["capabilities"] = serde_json::json!({
            "bounding": a.cap, "effective": a.cap, "permitted": a.cap,
        });
    }
    check_process(&p, "process")?;
    Ok(p)
}

pub async fn delete(ctx: &Ctx, a: &liboci_cli::Delete) -> Result<()> {
    let id = &a.container_id;
    check_id(id)?;
    let lock = ctx.root.lock(id)?;
    let Some(r) = ctx.root.load(id)? else {
        lock.release_and_remove();
        // runc: a forced delete of what does not exist succeeds.
        return if a.force {
            Ok(())
        } else {
            Err(Error::NotFound(id.clone()))
        };
    };
    let client = ctx.client().await?;
    if !a.force {
        let status = match ctx.status(&client, &r).await {
            Ok(s) => s,
            Err(e) => {
                drop(lock);
                return Err(e);
            }
        };
        // As runc: a created container is deleted without --force.
        if matches!(status, Status::Running | Status::Paused | Status::Creating) {
            drop(lock);
            return Err(Error::WrongState {
                id: id.clone(),
                status: status.as_str(),
                why: "stop it first, or delete --force",
            });
        }
    }
    teardown(ctx, &client, &r).await;
    lock.release_and_remove();
    Ok(())
}
