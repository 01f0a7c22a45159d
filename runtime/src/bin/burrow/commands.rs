//! One function per command: build the request, call the client, print the answer.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use burrow::api::client::{Client, ClientError};
use burrow::api::connect::{self, ConnectError, Found};
use burrow::api::*;
use burrow::paths::StateDir;

use crate::output::{
    print_diff, print_entries, print_images, print_info, print_job, print_list, print_policy,
};
use crate::SnapshotCommand;
use crate::{
    Cli, Command, DaemonCommand, EnvCommand, FileCommand, ImageCommand, JobCommand,
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

impl From<ConnectError> for Failure {
    fn from(e: ConnectError) -> Self {
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

async fn dispatch(cli: Cli) -> Result<i32, Failure> {
    let state = StateDir::new(&cli.state_dir).map_err(|e| format!("state dir: {e}"))?;
    if let Command::Daemon(cmd) = &cli.command {
        return daemon_command(cmd, &state, &cli.cache_dir).await;
    }
    let (c, found) = connect::connect(&state, &cli.cache_dir).await?;
    if let Found::Started(pid) = found {
        eprintln!(
            "burrow: started burrowd for {} (pid {pid})",
            state.root().display()
        );
    }
    match cli.command {
        Command::Create(a) => create(&c, a).await?,
        Command::Exec(a) => return exec(&c, a).await,
        Command::Job(cmd) => return job(&c, cmd).await,
        Command::Terminal(cmd) => return terminal(&c, cmd).await,
        Command::Env(EnvCommand::Set { workspace, vars }) => {
            let set = parse_vars(&vars, "env")?;
            let r = EnvRequest { set, unset: vec![] };
            c.set_env(&workspace, &r).await?;
        }
        Command::Env(EnvCommand::Unset { workspace, keys }) => {
            let r = EnvRequest {
                set: BTreeMap::new(),
                unset: keys,
            };
            c.set_env(&workspace, &r).await?;
        }
        Command::File(cmd) => file(&c, cmd).await?,
        Command::Ls(a) => {
            let list = c.list(&ListQuery { state: a.state }).await?;
            if a.json {
                print_json(&list);
            } else {
                print_list(&list);
            }
        }
        Command::Info(a) => {
            let w = c.info(&a.workspace).await?;
            if a.json {
                print_json(&w);
            } else {
                print_info(&w);
            }
        }
        Command::Logs(a) if a.follow => {
            let kind = log_kind(&a.kind);
            return crate::stream::follow_logs(&c, &a.workspace, kind, a.lines).await;
        }
        Command::Logs(a) => logs(&c, a).await?,
        Command::Start(a) => {
            let r = StartRequest {
                boot_timeout_secs: a.boot_timeout,
            };
            let w = c.start(&a.workspace, &r).await?;
            println!("{} {}", w.name, w.state);
        }
        Command::Stop(a) => {
            let w = c.stop(&a.workspace).await?;
            println!("{} {}", w.name, w.state);
        }
        Command::Destroy(a) => {
            c.destroy(&a.workspace).await?;
            println!("{} destroyed", a.workspace);
        }
        Command::Image(cmd) => image(&c, cmd).await?,
        Command::Snapshot(cmd) => snapshot(&c, cmd).await?,
        Command::Team(cmd) => team(&c, cmd).await?,
        Command::PortForward(cmd) => port_forward(&c, cmd).await?,
        Command::Fork(a) => fork(&c, a).await?,
        Command::Diff(a) => {
            let d = c.diff(&a.workspace, &a.snapshot).await?;
            if a.json {
                print_json(&d);
            } else {
                print_diff(&d);
            }
        }
        Command::NetworkPolicy(a) => network_policy(&c, a).await?,
        Command::Daemon(_) => unreachable!("handled above"),
    }
    Ok(0)
}

async fn create(c: &Client, a: crate::CreateArgs) -> Result<(), Failure> {
    let image = a
        .image
        .unwrap_or_else(|| burrow::image::DEFAULT_IMAGE.to_string());
    ensure_image(c, &image).await?;
    let p = CreateParams {
        name: a.name,
        vcpus: a.vcpus,
        memory_mib: a.memory,
        image: Some(image),
        boot_timeout_secs: a.boot_timeout,
        disk_gb: a.disk_gb,
    };
    let w = c.create(&p).await?;
    if a.json {
        print_json(&w);
    } else {
        println!("{} {}", w.id, w.name);
    }
    Ok(())
}

/// `--type` (clap allows only these two).
fn log_kind(kind: &str) -> LogKind {
    match kind {
        "agent" => LogKind::Agent,
        _ => LogKind::Console,
    }
}

async fn logs(c: &Client, a: crate::LogsArgs) -> Result<(), Failure> {
    let q = LogsQuery {
        r#type: Some(log_kind(&a.kind)),
        lines: Some(a.lines),
    };
    let logs = c.logs(&a.workspace, &q).await?;
    let mut out = std::io::stdout().lock();
    for l in logs.lines {
        let _ = writeln!(out, "{l}");
    }
    Ok(())
}

async fn image(c: &Client, cmd: ImageCommand) -> Result<(), Failure> {
    match cmd {
        ImageCommand::Build { name, force } => {
            c.build_image(&name, &BuildQuery { force }, |l| eprintln!("{l}"))
                .await?
        }
        ImageCommand::Ls { json } => {
            let list = c.images().await?;
            if json {
                print_json(&list);
            } else {
                print_images(&list);
            }
        }
    }
    Ok(())
}

async fn fork(c: &Client, a: crate::ForkArgs) -> Result<(), Failure> {
    let p = ForkParams {
        snapshot: a.snapshot,
        name: a.name,
        count: a.count,
        name_prefix: a.name_prefix,
        boot_timeout_secs: None,
        disk_gb: a.disk_gb,
    };
    let forks = c.fork(&a.workspace, &p).await?;
    if a.json {
        print_json(&forks);
    } else {
        for w in forks {
            println!("{} {}", w.id, w.name);
        }
    }
    Ok(())
}

/// Changes the flags given (none: shows the policy) and prints the policy now
/// in effect.
async fn network_policy(c: &Client, a: crate::NetworkPolicyArgs) -> Result<(), Failure> {
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
    let change = PolicyChange {
        allow_internet: a.allow_internet,
        allow_inter_vm: a.allow_inter_vm,
        allowed_ports: ports,
        allow_host_ports: host_ports,
        allow_cidr: cidrs,
    };
    let p = c.set_network_policy(&a.workspace, &change).await?;
    if a.json {
        print_json(&p);
    } else {
        print_policy(&a.workspace, &p);
    }
    Ok(())
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

/// Builds `name` first if it is not built, saying so before its progress.
async fn ensure_image(c: &Client, name: &str) -> Result<(), Failure> {
    let mut notice = Some(format!(
        "burrow: image {name} is not built yet; building it first"
    ));
    // The notice waits for the first progress line, so that a refused build
    // prints nothing but its error.
    c.ensure_image(name, |line| {
        if let Some(n) = notice.take() {
            eprintln!("{n}");
        }
        eprintln!("{line}");
    })
    .await?;
    Ok(())
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
    let r = c.exec(&a.workspace, &req).await?;
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
            let started = c.job_start(&workspace, &req).await?;
            println!("{}", started.job);
        }
        JobCommand::Poll {
            workspace,
            job,
            json,
        } => {
            let s = c.job_poll(&workspace, &job).await?;
            print_job(&s, json);
        }
        JobCommand::Logs {
            workspace,
            job,
            follow,
        } => return crate::stream::job_logs(c, &workspace, &job, follow).await,
        JobCommand::Wait { workspace, job } => {
            let s = c.job_wait(&workspace, &job).await?;
            return Ok(s.exit_code.unwrap_or(1));
        }
        JobCommand::Ls { workspace, json } => {
            let jobs = c.job_list(&workspace).await?;
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
            c.job_kill(&workspace, &job, &JobKillRequest { signal })
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
            let t = c.terminal_new(&workspace, &req).await?;
            println!("{}", t.name);
        }
        TerminalCommand::Attach {
            workspace,
            name,
            read_only,
        } => return crate::stream::attach(c, &workspace, &name, read_only).await,
        TerminalCommand::Ls { workspace, json } => {
            let list = c.terminal_list(&workspace).await?;
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
            let body = c.terminal_recording(&workspace, &name).await?;
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
            c.terminal_kill(&workspace, &name).await?;
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
            let mut stdin = tokio::io::stdin();
            c.write_file(&workspace, &path, mode, &mut stdin).await?;
        }
        FileCommand::Read {
            workspace,
            path,
            offset,
            limit,
        } => {
            let mut stdout = tokio::io::stdout();
            match c
                .read_file(&workspace, &path, offset, limit, &mut stdout)
                .await
            {
                // The reader went away (`| head`): what it wanted it has.
                Err(ClientError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                r => {
                    r?;
                }
            }
        }
        FileCommand::Edit {
            workspace,
            path,
            old,
            new,
            all,
        } => {
            let r = FileEdit {
                path,
                old,
                new,
                all,
            };
            let n = c.file_edit(&workspace, &r).await?.replacements;
            eprintln!("burrow: {n} replacement{}", if n == 1 { "" } else { "s" });
        }
        FileCommand::Ls {
            workspace,
            path,
            json,
        } => {
            let entries = c
                .file_list(&workspace, &FileListRequest { path })
                .await?
                .entries;
            if json {
                print_json(&entries);
            } else {
                print_entries(&entries);
            }
        }
    }
    Ok(())
}

/// `daemon start|stop|status`: these talk to the daemon without starting it
/// (but `start`).
async fn daemon_command(
    cmd: &DaemonCommand,
    state: &StateDir,
    cache: &std::path::Path,
) -> Result<i32, Failure> {
    match cmd {
        DaemonCommand::Start => match connect::connect(state, cache).await? {
            (_, Found::Running(s)) => {
                println!("burrowd already runs for {} (pid {})", s.state_dir, s.pid)
            }
            (_, Found::Started(pid)) => {
                println!("burrowd started for {} (pid {pid})", state.root().display())
            }
        },
        DaemonCommand::Stop => match connect::stop(state).await? {
            Some(pid) => println!("burrowd stopped (pid {pid}); running workspaces keep running"),
            None => println!("burrowd is not running for {}", state.root().display()),
        },
        DaemonCommand::Status { json } => match connect::status(state).await? {
            Some(s) if *json => print_json(&s),
            Some(s) => {
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
            None => {
                if *json {
                    print_json(&crate::output::NotRunning {
                        running: false,
                        state_dir: state.root(),
                    });
                } else {
                    println!("burrowd is not running for {}", state.root().display());
                }
                return Ok(3);
            }
        },
    }
    Ok(0)
}

async fn port_forward(c: &Client, cmd: PortForwardCommand) -> Result<(), Failure> {
    match cmd {
        PortForwardCommand::Add {
            workspace,
            guest_port,
            host_port,
            bind,
            json,
        } => {
            let p = ForwardParams {
                guest_port,
                host_port,
                bind,
            };
            let f = c.port_forward_add(&workspace, &p).await?;
            if json {
                print_json(&f);
            } else {
                println!("{}", f.host_port);
            }
        }
        PortForwardCommand::Ls { workspace, json } => {
            let list = c.port_forwards(&workspace).await?;
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
            c.port_forward_rm(&workspace, guest_port).await?;
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
            let m = c.team_create(&TeamParams { name, members }).await?;
            print(&m, json);
        }
        TeamCommand::Status { name, json } => {
            let m = c.team_status(&name).await?;
            print(&m, json);
        }
        TeamCommand::Destroy { name } => {
            c.team_destroy(&name).await?;
            println!("team {name} destroyed");
        }
    }
    Ok(())
}

async fn snapshot(c: &Client, cmd: SnapshotCommand) -> Result<(), Failure> {
    match cmd {
        SnapshotCommand::Create { workspace, name } => {
            let s = c
                .snapshot_create(&workspace, &SnapshotRequest { name })
                .await?;
            println!("{} {}", s.workspace, s.name);
        }
        SnapshotCommand::Ls { workspace, json } => {
            let list = c.snapshot_list(&workspace).await?;
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
            let w = c.snapshot_restore(&workspace, &name).await?;
            println!("{} restored to {name} ({})", w.name, w.state);
        }
        SnapshotCommand::Delete { workspace, name } => {
            c.snapshot_delete(&workspace, &name).await?;
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
