//! `burrow-agent`: PID 1 inside each workspace VM, serving the host over vsock.
//!
//! The initramfs mounts the workspace over virtio-fs, copies this binary to
//! `/run/burrow-agent` and `switch_root`s into it. As init the agent mounts the
//! kernel file systems, sets the host name from the kernel command line, brings up
//! `lo`, reaps every zombie, and serves `burrow-proto` requests until told to shut
//! down. With `--no-init --listen unix:PATH` it runs as an ordinary process on the
//! host, which is how it is developed and tested.

mod agent;
mod config;
mod containers;
mod env;
mod exec;
mod files;
mod init;
mod jobs;
mod log;
mod oci;
mod process;
mod pty;
mod ring;
mod server;
mod streams;
mod terminal;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use crate::agent::{Agent, Mode};
use crate::server::{ListenAddr, Listener};

#[derive(Debug, Parser)]
#[command(name = "burrow-agent", version, about = "The guest agent of burrow")]
struct Args {
    /// Where to listen: `vsock` or `vsock:PORT` (default port 1024), or `unix:PATH`.
    #[arg(long, default_value = "vsock", value_name = "ADDR")]
    listen: ListenAddr,
    /// Do not act as init (no mounts, host name or power-off), even as PID 1.
    #[arg(long)]
    no_init: bool,
    /// Log debug lines too.
    #[arg(short, long)]
    verbose: bool,
    /// The directory of container bundles (`<dir>/<id>/config.json`); in a VM,
    /// the shared directory's mount point.
    #[arg(long, value_name = "DIR", default_value = burrow_proto::CONTAINERS_DIR)]
    containers_dir: std::path::PathBuf,
    /// libcontainer's state root.
    #[arg(long, value_name = "DIR", default_value = containers::DEFAULT_OCI_ROOT)]
    oci_root: std::path::PathBuf,
}

fn main() -> ExitCode {
    // The OCI helper runs single-threaded, before any runtime exists: it forks.
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("oci") {
        return oci::main(&argv[2..]);
    }
    let pid1 = std::process::id() == 1;
    let args = match Args::try_parse() {
        Ok(a) => a,
        // As init, exiting panics the kernel: run with the defaults instead.
        Err(e) if pid1 => {
            log::init(true, false, false);
            tracing::warn!("ignoring arguments: {}", e.kind());
            Args {
                listen: ListenAddr::Vsock(burrow_proto::AGENT_PORT),
                no_init: false,
                verbose: false,
                containers_dir: burrow_proto::CONTAINERS_DIR.into(),
                oci_root: containers::DEFAULT_OCI_ROOT.into(),
            }
        }
        Err(e) => e.exit(),
    };
    let mode = if pid1 && !args.no_init {
        Mode::Init
    } else {
        Mode::Dev
    };
    // The console is the guest's serial port; in dev mode it would be the host's.
    log::init(!args.no_init, !pid1, args.verbose);

    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
        .and_then(|rt| rt.block_on(run(args, mode)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            if mode == Mode::Init {
                // Nothing can reach this guest any more: end it so the host sees the
                // VM exit (and the console tail) instead of a silent hang.
                init::power_off();
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, mode: Mode) -> anyhow::Result<()> {
    if mode == Mode::Init {
        init::setup();
    }
    // The reaper must exist before the first child does.
    let processes = process::ProcessTable::start().context("SIGCHLD handler")?;
    let agent = Arc::new(Agent::new(
        mode,
        env::Environment::from_process(mode == Mode::Init),
        processes,
        containers::ContainerPaths {
            dir: args.containers_dir.clone(),
            oci_root: args.oci_root.clone(),
            mount_shared: mode == Mode::Init,
        },
    ));
    let listener = Listener::bind(&args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    tracing::info!(
        "v{} listening on {}",
        env!("CARGO_PKG_VERSION"),
        args.listen
    );
    if mode == Mode::Dev {
        tokio::spawn(exit_on_signal(Arc::clone(&agent)));
    }
    listener.announce_ready();
    listener.serve(agent).await.context("serve")
}

/// In dev mode SIGTERM and SIGINT end the agent the way `Shutdown` does, so
/// whoever started it (a test, a developer) leaves no processes behind.
async fn exit_on_signal(agent: Arc<Agent>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    agent.shutdown().await;
}
