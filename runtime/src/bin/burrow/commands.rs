//! One function per command: build the request, send it, print the answer.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use burrow::api::client::{seg, Client, ClientError};
use burrow::api::{DaemonStatus, EnvRequest, JobKillRequest};
use burrow::engine::{CreateParams, Diff, ForkParams, SnapshotInfo, TeamMember, WorkspaceInfo};
use burrow::image::ImageInfo;
use burrow::paths::StateDir;
use burrow_proto::{
    DirEntry, Exec, ExecResult, FileData, FileEdit, FileRead, FileWrite, JobStart, JobStatus,
    MAX_FILE_CHUNK,
};
use serde_json::{json, Value};

use crate::output::{print_entries, print_info, print_job, print_list};
use crate::SnapshotCommand;
use crate::{
    daemon, Cli, Command, DaemonCommand, EnvCommand, FileCommand, ImageCommand, JobCommand,
    PortForwardCommand, TeamCommand, TerminalCommand,
};

use crate::stream::EXIT_TIMEOUT;

/// A failed command: the one line to print and the exit code.
pub struct Failure(pub String, pub i32);

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure(e.to_string(), 1)
    }
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Failure(e, 1)
    }
}

pub fn fail<T>(msg: impl Into<String>) -> Result<T, Failure> {
    Err(Failure(msg.into(), 1))
}

pub async fn run(cli: Cli) -> i32 {
    match dispatch(cli).await {
        Ok(code) => code,
        Err(Failure(msg, code)) => {
            eprintln!("burrow: {msg}");
            code
        }
    }
}

fn ws_path(ws: &str, rest: &str) -> String {
    format!("/v1/workspaces/{}{rest}", seg(ws))
}

