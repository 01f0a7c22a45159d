//! The `inet burrow` nftables table, written through nftnl, one atomic batch per
//! change: the kernel applies a batch whole or not at all.
//!
//! ```text
//! set internet, intervm, limited: ipv4_addr        who may go out / talk / is port-limited
//! set port_<P>: ipv4_addr                          who may go out to TCP port P
//! chain forward (hook forward):
//!     ct state established,related accept
//!     iif bridge oif bridge jump between           workspace → workspace
//!     iif bridge jump egress                       workspace → beyond the host
//!     oif bridge drop                              nothing else is routed to a workspace
//! set team_<name>: ipv4_addr                      the members of a team
//! chain between:       ip saddr @intervm ip daddr @intervm accept;
//!                      ip saddr @team_<T> ip daddr @team_<T> accept (per team); drop
//! chain egress:        ip saddr @internet jump internet_out; drop
//! chain internet_out:  ip saddr @limited jump limited; ip saddr @limited drop; accept
//! chain limited:       tcp dport P ip saddr @port_P accept   (one rule per port in use)
//! chain postrouting (nat): ip saddr @internet oif != bridge masquerade
//! ```
//!
//! A policy change is a handful of set element additions and deletions: its cost
//! does not grow with the number of workspaces. Only the first use of a port adds
//! a set and a rule, and a team change a set and a rule: the table is then rebuilt,
//! still in one batch (team changes are rare; member traffic needs no change).

use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::io;
use std::net::Ipv4Addr;

use nftnl::expr::InterfaceName;
use nftnl::set::Set;
use nftnl::{
    nft_expr, Batch, Chain, ChainType, FinalizedBatch, Hook, MsgType, Policy as ChainPolicy,
    ProtoFamily, Rule, Table,
};

use crate::protocol::Policy;

pub(crate) const TABLE: &CStr = c"burrow";

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn port_set_name(port: u16) -> CString {
    // Digits only: never contains a NUL.
    CString::new(format!("port_{port}")).unwrap_or_default()
}

/// Set ids tie a lookup to a set made in the same batch.
struct Ids(u32);

impl Ids {
    fn next(&mut self) -> u32 {
        self.0 += 1;
        self.0
    }
}

fn ports_in_use(members: &[(Ipv4Addr, Policy)]) -> BTreeSet<u16> {
    members
        .iter()
        .filter_map(|(_, p)| p.allowed_ports.as_ref())
        .flatten()
        .copied()
        .collect()
}

/// The ports whose sets exist after [`install`] with these members.
pub(crate) fn installed_ports(members: &[(Ipv4Addr, Policy)]) -> BTreeSet<u16> {
    ports_in_use(members)
}

fn limited(p: &Policy) -> bool {
    p.allowed_ports.as_ref().is_some_and(|v| !v.is_empty())
}

/// Loads the IPv4 source (or destination) address, after checking the packet is IPv4.
fn ip_field(rule: &mut Rule, dest: bool) {
    rule.add_expr(&nft_expr!(meta nfproto));
    rule.add_expr(&nft_expr!(cmp == libc::NFPROTO_IPV4 as u8));
    if dest {
        rule.add_expr(&nft_expr!(payload ipv4 daddr));
    } else {
        rule.add_expr(&nft_expr!(payload ipv4 saddr));
    }
}

fn iface(rule: &mut Rule, out: bool, name: &CString, equal: bool) {
    if out {
        rule.add_expr(&nft_expr!(meta oifname));
    } else {
        rule.add_expr(&nft_expr!(meta iifname));
    }
    if equal {
        rule.add_expr(&nft_expr!(cmp == InterfaceName::Exact(name.clone())));
    } else {
        rule.add_expr(&nft_expr!(cmp != InterfaceName::Exact(name.clone())));
    }
}

