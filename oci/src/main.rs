//! burrow-runtime: runc's command line, where each container is a microVM.
//!
//! It parses (on youki's liboci-cli), checks, asks burrowd (starting it if
//! needed) and answers as runc would; it never opens the engine itself. Errors
//! are one line on stderr and, with `--log`, a `"level":"error"` line there,
//! which containerd quotes in "OCI runtime create failed: ...". See docs/oci.md.

/// Prints a line on stdout; a reader that went away (`| head`) is not an error.
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

use burrow_oci::{bundle, error, hooks, log, signal};

mod holder;
mod lifecycle;
mod ops;
mod store;
mod term;

use std::ffi::OsString;
use std::path::PathBuf;

use burrow::api::client::{Client, ClientError};
use burrow::api::ContainerAnswer;
use burrow::paths::{StateDir, DEFAULT_CACHE_DIR, DEFAULT_STATE_DIR};
use burrow_proto::{ContainerOp, ContainerStatusKind};
use clap::{Parser, Subcommand};

use crate::error::{Error, Result};
use crate::store::{Record, Root};

/// Exit code of a holder whose stream broke before the container's exit.
pub const EXIT_LOST: i32 = 255;

#[derive(Parser, Debug)]
#[command(
    name = "burrow-runtime",
    version,
    about = "An OCI runtime with runc's command line: each container runs in its own microVM"
)]
struct Cli {
    #[command(flatten)]
    global: liboci_cli::GlobalOpts,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Standard(Box<liboci_cli::StandardCmd>),
    #[command(flatten)]
    Common(Box<liboci_cli::CommonCmd>),
    /// The process a pid file names: relays a container's stdio (started by create
    /// and exec --detach, not by hand).
    #[command(hide = true)]
    Holder,
}

/// A container's status as this runtime reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }
}

/// What every call has: the state root, the log, where burrowd is.
pub struct Ctx {
    pub root: Root,
    pub log: log::Log,
    state_dir: PathBuf,
    cache_dir: PathBuf,
}

impl Ctx {
    /// burrowd's client, starting the daemon when none serves the state dir.
    pub async fn client(&self) -> Result<Client> {
        let state = StateDir::new(&self.state_dir).map_err(Error::io(&self.state_dir))?;
        let (client, _) = burrow::api::connect::connect(&state, &self.cache_dir).await?;
        Ok(client)
    }

