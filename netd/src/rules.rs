//! The nftables tables of one burrow network (named after its bridge,
//! `burrow<N>`), written through nftnl, one atomic batch per change: the kernel
//! applies a batch whole or not at all. The `netdev` table, who a workspace is,
//! lives in [`crate::identity`]; this is the `inet` one.
//!
//! `table inet burrow<N>`: what workspaces may reach.
//!
//! ```text
//! set internet, intervm, limited: ipv4_addr        who may go out / talk / is port-limited
//! set port_<P>: ipv4_addr                          who may go out to TCP port P
//! set hostport_<P>: ipv4_addr                      who may reach host TCP port P
//! set cidr_<A_B_C_D_N>: ipv4_addr                  who may reach a private range
//! set team_<name>: ipv4_addr                       the members of a team
//! chain input (hook input):     iif bridge jump guest_in
//! chain guest_in:      ct state established,related accept
//!                      ip daddr gateway udp/tcp dport 53 accept
//!                      tcp dport P ip saddr @hostport_P accept   (per port in use)
//!                      counter drop
//! chain forward (hook forward):
//!     ct state established,related accept
//!     iif bridge oif bridge jump between           workspace → workspace
//!     iif bridge jump egress                       workspace → beyond the host
//!     oif bridge drop                              nothing else is routed to a workspace
//! chain between:       ip saddr @intervm ip daddr @intervm accept;
//!                      ip saddr @team_<T> ip daddr @team_<T> accept (per team); drop
//! chain egress:        ip saddr @internet jump internet_out; drop
//! chain internet_out:  jump private
//!                      ip saddr @limited jump limited; ip saddr @limited drop; accept
//! chain private:       ip daddr C ip saddr @cidr_C return   (per range in use)
//!                      ip daddr <never-internet range> counter drop  (per range)
//! chain limited:       tcp dport P ip saddr @port_P accept   (one rule per port in use)
//! chain postrouting (nat): ip saddr @internet oif != bridge masquerade
//! ```
//!
//! A policy change is a handful of set element additions and deletions: its cost
//! does not grow with the number of workspaces. Only the first use of a port or a
//! range adds a set and a rule, and a team change a set and a rule: the table is
//! then rebuilt, still in one batch.

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

use crate::protocol::{Cidr, Policy};

/// Ranges internet egress never includes unless a workspace's `allow_cidr`
/// names them: link-local (cloud metadata), RFC 1918, shared address space
/// (carrier-grade NAT), loopback, "this network", multicast and reserved. The
/// host's own addresses never reach the forward hook: the input chain has them.
pub(crate) const NEVER_INTERNET: [Cidr; 9] = [
    Cidr::new(0, 0, 0, 0, 8),
    Cidr::new(10, 0, 0, 0, 8),
    Cidr::new(100, 64, 0, 0, 10),
    Cidr::new(127, 0, 0, 0, 8),
    Cidr::new(169, 254, 0, 0, 16),
    Cidr::new(172, 16, 0, 0, 12),
    Cidr::new(192, 168, 0, 0, 16),
    Cidr::new(224, 0, 0, 0, 4),
    Cidr::new(240, 0, 0, 0, 4),
];

/// The names and addresses of one network.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    /// Both tables' name: the bridge's.
    pub table: CString,
    pub bridge: String,
    pub gateway: Ipv4Addr,
}

impl Names {
    pub fn new(bridge: &str, gateway: Ipv4Addr) -> io::Result<Names> {
        Ok(Names {
            table: cstr(bridge)?,
            bridge: bridge.to_string(),
            gateway,
        })
    }
}

pub(crate) fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn port_set_name(port: u16) -> CString {
    // Digits only: never contains a NUL.
    CString::new(format!("port_{port}")).unwrap_or_default()
}

fn host_port_set_name(port: u16) -> CString {
    CString::new(format!("hostport_{port}")).unwrap_or_default()
}

fn cidr_set_name(c: &Cidr) -> CString {
    let o = c.net.octets();
    CString::new(format!(
        "cidr_{}_{}_{}_{}_{}",
        o[0], o[1], o[2], o[3], c.prefix
    ))
    .unwrap_or_default()
}

/// Set ids tie a lookup to a set made in the same batch.
struct Ids(u32);

impl Ids {
    fn next(&mut self) -> u32 {
        self.0 += 1;
        self.0
    }
}

/// What the table has sets (and rules) for: ports, host ports, ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Installed {
    pub ports: BTreeSet<u16>,
    pub host_ports: BTreeSet<u16>,
    pub cidrs: BTreeSet<Cidr>,
}