/// Replaces whatever `inet burrow` holds with the rule set for these workspaces
/// (address, policy), in one batch.
pub(crate) fn install(
    bridge: &str,
    members: &[(Ipv4Addr, Policy)],
    teams: &std::collections::BTreeMap<String, Vec<Ipv4Addr>>,
) -> io::Result<()> {
    let br = cstr(bridge)?;
    let mut batch = Batch::new();
    let table = Table::new(TABLE, ProtoFamily::Inet);
    // Add (a no-op when it exists), delete, add: an exact table whatever was there.
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch.add(&table, MsgType::Add);
    let mut ids = Ids(0);

    let set = |name: &CStr, ids: &mut Ids, pick: &dyn Fn(&Policy) -> bool| {
        let mut s: Set<Ipv4Addr> = Set::new_named(name, ids.next(), &table, ProtoFamily::Inet);
        for (ip, p) in members {
            if pick(p) {
                s.add(ip);
            }
        }
        s
    };
    let internet = set(c"internet", &mut ids, &|p| p.allow_internet);
    let intervm = set(c"intervm", &mut ids, &|p| p.allow_inter_vm);
    let limit = set(c"limited", &mut ids, &limited);
    let ports: Vec<(u16, Set<Ipv4Addr>)> = ports_in_use(members)
        .into_iter()
        .map(|port| {
            let name = port_set_name(port);
            let s = set(&name, &mut ids, &move |p: &Policy| {
                p.allowed_ports.as_ref().is_some_and(|v| v.contains(&port))
            });
            (port, s)
        })
        .collect();
    let team_sets: Vec<Set<Ipv4Addr>> = teams
        .iter()
        .map(|(name, ips)| {
            let name = CString::new(format!("team_{name}")).unwrap_or_default();
            let mut s: Set<Ipv4Addr> = Set::new_named(&name, ids.next(), &table, ProtoFamily::Inet);
            for ip in ips {
                s.add(ip);
            }
            s
        })
        .collect();
    for s in [&internet, &intervm, &limit]
        .into_iter()
        .chain(ports.iter().map(|(_, s)| s))
        .chain(team_sets.iter())
    {
        batch.add(s, MsgType::Add);
        batch.add_iter(s.elems_iter(), MsgType::Add);
    }

    let mut forward = Chain::new(c"forward", &table);
    forward.set_hook(Hook::Forward, 0);
    forward.set_policy(ChainPolicy::Accept);
    let between = Chain::new(c"between", &table);
    let egress = Chain::new(c"egress", &table);
    let internet_out = Chain::new(c"internet_out", &table);
    let limited_chain = Chain::new(c"limited", &table);
    let mut postrouting = Chain::new(c"postrouting", &table);
    postrouting.set_hook(Hook::PostRouting, 100);
    postrouting.set_type(ChainType::Nat);
    postrouting.set_policy(ChainPolicy::Accept);
    for c in [
        &forward,
        &between,
        &egress,
        &internet_out,
        &limited_chain,
        &postrouting,
    ] {
        batch.add(c, MsgType::Add);
    }

    // forward
    let mut r = Rule::new(&forward);
    r.add_expr(&nft_expr!(ct state));
    let open = (nftnl::expr::ct::States::ESTABLISHED | nftnl::expr::ct::States::RELATED).bits();
    r.add_expr(&nft_expr!(bitwise mask open, xor 0u32));
    r.add_expr(&nft_expr!(cmp != 0u32));
    r.add_expr(&nft_expr!(verdict accept));
    batch.add(&r, MsgType::Add);
    let mut r = Rule::new(&forward);
    iface(&mut r, false, &br, true);
    iface(&mut r, true, &br, true);
    r.add_expr(&nft_expr!(verdict jump c"between".to_owned()));
    batch.add(&r, MsgType::Add);
    let mut r = Rule::new(&forward);
    iface(&mut r, false, &br, true);
    r.add_expr(&nft_expr!(verdict jump c"egress".to_owned()));
    batch.add(&r, MsgType::Add);
    let mut r = Rule::new(&forward);
    iface(&mut r, true, &br, true);
    r.add_expr(&nft_expr!(counter));
    r.add_expr(&nft_expr!(verdict drop));
    batch.add(&r, MsgType::Add);

    // between: both ends allow inter-VM traffic.
    let mut r = Rule::new(&between);
    ip_field(&mut r, false);
    r.add_expr(&nft_expr!(lookup & intervm));
    r.add_expr(&nft_expr!(payload ipv4 daddr));
    r.add_expr(&nft_expr!(lookup & intervm));
    r.add_expr(&nft_expr!(verdict accept));
    batch.add(&r, MsgType::Add);
    // Members of a team reach each other.
    for team in &team_sets {
        let mut r = Rule::new(&between);
        ip_field(&mut r, false);
        r.add_expr(&nft_expr!(lookup team));
        r.add_expr(&nft_expr!(payload ipv4 daddr));
        r.add_expr(&nft_expr!(lookup team));
        r.add_expr(&nft_expr!(verdict accept));
        batch.add(&r, MsgType::Add);
    }
    let mut r = Rule::new(&between);
    r.add_expr(&nft_expr!(counter));
    r.add_expr(&nft_expr!(verdict drop));
    batch.add(&r, MsgType::Add);

    // egress
    let mut r = Rule::new(&egress);
    ip_field(&mut r, false);
    r.add_expr(&nft_expr!(lookup & internet));
    r.add_expr(&nft_expr!(verdict jump c"internet_out".to_owned()));
    batch.add(&r, MsgType::Add);
    let mut r = Rule::new(&egress);
    r.add_expr(&nft_expr!(counter));
    r.add_expr(&nft_expr!(verdict drop));
    batch.add(&r, MsgType::Add);

    // internet_out: a limited workspace goes out only where `limited` accepts.
    let mut r = Rule::new(&internet_out);
    ip_field(&mut r, false);
    r.add_expr(&nft_expr!(lookup & limit));
    r.add_expr(&nft_expr!(verdict jump c"limited".to_owned()));
    batch.add(&r, MsgType::Add);
    let mut r = Rule::new(&internet_out);
    ip_field(&mut r, false);
    r.add_expr(&nft_expr!(lookup & limit));
    r.add_expr(&nft_expr!(counter));
    r.add_expr(&nft_expr!(verdict drop));
    batch.add(&r, MsgType::Add);
    let mut r = Rule::new(&internet_out);
    r.add_expr(&nft_expr!(verdict accept));
    batch.add(&r, MsgType::Add);

    for (port, s) in &ports {
        let mut r = Rule::new(&limited_chain);
        r.add_expr(&nft_expr!(meta l4proto));
        r.add_expr(&nft_expr!(cmp == libc::IPPROTO_TCP as u8));
        r.add_expr(&nft_expr!(payload tcp dport));
        r.add_expr(&nft_expr!(cmp == port.to_be()));
        ip_field(&mut r, false);
        r.add_expr(&nft_expr!(lookup s));
        r.add_expr(&nft_expr!(verdict accept));
        batch.add(&r, MsgType::Add);
    }

    // postrouting: masquerade what goes out of the bridge's subnet.
    let mut r = Rule::new(&postrouting);
    ip_field(&mut r, false);
    r.add_expr(&nft_expr!(lookup & internet));
    iface(&mut r, true, &br, false);
    r.add_expr(&nft_expr!(masquerade));
    batch.add(&r, MsgType::Add);

    send(&batch.finalize())
}