async fn dispatch(cli: Cli) -> Result<i32, Failure> {
    let state = StateDir::new(&cli.state_dir).map_err(|e| format!("state dir: {e}"))?;
    if let Command::Daemon(cmd) = &cli.command {
        return daemon_command(cmd, &state, &cli.cache_dir).await;
    }
    let c = daemon::connect(&state, &cli.cache_dir).await?;
    match cli.command {
        Command::Create(a) => {
            let image = a
                .image
                .clone()
                .unwrap_or_else(|| burrow::image::DEFAULT_IMAGE.to_string());
            ensure_image(&c, &image).await?;
            let p = CreateParams {
                name: a.name,
                vcpus: a.vcpus,
                memory_mib: a.memory,
                image: Some(image),
                boot_timeout_secs: a.boot_timeout,
                disk_gb: a.disk_gb,
            };
            let w: WorkspaceInfo = c.post("/v1/workspaces", &p).await?;
            if a.json {
                print_json(&w);
            } else {
                println!("{} {}", w.id, w.name);
            }
        }
        Command::Exec(a) => return exec(&c, a).await,
        Command::Job(cmd) => return job(&c, cmd).await,
        Command::Terminal(cmd) => return terminal(&c, cmd).await,
        Command::Env(EnvCommand::Set { workspace, vars }) => {
            let set = parse_vars(&vars, "env")?;
            let _: Value = c
                .post(
                    &ws_path(&workspace, "/env"),
                    &EnvRequest { set, unset: vec![] },
                )
                .await?;
        }
        Command::Env(EnvCommand::Unset { workspace, keys }) => {
            let _: Value = c
                .post(
                    &ws_path(&workspace, "/env"),
                    &EnvRequest {
                        set: BTreeMap::new(),
                        unset: keys,
                    },
                )
                .await?;
        }
        Command::File(cmd) => file(&c, cmd).await?,
        Command::Ls(a) => {
            let q = a
                .state
                .map(|s| format!("?state={}", seg(&s)))
                .unwrap_or_default();
            let list: Vec<WorkspaceInfo> = c.get(&format!("/v1/workspaces{q}")).await?;
            if a.json {
                print_json(&list);
            } else {
                print_list(&list);
            }
        }
        Command::Info(a) => {
            let w: WorkspaceInfo = c.get(&ws_path(&a.workspace, "")).await?;
            if a.json {
                print_json(&w);
            } else {
                print_info(&w);
            }
        }
        Command::Logs(a) if a.follow => {
            return crate::stream::follow_logs(&c, &a.workspace, &a.kind, a.lines).await
        }
        Command::Logs(a) => {
            let v: BTreeMap<String, Vec<String>> = c
                .get(&ws_path(
                    &a.workspace,
                    &format!("/logs?type={}&lines={}", a.kind, a.lines),
                ))
                .await?;
            let mut out = std::io::stdout().lock();
            for l in v.get("lines").into_iter().flatten() {
                let _ = writeln!(out, "{l}");
            }
        }
        Command::Start(a) => {
            let body = json!({"boot_timeout_secs": a.boot_timeout});
            let w: WorkspaceInfo = c.post(&ws_path(&a.workspace, "/start"), &body).await?;
            println!("{} {}", w.name, w.state);
        }
        Command::Stop(a) => {
            let w: WorkspaceInfo = c.post(&ws_path(&a.workspace, "/stop"), &json!({})).await?;
            println!("{} {}", w.name, w.state);
        }
        Command::Destroy(a) => {
            let _: Value = c
                .call(
                    hyper::Method::DELETE,
                    &ws_path(&a.workspace, ""),
                    None::<&()>,
                )
                .await?;
            println!("{} destroyed", a.workspace);
        }
        Command::Image(ImageCommand::Build { name, force }) => {
            build_image(&c, &name, force, None).await?
        }
        Command::Image(ImageCommand::Ls { json }) => {
            let list: Vec<ImageInfo> = c.get("/v1/images").await?;
            if json {
                print_json(&list);
            } else {
                println!("{:<10} {:>10} {:>8}  BUILT", "NAME", "SIZE", "PACKAGES");
                for i in list {
                    println!(
                        "{:<10} {:>9}M {:>8}  {}",
                        i.name,
                        i.size_bytes >> 20,
                        i.packages,
                        crate::output::unix_time(i.built_at)
                    );
                }
            }
        }
        Command::Snapshot(cmd) => snapshot(&c, cmd).await?,
        Command::Team(cmd) => team(&c, cmd).await?,
        Command::PortForward(cmd) => port_forward(&c, cmd).await?,
        Command::Fork(a) => {
            let p = ForkParams {
                snapshot: a.snapshot,
                name: a.name,
                count: a.count,
                name_prefix: a.name_prefix,
                boot_timeout_secs: None,
                disk_gb: a.disk_gb,
            };
            let forks: Vec<WorkspaceInfo> = c.post(&ws_path(&a.workspace, "/fork"), &p).await?;
            if a.json {
                print_json(&forks);
            } else {
                for w in forks {
                    println!("{} {}", w.id, w.name);
                }
            }
        }
        Command::Diff(a) => {
            let d: Diff = c
                .get(&ws_path(
                    &a.workspace,
                    &format!("/diff/{}", seg(&a.snapshot)),
                ))
                .await?;
            if a.json {
                print_json(&d);
            } else {
                for (mark, paths) in [("A", &d.added), ("M", &d.modified), ("D", &d.deleted)] {
                    for p in paths {
                        println!("{mark} {}", crate::output::quote_path(&p.bytes()));
                    }
                }
            }
        }
        Command::NetworkPolicy(a) => {
            let ports = match &a.allowed_ports {
                None => None,
                Some(list) => Some(parse_ports("allowed-ports", list)?),
            };
            let host_ports = match &a.allow_host_ports {
                None => None,
                Some(list) => Some(parse_ports("allow-host-ports", list)?),
            };
            // Checked by the daemon (one line naming allow_cidr).
            let cidrs: Option<Vec<String>> = a.allow_cidr.as_ref().map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect()
            });
            let body = burrow::engine::PolicyChange {
                allow_internet: a.allow_internet,
                allow_inter_vm: a.allow_inter_vm,
                allowed_ports: ports,
                allow_host_ports: host_ports,
                allow_cidr: cidrs,
            };
            let p: burrow_netd::protocol::Policy = c
                .post(&ws_path(&a.workspace, "/network-policy"), &body)
                .await?;
            if a.json {
                print_json(&p);
            } else {
                let ports = p
                    .allowed_ports
                    .map(|v| v.iter().map(u16::to_string).collect::<Vec<_>>().join(","))
                    .unwrap_or_else(|| "any".into());
                let host_ports = p
                    .allow_host_ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                let cidrs = p
                    .allow_cidr
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                println!(
                    "{}: allow_internet={} allow_inter_vm={} allowed_ports={ports} allow_host_ports={} allow_cidr={}",
                    a.workspace,
                    p.allow_internet,
                    p.allow_inter_vm,
                    if host_ports.is_empty() { "none" } else { &host_ports },
                    if cidrs.is_empty() { "none" } else { &cidrs },
                );
            }
        }
        Command::Daemon(_) => unreachable!("handled above"),
    }
    Ok(0)
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("burrow: cannot encode the answer: {e}"),
    }
}

