//! burrowd: owns the workspaces of one state dir and serves the API on its socket.
//!
//! Stopping the daemon leaves VMs running; the next daemon re-adopts them.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;

use anyhow::{bail, Context};
use burrow::access::{Access, CheckedListener};
use burrow::api::server::{router, AppState};
use burrow::engine::Engine;
use burrow::paths::{CacheDir, StateDir, DEFAULT_CACHE_DIR, DEFAULT_STATE_DIR};
use burrow::storage::StoreKind;
use burrow::Error;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "burrowd",
    version,
    about = "The burrow daemon: workspaces as microVMs"
)]
struct Args {
    #[arg(long, env = "BURROW_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[arg(long, env = "BURROW_CACHE_DIR", default_value = DEFAULT_CACHE_DIR)]
    cache_dir: PathBuf,
    /// Write "ready" to this inherited fd once the API is served (used by `burrow`
    /// when it starts the daemon, so that it waits on a signal and not a timer).
    #[arg(long)]
    ready_fd: Option<i32>,
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
    /// Volume store: auto (Btrfs if the state dir is on it, else a loop-mounted
    /// Btrfs image as root, else the FUSE layer store), btrfs, fuse, or copy.
    #[arg(long, env = "BURROW_STORE", default_value = "auto")]
    store: String,
    /// A group whose members may use this daemon besides root (e.g. `burrow`).
    #[arg(long, env = "BURROW_GROUP")]
    group: Option<String>,
}

/// Ends with the error chain on one line (and no backtrace, whatever
/// RUST_BACKTRACE says), which is what `burrow` shows from the daemon's log when
/// the daemon it started exits before it is ready.
fn main() -> std::process::ExitCode {
    match serve() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn serve() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("BURROW_LOG").unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if args.log_format == "json" {
        sub.json().init();
    } else {
        sub.init();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    // The ready pipe is ours alone: a helper started before we write to it (the
    // FUSE store's server) must not inherit it and keep it open.
    let ready = args.ready_fd.map(|fd| {
        // SAFETY: the fd was handed to us for one write; we own it from here.
        unsafe { std::fs::File::from_raw_fd(fd) }
    });
    if let Some(f) = &ready {
        // SAFETY: fcntl on an fd we own.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{}", burrow::access::NEEDS_ROOT);
    }
    // Whatever the umask of whoever started us: everything this daemon and the
    // processes it starts create (sockets, logs, volumes, the store image) is
    // theirs alone unless given another mode on purpose.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o077) };
    let access = Access::new(args.group.as_deref())?;
    let state = StateDir::new(&args.state_dir).context("state dir")?;
    let cache = CacheDir::new(&args.cache_dir).context("cache dir")?;
    // Guests' files, consoles and the socket live below: nobody but root (and the
    // access group, to reach the socket) gets in, whatever the umask.
    access.secure_state_dir(state.root())?;

    let agent = burrow::image::find_agent();
    tracing::info!(state_dir = %state.root().display(), agent = %agent.display(), "burrowd starting");
    let store = StoreKind::parse(&args.store)?;
    // The engine holds the state dir from here: a second daemon stops at this
    // line, having changed nothing (its refusal is the whole message).
    let engine = match Engine::open(state.clone(), cache.clone(), agent, store).await {
        Ok(e) => e,
        Err(e @ Error::AlreadyServed(_)) => return Err(e.into()),
        Err(e) => return Err(anyhow::Error::new(e).context("open state")),
    };
    let pid_path = state.pid_file();
    std::fs::write(&pid_path, format!("{}\n", std::process::id()))
        .with_context(|| format!("write {}", pid_path.display()))?;

    let sock = state.socket();
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)
        .with_context(|| format!("bind {}", sock.display()))?;
    access.secure_socket(&sock)?;
    let listener = CheckedListener {
        inner: listener,
        access,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let app = router(AppState {
        engine: engine.clone(),
        shutdown: tx,
        cache_dir: cache.root().display().to_string(),
    });

    if let Some(mut f) = ready {
        let _ = f.write_all(b"ready\n");
    }
    tracing::info!(socket = %sock.display(), "serving");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = rx.recv() => {}
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("burrowd stopping; VMs keep running");
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    // Removed while the engine still holds the state dir: once it lets go, a
    // new daemon may bind its own socket and write its own pid there.
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&pid_path);
    engine.close().await;
    Ok(())
}
