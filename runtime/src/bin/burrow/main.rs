//! burrow: the command line. It parses, asks burrowd (starting it if needed), and
//! prints the answer; it never touches a workspace itself.

mod commands;
mod output;
mod stream;
mod tty;

use std::path::PathBuf;

use burrow::paths::{DEFAULT_CACHE_DIR, DEFAULT_STATE_DIR};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "burrow",
    version,
    about = "Sandboxes that are microVMs: create, exec, files, jobs",
    propagate_version = true
)]
pub struct Cli {
    /// State dir of the daemon to talk to (one daemon per state dir).
    #[arg(long, global = true, env = "BURROW_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Image cache, shared between state dirs.
    #[arg(long, global = true, env = "BURROW_CACHE_DIR", default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create a workspace and boot it; prints its id and name.
    Create(CreateArgs),
    /// Run a command in a workspace; exits with the command's exit code.
    Exec(ExecArgs),
    /// Background jobs.
    #[command(subcommand)]
    Job(JobCommand),
    /// Persistent terminal sessions: attach, detach, watch, record.
    #[command(subcommand)]
    Terminal(TerminalCommand),
    /// Environment variables seen by later execs and jobs (guest memory only).
    #[command(subcommand)]
    Env(EnvCommand),
    /// Files in a workspace.
    #[command(subcommand)]
    File(FileCommand),
    /// List workspaces.
    Ls(LsArgs),
    /// Show one workspace.
    Info(WsJson),
    /// Show a workspace's console or agent log.
    Logs(LogsArgs),
    /// Boot a stopped workspace.
    Start(StartArgs),
    /// Power a workspace off; its files stay.
    Stop(Ws),
    /// Stop and remove a workspace, its files and logs.
    Destroy(Ws),
    /// Snapshots of a workspace's disk.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// New workspaces from a snapshot, booted and independent.
    Fork(ForkArgs),
    /// Paths added, modified and deleted since a snapshot.
    Diff(DiffArgs),
    /// What a workspace may reach on the network; changes take effect at once.
    NetworkPolicy(NetworkPolicyArgs),
    /// Host ports forwarded to a workspace's ports.
    #[command(subcommand)]
    PortForward(PortForwardCommand),
    /// Teams: workspaces made together that reach each other, and nothing else.
    #[command(subcommand)]
    Team(TeamCommand),
    /// Guest images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// The daemon serving the state dir.
    #[command(subcommand)]
    Daemon(DaemonCommand),
}

#[derive(Args)]
pub struct Ws {
    /// Workspace id or name.
    pub workspace: String,
}

