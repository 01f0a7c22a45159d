//! Requests and replies on netd's socket: one JSON line each way. The reply to an
//! `attach` carries the workspace's TAP device as an SCM_RIGHTS file descriptor.

use std::net::Ipv4Addr;

/// Requests are at most this long; longer lines are refused.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Ping,
    /// A TAP device on the bridge for `workspace`'s VM, and its address (the one
    /// it had, if it had one).
    Attach {
        workspace: String,
    },
    /// `workspace` is gone: its address and rules go too.
    Release {
        workspace: String,
    },
    /// These are all the workspaces and teams there are: forget every other.
    Sync {
        workspaces: Vec<String>,
        #[serde(default)]
        teams: std::collections::BTreeMap<String, Vec<String>>,
    },
    /// Team `name` is these workspaces: they reach each other, whatever their
    /// own inter-VM policy.
    SetTeam {
        name: String,
        members: Vec<String>,
    },
    RemoveTeam {
        name: String,
    },
    /// The addresses held.
    Leases,
    /// Changes what `workspace` may reach; fields left out keep their value.
    /// `allowed_ports: []` lifts the port limit. Takes effect at once.
    /// `allow_host_ports: []` and `allow_cidr: []` clear those lists.
    SetPolicy {
        workspace: String,
        allow_internet: Option<bool>,
        allow_inter_vm: Option<bool>,
        allowed_ports: Option<Vec<u16>>,
        #[serde(default)]
        allow_host_ports: Option<Vec<u16>>,
        #[serde(default)]
        allow_cidr: Option<Vec<String>>,
    },
    GetPolicy {
        workspace: String,
    },
    /// Forward a host port (given, or chosen ≥ 1024) on `bind` (default
    /// 127.0.0.1) to `guest_port` of the workspace.
    ForwardAdd {
        workspace: String,
        guest_port: u16,
        host_port: Option<u16>,
        #[serde(default)]
        bind: Option<Ipv4Addr>,
    },
    ForwardRm {
        workspace: String,
        guest_port: u16,
    },
    ForwardLs {
        workspace: String,
    },
    /// Remove the bridge and the table and exit, if no VM is on the network
    /// (addresses stay recorded for the next start).
    Shutdown,
}

/// What a workspace's VM needs to be on the network.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lease {
    pub workspace: String,
    pub tap: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub mac: String,
}

/// What a workspace may reach. By default: its gateway (the host) only.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Policy {
    /// Egress beyond the host, masqueraded.
    #[serde(default)]
    pub allow_internet: bool,
    /// Reach (and be reached by) other workspaces that allow it too.
    #[serde(default)]
    pub allow_inter_vm: bool,
    /// When set, egress beyond the host only to these TCP ports.
    #[serde(default)]
    pub allowed_ports: Option<Vec<u16>>,
    /// Host TCP ports (on any host address) this workspace may connect to,
    /// besides the DNS forwarder on its gateway.
    #[serde(default)]
    pub allow_host_ports: Vec<u16>,
    /// Ranges that internet egress otherwise never includes (private, shared,
    /// link-local, loopback) which this workspace may reach when allowed out.
    #[serde(default)]
    pub allow_cidr: Vec<Cidr>,
}

/// A change of a workspace's policy: fields left out keep their value; empty
/// lists clear `allowed_ports` (no limit), `allow_host_ports` and `allow_cidr`.
/// CIDRs travel as text and are checked by netd (field `allow_cidr`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyChange {
    #[serde(default)]
    pub allow_internet: Option<bool>,
    #[serde(default)]
    pub allow_inter_vm: Option<bool>,
    #[serde(default)]
    pub allowed_ports: Option<Vec<u16>>,
    #[serde(default)]
    pub allow_host_ports: Option<Vec<u16>>,
    #[serde(default)]
    pub allow_cidr: Option<Vec<String>>,
}

/// An IPv4 network, `A.B.C.D/N` with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub net: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub const fn new(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Cidr {
        Cidr {
            net: Ipv4Addr::new(a, b, c, d),
            prefix,
        }
    }

    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(prefix_mask(self.prefix))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & prefix_mask(self.prefix) == u32::from(self.net)
    }

    /// Whether the two networks share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let p = self.prefix.min(other.prefix);
        let m = prefix_mask(p);
        u32::from(self.net) & m == u32::from(other.net) & m
    }
}

