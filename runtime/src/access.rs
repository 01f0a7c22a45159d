//! Who may reach a daemon, and the modes that keep everybody else out.
//!
//! A state dir holds guests' files, their consoles and the daemon's socket: it is
//! 0700 (0710 with an access group, so that members can reach the socket and
//! nothing else), and the socket 0600 (0660 with the group) whatever the umask of
//! whoever started the daemon. The socket's mode is a first fence; the daemon
//! checks every client's credentials (SO_PEERCRED) as well, so a socket exposed by
//! a wrong mode, a bind mount or a passed descriptor still serves only root and the
//! group.

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Why burrowd will not run as another user: said the same way by the daemon and
/// by the CLI that would start it.
pub const NEEDS_ROOT: &str = "burrowd needs root (it mounts volumes, creates TAP devices, nftables rules and cgroups, and confines VMs); run burrow as root or as a member of the daemon's --group";

/// Who may use the daemon beyond root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// A group whose members may use the daemon (e.g. `burrow`).
    pub group: Option<(String, libc::gid_t)>,
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("invalid group: no group named {0:?}")]
    NoGroup(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io(path: &Path, source: std::io::Error) -> AccessError {
    AccessError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Access {
    /// Root only, or root and the members of group `name`.
    pub fn new(group: Option<&str>) -> Result<Access, AccessError> {
        let group = match group.filter(|g| !g.is_empty()) {
            None => None,
            Some(name) => Some((name.to_string(), group_id(name)?)),
        };
        Ok(Access { group })
    }

    fn gid(&self) -> Option<libc::gid_t> {
        self.group.as_ref().map(|(_, g)| *g)
    }

    /// Makes `root` exist with the state dir's mode and owner.
    pub fn secure_state_dir(&self, root: &Path) -> Result<(), AccessError> {
        std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
        let mode = if self.group.is_some() { 0o710 } else { 0o700 };
        self.own(root, mode)
    }

    /// Gives the daemon's socket its mode and owner.
    pub fn secure_socket(&self, socket: &Path) -> Result<(), AccessError> {
        let mode = if self.group.is_some() { 0o660 } else { 0o600 };
        self.own(socket, mode)
    }

    fn own(&self, path: &Path, mode: u32) -> Result<(), AccessError> {
        if let Some(gid) = self.gid() {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| io(path, e))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io(path, e))
    }

    /// Whether a client with these credentials may use the daemon: root, or a
    /// member of the access group (primary or supplementary).
    pub fn allows(&self, uid: libc::uid_t, gid: libc::gid_t, pid: Option<i32>) -> bool {
        if uid == 0 {
            return true;
        }
        let Some(allowed) = self.gid() else {
            return false;
        };
        gid == allowed || pid.is_some_and(|p| supplementary_groups(p).contains(&allowed))
    }

    /// The one-line refusal a client is given.
    pub fn refusal(&self, uid: libc::uid_t) -> String {
        match &self.group {
            Some((name, _)) => {
                format!("permission denied: uid {uid} is neither root nor in group {name}")
            }
            None => format!("permission denied: uid {uid} is not root (burrowd serves root only; start it with --group to admit a group)"),
        }
    }
}

/// The supplementary groups of process `pid` (its `Groups:` line).
fn supplementary_groups(pid: i32) -> Vec<libc::gid_t> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn group_id(name: &str) -> Result<libc::gid_t, AccessError> {
    let c = CString::new(name).map_err(|_| AccessError::NoGroup(name.to_string()))?;
    let mut grp: libc::group = unsafe_zeroed_group();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; buf outlives it and its length
    // is passed; `out` is either null or points at `grp`.
    let rc =
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return Err(AccessError::NoGroup(name.to_string()));
    }
    Ok(grp.gr_gid)
}

fn unsafe_zeroed_group() -> libc::group {
    // SAFETY: `group` is plain old data (integers and pointers); all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// A Unix listener for axum that serves only the clients [`Access`] allows; the
/// others get a 403 with the JSON error body and are hung up on.
pub struct CheckedListener {
    pub inner: tokio::net::UnixListener,
    pub access: Access,
}

impl axum::serve::Listener for CheckedListener {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (conn, addr) = match self.inner.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: say so, and try again a moment later
                    // rather than spin.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let allowed = conn
                .peer_cred()
                .map(|c| (self.access.allows(c.uid(), c.gid(), c.pid()), c.uid()));
            match allowed {
                Ok((true, _)) => return (conn, addr),
                Ok((false, uid)) => {
                    tracing::warn!(uid, "refused a client");
                    tokio::spawn(refuse(conn, self.access.refusal(uid)));
                }
                Err(e) => tracing::warn!("peer credentials: {e}"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

async fn refuse(mut conn: tokio::net::UnixStream, message: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = serde_json::to_string(&crate::api::ErrorBody {
        error: message,
        class: crate::error::ErrorClass::Forbidden,
    })
    .unwrap_or_default();
    let reply = format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // The request is read (its head, a bounded amount, briefly) before the answer
    // and drained after it: a socket closed with unread data is reset, and the
    // client would see the reset instead of the refusal.
    let limit = std::time::Duration::from_secs(1);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(limit, async {
        while seen.len() < 64 * 1024 && !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(limit, async {
        conn.write_all(reply.as_bytes()).await?;
        conn.shutdown().await?;
        let mut drained = 0usize;
        while drained < 1 << 20 {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_always_others_only_through_the_group() {
        let root_only = Access::default();
        assert!(root_only.allows(0, 0, None));
        assert!(!root_only.allows(1000, 1000, None));
        let grp = Access {
            group: Some(("burrow".into(), 4242)),
        };
        assert!(grp.allows(1000, 4242, None));
        assert!(!grp.allows(1000, 1000, None));
        // Our own supplementary groups are read from /proc.
        let me = std::process::id() as i32;
        let mine = supplementary_groups(me);
        if let Some(g) = mine.first() {
            let a = Access {
                group: Some(("x".into(), *g)),
            };
            assert!(a.allows(1000, 1, Some(me)));
        }
        assert!(Access::new(Some("no-such-group-here")).is_err());
        assert_eq!(
            Access::new(Some("root")).ok().and_then(|a| a.gid()),
            Some(0)
        );
    }
}
