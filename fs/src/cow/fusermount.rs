//! Mounting without privileges: `fusermount3` (set-user-ID root) opens
//! `/dev/fuse`, mounts it on a directory the user owns, and passes the open device
//! back over a Unix socket named by `_FUSE_COMMFD` (SCM_RIGHTS).
//!
//! fuser does this only when `/dev/fuse` is missing for the user, not when it
//! exists but is closed to them (mode 0600, as in many containers): hence this.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

/// Mounts a FUSE file system on `mnt` with the comma-separated `options` and
/// returns the device to serve it on.
pub(crate) fn mount(mnt: &Path, options: &str) -> io::Result<OwnedFd> {
    let (ours, theirs) = UnixStream::pair()?;
    // The child must inherit its end: clear close-on-exec on it.
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_SETFD, 0) };
    let out = Command::new("fusermount3")
        .arg("-o")
        .arg(options)
        .arg("--")
        .arg(mnt)
        .env("_FUSE_COMMFD", theirs.as_raw_fd().to_string())
        .output()?;
    drop(theirs);
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "fusermount3: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    receive_fd(&ours)
}

/// Unmounts what [`mount`] mounted (lazily: a busy mount goes when released).
pub(crate) fn unmount(mnt: &Path) -> io::Result<()> {
    let out = Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(mnt)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

fn receive_fd(sock: &UnixStream) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // Room for one control message carrying one fd, aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive recvmsg.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: recvmsg into the buffers msg points to.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: CMSG_FIRSTHDR reads msg, which recvmsg filled in.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    // SAFETY: a non-null cmsg points into `control`, which is still alive.
    if cmsg.is_null() || unsafe { (*cmsg).cmsg_type } != libc::SCM_RIGHTS {
        return Err(io::Error::other("fusermount3 passed no file descriptor"));
    }
    // SAFETY: an SCM_RIGHTS message's data is an fd (possibly unaligned).
    let fd = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>()) };
    // SAFETY: the kernel installed this fd in our table for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