fn parse_vars(vars: &[String], field: &str) -> Result<BTreeMap<String, String>, Failure> {
    let mut out = BTreeMap::new();
    for v in vars {
        match v.split_once('=') {
            Some((k, val)) if !k.is_empty() => {
                out.insert(k.to_string(), val.to_string());
            }
            _ => return fail(format!("invalid {field}: {v:?} is not KEY=VALUE")),
        }
    }
    Ok(out)
}

async fn ensure_image(c: &Client, name: &str) -> Result<(), Failure> {
    let list: Vec<ImageInfo> = c.get("/v1/images").await?;
    if list.iter().any(|i| i.name == name) {
        return Ok(());
    }
    build_image(
        c,
        name,
        false,
        Some(format!(
            "burrow: image {name} is not built yet; building it first"
        )),
    )
    .await
}

/// Builds an image, showing progress. `notice` is printed before the first progress
/// line, so that a refused build prints nothing but its error.
async fn build_image(
    c: &Client,
    name: &str,
    force: bool,
    mut notice: Option<String>,
) -> Result<(), Failure> {
    let mut last = String::new();
    let path = format!("/v1/images/{}/build?force={force}", seg(name));
    c.stream_lines(hyper::Method::POST, &path, |line| {
        if let Some(n) = notice.take() {
            eprintln!("{n}");
        }
        if line != "ok" && !line.starts_with("error: ") {
            eprintln!("{line}");
        }
        last = line.to_string();
    })
    .await?;
    match last.strip_prefix("error: ") {
        Some(e) => fail(e.to_string()),
        None if last == "ok" => Ok(()),
        None => fail("the image build ended without a result"),
    }
}

