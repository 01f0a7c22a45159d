//! Which network a state dir's netd runs: an index N, claimed among the netds of
//! one network namespace, that names its bridge and tables (`burrow<N>`) and, by
//! default, its subnet (10.(213+N).0.0/16).
//!
//! Claims live in `/run/burrow/netns-<dev>-<inode>/index-<N>`: a file that its
//! netd holds `flock`ed while it runs and that names the state dir and subnet
//! it belongs to. The state dir keeps its claim in `network.json`, so it gets
//! the same index and subnet again after a restart, and another state dir does
//! not take an index whose owner still records it, even while that owner's netd
//! is stopped. A subnet is checked against the other claims and the routes of
//! the namespace before it is used. The claims of namespaces that are gone (no
//! claim held or still recorded by a state dir) are removed at the next claim.

use std::io::{Read, Seek, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::protocol::Cidr;

/// Indexes 0..COUNT give the default subnets 10.213/16 … 10.255/16.
pub const COUNT: u8 = 43;
const CLAIMS: &str = "/run/burrow";

/// What a state dir's network is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetworkId {
    pub index: u8,
    /// The gateway address; the subnet is gateway/prefix.
    pub gateway: Ipv4Addr,
    pub prefix: u8,
}

impl NetworkId {
    pub fn bridge(&self) -> String {
        format!("burrow{}", self.index)
    }

    pub fn subnet(&self) -> Cidr {
        let mask = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        };
        Cidr {
            net: Ipv4Addr::from(u32::from(self.gateway) & mask),
            prefix: self.prefix,
        }
    }

    /// The default network of index `i`: 10.(213+i).0.1/16.
    pub fn default_for(index: u8) -> NetworkId {
        NetworkId {
            index,
            gateway: Ipv4Addr::new(10, 213u8.saturating_add(index), 0, 1),
            prefix: 16,
        }
    }
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Owner {
    /// netd's state dir (`$STATE/net`).
    state: PathBuf,
    network: NetworkId,
}

/// A claimed network; the claim holds while this lives (and the process).
pub struct Claim {
    pub network: NetworkId,
    _lock: std::fs::File,
}

/// The directory of this network namespace's claims.
fn claims_dir() -> Result<PathBuf, String> {
    let ns = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|e| format!("network namespace: {e}"))?;
    let dir = Path::new(CLAIMS).join(format!("netns-{}-{}", ns.dev(), ns.ino()));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Opens (creating, 0600, never truncating) a lock or claim file.
fn open_private(path: &Path) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))
}

/// Held while claims are made or pruned, so that a prune never removes a claim
/// file another netd is taking.
fn host_lock() -> Result<std::fs::File, String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(CLAIMS)
        .map_err(|e| format!("create {CLAIMS}: {e}"))?;
    let path = Path::new(CLAIMS).join("claims.lock");
    let f = open_private(&path)?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "lock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(f)
}

/// Removes the claim directories (other than `keep`) of namespaces nobody uses
/// any more: no claim in them is held by a running netd or recorded by a state
/// dir that still exists (a namespace that was deleted leaves these behind).
fn prune(keep: &Path) {
    for d in std::fs::read_dir(CLAIMS).into_iter().flatten().flatten() {
        let path = d.path();
        if path == keep || !path.is_dir() {
            continue;
        }
        let files: Vec<PathBuf> = std::fs::read_dir(&path)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        let mut locks = Vec::new();
        let unused = files.iter().all(|f| {
            let Ok(mut file) = std::fs::File::open(f) else {
                return false;
            };
            let free = try_lock(&file) && !read_owner(&mut file).is_some_and(|o| still_owned(&o));
            locks.push(file);
            free
        });
        if unused {
            for f in &files {
                let _ = std::fs::remove_file(f);
            }
            let _ = std::fs::remove_dir(&path);
        }
    }
}

fn persisted(state: &Path) -> Option<NetworkId> {
    let b = std::fs::read(state.join("network.json")).ok()?;
    serde_json::from_slice(&b).ok()
}

fn persist(state: &Path, network: &NetworkId) -> Result<(), String> {
    let path = state.join("network.json");
    let tmp = state.join("network.json.partial");
    let body = serde_json::to_vec_pretty(network).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, body)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("write {}: {e}", path.display()))
}

