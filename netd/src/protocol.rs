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
    SetPolicy {
        workspace: String,
        allow_internet: Option<bool>,
        allow_inter_vm: Option<bool>,
        allowed_ports: Option<Vec<u16>>,
    },
    GetPolicy {
        workspace: String,
    },
    /// Forward a host port (given, or chosen ≥ 1024) to `guest_port` of the workspace.
    ForwardAdd {
        workspace: String,
        guest_port: u16,
        host_port: Option<u16>,
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
}

/// A host port forwarded to a workspace's port.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Forward {
    pub workspace: String,
    pub guest_port: u16,
    pub host_port: u16,
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
}
