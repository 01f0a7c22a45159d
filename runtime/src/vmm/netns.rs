//! A container VM's network, inside the network namespace its caller made.
//!
//! dockerd and CNI give a container a network namespace holding one interface (a
//! veth whose peer is on a bridge, with an address, a MAC and routes). A runc
//! container's processes would live in that namespace; a burrow container lives in
//! a VM. So, as Kata does: a TAP is created in that namespace, and tc's `mirred`
//! action redirects every frame arriving on the veth to the TAP and every frame
//! from the TAP to the veth. The guest's interface takes the veth's MAC, address
//! and default route, so for the bridge and everything behind it the VM *is* the
//! container. The namespace's own stack sees none of that traffic.
//!
//! The TAP is not persistent: it goes when QEMU, the last holder of its
//! descriptor, exits. [`detach`] removes the redirect from the veth (the
//! namespace usually goes with its container anyway).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The TAP's name inside the container's namespace.
pub const TAP_NAME: &str = "burrow0";

/// What the guest's interface takes over from the namespace's.
#[derive(Debug)]
pub struct NetnsLink {
    /// The TAP, created in the namespace (QEMU's `-netdev tap,fd=`).
    pub tap: OwnedFd,
    /// The namespace's interface the TAP is paired with.
    pub veth: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub mtu: u32,
}

fn nsenter(netns: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(args)
        .output()
        .map_err(|e| format!("run nsenter {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{} in {}: {}",
            args.join(" "),
            netns.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The namespace's interface, as `ip -j addr` shows it.
struct Found {
    veth: String,
    mac: String,
    ip: Ipv4Addr,
    prefix: u8,
    mtu: u32,
}

/// The namespace's interface to take over: the first one, other than loopback and
/// our own TAP, that has an IPv4 address. None when there is none (a container
/// with no network: only lo).
fn find_link(netns: &Path) -> Result<Option<Found>, String> {
    let out = nsenter(netns, &["ip", "-j", "addr", "show"])?;
    let links: Value = serde_json::from_str(&out).map_err(|e| format!("ip -j addr: {e}"))?;
    for l in links.as_array().into_iter().flatten() {
        let name = l["ifname"].as_str().unwrap_or_default();
        if l["link_type"] == "loopback" || name == TAP_NAME || name.is_empty() {
            continue;
        }
        let Some(mac) = l["address"].as_str() else {
            continue;
        };
        let v4 = l["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["family"] == "inet");
        let Some(a) = v4 else { continue };
        let ip: Ipv4Addr = a["local"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{name}: unreadable address {a}"))?;
        let prefix = a["prefixlen"]
            .as_u64()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{name}: unreadable prefix length {a}"))?
            as u8;
        let mtu = l["mtu"].as_u64().unwrap_or(1500).clamp(576, 65535) as u32;
        return Ok(Some(Found {
            veth: name.to_string(),
            mac: mac.to_string(),
            ip,
            prefix,
            mtu,
        }));
    }
    Ok(None)
}

fn default_gateway(netns: &Path) -> Result<Option<Ipv4Addr>, String> {
    let out = nsenter(netns, &["ip", "-j", "-4", "route", "show", "default"])?;
    let routes: Value = serde_json::from_str(&out).map_err(|e| format!("ip -j route: {e}"))?;
    Ok(routes
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|r| r["gateway"].as_str()?.parse().ok()))
}

/// Creates TAP `name` in the namespace at `netns`: on a thread of its own that
/// enters the namespace (a thread's namespace is its own), so the daemon's other
/// threads stay where they are.
fn open_tap_in(netns: &Path, name: &str) -> Result<OwnedFd, String> {
    let netns: PathBuf = netns.to_path_buf();
    let name = name.to_string();
    std::thread::spawn(move || -> Result<OwnedFd, String> {
        let ns = std::fs::File::open(&netns)
            .map_err(|e| format!("open network namespace {}: {e}", netns.display()))?;
        // SAFETY: setns on an fd we hold; it changes this thread only.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "enter network namespace {}: {}",
                netns.display(),
                std::io::Error::last_os_error()
            ));
        }
        burrow_netd::open_tap(&name, [0; 6]).map_err(|e| format!("{e} in {}", netns.display()))
    })
    .join()
    .map_err(|_| "the TAP thread panicked".to_string())?
}

/// Pairs a new TAP with the namespace's interface (see the module docs). None
/// when the namespace has no interface to take over.
pub fn attach(netns: &Path) -> Result<Option<NetnsLink>, String> {
    let Some(Found {
        veth,
        mac,
        ip,
        prefix,
        mtu,
    }) = find_link(netns)?
    else {
        return Ok(None);
    };
    let gateway = default_gateway(netns)?;
    let tap = open_tap_in(netns, TAP_NAME)?;
    let mtu_s = mtu.to_string();
    let redirect = |from: &str, to: &str| -> Result<(), String> {
        nsenter(netns, &["tc", "qdisc", "add", "dev", from, "ingress"])?;
        nsenter(
            netns,
            &[
                "tc", "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32",
                "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
            ],
        )
        .map(drop)
    };
    let set_up = nsenter(netns, &["ip", "link", "set", TAP_NAME, "mtu", &mtu_s, "up"])
        .and_then(|_| redirect(&veth, TAP_NAME))
        .and_then(|_| redirect(TAP_NAME, &veth));
    if let Err(e) = set_up {
        detach(netns, &veth);
        return Err(e);
    }
    Ok(Some(NetnsLink {
        tap,
        veth,
        mac,
        ip,
        prefix,
        gateway,
        mtu,
    }))
}

/// Removes the redirect from `veth` (the TAP goes with its last descriptor).
/// Best effort: the namespace may be gone already.
pub fn detach(netns: &Path, veth: &str) {
    if netns.exists() {
        let _ = nsenter(netns, &["tc", "qdisc", "del", "dev", veth, "ingress"]);
    }
}