/// Moves one workspace from policy `old` to `new` by set element changes alone.
/// Returns false (changing nothing) when `new` uses a port no set exists for:
/// the caller then rebuilds the table.
pub(crate) fn update(
    ip: Ipv4Addr,
    old: &Policy,
    new: &Policy,
    ports: &BTreeSet<u16>,
) -> io::Result<bool> {
    let wanted: BTreeSet<u16> = new.allowed_ports.iter().flatten().copied().collect();
    if !wanted.is_subset(ports) {
        return Ok(false);
    }
    let had: BTreeSet<u16> = old.allowed_ports.iter().flatten().copied().collect();
    let table = Table::new(TABLE, ProtoFamily::Inet);
    let mut batch = Batch::new();
    let mut change = |name: &CStr, before: bool, after: bool| {
        if before == after {
            return;
        }
        let mut s: Set<Ipv4Addr> = Set::new_named(name, 0, &table, ProtoFamily::Inet);
        s.add(&ip);
        let kind = if after { MsgType::Add } else { MsgType::Del };
        batch.add_iter(s.elems_iter(), kind);
    };
    change(c"internet", old.allow_internet, new.allow_internet);
    change(c"intervm", old.allow_inter_vm, new.allow_inter_vm);
    change(c"limited", limited(old), limited(new));
    for port in had.union(&wanted) {
        change(
            &port_set_name(*port),
            had.contains(port),
            wanted.contains(port),
        );
    }
    send(&batch.finalize())?;
    Ok(true)
}

/// Removes the table.
pub(crate) fn remove() -> io::Result<()> {
    let mut batch = Batch::new();
    let table = Table::new(TABLE, ProtoFamily::Inet);
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    send(&batch.finalize())
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
