//! The workspaces' resolver: a DNS forwarder on the gateway address (UDP port 53).
//!
//! Guests always use the gateway as their name server, so a policy change never
//! has to touch the guest: a workspace allowed out gets answers from the upstream
//! resolver, any other gets REFUSED.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;

/// Largest DNS message over UDP we relay (EDNS0 sizes included).
const MAX_MESSAGE: usize = 4096;

/// Serves on `gateway:53`, forwarding to `upstream:53` what `allowed` permits.
pub(crate) async fn serve(
    gateway: Ipv4Addr,
    upstream: Ipv4Addr,
    allowed: impl Fn(Ipv4Addr) -> tokio::task::JoinHandle<bool> + Send + Sync + 'static,
) -> std::io::Result<()> {
    let sock = Arc::new(UdpSocket::bind((gateway, 53)).await?);
    let allowed = Arc::new(allowed);
    tokio::spawn(async move {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                continue;
            };
            if n < 12 {
                continue; // not even a header
            }
            let query = buf[..n].to_vec();
            let sock = sock.clone();
            let allowed = allowed.clone();
            tokio::spawn(async move {
                let SocketAddr::V4(src) = from else { return };
                let permitted = allowed(*src.ip()).await.unwrap_or(false);
                let answer = if permitted {
                    forward(&query, upstream)
                        .await
                        .unwrap_or_else(|| refused(&query, 2))
                } else {
                    refused(&query, 5)
                };
                let _ = sock.send_to(&answer, from).await;
            });
        }
    });
    Ok(())
}

async fn forward(query: &[u8], upstream: Ipv4Addr) -> Option<Vec<u8>> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await.ok()?;
    s.connect((upstream, 53)).await.ok()?;
    s.send(query).await.ok()?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let n = tokio::time::timeout(Duration::from_secs(3), s.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    // The answer must be to this query.
    (n >= 12 && buf[..2] == query[..2]).then(|| buf[..n].to_vec())
}

/// The query turned into an answer with response code `rcode` (2 SERVFAIL,
/// 5 REFUSED) and no records.
fn refused(query: &[u8], rcode: u8) -> Vec<u8> {
    let mut a = query.to_vec();
    a[2] = 0x80 | (query[2] & 0x79); // QR, keep opcode and RD
    a[3] = 0x80 | rcode; // RA
    for b in &mut a[6..12] {
        *b = 0; // no answer, authority or additional records
    }
    a
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_refusal_keeps_the_id_and_question() {
        let q = [
            0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1, 3, b'a', b'b', b'c', 0, 0, 1, 0, 1,
        ];
        let a = super::refused(&q, 5);
        assert_eq!(&a[..2], &[0x12, 0x34]);
        assert_eq!(a[2] & 0x80, 0x80);
        assert_eq!(a[3] & 0x0f, 5);
        assert_eq!(&a[4..6], &[0, 1]);
        assert_eq!(&a[10..12], &[0, 0], "additional records dropped");
        assert_eq!(&a[12..], &q[12..]);
    }
}
