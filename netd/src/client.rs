//! The client `burrowd` uses: blocking, one connection per request.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::fdpass::recv_with_fd;
use crate::protocol::{Forward, Lease, Policy, PolicyChange, Reply, Request, MAX_LINE};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("burrow-netd at {0}: {1}")]
    Unreachable(PathBuf, std::io::Error),
    #[error("invalid {field}: {message}")]
    Refused { field: String, message: String },
    #[error("burrow-netd: {0}")]
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct NetClient {
    socket: PathBuf,
}

impl NetClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        NetClient {
            socket: socket.into(),
        }
    }

    fn call(&self, req: &Request) -> Result<(Reply, Option<OwnedFd>), NetError> {
        let io = |e| NetError::Unreachable(self.socket.clone(), e);
        let mut s = UnixStream::connect(&self.socket).map_err(io)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io)?;
        let mut line = serde_json::to_vec(req).map_err(|e| NetError::Failed(e.to_string()))?;
        line.push(b'\n');
        s.write_all(&line).map_err(io)?;
        let mut buf = vec![0u8; MAX_LINE];
        let (mut n, fd) = recv_with_fd(&s, &mut buf).map_err(io)?;
        while n > 0 && buf[n - 1] != b'\n' && n < buf.len() {
            match s.read(&mut buf[n..]).map_err(io)? {
                0 => break,
                m => n += m,
            }
        }
        let reply: Reply = serde_json::from_slice(&buf[..n])
            .map_err(|e| NetError::Failed(format!("bad reply: {e}")))?;
        match reply {
            Reply::Refused { field, message } => Err(NetError::Refused {
                field: field.unwrap_or_else(|| "request".into()),
                message,
            }),
            Reply::Failed(m) => Err(NetError::Failed(m)),
            r => Ok((r, fd)),
        }
    }

    pub fn ping(&self) -> Result<(), NetError> {
        self.call(&Request::Ping).map(|_| ())
    }

    /// The workspace's TAP device (to hand to QEMU) and its address.
    pub fn attach(&self, workspace: &str) -> Result<(Lease, OwnedFd), NetError> {
        match self.call(&Request::Attach {
            workspace: workspace.to_string(),
        })? {
            (Reply::Attached(lease), Some(fd)) => Ok((lease, fd)),
            _ => Err(NetError::Failed(
                "attach: no TAP device in the reply".into(),
            )),
        }
    }

    pub fn release(&self, workspace: &str) -> Result<(), NetError> {
        self.call(&Request::Release {
            workspace: workspace.to_string(),
        })
        .map(|_| ())
    }

    pub fn sync(
        &self,
        workspaces: Vec<String>,
        teams: std::collections::BTreeMap<String, Vec<String>>,
    ) -> Result<(), NetError> {
        self.call(&Request::Sync { workspaces, teams }).map(|_| ())
    }

    pub fn set_team(&self, name: &str, members: Vec<String>) -> Result<(), NetError> {
        self.call(&Request::SetTeam {
            name: name.to_string(),
            members,
        })
        .map(|_| ())
    }

    pub fn remove_team(&self, name: &str) -> Result<(), NetError> {
        self.call(&Request::RemoveTeam {
            name: name.to_string(),
        })
        .map(|_| ())
    }

    /// Changes `workspace`'s policy (None keeps a field) and returns the result.
    pub fn set_policy(&self, workspace: &str, change: PolicyChange) -> Result<Policy, NetError> {
        match self.call(&Request::SetPolicy {
            workspace: workspace.to_string(),
            allow_internet: change.allow_internet,
            allow_inter_vm: change.allow_inter_vm,
            allowed_ports: change.allowed_ports,
            allow_host_ports: change.allow_host_ports,
            allow_cidr: change.allow_cidr,
        })? {
            (Reply::Policy(p), _) => Ok(p),
            _ => Err(NetError::Failed("set_policy: unexpected reply".into())),
        }
    }

    pub fn policy(&self, workspace: &str) -> Result<Policy, NetError> {
        match self.call(&Request::GetPolicy {
            workspace: workspace.to_string(),
        })? {
            (Reply::Policy(p), _) => Ok(p),
            _ => Err(NetError::Failed("policy: unexpected reply".into())),
        }
    }

    pub fn forward_add(
        &self,
        workspace: &str,
        guest_port: u16,
        host_port: Option<u16>,
        bind: Option<std::net::Ipv4Addr>,
    ) -> Result<Forward, NetError> {
        match self.call(&Request::ForwardAdd {
            workspace: workspace.to_string(),
            guest_port,
            host_port,
            bind,
        })? {
            (Reply::Forward(f), _) => Ok(f),
            _ => Err(NetError::Failed("forward_add: unexpected reply".into())),
        }
    }

    pub fn forward_rm(&self, workspace: &str, guest_port: u16) -> Result<(), NetError> {
        self.call(&Request::ForwardRm {
            workspace: workspace.to_string(),
            guest_port,
        })
        .map(|_| ())
    }

    pub fn forward_ls(&self, workspace: &str) -> Result<Vec<Forward>, NetError> {
        match self.call(&Request::ForwardLs {
            workspace: workspace.to_string(),
        })? {
            (Reply::Forwards(f), _) => Ok(f),
            _ => Err(NetError::Failed("forward_ls: unexpected reply".into())),
        }
    }

    /// Asks netd to remove what it made and exit; refused while VMs use the network.
    pub fn shutdown(&self) -> Result<(), NetError> {
        self.call(&Request::Shutdown).map(|_| ())
    }

    pub fn leases(&self) -> Result<Vec<Lease>, NetError> {
        match self.call(&Request::Leases)? {
            (Reply::Leases(l), _) => Ok(l),
            _ => Err(NetError::Failed("leases: unexpected reply".into())),
        }
    }
}
