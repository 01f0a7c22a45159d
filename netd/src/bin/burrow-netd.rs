//! `burrow-netd --state DIR --socket PATH [--netns NAME] [--subnet A.B.C.D/N]
//! [--upstream-dns A.B.C.D]`
//!
//! `--subnet` gives the gateway address and prefix; without it the state dir
//! keeps the network it had, or claims a free one (10.213.0.1/16, 10.214.0.1/16, …).
//!
//! Started by burrowd (in a session of its own, so that it outlives a daemon
//! restart); prints `ready` on stdout once it serves.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use burrow_netd::daemon::{enter_netns, run, Config};

fn usage(msg: &str) -> ! {
    eprintln!("burrow-netd: {msg}");
    eprintln!("usage: burrow-netd --state DIR --socket PATH [--netns NAME] [--subnet A.B.C.D/N] [--upstream-dns A.B.C.D]");
    std::process::exit(2);
}

fn main() {
    // Everything netd makes (its socket, its records) is root's alone; set
    // while this is the only thread, before any file exists.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o077) };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let (mut state, mut socket, mut netns, mut dns) = (None, None, None, None);
    let mut subnet = None;
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--state" => state = Some(PathBuf::from(value())),
            "--socket" => socket = Some(PathBuf::from(value())),
            "--netns" => netns = Some(value()),
            "--upstream-dns" => {
                let v = value();
                dns = Some(v.parse::<Ipv4Addr>().unwrap_or_else(|_| {
                    usage(&format!(
                        "invalid --upstream-dns {v:?}: use an IPv4 address"
                    ))
                }));
            }
            "--subnet" => {
                let v = value();
                let parsed = v.split_once('/').and_then(|(ip, p)| {
                    let p: u8 = p.parse().ok().filter(|p| (8..=30).contains(p))?;
                    Some((ip.parse::<Ipv4Addr>().ok()?, p))
                });
                subnet = Some(parsed.unwrap_or_else(|| {
                    usage(&format!(
                        "invalid --subnet {v:?}: use A.B.C.D/N, N in 8..=30"
                    ))
                }));
            }
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    let (Some(state_dir), Some(socket)) = (state, socket) else {
        usage("--state and --socket are required");
    };
    if let Some(ns) = &netns {
        if let Err(e) = enter_netns(ns) {
            eprintln!("burrow-netd: netns {ns}: {e}");
            println!("failed: netns {ns}: {e}");
            std::process::exit(1);
        }
    }
    let cfg = Config {
        state_dir,
        socket,
        netns,
        upstream_dns: dns,
        subnet,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("burrow-netd: runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(run(cfg, || {
        println!("ready");
        let _ = std::io::stdout().flush();
    }));
    if let Err(e) = result {
        eprintln!("burrow-netd: {e}");
        println!("failed: {e}");
        std::process::exit(1);
    }
}
