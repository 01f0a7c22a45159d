//! The workspaces' network: burrow-netd, started by the daemon when none serves
//! its state dir, in a session of its own so that it (and the network of running
//! VMs) outlives a daemon restart.
//!
//! `BURROW_NETNS` names a network namespace (`ip netns`) for netd to work in:
//! tests give each instance its own. `BURROW_UPSTREAM_DNS` is the resolver netd
//! forwards guests' queries to (default: the host's first in /etc/resolv.conf).
//! `BURROW_SUBNET=A.B.C.D/N` gives this state dir's gateway and subnet; without it
//! netd keeps the one the state dir had or claims a free one, so several state
//! dirs share a host (or namespace) without sharing a network. When no network
//! can be had (not root, no free subnet), [`Network::open`] says why, and the
//! engine refuses to boot workspaces with that reason: never a workspace without
//! network while nothing says so.

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use burrow_netd::{Lease, NetClient, NetError};

use crate::paths::StateDir;
use crate::vmm::VmNet;

#[derive(Clone)]
pub struct Network {
    client: NetClient,
    pid_file: PathBuf,
    state: StateDir,
}

impl Network {
    /// Connects to this state dir's netd, starting it if none answers. An error
    /// (one line, logged) when the host cannot give workspaces a network.
    pub fn open(state: &StateDir) -> Result<Network, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let why =
                "burrowd is not root, and workspace networks (TAP devices, nftables) need root"
                    .to_string();
            tracing::warn!("{why}");
            return Err(why);
        }
        let socket = state.root().join("netd.sock");
        let net = Network {
            client: NetClient::new(&socket),
            pid_file: state.root().join("netd.pid"),
            state: state.clone(),
        };
        if net.client.ping().is_ok() {
            return Ok(net);
        }
        match net.start() {
            Ok(()) => Ok(net),
            Err(e) => {
                tracing::warn!("burrow-netd: {e}");
                Err(format!("burrow-netd: {e}"))
            }
        }
    }

    /// Runs `f` against netd; if netd is gone (killed), starts it again (it
    /// rebuilds its bridge and table from its records) and runs `f` once more.
    fn with<T>(&self, f: impl Fn(&NetClient) -> Result<T, NetError>) -> Result<T, NetError> {
        match f(&self.client) {
            Err(NetError::Unreachable(path, e)) => {
                tracing::warn!(
                    "burrow-netd at {} does not answer ({e}): starting it",
                    path.display()
                );
                self.start().map_err(NetError::Failed)?;
                f(&self.client)
            }
            r => r,
        }
    }

    fn start(&self) -> Result<(), String> {
        let state = &self.state;
        let socket = state.root().join("netd.sock");
        let binary = crate::paths::companion_binary("BURROW_NETD", "burrow-netd")
            .ok_or("burrow-netd is not installed next to burrowd")?;
        let log = state.root().join("netd.log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("open {}: {e}", log.display()))?;
        let mut cmd = Command::new(binary);
        cmd.arg("--state")
            .arg(state.root().join("net"))
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        if let Ok(ns) = std::env::var("BURROW_NETNS") {
            cmd.args(["--netns", &ns]);
        }
        if let Ok(dns) = std::env::var("BURROW_UPSTREAM_DNS") {
            cmd.args(["--upstream-dns", &dns]);
        }
        if let Ok(subnet) = std::env::var("BURROW_SUBNET") {
            cmd.args(["--subnet", &subnet]);
        }
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            })
        };
        let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
        let _ = std::fs::write(&self.pid_file, format!("{}\n", child.id()));
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        std::thread::spawn(move || child.wait());
        if line.trim() == "ready" {
            Ok(())
        } else if let Some(why) = line.trim().strip_prefix("failed: ") {
            Err(why.to_string())
        } else {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            Err(tail
                .lines()
                .last()
                .unwrap_or("exited before serving")
                .to_string())
        }
    }

    /// The guest's interface for `workspace`'s VM.
    pub fn attach(&self, workspace: &str) -> Result<(Lease, VmNet), String> {
        let (lease, fd) = self
            .with(|c| c.attach(workspace))
            .map_err(|e| e.to_string())?;
        let net = VmNet {
            tap: std::sync::Arc::new(fd),
            mac: lease.mac.clone(),
            ip: lease.ip,
            prefix: lease.prefix,
            gateway: lease.gateway,
        };
        Ok((lease, net))
    }

    pub fn release(&self, workspace: &str) {
        if let Err(e) = self.with(|c| c.release(workspace)) {
            tracing::warn!(workspace, "release its address: {e}");
        }
    }

    /// Tells netd which workspaces and teams exist; it forgets the others.
    pub fn sync(
        &self,
        workspaces: Vec<String>,
        teams: std::collections::BTreeMap<String, Vec<String>>,
    ) {
        if let Err(e) = self.with(|c| c.sync(workspaces.clone(), teams.clone())) {
            tracing::warn!("network sync: {e}");
        }
    }

    /// Stops netd (it removes its bridge and table) when no VM uses the network.
    pub fn shutdown(&self) {
        match self.client.shutdown() {
            Ok(()) => {
                let _ = std::fs::remove_file(&self.pid_file);
            }
            Err(e) => tracing::info!("burrow-netd stays: {e}"),
        }
    }

    pub fn set_team(&self, name: &str, members: Vec<String>) -> Result<(), burrow_netd::NetError> {
        self.with(|c| c.set_team(name, members.clone()))
    }

    pub fn remove_team(&self, name: &str) -> Result<(), burrow_netd::NetError> {
        self.with(|c| c.remove_team(name))
    }

    pub fn set_policy(
        &self,
        workspace: &str,
        change: burrow_netd::protocol::PolicyChange,
    ) -> Result<burrow_netd::protocol::Policy, burrow_netd::NetError> {
        self.with(|c| c.set_policy(workspace, change.clone()))
    }

    pub fn policy(
        &self,
        workspace: &str,
    ) -> Result<burrow_netd::protocol::Policy, burrow_netd::NetError> {
        self.with(|c| c.policy(workspace))
    }

    pub fn forward_add(
        &self,
        workspace: &str,
        guest_port: u16,
        host_port: Option<u16>,
        bind: Option<std::net::Ipv4Addr>,
    ) -> Result<burrow_netd::protocol::Forward, NetError> {
        self.with(|c| c.forward_add(workspace, guest_port, host_port, bind))
    }

    pub fn forward_rm(&self, workspace: &str, guest_port: u16) -> Result<(), NetError> {
        self.with(|c| c.forward_rm(workspace, guest_port))
    }

    pub fn forward_ls(
        &self,
        workspace: &str,
    ) -> Result<Vec<burrow_netd::protocol::Forward>, NetError> {
        self.with(|c| c.forward_ls(workspace))
    }

    pub fn leases(&self) -> Vec<Lease> {
        self.with(|c| c.leases()).unwrap_or_default()
    }
}
