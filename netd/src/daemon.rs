//! The daemon: joins its network namespace, makes the bridge and the table exact,
//! then answers requests on its socket.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;

use crate::claim::{Claim, NetworkId};
use crate::forwards::Relays;
use crate::identity::Port;
use crate::protocol::{Reply, Request, MAX_LINE};
use crate::rules::{Installed, Names};
use crate::state::{mac_for, Store};
use crate::{claim, fdpass, identity, links, rules};

mod requests;

enum Refusal {
    Field(&'static str, String),
    Failed(String),
}

impl Refusal {
    fn reply(self) -> (Reply, Option<std::os::fd::OwnedFd>) {
        let reply = match self {
            Refusal::Field(field, message) => Reply::Refused {
                field: Some(field.into()),
                message,
            },
            Refusal::Failed(e) => Reply::Failed(e),
        };
        (reply, None)
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// A network namespace (`ip netns` name) to do everything in.
    pub netns: Option<String>,
    /// The resolver guests' queries are forwarded to (when their policy allows
    /// internet access); none: the first of /etc/resolv.conf.
    pub upstream_dns: Option<Ipv4Addr>,
    /// A configured subnet (gateway address and prefix length); none: the one
    /// this state dir had, else a free default one (see [`claim`]).
    pub subnet: Option<(Ipv4Addr, u8)>,
}

/// A policy change as asked: fields left out keep their value.
#[derive(Debug, Default)]
struct PolicyChange {
    allow_internet: Option<bool>,
    allow_inter_vm: Option<bool>,
    allowed_ports: Option<Vec<u16>>,
    allow_host_ports: Option<Vec<u16>>,
    allow_cidr: Option<Vec<crate::protocol::Cidr>>,
}

struct Daemon {
    cfg: Config,
    handle: rtnetlink::Handle,
    /// This network's index, held for netd's lifetime.
    claim: Claim,
    names: Names,
    bridge: u32,
    /// Addresses and policies, and the port sets the table has: changed together.
    store: Mutex<Net>,
}

struct Net {
    store: Store,
    installed: Installed,
    relays: Relays,
    names: Names,
}

impl Net {
    /// Rebuilds the table from the recorded workspaces, in one batch.
    fn install(&mut self) -> Result<(), String> {
        let members = self.store.leases.members();
        let teams = self.store.leases.team_addresses();
        rules::install(&self.names, &members, &teams).map_err(|e| format!("nftables: {e}"))?;
        self.installed = Installed::of(&members);
        Ok(())
    }
}

/// Routing between workspaces (when policy allows it) goes through the host:
/// forwarding on, proxy ARP across the isolated bridge ports, and no ICMP
/// redirects telling a guest to go around the host.
fn route_through_host(bridge: &str) -> Result<(), String> {
    let set = |path: String, value: &str| {
        std::fs::write(&path, value).map_err(|e| format!("{path}: {e}"))
    };
    set("/proc/sys/net/ipv4/ip_forward".into(), "1")?;
    let conf = format!("/proc/sys/net/ipv4/conf/{bridge}");
    set(format!("{conf}/proxy_arp"), "1")?;
    set(format!("{conf}/proxy_arp_pvlan"), "1")?;
    set(format!("{conf}/send_redirects"), "0")?;
    set("/proc/sys/net/ipv4/conf/all/send_redirects".into(), "0")
}

/// The host's first IPv4 name server (not a loopback one: the guests' queries are
/// sent from here, and a stub on 127.0.0.53 would not be reachable the same way).
fn system_resolver() -> Option<Ipv4Addr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .ok()?
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .find(|a| !a.is_loopback())
}

/// Joins `name` (a file in /run/netns). Call before any other thread exists: a
/// namespace is per thread, and threads made later inherit it.
pub fn enter_netns(name: &str) -> std::io::Result<()> {
    let path = std::path::Path::new("/run/netns").join(name);
    let ns = std::fs::File::open(&path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    // SAFETY: setns with an fd we own.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs the daemon; `ready` is called once it serves.
pub async fn run(cfg: Config, ready: impl FnOnce()) -> Result<(), String> {
    let store = Store::load(&cfg.state_dir).map_err(|e| format!("state: {e}"))?;
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| format!("netlink: {e}"))?;
    tokio::spawn(conn);
    // This state dir's own network, never another's: an index claimed among
    // the netds of this namespace, and a subnet no route or other state dir has.
    let routes = links::routes(&handle).await?;
    let claim = claim::claim(&cfg.state_dir, cfg.subnet, &routes)?;
    let network: NetworkId = claim.network;
    let bridge_name = network.bridge();
    let names = Names::new(&bridge_name, network.gateway).map_err(|e| e.to_string())?;
    let bridge =
        links::ensure_bridge(&handle, &bridge_name, network.gateway, network.prefix).await?;
    route_through_host(&bridge_name)?;
    let mut store = store;
    // Addresses from another subnet (the state dir was given a new one) are
    // given up; their workspaces get new ones when they next boot.
    let subnet = network.subnet();
    let before = store.leases.by_workspace.len();
    store
        .leases
        .by_workspace
        .retain(|_, ip| subnet.contains(*ip));
    if store.leases.by_workspace.len() != before {
        store.save().map_err(|e| format!("save leases: {e}"))?;
    }
    let mut net = Net {
        store,
        installed: Installed::default(),
        relays: Relays::default(),
        names: names.clone(),
    };
    net.install()?;
    // The identity checks of the VMs already on the bridge (netd restarted
    // while they ran).
    let running = links::ports(&handle, bridge).await?;
    let guarded: Vec<Port> = net
        .store
        .leases
        .by_workspace
        .iter()
        .map(|(w, ip)| port_of(w, *ip))
        .filter(|p| running.contains(&p.tap))
        .collect();
    identity::install_ports(&names, &guarded).map_err(|e| format!("nftables: {e}"))?;
    // The recorded forwards again (a port another process took meanwhile is
    // reported and skipped).
    for f in net
        .store
        .leases
        .forwards
        .values()
        .cloned()
        .collect::<Vec<_>>()
    {
        let Some(ip) = net.store.leases.by_workspace.get(&f.workspace).copied() else {
            continue;
        };
        if let Err(e) = net
            .relays
            .start(f.bind, f.host_port, (ip, f.guest_port).into())
            .await
        {
            tracing::warn!(host_port = f.host_port, "forward: {e}");
        }
    }
    let _ = std::fs::remove_file(&cfg.socket);
    // netd's umask (077, set in main) makes the socket 0600 at bind, before
    // anyone can connect; the chmod says so whatever the umask was.
    let listener = UnixListener::bind(&cfg.socket)
        .map_err(|e| format!("bind {}: {e}", cfg.socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("chmod {}: {e}", cfg.socket.display()))?;
    }
    let gateway = network.gateway;
    let daemon = Arc::new(Daemon {
        cfg,
        handle,
        claim,
        names,
        bridge,
        store: Mutex::new(net),
    });
    if let Some(upstream) = daemon.cfg.upstream_dns.or_else(system_resolver) {
        let d = daemon.clone();
        crate::dns::serve(gateway, upstream, move |ip| {
            let d = d.clone();
            tokio::spawn(async move {
                let n = d.store.lock().await;
                let ws = n
                    .store
                    .leases
                    .by_workspace
                    .iter()
                    .find(|(_, a)| **a == ip)
                    .map(|(w, _)| w.clone());
                ws.and_then(|w| n.store.leases.policies.get(&w).map(|p| p.allow_internet))
                    .unwrap_or(false)
            })
        })
        .await
        .map_err(|e| format!("resolver on {gateway}:53: {e}"))?;
    } else {
        tracing::warn!("no upstream resolver: guests get no DNS");
    }
    ready();
    loop {
        let (conn, _) = listener
            .accept()
            .await
            .map_err(|e| format!("accept: {e}"))?;
        let d = daemon.clone();
        tokio::spawn(async move {
            if let Err(e) = d.serve(conn).await {
                tracing::warn!("connection: {e}");
            }
        });
    }
}

/// The identity of `workspace`'s port: its TAP, MAC and address.
fn port_of(workspace: &str, ip: Ipv4Addr) -> Port {
    Port {
        tap: format!("bw{workspace}"),
        mac: mac_for(ip),
        ip,
    }
}

impl Daemon {
    async fn serve(&self, conn: UnixStream) -> std::io::Result<()> {
        let mut reader = BufReader::new(conn);
        let mut line = String::new();
        let n = (&mut reader)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .await?;
        let conn = reader.into_inner();
        if n == 0 {
            return Ok(());
        }
        // Only root drives the host's network, whatever the socket's mode. The
        // request is read (bounded) first so that the client, which writes
        // before it reads, always gets the refusal.
        let uid = conn.peer_cred().map(|c| c.uid()).ok();
        if uid != Some(0) {
            use tokio::io::AsyncWriteExt;
            let reply = Reply::Refused {
                field: None,
                message: format!(
                    "burrow-netd serves root only (peer uid {})",
                    uid.map_or("unknown".to_string(), |u| u.to_string())
                ),
            };
            let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
            out.push(b'\n');
            let mut conn = conn;
            return conn.write_all(&out).await;
        }
        let parsed = serde_json::from_str::<Request>(&line);
        let shutting_down = matches!(parsed, Ok(Request::Shutdown));
        let (reply, fd) = match parsed {
            Err(e) => (
                Reply::Refused {
                    field: Some("request".into()),
                    message: e.to_string(),
                },
                None,
            ),
            Ok(req) => self.handle(req).await,
        };
        let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
        out.push(b'\n');
        let raw = conn.as_raw_fd();
        conn.writable().await?;
        let sent = match fd {
            Some(fd) => fdpass::send_with_fd(raw, &out, fd.as_raw_fd()),
            None => {
                use tokio::io::AsyncWriteExt;
                let mut conn = conn;
                conn.write_all(&out).await
            }
        };
        if shutting_down && matches!(reply, Reply::Ok) {
            std::process::exit(0);
        }
        sent
    }
}
