//! Network policy of workspaces, through burrow-netd.

use serde::{Deserialize, Serialize};

use super::Engine;
use crate::error::{Error, Result};
use burrow_netd::protocol::{Forward, Policy};

/// A change of network policy: fields left out keep their value.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PolicyChange {
    #[serde(default)]
    pub allow_internet: Option<bool>,
    #[serde(default)]
    pub allow_inter_vm: Option<bool>,
    /// [] lifts the limit.
    #[serde(default)]
    pub allowed_ports: Option<Vec<u16>>,
}

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
        if let Some(p) = change.allowed_ports.iter().flatten().find(|p| **p == 0) {
            return Err(Error::invalid(
                "allowed_ports",
                format!("{p} is not a TCP port (1-65535)"),
            ));
        }
        let rec = self.db.resolve(reference)?;
        let net = self.network()?;
        blocking_net(move || {
            net.set_policy(
                &rec.id,
                change.allow_internet,
                change.allow_inter_vm,
                change.allowed_ports,
            )
        })
        .await
    }

    /// Forwards a host port (given, or chosen ≥ 1024) to `guest_port` of a workspace.
    pub async fn port_forward_add(
        &self,
        reference: &str,
        guest_port: u16,
        host_port: Option<u16>,
    ) -> Result<Forward> {
        let rec = self.db.resolve(reference)?;
        let net = self.network()?;
        blocking_net(move || net.forward_add(&rec.id, guest_port, host_port)).await
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

    pub(super) fn network(&self) -> Result<crate::net::Network> {
        self.net.clone().ok_or_else(|| {
            Error::invalid(
                "network",
                "this host gives workspaces no network (burrowd needs root)",
            )
        })
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