#[derive(Args)]
pub struct WsJson {
    pub workspace: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CreateArgs {
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Memory in MiB.
    #[arg(long)]
    pub memory: Option<u32>,
    #[arg(long)]
    pub image: Option<String>,
    /// Seconds the guest may take to come up.
    #[arg(long)]
    pub boot_timeout: Option<u64>,
    /// Most GiB the workspace's disk may hold (default 10).
    #[arg(long)]
    pub disk_gb: Option<u32>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ExecArgs {
    pub workspace: String,
    /// Kill the command after this many seconds (exit code 124).
    #[arg(long)]
    pub timeout: Option<f64>,
    #[arg(long)]
    pub workdir: Option<String>,
    /// KEY=VALUE, repeatable.
    #[arg(long = "env", short = 'e')]
    pub env: Vec<String>,
    /// Buffered: one answer once the command ends, each of stdout and stderr
    /// capped at this many bytes (without it, output streams live, uncapped).
    #[arg(long)]
    pub max_output: Option<u64>,
    /// Stream this command's standard input to the guest command.
    #[arg(long, short = 'i')]
    pub interactive: bool,
    /// Run on a terminal in the guest (raw mode here; needs a local terminal).
    #[arg(long, short = 't')]
    pub tty: bool,
    #[arg(last = true, required = true)]
    pub argv: Vec<String>,
}

#[derive(Subcommand)]
pub enum JobCommand {
    /// Start a background job; prints its id.
    Start {
        workspace: String,
        /// A name to refer to the job by, besides its number.
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        workdir: Option<String>,
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// A job's state and output so far.
    Poll {
        workspace: String,
        job: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a job's output (what is kept); with -f, follow it live until it ends.
    Logs {
        workspace: String,
        job: String,
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Wait for a job to end; exits with its exit code (128 + signal if killed).
    Wait { workspace: String, job: String },
    /// Send a signal (name or number) to a job's process group.
    Signal {
        workspace: String,
        job: String,
        signal: String,
    },
    /// List jobs.
    Ls {
        workspace: String,
        #[arg(long)]
        json: bool,
    },
    /// Signal a job's process group.
    Kill {
        workspace: String,
        job: String,
        /// Signal name or number.
        #[arg(long, default_value = "TERM")]
        signal: String,
    },
}

#[derive(Subcommand)]
pub enum TerminalCommand {
    /// Start a session (default command: the image's login shell).
    New {
        workspace: String,
        #[arg(long)]
        name: String,
        #[arg(last = true)]
        argv: Vec<String>,
    },
    /// Attach to a session; detach with Ctrl-] d (the session lives on).
    Attach {
        workspace: String,
        name: String,
        /// Watch only: keys are not sent.
        #[arg(long)]
        read_only: bool,
    },
    /// List sessions: name, command, created, viewers, alive, exit code.
    Ls {
        workspace: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a session's recording (asciicast v2; plays with `asciinema play`).
    Record {
        workspace: String,
        name: String,
        /// Write to this file instead of standard output.
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
    },
    /// End a session and forget it (its recording stays).
    Kill { workspace: String, name: String },
}

#[derive(Subcommand)]
pub enum EnvCommand {
    /// Set KEY=VALUE pairs.
    Set {
        workspace: String,
        #[arg(required = true)]
        vars: Vec<String>,
    },
    /// Remove variables.
    Unset {
        workspace: String,
        #[arg(required = true)]
        keys: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum FileCommand {
    /// Write standard input to a file (parent directories are created).
    Write {
        workspace: String,
        path: String,
        /// Octal permission bits, e.g. 0644.
        #[arg(long)]
        mode: Option<String>,
    },
    /// Print a file (or a byte range of it).
    Read {
        workspace: String,
        path: String,
        #[arg(long, default_value_t = 0)]
        offset: u64,
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Replace a string in a file; fails if it is absent.
    Edit {
        workspace: String,
        path: String,
        #[arg(long)]
        old: String,
        #[arg(long)]
        new: String,
        /// Replace every occurrence (otherwise it must occur once).
        #[arg(long)]
        all: bool,
    },
    /// List a directory.
    Ls {
        workspace: String,
        path: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct LsArgs {
    #[arg(long)]
    pub state: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct LogsArgs {
    pub workspace: String,
    #[arg(long = "type", value_parser = ["console", "agent"], default_value = "console")]
    pub kind: String,
    #[arg(long, default_value_t = 100)]
    pub lines: usize,
    /// Keep printing new lines until the workspace stops.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Args)]
pub struct StartArgs {
    pub workspace: String,
    #[arg(long)]
    pub boot_timeout: Option<u64>,
}

#[derive(Subcommand)]
pub enum PortForwardCommand {
    /// Forward a host port to GUEST_PORT; prints the host port.
    Add {
        workspace: String,
        guest_port: u16,
        /// The host port (≥ 1024); chosen when left out.
        #[arg(long)]
        host_port: Option<u16>,
        /// The host address to listen on (default 127.0.0.1: the host only).
        #[arg(long)]
        bind: Option<std::net::Ipv4Addr>,
        #[arg(long)]
        json: bool,
    },
    Ls {
        workspace: String,
        #[arg(long)]
        json: bool,
    },
    Rm {
        workspace: String,
        guest_port: u16,
    },
}

#[derive(Subcommand)]
pub enum TeamCommand {
    /// Create a team and its member workspaces (in parallel).
    Create {
        name: String,
        /// A member workspace to create (repeat for each).
        #[arg(long = "member", required = true)]
        members: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// The members: name, workspace_id, ip, state.
    Status {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Destroy the members (in parallel) and the team.
    Destroy { name: String },
}

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Freeze the disk as it is now (a running guest flushes its writes first).
    Create { workspace: String, name: String },
    /// List snapshots with the forks that depend on each.
    Ls {
        workspace: String,
        #[arg(long)]
        json: bool,
    },
    /// Make the disk exactly the snapshot; a running workspace restarts on it.
    Restore { workspace: String, name: String },
    /// Delete a snapshot (refused while forks depend on it).
    Delete { workspace: String, name: String },
}

#[derive(Args)]
pub struct ForkArgs {
    pub workspace: String,
    pub snapshot: String,
    /// Name of the fork (one fork).
    #[arg(long)]
    pub name: Option<String>,
    /// How many forks, made in parallel.
    #[arg(long)]
    pub count: Option<u32>,
    /// Forks are named PREFIX-1 … PREFIX-COUNT.
    #[arg(long)]
    pub name_prefix: Option<String>,
    /// Most GiB each fork's disk may hold (default: the source's limit).
    #[arg(long)]
    pub disk_gb: Option<u32>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct NetworkPolicyArgs {
    pub workspace: String,
    /// Egress beyond the host (masqueraded): true or false.
    #[arg(long)]
    pub allow_internet: Option<bool>,
    /// Reach other workspaces that allow it too: true or false.
    #[arg(long)]
    pub allow_inter_vm: Option<bool>,
    /// Egress only to these TCP ports, e.g. 443,80; "" lifts the limit.
    #[arg(long)]
    pub allowed_ports: Option<String>,
    /// Host TCP ports this workspace may connect to (any host address), e.g.
    /// 8000,9000; "" clears. By default it reaches only DNS on its gateway.
    #[arg(long)]
    pub allow_host_ports: Option<String>,
    /// Private, shared or link-local ranges (CIDRs) internet egress may include
    /// for this workspace, e.g. 10.99.0.0/16,169.254.169.254/32; "" clears.
    #[arg(long)]
    pub allow_cidr: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct DiffArgs {
    pub workspace: String,
    pub snapshot: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build an image (default: debian) and the guest kernel, if missing.
    Build {
        #[arg(default_value = "debian")]
        name: String,
        /// Rebuild even if present.
        #[arg(long)]
        force: bool,
    },
    /// List built images.
    Ls {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum DaemonCommand {
    /// Start burrowd for the state dir in the background.
    Start,
    /// Stop burrowd (running workspaces keep running and are re-adopted on start).
    Stop,
    /// Whether burrowd runs, and what it serves.
    Status {
        #[arg(long)]
        json: bool,
    },
}

/// Parses the command line; a bad argument is reported on one line (clap's own
/// report spans several), help and version as clap prints them.
fn parse() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            let text = e.to_string();
            let line: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| {
                    !l.is_empty()
                        && !l.starts_with("For more information")
                        && !l.starts_with("Usage:")
                })
                .collect();
            let line = line.join(" ");
            eprintln!("burrow: {}", line.strip_prefix("error: ").unwrap_or(&line));
            std::process::exit(2);
        }
    }
}

fn main() {
    let cli = parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("burrow: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(commands::run(cli));
    std::process::exit(code);
}
