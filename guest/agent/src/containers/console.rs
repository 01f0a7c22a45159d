//! Receiving a container's terminal: libcontainer sends its master over a console
//! socket the agent listens on.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use burrow_proto::{AgentError, WinSize};

use super::helper::helper_garbled;
use crate::pty::PtyMaster;

/// How long a console socket may take to receive a terminal whose process the
/// helper has already reported (it is sent before that report, so this only
/// bounds a broken helper).
const CONSOLE_WAIT: Duration = Duration::from_secs(10);

/// Receives a container's terminal master on its console socket
/// (libcontainer sends it with SCM_RIGHTS) and sets its size.
pub async fn receive_master(
    listener: tokio::net::UnixListener,
    size: Option<WinSize>,
) -> Result<PtyMaster, AgentError> {
    let stream = tokio::time::timeout(CONSOLE_WAIT, listener.accept())
        .await
        .map_err(|_| helper_garbled("no terminal on the console socket"))?
        .map_err(|e| helper_garbled(format!("console socket: {e}")))?
        .0
        .into_std()
        .map_err(|e| helper_garbled(format!("console socket: {e}")))?;
    let fd = tokio::task::spawn_blocking(move || recv_fd(stream))
        .await
        .map_err(|e| helper_garbled(e.to_string()))??;
    PtyMaster::adopt(fd, size).map_err(|e| helper_garbled(format!("terminal: {e}")))
}

fn recv_fd(stream: std::os::unix::net::UnixStream) -> Result<OwnedFd, AgentError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let err = |e: String| helper_garbled(format!("console socket: {e}"));
    stream
        .set_nonblocking(false)
        .and_then(|_| stream.set_read_timeout(Some(CONSOLE_WAIT)))
        .map_err(|e| err(e.to_string()))?;
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| err(e.to_string()))?;
    let mut got = None;
    for cmsg in msg.cmsgs().map_err(|e| err(e.to_string()))? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel just installed this descriptor in our table
                // for us; nothing else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if got.is_none() {
                    got = Some(owned);
                }
            }
        }
    }
    got.ok_or_else(|| err("no terminal received".into()))
}
