//! Host terminals: a pty whose master goes to the caller over `--console-socket`
//! (as runc sends it), raw mode, window sizes.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use burrow_proto::WinSize;

/// A new pty: (master, slave, the slave's path).
pub fn openpty() -> std::io::Result<(OwnedFd, OwnedFd, String)> {
    let mut master = -1;
    let mut slave = -1;
    // SAFETY: openpty writes two fds; the name, termios and winsize arguments may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and ours alone.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&master, &slave] {
        // SAFETY: fcntl on an fd we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let name = std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd()))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((master, slave, name))
}

/// Makes `fd` (a pty slave) the controlling terminal of this process, which must
/// lead a session: the kernel then sends SIGWINCH here when the master's owner
/// resizes it, and SIGHUP when it closes the master.
pub fn make_controlling(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: TIOCSCTTY takes an int argument (0: do not steal).
    if unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Puts a terminal in raw mode; returns the settings it had.
pub fn set_raw(fd: RawFd) -> std::io::Result<libc::termios> {
    // SAFETY: termios is plain data that tcgetattr fills.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes into `saved`, which we own.
    if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut raw = saved;
    // SAFETY: cfmakeraw edits the struct we own.
    unsafe { libc::cfmakeraw(&mut raw) };
    // SAFETY: tcsetattr reads the struct we own.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(saved)
}

/// The local terminal in raw mode while this lives (foreground `run`/`exec` on a
/// terminal, as runc does with its own standard input).
pub struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    pub fn enter(fd: RawFd) -> std::io::Result<RawMode> {
        Ok(RawMode {
            fd,
            saved: set_raw(fd)?,
        })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: tcsetattr reads the saved struct we own.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

pub fn is_terminal(fd: RawFd) -> bool {
    // SAFETY: isatty has no memory effects.
    unsafe { libc::isatty(fd) == 1 }
}

pub fn window_size(fd: RawFd) -> Option<WinSize> {
    // SAFETY: winsize is plain data.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we own.
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 {
        return Some(WinSize {
            rows: ws.ws_row.min(1000),
            cols: ws.ws_col.clamp(1, 1000),
        });
    }
    None
}

/// Sends `fd` over the Unix socket at `path` in one SCM_RIGHTS message whose data
/// is `name`, as runc's `utils.SendFile` does (containerd's console socket reads it
/// so).
pub fn send_fd(path: &Path, fd: RawFd, name: &str) -> std::io::Result<()> {
    let sock = UnixStream::connect(path)?;
    // At least one byte of data carries the descriptor.
    let data = if name.is_empty() { "\0" } else { name };
    burrow_netd::send_with_fd(sock.as_raw_fd(), data.as_bytes(), fd)
}