fn try_lock(f: &std::fs::File) -> bool {
    // SAFETY: flock on an fd we own.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

fn read_owner(f: &mut std::fs::File) -> Option<Owner> {
    let mut s = String::new();
    f.rewind().ok()?;
    f.read_to_string(&mut s).ok()?;
    serde_json::from_str(&s).ok()
}

/// Whether an owner still has this claim: its state dir records that network.
fn still_owned(owner: &Owner) -> bool {
    persisted(&owner.state).is_some_and(|n| n.index == owner.network.index)
}

/// The networks other state dirs hold in this namespace (running or not).
fn others(dir: &Path, me: &Path) -> Vec<NetworkId> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(mut f) = std::fs::File::open(e.path()) else {
            continue;
        };
        if let Some(o) = read_owner(&mut f) {
            if o.state != me && still_owned(&o) {
                out.push(o.network);
            }
        }
    }
    out
}

/// Claims this state dir's network: `wanted` (a configured subnet, kept under
/// any index) or the one it had, else the first free default one whose subnet
/// overlaps neither another state dir's nor a route in `routes` (the
/// namespace's routes as (destination, output interface name)).
pub fn claim(
    state: &Path,
    wanted: Option<(Ipv4Addr, u8)>,
    routes: &[(Cidr, String)],
) -> Result<Claim, String> {
    // One claim or prune at a time on this host; this namespace's directory is
    // made under the lock too, or another netd's prune could take it away as
    // unused between its making and our claim in it.
    let _serial = host_lock()?;
    let dir = claims_dir()?;
    prune(&dir);
    let state = std::fs::canonicalize(state).unwrap_or_else(|_| state.to_path_buf());
    let had = persisted(&state);
    let others = others(&dir, &state);
    let mut order: Vec<u8> = had.iter().map(|n| n.index).collect();
    order.extend((0..COUNT).filter(|i| Some(*i) != had.map(|n| n.index)));
    let mut why = Vec::new();
    for index in order {
        let network = match (wanted, had) {
            (Some((gateway, prefix)), _) => NetworkId {
                index,
                gateway,
                prefix,
            },
            (None, Some(h)) if h.index == index => h,
            (None, _) => NetworkId::default_for(index),
        };
        let path = dir.join(format!("index-{index}"));
        let mut f = open_private(&path)?;
        if !try_lock(&f) {
            continue; // a running netd holds it
        }
        if let Some(o) = read_owner(&mut f) {
            if o.state != state && still_owned(&o) {
                continue; // another state dir's, stopped for now
            }
        }
        let subnet = network.subnet();
        let bridge = network.bridge();
        let clash = others
            .iter()
            .find(|o| o.subnet().overlaps(&subnet))
            .map(|o| format!("{subnet} overlaps {} of another state dir", o.subnet()))
            .or_else(|| {
                routes
                    .iter()
                    .find(|(dst, dev)| dst.prefix > 0 && *dev != bridge && dst.overlaps(&subnet))
                    .map(|(dst, dev)| format!("{subnet} overlaps the route to {dst} on {dev}"))
            });
        if let Some(c) = clash {
            if wanted.is_some() {
                return Err(format!("subnet {c}"));
            }
            why.push(c);
            continue;
        }
        let owner = Owner {
            state: state.clone(),
            network,
        };
        let body = serde_json::to_vec(&owner).map_err(|e| e.to_string())?;
        f.set_len(0)
            .and_then(|_| f.rewind())
            .and_then(|_| f.write_all(&body))
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        persist(&state, &network)?;
        return Ok(Claim { network, _lock: f });
    }
    Err(match why.last() {
        Some(w) => format!(
            "no free subnet for this state dir's network (last tried: {w}); set BURROW_SUBNET"
        ),
        None => {
            format!("all {COUNT} networks of this network namespace are taken by other state dirs")
        }
    })
}

/// Whether `ip` is a workspace's address in any state dir's network of this
/// namespace (in a subnet, and not its gateway, which is the host).
pub fn is_workspace_address(ip: Ipv4Addr) -> bool {
    all_networks()
        .iter()
        .any(|n| n.subnet().contains(ip) && ip != n.gateway)
}

fn all_networks() -> Vec<NetworkId> {
    let Ok(dir) = claims_dir() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if let Ok(mut f) = std::fs::File::open(e.path()) {
            if let Some(o) = read_owner(&mut f) {
                out.push(o.network);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_networks_do_not_overlap() {
        let a = NetworkId::default_for(0);
        assert_eq!(a.gateway, Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(a.bridge(), "burrow0");
        assert_eq!(a.subnet(), Cidr::new(10, 213, 0, 0, 16));
        for i in 1..COUNT {
            assert!(!NetworkId::default_for(i)
                .subnet()
                .overlaps(&NetworkId::default_for(i - 1).subnet()));
        }
        assert_eq!(
            NetworkId::default_for(COUNT - 1).gateway,
            Ipv4Addr::new(10, 255, 0, 1)
        );
    }
}
