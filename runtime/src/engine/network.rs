//! Network policy of workspaces, through burrow-netd.

use super::Engine;
use crate::error::{Error, Result};
use burrow_netd::protocol::{parse_cidrs, Forward, Policy};

/// A change of network policy: fields left out keep their value; `[]` lifts the
/// port limit and clears `allow_host_ports` and `allow_cidr`.
pub use burrow_netd::protocol::PolicyChange;

impl Engine {
    /// What a workspace may reach on the network.
    pub async fn network_policy(&self, reference: &str) -> Result<Policy> {
        let rec = self.db.resolve(reference)?;
        let net = self.network()?;
        blocking_net(move || net.policy(&rec.id)).await
    }

    /// Changes what a workspace may reach; in effect when this returns, whether
    /// the workspace runs or not.
    pub async fn set_network_policy(
        &self,
        reference: &str,
        change: PolicyChange,
    ) -> Result<Policy> {
        for (field, ports) in [
            ("allowed_ports", &change.allowed_ports),
            ("allow_host_ports", &change.allow_host_ports),
        ] {
            if let Some(p) = ports.iter().flatten().find(|p| **p == 0) {
                return Err(Error::invalid(
                    field,
                    format!("{p} is not a TCP port (1-65535)"),
                ));
            }
        }
        if let Some(list) = &change.allow_cidr {
            parse_cidrs(list).map_err(|m| Error::invalid("allow_cidr", m))?;
        }
        let rec = self.db.resolve(reference)?;
        let net = self.network()?;
        blocking_net(move || net.set_policy(&rec.id, change)).await
    }

    /// Forwards a host port (given, or chosen ≥ 1024) on `bind` (127.0.0.1 if
    /// none) to `guest_port` of a workspace.
    pub async fn port_forward_add(
        &self,
        reference: &str,
        guest_port: u16,
        host_port: Option<u16>,
        bind: Option<std::net::Ipv4Addr>,
    ) -> Result<Forward> {
        let rec = self.db.resolve(reference)?;
        let net = self.network()?;
        blocking_net(move || net.forward_add(&rec.id, guest_port, host_port, bind)).await
    }

    pub async fn port_forward_rm(&self, reference: &str, guest_port: u16) -> Result<()> {
        let rec = self.db.resolve(reference)?;
        let net = self.network()?;
        blocking_net(move || net.forward_rm(&rec.id, guest_port)).await
    }

    pub async fn port_forward_ls(&self, reference: &str) -> Result<Vec<Forward>> {
        let rec = self.db.resolve(reference)?;
        let net = self.network()?;
        blocking_net(move || net.forward_ls(&rec.id)).await
    }

    /// netd, or why this daemon has no network (then no workspace boots).
    pub(super) fn network(&self) -> Result<crate::net::Network> {
        self.net
            .clone()
            .map_err(|why| Error::invalid("network", format!("no network for workspaces: {why}")))
    }
}

async fn blocking_net<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, burrow_netd::NetError> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(burrow_netd::NetError::Refused { field, message })) => {
            let field = match field.as_str() {
                "workspace" => "workspace",
                "allowed_ports" => "allowed_ports",
                "allow_host_ports" => "allow_host_ports",
                "allow_cidr" => "allow_cidr",
                "bind" => "bind",
                "host_port" => "host-port",
                "guest_port" => "guest-port",
                _ => "network",
            };
            Err(Error::invalid(field, message))
        }
        Ok(Err(e)) => Err(Error::Vmm(e.to_string())),
        Err(e) => Err(Error::Vmm(format!("network task: {e}"))),
    }
}