async fn exec(c: &Client, a: crate::ExecArgs) -> Result<i32, Failure> {
    let timeout_ms = match a.timeout {
        None => None,
        Some(t) if t.is_finite() && t > 0.0 && t <= 86_400.0 => Some((t * 1000.0).ceil() as u64),
        Some(t) => {
            return fail(format!(
                "invalid timeout: {t} is not between 0 and 86400 seconds"
            ))
        }
    };
    if a.max_output.is_none() {
        let spawn = burrow_proto::Spawn {
            argv: a.argv,
            workdir: a.workdir,
            env: parse_vars(&a.env, "env")?,
            tty: None,
            stdin: a.interactive,
            timeout_ms,
        };
        let e = crate::stream::ExecStream {
            workspace: a.workspace,
            spawn,
            tty: a.tty,
            timeout_secs: a.timeout,
        };
        return crate::stream::exec(c, e).await;
    }
    if a.tty {
        return fail("-t streams: it cannot be used with --max-output");
    }
    let stdin = if a.interactive {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| format!("read stdin: {e}"))?;
        Some(buf)
    } else {
        None
    };
    let req = Exec {
        argv: a.argv,
        workdir: a.workdir,
        env: parse_vars(&a.env, "env")?,
        timeout_ms,
        max_output_bytes: a.max_output,
        stdin,
    };
    let r: ExecResult = c.post(&ws_path(&a.workspace, "/exec"), &req).await?;
    {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&r.stdout);
        let _ = out.flush();
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(&r.stderr);
        let _ = err.flush();
    }
    if r.stdout_truncated || r.stderr_truncated {
        eprintln!("burrow: output truncated (raise --max-output)");
    }
    if r.timed_out {
        let secs = a.timeout.unwrap_or_default();
        return Err(Failure(
            format!("exec timed out after {secs} s; the command was killed"),
            EXIT_TIMEOUT,
        ));
    }
    Ok(r.exit_code)
}

async fn job(c: &Client, cmd: JobCommand) -> Result<i32, Failure> {
    match cmd {
        JobCommand::Start {
            workspace,
            name,
            workdir,
            env,
            argv,
        } => {
            let req = JobStart {
                argv,
                workdir,
                env: parse_vars(&env, "env")?,
                max_output_bytes: None,
                name,
            };
            let v: Value = c.post(&ws_path(&workspace, "/jobs"), &req).await?;
            println!("{}", v.get("job").cloned().unwrap_or(Value::Null));
        }
        JobCommand::Poll {
            workspace,
            job,
            json,
        } => {
            let s: JobStatus = c
                .get(&ws_path(&workspace, &format!("/jobs/{}", seg(&job))))
                .await?;
            print_job(&s, json);
        }
        JobCommand::Logs {
            workspace,
            job,
            follow,
        } => return crate::stream::job_logs(c, &workspace, &job, follow).await,
        JobCommand::Wait { workspace, job } => {
            let s: JobStatus = c
                .post(
                    &ws_path(&workspace, &format!("/jobs/{}/wait", seg(&job))),
                    &serde_json::Map::new(),
                )
                .await?;
            return Ok(s.exit_code.unwrap_or(1));
        }
        JobCommand::Ls { workspace, json } => {
            let jobs: Vec<burrow_proto::JobInfo> = c.get(&ws_path(&workspace, "/jobs")).await?;
            if json {
                print_json(&jobs);
            } else {
                crate::output::print_jobs(&jobs);
            }
        }
        JobCommand::Kill {
            workspace,
            job,
            signal,
        }
        | JobCommand::Signal {
            workspace,
            job,
            signal,
        } => {
            let signal = parse_signal(&signal)?;
            let _: Value = c
                .post(
                    &ws_path(&workspace, &format!("/jobs/{}/kill", seg(&job))),
                    &JobKillRequest { signal },
                )
                .await?;
        }
    }
    Ok(0)
}

pub fn parse_signal(s: &str) -> Result<i32, Failure> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
    }
    let name = s.trim_start_matches("SIG").to_ascii_uppercase();
    let n = match name.as_str() {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        "ALRM" => libc::SIGALRM,
        _ => {
            return fail(format!(
                "invalid signal: {s:?} is not a signal name or number"
            ))
        }
    };
    Ok(n)
}

