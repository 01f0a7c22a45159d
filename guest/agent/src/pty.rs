//! Pseudo-terminals: opening a pair, starting a process on the slave as the leader
//! of a new session with it as its controlling terminal, and async I/O on the master.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use burrow_proto::WinSize;
use tokio::io::unix::AsyncFd;

use crate::process::{ExitWaiter, ProcessTable};

/// `TERM` of a terminal whose requester set none.
pub const DEFAULT_TERM: &str = "xterm-256color";

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn winsize(size: WinSize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Opens a master/slave pair with the slave at `size`. Both ends are close-on-exec;
/// the master is non-blocking.
fn open_pair(size: WinSize) -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: posix_openpt returns a new fd or -1.
    let m = cvt(unsafe {
        libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK)
    })?;
    // SAFETY: a fresh fd that nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    // SAFETY: grantpt/unlockpt act on the fd only.
    cvt(unsafe { libc::grantpt(master.as_raw_fd()) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::unlockpt(master.as_raw_fd()) })?;
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes a NUL-terminated name of at most `len` bytes.
    let r = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // SAFETY: `name` is NUL-terminated (ptsname_r succeeded).
    let s = cvt(unsafe {
        libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: a fresh fd that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(s) };
    set_size(master.as_raw_fd(), size)?;
    Ok((master, slave))
}

fn set_size(fd: RawFd, size: WinSize) -> io::Result<()> {
    let ws = winsize(size);
    // SAFETY: TIOCSWINSZ reads one winsize that lives across the call.
    cvt(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) }).map(|_| ())
}

/// The master side of a terminal whose process runs.
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

/// A process started on a new terminal.
pub struct PtyChild {
    pub pid: i32,
    pub master: PtyMaster,
    pub exit: ExitWaiter,
}

/// Starts `cmd` on a new terminal of `size`: its own session (so its group is its
/// pid) with the slave as controlling terminal and as fds 0, 1 and 2. The caller
/// has set the environment (TERM included).
pub fn spawn(table: &ProcessTable, mut cmd: Command, size: WinSize) -> io::Result<PtyChild> {
    let (master, slave) = open_pair(size)?;
    cmd.stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave));
    // SAFETY: the closure only makes async-signal-safe system calls (setsid, ioctl).
    unsafe {
        cmd.pre_exec(|| {
            cvt(libc::setsid())?;
            // fd 0 is the slave by now (std sets up stdio before running this).
            cvt(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
            Ok(())
        });
    }
    let spawned = table.spawn(&mut cmd);
    // The parent's copies of the slave must go: the master reads EIO (end of
    // file) only once every slave fd is closed.
    drop(cmd);
    let (child, exit) = spawned?;
    // SAFETY: an OwnedFd keeps its one descriptor open for as long as it lives,
    // and the AsyncFd owns it.
    let fd = unsafe { AsyncFd::register(master) }.map_err(|e| io::Error::other(e.to_string()))?;
    Ok(PtyChild {
        pid: child.id() as i32,
        master: PtyMaster { fd },
        exit,
    })
}

impl PtyMaster {
    /// Takes a terminal master opened elsewhere (a container's, received over its
    /// console socket) and sets its size.
    pub fn adopt(master: OwnedFd, size: Option<WinSize>) -> io::Result<PtyMaster> {
        let fd = master.as_raw_fd();
        // SAFETY: fcntl on an fd we own; only its status flags change.
        let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
        // SAFETY: as above.
        cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
        // SAFETY: as above; the descriptor must not reach the agent's other children.
        cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) })?;
        if let Some(size) = size {
            set_size(fd, size)?;
        }
        // SAFETY: an OwnedFd keeps its one descriptor open for as long as it lives,
        // and the AsyncFd owns it.
        let fd =
            unsafe { AsyncFd::register(master) }.map_err(|e| io::Error::other(e.to_string()))?;
        Ok(PtyMaster { fd })
    }

    /// Reads what the terminal wrote. `Ok(0)` at the end: EIO once every slave fd
    /// is closed.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            let r = guard.try_io(|fd| {
                // SAFETY: read writes at most buf.len() bytes into buf.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data` to the terminal's input.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            let r = guard.try_io(|fd| {
                // SAFETY: write reads at most data.len() bytes from data.
                let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    pub fn resize(&self, size: WinSize) -> io::Result<()> {
        set_size(self.fd.get_ref().as_raw_fd(), size)
    }

    /// The line discipline's end-of-file character (^D unless changed).
    pub fn eof_char(&self) -> u8 {
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: one termios that lives across the call.
        if unsafe { libc::tcgetattr(self.fd.get_ref().as_raw_fd(), &mut t) } == 0 {
            let c = t.c_cc[libc::VEOF];
            if c != 0 {
                return c;
            }
        }
        4
    }

    /// The terminal's foreground process group, if it has one.
    pub fn foreground(&self) -> Option<i32> {
        // SAFETY: tcgetpgrp only reads the fd.
        let pg = unsafe { libc::tcgetpgrp(self.fd.get_ref().as_raw_fd()) };
        (pg > 1).then_some(pg)
    }
}