fn prefix_mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (ip, prefix) = s.split_once('/').unwrap_or((s, "32"));
        let net: Ipv4Addr = ip.parse().map_err(|_| {
            format!("{s:?} is not an IPv4 network (A.B.C.D/N; guests have no IPv6)")
        })?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{s:?}: the prefix length must be 0-32"))?;
        let c = Cidr { net, prefix };
        if u32::from(net) & !prefix_mask(prefix) != 0 {
            let fixed = Ipv4Addr::from(u32::from(net) & prefix_mask(prefix));
            return Err(format!(
                "{s:?} has host bits set (the network is {fixed}/{prefix})"
            ));
        }
        Ok(c)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses a list of CIDRs (the `allow_cidr` field): sorted, without duplicates.
pub fn parse_cidrs(list: &[String]) -> Result<Vec<Cidr>, String> {
    let mut out = list
        .iter()
        .map(|s| s.parse::<Cidr>())
        .collect::<Result<Vec<_>, _>>()?;
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Where a forward listens when no address is given: the host itself only.
pub fn default_bind() -> Ipv4Addr {
    Ipv4Addr::LOCALHOST
}

/// A host port forwarded to a workspace's port.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Forward {
    pub workspace: String,
    pub guest_port: u16,
    pub host_port: u16,
    /// The host address it listens on (forwards recorded before there was a
    /// choice come back on 127.0.0.1, never on every address).
    #[serde(default = "default_bind")]
    pub bind: Ipv4Addr,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok,
    Forward(Forward),
    Forwards(Vec<Forward>),
    Attached(Lease),
    Policy(Policy),
    Leases(Vec<Lease>),
    /// A request refused: `field` names what was wrong with it, when something was.
    Refused {
        field: Option<String>,
        message: String,
    },
    Failed(String),
}

/// Workspace ids name TAP devices (`bw` + id): they must fit IFNAMSIZ and be safe.
pub fn validate_workspace(id: &str) -> Result<(), String> {
    if !id.is_empty()
        && id.len() <= 13
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err(format!(
            "invalid workspace id {id:?}: use [A-Za-z0-9_-]{{1,13}}"
        ))
    }
}

/// Team names become set names: keep them short and plain.
pub fn validate_team(name: &str) -> Result<(), String> {
    if !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err(format!(
            "invalid team name {name:?}: use [A-Za-z0-9_-]{{1,32}}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shape() {
        let r: Request =
            serde_json::from_str(r#"{"op":"attach","workspace":"ab12"}"#).unwrap_or(Request::Ping);
        assert!(matches!(r, Request::Attach { workspace } if workspace == "ab12"));
        assert!(validate_workspace("9f3db880d312").is_ok());
        for bad in ["", "a/b", "x".repeat(14).as_str(), "a b"] {
            assert!(validate_workspace(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cidrs_parse_strictly() {
        let c: Cidr = "10.99.0.0/16".parse().unwrap_or(Cidr::new(0, 0, 0, 0, 0));
        assert_eq!(c, Cidr::new(10, 99, 0, 0, 16));
        assert!(c.contains(Ipv4Addr::new(10, 99, 3, 4)));
        assert!(!c.contains(Ipv4Addr::new(10, 98, 3, 4)));
        assert_eq!(
            "169.254.169.254".parse::<Cidr>(),
            Ok(Cidr::new(169, 254, 169, 254, 32))
        );
        for bad in ["10.99.0.1/16", "10.0.0.0/33", "fd00::/8", "x", "10.0.0.0/"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
        assert!(Cidr::new(10, 0, 0, 0, 8).overlaps(&Cidr::new(10, 214, 0, 0, 16)));
        assert!(!Cidr::new(10, 213, 0, 0, 16).overlaps(&Cidr::new(10, 214, 0, 0, 16)));
        let json = serde_json::to_string(&c).unwrap_or_default();
        assert_eq!(json, "\"10.99.0.0/16\"");
        let f: Forward = serde_json::from_str(r#"{"workspace":"a","guest_port":1,"host_port":2}"#)
            .unwrap_or_else(|_| panic!("old forward record"));
        assert_eq!(
            f.bind,
            Ipv4Addr::LOCALHOST,
            "old records never listen everywhere"
        );
    }
}