async fn terminal(c: &Client, cmd: TerminalCommand) -> Result<i32, Failure> {
    match cmd {
        TerminalCommand::New {
            workspace,
            name,
            argv,
        } => {
            let req = burrow_proto::TerminalNew {
                name,
                argv: if argv.is_empty() { None } else { Some(argv) },
                workdir: None,
                env: BTreeMap::new(),
                size: crate::tty::window_size(),
            };
            let t: burrow_proto::TerminalInfo =
                c.post(&ws_path(&workspace, "/terminals"), &req).await?;
            println!("{}", t.name);
        }
        TerminalCommand::Attach {
            workspace,
            name,
            read_only,
        } => return crate::stream::attach(c, &workspace, &name, read_only).await,
        TerminalCommand::Ls { workspace, json } => {
            let list: Vec<burrow_proto::TerminalInfo> =
                c.get(&ws_path(&workspace, "/terminals")).await?;
            if json {
                print_json(&list);
            } else {
                crate::output::print_terminals(&list);
            }
        }
        TerminalCommand::Record {
            workspace,
            name,
            output,
        } => {
            let path = ws_path(&workspace, &format!("/terminals/{}/recording", seg(&name)));
            let body = c.get_bytes(&path).await?;
            match output {
                Some(p) => {
                    std::fs::write(&p, &body).map_err(|e| format!("write {}: {e}", p.display()))?
                }
                None => {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&body).and_then(|()| out.flush());
                }
            }
        }
        TerminalCommand::Kill { workspace, name } => {
            let _: Value = c
                .call(
                    hyper::Method::DELETE,
                    &ws_path(&workspace, &format!("/terminals/{}", seg(&name))),
                    None::<&()>,
                )
                .await?;
        }
    }
    Ok(0)
}

async fn file(c: &Client, cmd: FileCommand) -> Result<(), Failure> {
    match cmd {
        FileCommand::Write {
            workspace,
            path,
            mode,
        } => {
            let mode = match mode {
                None => None,
                Some(m) => Some(
                    u32::from_str_radix(m.trim_start_matches("0o"), 8)
                        .ok()
                        .filter(|v| *v <= 0o7777)
                        .ok_or_else(|| {
                            format!("invalid mode: {m:?} is not octal permission bits like 0644")
                        })?,
                ),
            };
            let mut data = Vec::new();
            std::io::stdin()
                .read_to_end(&mut data)
                .map_err(|e| format!("read stdin: {e}"))?;
            // Large contents go in chunks: the first truncates, the rest append.
            let mut chunks = data.chunks(MAX_FILE_CHUNK).peekable();
            let first = chunks.next().unwrap_or(&[]);
            let mut req = FileWrite {
                path,
                data: first.to_vec(),
                mode,
                append: false,
            };
            loop {
                let _: Value = c.post(&ws_path(&workspace, "/files/write"), &req).await?;
                match chunks.next() {
                    Some(next) => {
                        req = FileWrite {
                            data: next.to_vec(),
                            append: true,
                            ..req
                        }
                    }
                    None => break,
                }
            }
        }
        FileCommand::Read {
            workspace,
            path,
            offset,
            limit,
        } => {
            let mut out = std::io::stdout().lock();
            let mut offset = offset;
            let mut left = limit;
            loop {
                let chunk = left
                    .map(|l| l.min(MAX_FILE_CHUNK as u64))
                    .unwrap_or(MAX_FILE_CHUNK as u64);
                let req = FileRead {
                    path: path.clone(),
                    offset,
                    limit: Some(chunk),
                };
                let d: FileData = c.post(&ws_path(&workspace, "/files/read"), &req).await?;
                let _ = out.write_all(&d.data);
                offset += d.data.len() as u64;
                if let Some(l) = left.as_mut() {
                    *l -= (d.data.len() as u64).min(*l);
                }
                if d.eof || d.data.is_empty() || left == Some(0) {
                    break;
                }
            }
            let _ = out.flush();
        }
        FileCommand::Edit {
            workspace,
            path,
            old,
            new,
            all,
        } => {
            let v: Value = c
                .post(
                    &ws_path(&workspace, "/files/edit"),
                    &FileEdit {
                        path,
                        old,
                        new,
                        all,
                    },
                )
                .await?;
            let n = v.get("replacements").and_then(Value::as_u64).unwrap_or(0);
            eprintln!("burrow: {n} replacement{}", if n == 1 { "" } else { "s" });
        }
        FileCommand::Ls {
            workspace,
            path,
            json,
        } => {
            let v: BTreeMap<String, Vec<DirEntry>> = c
                .post(&ws_path(&workspace, "/files/list"), &json!({"path": path}))
                .await?;
            let entries = v.get("entries").cloned().unwrap_or_default();
            if json {
                print_json(&entries);
            } else {
                print_entries(&entries);
            }
        }
    }
    Ok(())
}

