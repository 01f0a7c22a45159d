//! Port forwards: a host port whose connections netd relays to a workspace's port.
//!
//! A userspace relay rather than DNAT: it serves connections made from the host
//! itself (to 127.0.0.1) as well as from outside, with no `route_localnet` or
//! hairpin NAT, and the forward chain never has to let new connections into the
//! bridge. The price is a copy through netd, which suits what forwards are for
//! (development servers, previews), not bulk transfer.
//!
//! A forward listens on 127.0.0.1 unless told otherwise, and is never a path
//! between workspaces: a connection from an address in any workspace subnet of
//! this namespace is closed unanswered, whatever address the forward listens on
//! and whatever host ports the workspace may reach.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::protocol::Forward;

#[derive(Default)]
pub(crate) struct Relays {
    /// Host port → the task accepting on it.
    running: HashMap<u16, JoinHandle<()>>,
}

impl Relays {
    /// Binds `bind:host_port` (0: the kernel picks one ≥ 1024) and relays
    /// connections to `guest`. Returns the port bound.
    pub async fn start(
        &mut self,
        bind: Ipv4Addr,
        host_port: u16,
        guest: SocketAddr,
    ) -> std::io::Result<u16> {
        let listener = TcpListener::bind((bind, host_port)).await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, peer)) = listener.accept().await else {
                    continue;
                };
                if from_a_workspace(peer) {
                    tracing::warn!(%peer, port, "forward: refused a connection from a workspace");
                    continue; // dropped: closed unanswered
                }
                tokio::spawn(async move {
                    match TcpStream::connect(guest).await {
                        Ok(mut outbound) => {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                        Err(e) => tracing::debug!(%guest, "forward: {e}"),
                    }
                });
            }
        });
        self.running.insert(port, task);
        Ok(port)
    }

    pub fn stop(&mut self, host_port: u16) {
        if let Some(t) = self.running.remove(&host_port) {
            t.abort();
        }
    }

    /// Stops every relay not in `keep`.
    pub fn retain(&mut self, keep: &[Forward]) {
        let gone: Vec<u16> = self
            .running
            .keys()
            .filter(|p| !keep.iter().any(|f| f.host_port == **p))
            .copied()
            .collect();
        for p in gone {
            self.stop(p);
        }
    }
}

/// Whether `peer` is a workspace of this namespace (this netd's or another state
/// dir's); a gateway address is the host's own.
fn from_a_workspace(peer: SocketAddr) -> bool {
    let ip = match peer.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(ip) => ip,
            None => return false,
        },
    };
    crate::claim::is_workspace_address(ip)
}
