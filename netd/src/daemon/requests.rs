//! What netd does for each request: one method per request kind, each
//! validating its fields before it changes anything.

use std::net::Ipv4Addr;

use super::{port_of, Daemon, Net, PolicyChange, Refusal};
use crate::protocol::{
    parse_cidrs, validate_team, validate_workspace, Forward, Lease, Policy, Reply, Request,
};
use crate::state::{mac_for, mac_string};
use crate::{identity, links, rules};

impl Daemon {
    pub(super) async fn handle(&self, req: Request) -> (Reply, Option<std::os::fd::OwnedFd>) {
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
                let old = n.store.leases.policy_of(&workspace);
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
                let p = n.store.leases.policy_of(&workspace);
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
        let old = n.store.leases.policy_of(workspace);
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
