//! The `inet burrow` nftables table, written through nftnl, one atomic batch per
//! change: the kernel applies a batch whole or not at all.
//!
//! Now: workspaces reach the host (their gateway) and nothing beyond it, and
//! nothing is routed to them: no internet, no other workspace.

use std::ffi::{CStr, CString};
use std::io;

use nftnl::expr::InterfaceName;
use nftnl::{nft_expr, Batch, Chain, FinalizedBatch, Hook, Policy, ProtoFamily, Rule, Table};

pub(crate) const TABLE: &CStr = c"burrow";

/// Replaces whatever `inet burrow` holds with the base rule set, in one batch.
pub(crate) fn install(bridge: &str) -> io::Result<()> {
    let bridge = CString::new(bridge).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut batch = Batch::new();
    let table = Table::new(TABLE, ProtoFamily::Inet);
    // Add (a no-op when it exists), delete, add: an exact table whatever was there.
    batch.add(&table, nftnl::MsgType::Add);
    batch.add(&table, nftnl::MsgType::Del);
    batch.add(&table, nftnl::MsgType::Add);

    let mut forward = Chain::new(c"forward", &table);
    forward.set_hook(Hook::Forward, 0);
    forward.set_policy(Policy::Accept);
    batch.add(&forward, nftnl::MsgType::Add);
    for dir in [Dir::In, Dir::Out] {
        let mut rule = Rule::new(&forward);
        match dir {
            Dir::In => rule.add_expr(&nft_expr!(meta iifname)),
            Dir::Out => rule.add_expr(&nft_expr!(meta oifname)),
        }
        rule.add_expr(&nft_expr!(cmp == InterfaceName::Exact(bridge.clone())));
        rule.add_expr(&nft_expr!(counter));
        rule.add_expr(&nft_expr!(verdict drop));
        batch.add(&rule, nftnl::MsgType::Add);
    }
    send(&batch.finalize())
}

/// Removes the table.
pub(crate) fn remove() -> io::Result<()> {
    let mut batch = Batch::new();
    let table = Table::new(TABLE, ProtoFamily::Inet);
    batch.add(&table, nftnl::MsgType::Add);
    batch.add(&table, nftnl::MsgType::Del);
    send(&batch.finalize())
}

enum Dir {
    In,
    Out,
}

fn send(batch: &FinalizedBatch) -> io::Result<()> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
    let portid = socket.portid();
    socket.send_all(batch)?;
    let mut buffer = vec![0; nftnl::nft_nlmsg_maxsize() as usize];
    let mut expected = batch.sequence_numbers();
    while !expected.is_empty() {
        for message in socket.recv(&mut buffer[..])? {
            let message = message?;
            let Some(seq) = expected.next() else {
                return Err(io::Error::other("nftables acknowledged more than was sent"));
            };
            mnl::cb_run(message, seq, portid)?;
        }
    }
    Ok(())
}