impl Installed {
    /// The sets the table has after [`install`] with these members.
    pub fn of(members: &[(Ipv4Addr, Policy)]) -> Installed {
        let mut i = Installed::default();
        for (_, p) in members {
            i.ports.extend(p.allowed_ports.iter().flatten().copied());
            i.host_ports.extend(p.allow_host_ports.iter().copied());
            i.cidrs.extend(p.allow_cidr.iter().copied());
        }
        i
    }

    fn covers(&self, p: &Policy) -> bool {
        p.allowed_ports
            .iter()
            .flatten()
            .all(|x| self.ports.contains(x))
            && p.allow_host_ports
                .iter()
                .all(|x| self.host_ports.contains(x))
            && p.allow_cidr.iter().all(|x| self.cidrs.contains(x))
    }
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

/// Matches an IPv4 destination inside `c`.
fn daddr_in(rule: &mut Rule, c: &Cidr) {
    ip_field(rule, true);
    rule.add_expr(&nft_expr!(bitwise mask c.mask(), xor Ipv4Addr::UNSPECIFIED));
    rule.add_expr(&nft_expr!(cmp == c.net));
}

fn tcp_dport(rule: &mut Rule, port: u16) {
    rule.add_expr(&nft_expr!(meta l4proto));
    rule.add_expr(&nft_expr!(cmp == libc::IPPROTO_TCP as u8));
    rule.add_expr(&nft_expr!(payload tcp dport));
    rule.add_expr(&nft_expr!(cmp == port.to_be()));
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

fn ct_established(rule: &mut Rule) {
    rule.add_expr(&nft_expr!(ct state));
    let open = (nftnl::expr::ct::States::ESTABLISHED | nftnl::expr::ct::States::RELATED).bits();
    rule.add_expr(&nft_expr!(bitwise mask open, xor 0u32));
    rule.add_expr(&nft_expr!(cmp != 0u32));
}

/// Replaces whatever `inet <table>` holds with the rule set for these workspaces
/// (address, policy), in one batch.
pub(crate) fn install(
    names: &Names,
    members: &[(Ipv4Addr, Policy)],
    teams: &std::collections::BTreeMap<String, Vec<Ipv4Addr>>,
) -> io::Result<()> {
    let br = cstr(&names.bridge)?;
    let mut batch = Batch::new();
    let table = Table::new(&names.table, ProtoFamily::Inet);
    // Add (a no-op when it exists), delete, add: an exact table whatever was there.
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch.add(&table, MsgType::Add);
    let mut ids = Ids(0);
    let installed = Installed::of(members);

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
    let ports: Vec<(u16, Set<Ipv4Addr>)> = installed
        .ports
        .iter()
        .map(|&port| {
            let s = set(&port_set_name(port), &mut ids, &move |p: &Policy| {
                p.allowed_ports.as_ref().is_some_and(|v| v.contains(&port))
            });
            (port, s)
        })
        .collect();
    let host_ports: Vec<(u16, Set<Ipv4Addr>)> = installed
        .host_ports
        .iter()
        .map(|&port| {
            let s = set(&host_port_set_name(port), &mut ids, &move |p: &Policy| {
                p.allow_host_ports.contains(&port)
            });
            (port, s)
        })
        .collect();
    let cidrs: Vec<(Cidr, Set<Ipv4Addr>)> = installed
        .cidrs
        .iter()
        .map(|&c| {
            let s = set(&cidr_set_name(&c), &mut ids, &move |p: &Policy| {
                p.allow_cidr.contains(&c)
            });
            (c, s)
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
        .chain(host_ports.iter().map(|(_, s)| s))
        .chain(cidrs.iter().map(|(_, s)| s))
        .chain(team_sets.iter())
    {
        batch.add(s, MsgType::Add);
        batch.add_iter(s.elems_iter(), MsgType::Add);
    }

    let mut input = Chain::new(c"input", &table);
    input.set_hook(Hook::In, 0);
    input.set_policy(ChainPolicy::Accept);
    let guest_in = Chain::new(c"guest_in", &table);
    let mut forward = Chain::new(c"forward", &table);
    forward.set_hook(Hook::Forward, 0);
    forward.set_policy(ChainPolicy::Accept);
    let between = Chain::new(c"between", &table);
    let egress = Chain::new(c"egress", &table);
    let internet_out = Chain::new(c"internet_out", &table);
    let private = Chain::new(c"private", &table);
    let limited_chain = Chain::new(c"limited", &table);
    let mut postrouting = Chain::new(c"postrouting", &table);
    postrouting.set_hook(Hook::PostRouting, 100);
    postrouting.set_type(ChainType::Nat);
    postrouting.set_policy(ChainPolicy::Accept);
    for c in [
        &input,
        &guest_in,
        &forward,
        &between,
        &egress,
        &internet_out,
        &private,
        &limited_chain,
        &postrouting,
    ] {
        batch.add(c, MsgType::Add);
    }

    // input: what a workspace may reach on the host itself.
    let mut r = Rule::new(&input);
    iface(&mut r, false, &br, true);
    r.add_expr(&nft_expr!(verdict jump c"guest_in".to_owned()));
    batch.add(&r, MsgType::Add);
    let mut r = Rule::new(&guest_in);
    ct_established(&mut r);
    r.add_expr(&nft_expr!(verdict accept));
    batch.add(&r, MsgType::Add);
    for proto in [libc::IPPROTO_UDP as u8, libc::IPPROTO_TCP as u8] {
        let mut r = Rule::new(&guest_in);
        ip_field(&mut r, true);
        r.add_expr(&nft_expr!(cmp == names.gateway));
        r.add_expr(&nft_expr!(meta l4proto));
        r.add_expr(&nft_expr!(cmp == proto));
        // UDP and TCP have their destination port at the same offset.
        r.add_expr(&nft_expr!(payload tcp dport));
        r.add_expr(&nft_expr!(cmp == 53u16.to_be()));
        r.add_expr(&nft_expr!(verdict accept));
        batch.add(&r, MsgType::Add);
    }
    for (port, s) in &host_ports {
        let mut r = Rule::new(&guest_in);
        tcp_dport(&mut r, *port);
        ip_field(&mut r, false);
        r.add_expr(&nft_expr!(lookup s));
        r.add_expr(&nft_expr!(verdict accept));
        batch.add(&r, MsgType::Add);
    }
    let mut r = Rule::new(&guest_in);
    r.add_expr(&nft_expr!(counter));
    r.add_expr(&nft_expr!(verdict drop));
    batch.add(&r, MsgType::Add);

    // forward
    let mut r = Rule::new(&forward);
    ct_established(&mut r);
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

    // internet_out: never the private ranges (unless named), then a limited
    // workspace goes out only where `limited` accepts.
    let mut r = Rule::new(&internet_out);
    r.add_expr(&nft_expr!(verdict jump c"private".to_owned()));
    batch.add(&r, MsgType::Add);
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

    // private: a named range returns to internet_out; the others end here.
    for (c, s) in &cidrs {
        let mut r = Rule::new(&private);
        daddr_in(&mut r, c);
        ip_field(&mut r, false);
        r.add_expr(&nft_expr!(lookup s));
        r.add_expr(&nft_expr!(verdict return));
        batch.add(&r, MsgType::Add);
    }
    for c in &NEVER_INTERNET {
        let mut r = Rule::new(&private);
        daddr_in(&mut r, c);
        r.add_expr(&nft_expr!(counter));
        r.add_expr(&nft_expr!(verdict drop));
        batch.add(&r, MsgType::Add);
    }

    for (port, s) in &ports {
        let mut r = Rule::new(&limited_chain);
        tcp_dport(&mut r, *port);
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
    names: &Names,
    ip: Ipv4Addr,
    old: &Policy,
    new: &Policy,
    installed: &Installed,
) -> io::Result<bool> {
    if !installed.covers(new) {
        return Ok(false);
    }
    let wanted: BTreeSet<u16> = new.allowed_ports.iter().flatten().copied().collect();
    let had: BTreeSet<u16> = old.allowed_ports.iter().flatten().copied().collect();
    let table = Table::new(&names.table, ProtoFamily::Inet);
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
    let had: BTreeSet<u16> = old.allow_host_ports.iter().copied().collect();
    let wanted: BTreeSet<u16> = new.allow_host_ports.iter().copied().collect();
    for port in had.union(&wanted) {
        change(
            &host_port_set_name(*port),
            had.contains(port),
            wanted.contains(port),
        );
    }
    let had: BTreeSet<Cidr> = old.allow_cidr.iter().copied().collect();
    let wanted: BTreeSet<Cidr> = new.allow_cidr.iter().copied().collect();
    for c in had.union(&wanted) {
        change(&cidr_set_name(c), had.contains(c), wanted.contains(c));
    }
    send(&batch.finalize())?;
    Ok(true)
}

/// Removes both tables.
pub(crate) fn remove(names: &Names) -> io::Result<()> {
    let mut batch = Batch::new();
    for family in [ProtoFamily::Inet, ProtoFamily::NetDev] {
        let table = Table::new(&names.table, family);
        batch.add(&table, MsgType::Add);
        batch.add(&table, MsgType::Del);
    }
    send(&batch.finalize())
}

pub(crate) fn send(batch: &FinalizedBatch) -> io::Result<()> {
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