async fn daemon_command(
    cmd: &DaemonCommand,
    state: &StateDir,
    cache: &std::path::Path,
) -> Result<i32, Failure> {
    let c = Client::new(state.socket());
    match cmd {
        DaemonCommand::Start => match c.get::<DaemonStatus>("/v1/daemon").await {
            Ok(s) => println!("burrowd already runs for {} (pid {})", s.state_dir, s.pid),
            Err(ClientError::NotRunning { .. }) => {
                let pid = daemon::start(state, cache).await?;
                println!("burrowd started for {} (pid {pid})", state.root().display());
            }
            Err(e) => return Err(e.into()),
        },
        DaemonCommand::Stop => match c.get::<DaemonStatus>("/v1/daemon").await {
            Ok(s) => {
                let _: Value = c.post("/v1/daemon/shutdown", &json!({})).await?;
                if let Some(p) = burrow::db::ProcId::of(s.pid as i32) {
                    if tokio::time::timeout(std::time::Duration::from_secs(30), p.exited())
                        .await
                        .is_err()
                    {
                        return fail(format!("burrowd (pid {}) did not stop within 30 s", s.pid));
                    }
                }
                println!(
                    "burrowd stopped (pid {}); running workspaces keep running",
                    s.pid
                );
            }
            Err(ClientError::NotRunning { .. }) => {
                println!("burrowd is not running for {}", state.root().display())
            }
            Err(e) => return Err(e.into()),
        },
        DaemonCommand::Status { json } => match c.get::<DaemonStatus>("/v1/daemon").await {
            Ok(s) => {
                if *json {
                    print_json(&s);
                } else {
                    println!("burrowd running (pid {})", s.pid);
                    println!("state dir:  {}", s.state_dir);
                    println!("cache dir:  {}", s.cache_dir);
                    println!(
                        "accel:      {}",
                        s.accel.as_deref().unwrap_or("(not probed yet)")
                    );
                    println!("store:      {}", s.store);
                    println!("workspaces: {} ({} running)", s.workspaces, s.running);
                }
            }
            Err(ClientError::NotRunning { .. }) => {
                if *json {
                    print_json(&json!({"running": false, "state_dir": state.root()}));
                } else {
                    println!("burrowd is not running for {}", state.root().display());
                }
                return Ok(3);
            }
            Err(e) => return Err(e.into()),
        },
    }
    Ok(0)
}

async fn port_forward(c: &Client, cmd: PortForwardCommand) -> Result<(), Failure> {
    use burrow_netd::protocol::Forward;
    match cmd {
        PortForwardCommand::Add {
            workspace,
            guest_port,
            host_port,
            bind,
            json,
        } => {
            let f: Forward = c
                .post(
                    &ws_path(&workspace, "/port-forwards"),
                    &json!({"guest_port": guest_port, "host_port": host_port, "bind": bind}),
                )
                .await?;
            if json {
                print_json(&f);
            } else {
                println!("{}", f.host_port);
            }
        }
        PortForwardCommand::Ls { workspace, json } => {
            let list: Vec<Forward> = c.get(&ws_path(&workspace, "/port-forwards")).await?;
            if json {
                print_json(&list);
            } else {
                println!("{:<16} {:<10} GUEST_PORT", "BIND", "HOST_PORT");
                for f in list {
                    println!("{:<16} {:<10} {}", f.bind, f.host_port, f.guest_port);
                }
            }
        }
        PortForwardCommand::Rm {
            workspace,
            guest_port,
        } => {
            let _: Value = c
                .call(
                    hyper::Method::DELETE,
                    &ws_path(&workspace, &format!("/port-forwards/{guest_port}")),
                    None::<&()>,
                )
                .await?;
            println!("{workspace}: {guest_port} no longer forwarded");
        }
    }
    Ok(())
}

