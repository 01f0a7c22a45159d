//! The local terminal: raw mode (restored on every way out) and its size.

use std::io::IsTerminal;
use std::os::fd::AsRawFd;

use burrow_proto::WinSize;

/// The terminal in raw mode for as long as this lives: keys reach the guest as
/// typed (Ctrl-C as the byte 0x03 for the guest's line discipline, not a local
/// SIGINT). Dropping it restores the saved settings, on return, error and panic
/// alike; a signal that would end the CLI is caught by the stream pump, which
/// returns through here.
pub struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    pub fn enter() -> std::io::Result<RawMode> {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: termios is plain data; tcgetattr fills it.
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
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: tcsetattr reads the saved struct we own.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

pub fn stdin_is_terminal() -> bool {
    std::io::stdin().is_terminal()
}

/// The size of the terminal on standard input (or output), if there is one.
pub fn window_size() -> Option<WinSize> {
    for fd in [std::io::stdin().as_raw_fd(), std::io::stdout().as_raw_fd()] {
        // SAFETY: winsize is plain data.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes a winsize into the struct we own.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 {
            return Some(WinSize {
                rows: ws.ws_row.min(1000),
                cols: ws.ws_col.clamp(1, 1000),
            });
        }
    }
    None
}
