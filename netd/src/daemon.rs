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
use crate::protocol::{
    parse_cidrs, validate_team, validate_workspace, Forward, Lease, Policy, Reply, Request,
    MAX_LINE,
};
use crate::rules::{Installed, Names};
use crate::state::{mac_for, mac_string, Store};
use crate::{claim, fdpass, identity, links, rules};

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

    async fn handle(&self, req: Request) -> (Reply, Option<std::os::fd::OwnedFd>) {
        let refused = |field: &str, message: String| Reply::Refused {
            field: Some(field.into()),
            message,
        };
        match req {
            Request::Ping => (Reply::Ok, None),
            Request::Attach { workspace } => {
                if let Err(m) = validate_workspace(&workspace) {
                    return (refused("workspace", m), None);
                }
                match self.attach(&workspace).await {
                    Ok((lease, fd)) => (Reply::Attached(lease), Some(fd)),
                    Err(e) => (Reply::Failed(e), None),
                }
            }
            Request::Release { workspace } => {
                if let Err(m) = validate_workspace(&workspace) {
                    return (refused("workspace", m), None);
                }
                let mut n = self.store.lock().await;
                let ip = n.store.leases.by_workspace.get(&workspace).copied();
                let old = n
                    .store
                    .leases
                    .policies
                    .get(&workspace)
                    .cloned()
                    .unwrap_or_default();
                let in_team = n
                    .store
                    .leases
                    .teams
                    .values()
                    .any(|m| m.contains(&workspace));
                n.store.leases.remove(&workspace);
                let forwards: Vec<_> = n.store.leases.forwards.values().cloned().collect();
                n.relays.retain(&forwards);
                if let Err(e) = identity::unguard_port(&self.names, &format!("bw{workspace}")) {
                    return (Reply::Failed(format!("nftables: {e}")), None);
                }
                if in_team {
                    // Its address leaves the team's set with a rebuild.
                    return self.saved_and_installed(&mut n);
                }
                if let Err(e) = n.store.save() {
                    return (Reply::Failed(format!("save leases: {e}")), None);
                }
                let cleared = match ip {
                    Some(ip) => {
                        rules::update(&self.names, ip, &old, &Policy::default(), &n.installed)
                            .map_err(|e| format!("nftables: {e}"))
                    }
                    None => Ok(true),
                };
                match cleared {
                    Ok(_) => (Reply::Ok, None),
                    Err(e) => (Reply::Failed(e), None),
                }
            }
            Request::SetTeam { name, members } => {
                if let Err(m) = validate_team(&name) {
                    return (refused("team", m), None);
                }
                if let Some(Err(m)) = members
                    .iter()
                    .map(|w| validate_workspace(w))
                    .find(Result::is_err)
                {
                    return (refused("member", m), None);
                }
                let mut n = self.store.lock().await;
                n.store.leases.teams.insert(name, members);
                self.saved_and_installed(&mut n)
            }
            Request::RemoveTeam { name } => {
                let mut n = self.store.lock().await;
                if n.store.leases.teams.remove(&name).is_none() {
                    return (refused("team", format!("no team {name:?}")), None);
                }
                self.saved_and_installed(&mut n)
            }
            Request::Sync { workspaces, teams } => {
                let mut n = self.store.lock().await;
                let gone: Vec<String> = n
                    .store
                    .leases
                    .by_workspace
                    .keys()
                    .filter(|w| !workspaces.contains(w))
                    .cloned()
                    .collect();
                for w in &gone {
                    n.store.leases.remove(w);
                }
                n.store.leases.teams = teams;
                self.saved_and_installed(&mut n)
            }
            Request::SetPolicy {
                workspace,
                allow_internet,
                allow_inter_vm,
                allowed_ports,
                allow_host_ports,
                allow_cidr,
            } => {
                if let Err(m) = validate_workspace(&workspace) {
                    return (refused("workspace", m), None);
                }
                if let Some(p) = allowed_ports.iter().flatten().find(|p| **p == 0) {
                    return (
                        refused("allowed_ports", format!("{p} is not a port (1-65535)")),
                        None,
                    );
                }
                if let Some(p) = allow_host_ports.iter().flatten().find(|p| **p == 0) {
                    return (
                        refused("allow_host_ports", format!("{p} is not a port (1-65535)")),
                        None,
                    );
                }
                let allow_cidr = match allow_cidr.as_deref().map(parse_cidrs).transpose() {
                    Ok(c) => c,
                    Err(m) => return (refused("allow_cidr", m), None),
                };
                let change = PolicyChange {
                    allow_internet,
                    allow_inter_vm,
                    allowed_ports,
                    allow_host_ports,
                    allow_cidr,
                };
                match self.set_policy(&workspace, change).await {
                    Ok(p) => (Reply::Policy(p), None),
                    Err(r) => r.reply(),
                }
            }
            Request::ForwardAdd {
                workspace,
                guest_port,
                host_port,
                bind,
            } => {
                if let Err(m) = validate_workspace(&workspace) {
                    return (refused("workspace", m), None);
                }
                if guest_port == 0 {
                    return (
                        refused("guest_port", "0 is not a port (1-65535)".into()),
                        None,
                    );
                }
                if let Some(h) = host_port.filter(|h| *h < 1024) {
                    return (refused("host_port", format!("{h} is below 1024")), None);
                }
                let bind = bind.unwrap_or_else(crate::protocol::default_bind);
                if bind.is_multicast() || bind.is_broadcast() {
                    return (
                        refused("bind", format!("{bind} is not a host address")),
                        None,
                    );
                }
                match self
                    .forward_add(&workspace, guest_port, host_port, bind)
                    .await
                {
                    Ok(f) => (Reply::Forward(f), None),
                    Err(r) => r.reply(),
                }
            }
            Request::ForwardRm {
                workspace,
                guest_port,
            } => {
                let mut n = self.store.lock().await;
                let found = n
                    .store
                    .leases
                    .forward_of(&workspace, guest_port)
                    .map(|f| f.host_port);
                let Some(host_port) = found else {
                    return (
                        refused(
                            "guest_port",
                            format!("{guest_port} of {workspace} is not forwarded"),
                        ),
                        None,
                    );
                };
                n.store.leases.forwards.remove(&host_port);
                n.relays.stop(host_port);
                match n.store.save() {
                    Ok(()) => (Reply::Ok, None),
                    Err(e) => (Reply::Failed(format!("save: {e}")), None),
                }
            }
            Request::ForwardLs { workspace } => {
                let n = self.store.lock().await;
                let list = n
                    .store
                    .leases
                    .forwards
                    .values()
                    .filter(|f| f.workspace == workspace)
                    .cloned()
                    .collect();
                (Reply::Forwards(list), None)
            }
            Request::GetPolicy { workspace } => {
                let n = self.store.lock().await;
                if !n.store.leases.by_workspace.contains_key(&workspace) {
                    return (
                        refused("workspace", format!("{workspace:?} has no address")),
                        None,
                    );
                }
                let p = n
                    .store
                    .leases
                    .policies
                    .get(&workspace)
                    .cloned()
                    .unwrap_or_default();
                (Reply::Policy(p), None)
            }
            Request::Shutdown => match self.shutdown().await {
                Ok(()) => (Reply::Ok, None),
                Err(e) => (
                    Reply::Refused {
                        field: None,
                        message: e,
                    },
                    None,
                ),
            },
            Request::Leases => {
                let n = self.store.lock().await;
                let leases = n
                    .store
                    .leases
                    .by_workspace
                    .iter()
                    .map(|(w, ip)| self.lease(w, *ip))
                    .collect();
                (Reply::Leases(leases), None)
            }
        }
    }

    fn lease(&self, workspace: &str, ip: Ipv4Addr) -> Lease {
        Lease {
            workspace: workspace.to_string(),
            tap: format!("bw{workspace}"),
            ip,
            prefix: self.claim.network.prefix,
            gateway: self.claim.network.gateway,
            mac: mac_string(mac_for(ip)),
        }
    }

    /// Removes the table and the bridge (the process exits once the reply is
    /// out); refused while a VM is on the bridge.
    async fn shutdown(&self) -> Result<(), String> {
        let ports = links::ports(&self.handle, self.bridge).await?;
        if !ports.is_empty() {
            return Err(format!("VMs are on the network: {}", ports.join(", ")));
        }
        rules::remove(&self.names).map_err(|e| format!("nftables: {e}"))?;
        links::delete(&self.handle, self.bridge).await?;
        let _ = std::fs::remove_file(&self.cfg.socket);
        Ok(())
    }

    fn saved_and_installed(&self, n: &mut Net) -> (Reply, Option<std::os::fd::OwnedFd>) {
        let forwards: Vec<_> = n.store.leases.forwards.values().cloned().collect();
        n.relays.retain(&forwards);
        let done = n
            .store
            .save()
            .map_err(|e| format!("save leases: {e}"))
            .and_then(|_| n.install());
        match done {
            Ok(()) => (Reply::Ok, None),
            Err(e) => (Reply::Failed(e), None),
        }
    }

    async fn forward_add(
        &self,
        workspace: &str,
        guest_port: u16,
        host_port: Option<u16>,
        bind: Ipv4Addr,
    ) -> Result<Forward, Refusal> {
        let mut n = self.store.lock().await;
        let ip =
            *n.store.leases.by_workspace.get(workspace).ok_or_else(|| {
                Refusal::Field("workspace", format!("{workspace:?} has no address"))
            })?;
        if let Some(f) = n.store.leases.forward_of(workspace, guest_port) {
            return Err(Refusal::Field(
                "guest_port",
                format!(
                    "{guest_port} is already forwarded from host port {}",
                    f.host_port
                ),
            ));
        }
        let port = match n
            .relays
            .start(bind, host_port.unwrap_or(0), (ip, guest_port).into())
            .await
        {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(Refusal::Field(
                    "host_port",
                    format!("{} is already taken", host_port.unwrap_or(0)),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                return Err(Refusal::Field(
                    "bind",
                    format!("{bind} is not an address of this host"),
                ))
            }
            Err(e) => return Err(Refusal::Failed(format!("bind: {e}"))),
        };
        let f = Forward {
            workspace: workspace.to_string(),
            guest_port,
            host_port: port,
            bind,
        };
        n.store.leases.forwards.insert(port, f.clone());
        if let Err(e) = n.store.save() {
            n.relays.stop(port);
            n.store.leases.forwards.remove(&port);
            return Err(Refusal::Failed(format!("save: {e}")));
        }
        Ok(f)
    }

    /// Applies a policy change: set elements only, unless a port is new to the
    /// table (then one rebuild). Recorded first.
    async fn set_policy(&self, workspace: &str, change: PolicyChange) -> Result<Policy, Refusal> {
        let PolicyChange {
            allow_internet,
            allow_inter_vm,
            allowed_ports,
            allow_host_ports,
            allow_cidr,
        } = change;
        let mut n = self.store.lock().await;
        let ip =
            *n.store.leases.by_workspace.get(workspace).ok_or_else(|| {
                Refusal::Field("workspace", format!("{workspace:?} has no address"))
            })?;
        let old = n
            .store
            .leases
            .policies
            .get(workspace)
            .cloned()
            .unwrap_or_default();
        let mut new = old.clone();
        if let Some(v) = allow_internet {
            new.allow_internet = v;
        }
        if let Some(v) = allow_inter_vm {
            new.allow_inter_vm = v;
        }
        if let Some(mut ports) = allowed_ports {
            ports.sort_unstable();
            ports.dedup();
            new.allowed_ports = (!ports.is_empty()).then_some(ports);
        }
        if let Some(mut ports) = allow_host_ports {
            ports.sort_unstable();
            ports.dedup();
            new.allow_host_ports = ports;
        }
        if let Some(cidrs) = allow_cidr {
            new.allow_cidr = cidrs;
        }
        n.store
            .leases
            .policies
            .insert(workspace.to_string(), new.clone());
        n.store
            .save()
            .map_err(|e| Refusal::Failed(format!("save: {e}")))?;
        let incremental = rules::update(&self.names, ip, &old, &new, &n.installed)
            .map_err(|e| Refusal::Failed(format!("nftables: {e}")))?;
        if !incremental {
            n.install().map_err(Refusal::Failed)?;
        }
        Ok(new)
    }

    async fn attach(&self, workspace: &str) -> Result<(Lease, std::os::fd::OwnedFd), String> {
        let mut n = self.store.lock().await;
        let s = &mut n.store;
        let network = self.claim.network;
        let ip = s
            .allocate(workspace, network.gateway, network.prefix)
            .ok_or_else(|| "no free address left in the subnet".to_string())?;
        // Recorded before the device exists.
        s.save().map_err(|e| format!("save leases: {e}"))?;
        let lease = self.lease(workspace, ip);
        let ports = links::ports(&self.handle, self.bridge).await?;
        if ports.contains(&lease.tap) {
            return Err(format!("{} is already running on the network", workspace));
        }
        let fd = links::open_tap(&lease.tap, mac_for(ip))?;
        // Its identity is checked before the port joins the bridge: no frame of
        // it is ever seen unchecked.
        identity::guard_port(&self.names, &port_of(workspace, ip))
            .map_err(|e| format!("nftables: guard {}: {e}", lease.tap))?;
        links::plug(&self.handle, &lease.tap, self.bridge).await?;
        Ok((lease, fd))
    }
}