    pub fn load(&self, id: &str) -> Result<Record> {
        self.root
            .load(id)?
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    /// Stopped once its holder is gone; otherwise what the guest says.
    pub async fn status(&self, client: &Client, r: &Record) -> Result<Status> {
        if r.holder.is_none() {
            return Ok(Status::Creating);
        }
        if !r.holder_alive() {
            return Ok(Status::Stopped);
        }
        let answer = match lifecycle::op(client, r, ContainerOp::State { id: r.id.clone() }).await {
            // Its VM is gone (destroyed behind the runtime's back): so is it.
            Err(Error::Client(ClientError::Api { status: 404, .. })) => return Ok(Status::Stopped),
            a => a?,
        };
        Ok(match answer {
            ContainerAnswer::Status(s) => match s.status {
                ContainerStatusKind::Created => Status::Created,
                ContainerStatusKind::Running => Status::Running,
                ContainerStatusKind::Paused => Status::Paused,
                ContainerStatusKind::Stopped => Status::Stopped,
            },
            _ => {
                return Err(Error::Holder(
                    "burrowd answered state with something else".into(),
                ))
            }
        })
    }

    /// The global flags a holder is started with.
    pub fn globals(&self) -> Vec<OsString> {
        let mut g = Vec::new();
        if let Some(p) = &self.log.path {
            g.push("--log".into());
            g.push(p.clone().into_os_string());
        }
        g.push("--log-format".into());
        g.push(self.log.format.as_str().into());
        if self.log.debug {
            g.push("--debug".into());
        }
        g
    }
}

/// `--log` and `--log-format` read from the raw arguments, for an error found
/// before (or while) clap parses them.
fn log_from_args(args: &[OsString]) -> log::Log {
    let mut path = None;
    let mut format = log::Format::Text;
    let mut it = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(a) = it.next() {
        match a.as_str() {
            "--log" | "-l" => path = it.next().map(PathBuf::from),
            "--log-format" => {
                format = log::Format::parse(it.next().as_deref()).unwrap_or(log::Format::Text)
            }
            _ => {
                if let Some(p) = a.strip_prefix("--log=") {
                    path = Some(PathBuf::from(p));
                } else if let Some(f) = a.strip_prefix("--log-format=") {
                    format = log::Format::parse(Some(f)).unwrap_or(log::Format::Text);
                }
            }
        }
    }
    log::Log {
        path,
        format,
        debug: false,
    }
}

fn fail(log: &log::Log, msg: &str) -> ! {
    let msg = msg.replace('\n', " ");
    eprintln!("burrow-runtime: {msg}");
    log.error(&msg);
    std::process::exit(1)
}

fn main() {
    let args: Vec<OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp
            | clap::error::ErrorKind::DisplayVersion
            | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
            _ => {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or("bad arguments");
                fail(&log_from_args(&args), first.trim_start_matches("error: "))
            }
        },
    };
    let mut log = log_from_args(&args);
    log.debug = cli.global.debug;
    log.format = match log::Format::parse(cli.global.log_format.as_deref()) {
        Ok(f) => f,
        Err(e) => fail(&log, &e.to_string()),
    };
    log.path = cli.global.log.clone();
    let root = match Root::new(cli.global.root.as_deref()) {
        Ok(r) => r,
        Err(e) => fail(&log, &e.to_string()),
    };
    let ctx = Ctx {
        root,
        log,
        state_dir: std::env::var_os("BURROW_STATE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
        cache_dir: std::env::var_os("BURROW_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| DEFAULT_CACHE_DIR.into()),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => fail(&ctx.log, &format!("tokio runtime: {e}")),
    };
    if let Err(e) = runtime.block_on(dispatch(&ctx, cli.command)) {
        fail(&ctx.log, &e.to_string());
    }
}

async fn dispatch(ctx: &Ctx, command: Command) -> Result<()> {
    use liboci_cli::{CommonCmd, StandardCmd};
    match command {
        Command::Holder => holder::main(&ctx.log).await,
        Command::Standard(c) => match *c {
            StandardCmd::Create(a) => lifecycle::create(ctx, &a).await,
            StandardCmd::Start(a) => lifecycle::start(ctx, &a).await,
            StandardCmd::State(a) => ops::state(ctx, &a).await,
            StandardCmd::Kill(a) => ops::kill(ctx, &a).await,
            StandardCmd::Delete(a) => lifecycle::delete(ctx, &a).await,
        },
        Command::Common(c) => match *c {
            CommonCmd::Run(a) => lifecycle::run(ctx, &a).await,
            CommonCmd::Exec(a) => lifecycle::exec(ctx, &a).await,
            CommonCmd::Ps(a) => ops::ps(ctx, &a).await,
            CommonCmd::Pause(a) => ops::pause(ctx, &a).await,
            CommonCmd::Resume(a) => ops::resume(ctx, &a).await,
            CommonCmd::Update(a) => ops::update(ctx, &a).await,
            CommonCmd::List(a) => ops::list(ctx, &a).await,
            CommonCmd::Events(a) => ops::events(ctx, &a).await,
            CommonCmd::Features(_) => {
                crate::say!(
                    "{}",
                    serde_json::to_string_pretty(&ops::features()).unwrap_or_default()
                );
                Ok(())
            }
            CommonCmd::Spec(a) => ops::spec(&a),
            CommonCmd::Checkpointt(_) => Err(Error::invalid(
                "checkpoint",
                "not supported: a container's VM cannot be checkpointed yet",
            )),
        },
    }
}