async fn team(c: &Client, cmd: TeamCommand) -> Result<(), Failure> {
    let print = |members: &[TeamMember], as_json: bool| {
        if as_json {
            print_json(&members);
        } else {
            println!("{:<20} {:<14} {:<15} STATE", "NAME", "WORKSPACE_ID", "IP");
            for m in members {
                println!(
                    "{:<20} {:<14} {:<15} {}",
                    m.name,
                    m.workspace_id,
                    m.ip.as_deref().unwrap_or("-"),
                    m.state
                );
            }
        }
    };
    match cmd {
        TeamCommand::Create {
            name,
            members,
            json,
        } => {
            let m: Vec<TeamMember> = c
                .post("/v1/teams", &json!({"name": name, "members": members}))
                .await?;
            print(&m, json);
        }
        TeamCommand::Status { name, json } => {
            let m: Vec<TeamMember> = c.get(&format!("/v1/teams/{}", seg(&name))).await?;
            print(&m, json);
        }
        TeamCommand::Destroy { name } => {
            let _: Value = c
                .call(
                    hyper::Method::DELETE,
                    &format!("/v1/teams/{}", seg(&name)),
                    None::<&()>,
                )
                .await?;
            println!("team {name} destroyed");
        }
    }
    Ok(())
}

async fn snapshot(c: &Client, cmd: SnapshotCommand) -> Result<(), Failure> {
    match cmd {
        SnapshotCommand::Create { workspace, name } => {
            let s: SnapshotInfo = c
                .post(&ws_path(&workspace, "/snapshots"), &json!({"name": name}))
                .await?;
            println!("{} {}", s.workspace, s.name);
        }
        SnapshotCommand::Ls { workspace, json } => {
            let list: Vec<SnapshotInfo> = c.get(&ws_path(&workspace, "/snapshots")).await?;
            if json {
                print_json(&list);
            } else {
                println!(
                    "{:<20} {:<21} {:<20} {:>9} {:>10}  FORKS",
                    "NAME", "CREATED", "PARENT", "USED", "REFERENCED"
                );
                for s in list {
                    println!(
                        "{:<20} {:<21} {:<20} {:>8}K {:>9}K  {}",
                        s.name,
                        s.created_at,
                        s.parent.as_deref().unwrap_or("-"),
                        s.used_bytes.unwrap_or(0) >> 10,
                        s.referenced_bytes.unwrap_or(0) >> 10,
                        s.dependents.join(",")
                    );
                }
            }
        }
        SnapshotCommand::Restore { workspace, name } => {
            let path = ws_path(&workspace, &format!("/snapshots/{}/restore", seg(&name)));
            let w: WorkspaceInfo = c.post(&path, &json!({})).await?;
            println!("{} restored to {name} ({})", w.name, w.state);
        }
        SnapshotCommand::Delete { workspace, name } => {
            let path = ws_path(&workspace, &format!("/snapshots/{}", seg(&name)));
            let _: Value = c.call(hyper::Method::DELETE, &path, None::<&()>).await?;
            println!("{name} deleted");
        }
    }
    Ok(())
}

/// `443,80` → [443, 80]; "" → []. Anything else names the field and the bad item.
fn parse_ports(field: &str, list: &str) -> Result<Vec<u16>, String> {
    if list.trim().is_empty() {
        return Ok(Vec::new());
    }
    list.split(',')
        .map(|p| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("invalid {field}: {p:?} is not a TCP port (1-65535)"))
        })
        .collect()
}
