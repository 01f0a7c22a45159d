//! Who a workspace is: `table netdev burrow<N>`, one chain per workspace port
//! checking every frame on the TAP's ingress, before the bridge, the host's IP
//! stack or any other rule sees it.
//!
//! ```text
//! chain port_<tap> (hook ingress device <tap>):
//!     ether type ip ether saddr MAC ip saddr IP accept (the common case first)
//!     ether saddr != MAC counter drop                  "spoofed mac"
//!     arp (Ethernet/IPv4) sender MAC, IP its own accept
//!     ether type arp counter drop                      "spoofed arp"
//!     ether type ip counter drop                       "spoofed ip"
//!     counter drop                                     "not ipv4"  (IPv6 included)
//! ```
//!
//! One chain per running workspace, added when its TAP is made: attaching a
//! workspace is one chain, never a rebuild.

use std::ffi::{CStr, CString};
use std::io;
use std::net::Ipv4Addr;

use nftnl::expr::{LLHeaderField, NetworkHeaderField, Payload};
use nftnl::{
    nft_expr, Batch, Chain, ChainType, Hook, MsgType, Policy as ChainPolicy, ProtoFamily, Rule,
    Table,
};

use crate::rules::{cstr, send, Names};

/// A workspace port: its TAP device, and the only MAC and IPv4 address it may
/// send from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Port {
    pub tap: String,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
}

fn port_chain_name(tap: &str) -> io::Result<CString> {
    cstr(&format!("port_{tap}"))
}

fn comment(rule: &mut Rule, text: &CStr) {
    // Short constant comments always fit the rule's user data.
    let _ = rule.set_comment(text);
}

/// Adds the chain that checks `port`'s frames to `batch` (the netdev table must
/// exist in it).
fn add_port_chain(batch: &mut Batch, table: &Table, port: &Port) -> io::Result<()> {
    let name = port_chain_name(&port.tap)?;
    let mut chain = Chain::new(&name, table);
    // The netdev family numbers its ingress hook 0 (NF_NETDEV_INGRESS), which
    // nftnl spells PreRouting; its `Ingress` is the inet family's (5).
    chain.set_hook(Hook::PreRouting, -500);
    chain.set_device(cstr(&port.tap)?);
    chain.set_type(ChainType::Filter);
    chain.set_policy(ChainPolicy::Accept);
    batch.add(&chain, MsgType::Add);
    let mac: &[u8] = &port.mac;
    let ether_type = |r: &mut Rule, t: u16| {
        r.add_expr(&Payload::LinkLayer(LLHeaderField::EtherType));
        r.add_expr(&nft_expr!(cmp == t.to_be()));
    };
    // nftnl's "raw" payload offsets and lengths are in bytes.
    let arp_field = |offset: u32, len: u32| {
        Payload::Network(NetworkHeaderField::Raw {
            offset_bits: offset,
            length_bits: len,
        })
    };

    // The common case first, in one rule: IPv4 from its own MAC and address.
    let mut r = Rule::new(&chain);
    ether_type(&mut r, libc::ETH_P_IP as u16);
    r.add_expr(&Payload::LinkLayer(LLHeaderField::Saddr));
    r.add_expr(&nft_expr!(cmp == mac));
    r.add_expr(&nft_expr!(payload ipv4 saddr));
    r.add_expr(&nft_expr!(cmp == port.ip));
    r.add_expr(&nft_expr!(verdict accept));
    batch.add(&r, MsgType::Add);

    let mut r = Rule::new(&chain);
    r.add_expr(&Payload::LinkLayer(LLHeaderField::Saddr));
    r.add_expr(&nft_expr!(cmp != mac));
    r.add_expr(&nft_expr!(counter));
    r.add_expr(&nft_expr!(verdict drop));
    comment(&mut r, c"spoofed mac");
    batch.add(&r, MsgType::Add);

    // ARP for Ethernet and IPv4 (hardware type 1, protocol 0x0800, lengths 6
    // and 4) whose sender is this port's MAC and address: nothing else.
    let mut r = Rule::new(&chain);
    ether_type(&mut r, libc::ETH_P_ARP as u16);
    r.add_expr(&arp_field(0, 6));
    r.add_expr(&nft_expr!(cmp == &[0u8, 1, 8, 0, 6, 4][..]));
    r.add_expr(&arp_field(8, 6));
    r.add_expr(&nft_expr!(cmp == mac));
    r.add_expr(&arp_field(14, 4));
    r.add_expr(&nft_expr!(cmp == port.ip));
    r.add_expr(&nft_expr!(verdict accept));
    batch.add(&r, MsgType::Add);
    let mut r = Rule::new(&chain);
    ether_type(&mut r, libc::ETH_P_ARP as u16);
    r.add_expr(&nft_expr!(counter));
    r.add_expr(&nft_expr!(verdict drop));
    comment(&mut r, c"spoofed arp");
    batch.add(&r, MsgType::Add);

    // IPv4 that the first rule did not accept comes from another address.
    let mut r = Rule::new(&chain);
    ether_type(&mut r, libc::ETH_P_IP as u16);
    r.add_expr(&nft_expr!(counter));
    r.add_expr(&nft_expr!(verdict drop));
    comment(&mut r, c"spoofed ip");
    batch.add(&r, MsgType::Add);

    // IPv6 and every other protocol: workspaces speak IPv4 only.
    let mut r = Rule::new(&chain);
    r.add_expr(&nft_expr!(counter));
    r.add_expr(&nft_expr!(verdict drop));
    comment(&mut r, c"not ipv4");
    batch.add(&r, MsgType::Add);
    Ok(())
}

/// Replaces `netdev <table>` with the checks of these ports, in one batch.
pub(crate) fn install_ports(names: &Names, ports: &[Port]) -> io::Result<()> {
    let mut batch = Batch::new();
    let table = Table::new(&names.table, ProtoFamily::NetDev);
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch.add(&table, MsgType::Add);
    for p in ports {
        add_port_chain(&mut batch, &table, p)?;
    }
    send(&batch.finalize())
}

/// Adds (or replaces) the checks of one port: one chain, whatever the number
/// of workspaces.
pub(crate) fn guard_port(names: &Names, port: &Port) -> io::Result<()> {
    let mut batch = Batch::new();
    let table = Table::new(&names.table, ProtoFamily::NetDev);
    batch.add(&table, MsgType::Add);
    // A chain left by an earlier run of this workspace (kernels keep a netdev
    // chain whose device went): add (a no-op if there), delete, then the new one.
    let name = port_chain_name(&port.tap)?;
    let old = Chain::new(&name, &table);
    batch.add(&old, MsgType::Add);
    batch.add(&old, MsgType::Del);
    add_port_chain(&mut batch, &table, port)?;
    send(&batch.finalize())
}

/// Removes the checks of one port, if it has any.
pub(crate) fn unguard_port(names: &Names, tap: &str) -> io::Result<()> {
    let mut batch = Batch::new();
    let table = Table::new(&names.table, ProtoFamily::NetDev);
    batch.add(&table, MsgType::Add);
    let old = Chain::new(port_chain_name(tap)?, &table);
    batch.add(&old, MsgType::Add);
    batch.add(&old, MsgType::Del);
    send(&batch.finalize())
}
