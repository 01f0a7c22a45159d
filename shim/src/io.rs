//! A task process's standard I/O: what containerd hands the shim (FIFOs it
//! reads and writes, `file://` paths, or a `binary://` logging program the shim
//! starts), relayed to and from the process's stream on burrowd.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

pub use burrow::api::stream::Up;
use burrow::api::stream::{ClientStream, ServerEvent, StreamMessage};
use burrow_proto::ExitInfo;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

/// The stdio a Create or an Exec names: each path may be empty (none).
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// How a relay ended.
#[derive(Debug, Clone)]
pub enum Ended {
    Exit(ExitInfo),
    /// The stream broke before the process's exit (the VM or burrowd went away).
    Lost(String),
}

/// An output the process's bytes go to.
type Sink = Box<dyn AsyncWrite + Send + Unpin>;

/// The host ends of a process's stdio, opened before its stream is, so that a
/// bad path fails the Create or Exec before anything runs.
pub struct Opened {
    stdin: Option<PathBuf>,
    stdout: Option<Sink>,
    stderr: Option<Sink>,
    logger: Option<Logger>,
}

impl Opened {
    pub fn has_stdin(&self) -> bool {
        self.stdin.is_some()
    }
}

/// How long a logging program may take to say it is ready, and to exit once
/// the process's output ended.
const LOGGER_GRACE: Duration = Duration::from_secs(10);

/// Where a stdio string points: a FIFO or file path, or a `file://` URI
/// (`binary://` is handled by [`Logger::start`]).
fn target(field: &str, uri: &str) -> Result<PathBuf, String> {
    if let Some(rest) = uri.strip_prefix("file://") {
        return Ok(PathBuf::from(rest));
    }
    if uri.contains("://") {
        return Err(format!("{field}: {uri:?}: unknown URI scheme"));
    }
    Ok(PathBuf::from(uri))
}

async fn open_sink(field: &str, uri: &str) -> Result<Option<Sink>, String> {
    if uri.is_empty() {
        return Ok(None);
    }
    let path = target(field, uri)?;
    let meta = tokio::fs::metadata(&path).await;
    let is_fifo = meta.as_ref().is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_fifo()
    });
    if is_fifo {
        // Read-write: the open never waits for a reader, and a reader that comes
        // and goes does not end the relay with EPIPE.
        let s = pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(&path)
            .map_err(|e| format!("{field}: open {}: {e}", path.display()))?;
        return Ok(Some(Box::new(s)));
    }
    let f = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await
        .map_err(|e| format!("{field}: open {}: {e}", path.display()))?;
    Ok(Some(Box::new(f)))
}

/// Opens what `stdio` names for the process of container `who.0` in
/// containerd namespace `who.1`.
pub async fn open(stdio: &Stdio, who: (&str, &str)) -> Result<Opened, String> {
    let stdin = if stdio.stdin.is_empty() {
        None
    } else {
        let path = target("stdin", &stdio.stdin)?;
        tokio::fs::metadata(&path)
            .await
            .map_err(|e| format!("stdin: {}: {e}", path.display()))?;
        Some(path)
    };
    if stdio.stdout.starts_with("binary://") {
        let (logger, out, err) = Logger::start(&stdio.stdout, who).await?;
        return Ok(Opened {
            stdin,
            stdout: Some(out),
            stderr: (!stdio.terminal).then_some(err),
            logger: Some(logger),
        });
    }
    let stdout = open_sink("stdout", &stdio.stdout).await?;
    // On a terminal there is one output, the terminal's.
    let stderr = if stdio.terminal {
        None
    } else {
        open_sink("stderr", &stdio.stderr).await?
    };
    Ok(Opened {
        stdin,
        stdout,
        stderr,
        logger: None,
    })
}

/// A logging program containerd names as `binary:///path?key=value&...`,
/// started as containerd's own shims start it: the process's stdout on its fd 3,
/// stderr on fd 4, and fd 5 to write to or close once it is ready (the shim
/// waits for that); `CONTAINER_ID` and `CONTAINER_NAMESPACE` in its environment;
/// each query pair becomes two arguments. It reads to the end of both and exits;
/// one that has not exited [`LOGGER_GRACE`] after the output ended is killed.
struct Logger {
    child: Option<tokio::process::Child>,
}

impl Logger {
    async fn start(uri: &str, who: (&str, &str)) -> Result<(Logger, Sink, Sink), String> {
        let (path, args) = parse_binary(uri)?;
        let (out_r, out_w) = pipe_fds().map_err(|e| format!("stdout: pipe: {e}"))?;
        let (err_r, err_w) = pipe_fds().map_err(|e| format!("stdout: pipe: {e}"))?;
        let (ready_r, ready_w) = pipe_fds().map_err(|e| format!("stdout: pipe: {e}"))?;
        let fds = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
        let mut cmd = tokio::process::Command::new(&path);
        cmd.args(&args)
            .env("CONTAINER_ID", who.0)
            .env("CONTAINER_NAMESPACE", who.1)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: between fork and exec only fcntl and dup2 run (async-signal
        // safe), on fds this process owns until the exec.
        unsafe {
            cmd.pre_exec(move || {
                // Above 10 first, so that no target number clobbers a source.
                let mut high = [0; 3];
                for (h, fd) in high.iter_mut().zip(fds) {
                    *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                    if *h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (target, fd) in (3..).zip(high) {
                    if libc::dup2(fd, target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("stdout: {uri:?}: start {}: {e}", path.display()))?;
        let mut logger = Logger { child: Some(child) };
        drop((out_r, err_r, ready_w));
        // Ready once it writes a byte or closes fd 5 (or exits).
        let ready = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut b = [0u8; 1];
            std::fs::File::from(ready_r).read(&mut b)
        });
        match tokio::time::timeout(LOGGER_GRACE, ready).await {
            Ok(Ok(Ok(_))) => {}
            _ => {
                if let Some(mut c) = logger.child.take() {
                    let _ = c.kill().await;
                }
                return Err(format!(
                    "stdout: {uri:?}: the logging program did not get ready within {} s",
                    LOGGER_GRACE.as_secs()
                ));
            }
        }
        let sink = |fd: OwnedFd| -> Result<Sink, String> {
            pipe::Sender::from_owned_fd(fd)
                .map(|s| Box::new(s) as Sink)
                .map_err(|e| format!("stdout: pipe: {e}"))
        };
        Ok((logger, sink(out_w)?, sink(err_w)?))
    }
}

impl Drop for Logger {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            tokio::spawn(async move {
                if tokio::time::timeout(LOGGER_GRACE, child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
            });
        }
    }
}

/// A pipe whose ends are closed on exec (the logger gets its copies by dup2).
fn pipe_fds() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The program and arguments of `binary:///path?k=v&k2=v2`: an absolute path,
/// then `k v k2 v2` (percent-decoded; a key without a value stands alone).
fn parse_binary(uri: &str) -> Result<(PathBuf, Vec<String>), String> {
    let bad = |why: &str| format!("stdout: {uri:?}: {why}");
    let rest = uri
        .strip_prefix("binary://")
        .ok_or_else(|| bad("not binary://"))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let path = percent_decode(path).ok_or_else(|| bad("bad percent-encoding"))?;
    if !path.starts_with('/') {
        return Err(bad("the logging program must be an absolute path"));
    }
    let mut args = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        args.push(percent_decode(k).ok_or_else(|| bad("bad percent-encoding"))?);
        if !v.is_empty() {
            args.push(percent_decode(v).ok_or_else(|| bad("bad percent-encoding"))?);
        }
    }
    Ok((PathBuf::from(path), args))
}

/// `%XX` escapes and `+` (a query's space) decoded; `None` when malformed or
/// not UTF-8, or when it decodes to a NUL.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    if out.contains(&0) {
        return None;
    }
    String::from_utf8(out).ok()
}

/// Relays `io` and the process's stream until its exit; `up` carries what the
/// task service sends the process (end of input, window sizes, signals). When
/// the stream breaks before the exit, `reattach` opens it again (the process's
/// stream is durable: after a burrowd restart it waits in the guest, with what
/// the process wrote meanwhile); the relay ends `Lost` only when that fails.
pub async fn relay<F, Fut>(
    stream: ClientStream,
    io: Opened,
    mut up: mpsc::Receiver<Up>,
    up_tx: mpsc::Sender<Up>,
    mut reattach: F,
) -> Ended
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<ClientStream, String>>,
{
    let Opened {
        stdin,
        mut stdout,
        mut stderr,
        logger,
    } = io;
    let reading = stdin.map(|path| Input::start(path, up_tx));
    // What the broken stream did not send goes up the next one first.
    let mut pending = None;
    let mut stream = stream;
    let ended = loop {
        let why = match carry(stream, &mut stdout, &mut stderr, &mut up, &mut pending).await {
            Ok(exit) => break Ended::Exit(exit),
            Err(why) => why,
        };
        match reattach(why).await {
            Ok(s) => stream = s,
            Err(why) => break Ended::Lost(why),
        }
    };
    for s in [&mut stdout, &mut stderr].into_iter().flatten() {
        let _ = s.flush().await;
    }
    // The logging program reads the end of its pipes, then has its grace.
    drop((reading, stdout, stderr, logger));
    ended
}

/// Carries one stream of the process: its exit, or why it broke first.
async fn carry(
    stream: ClientStream,
    stdout: &mut Option<Sink>,
    stderr: &mut Option<Sink>,
    up: &mut mpsc::Receiver<Up>,
    pending: &mut Option<Up>,
) -> Result<ExitInfo, String> {
    let ClientStream {
        mut sender,
        mut receiver,
        ..
    } = stream;
    let pump = sender.pump_kept(up, pending);
    tokio::pin!(pump);
    let mut pumping = true;
    loop {
        let msg = tokio::select! {
            // Ends when `up` closes or the stream breaks (then so does the
            // receiving side).
            _ = &mut pump, if pumping => {
                pumping = false;
                continue;
            }
            m = receiver.next() => m,
        };
        match msg {
            Ok(Some(StreamMessage::Stdout(d)))
            | Ok(Some(StreamMessage::Record { data: d, .. })) => write(stdout, &d).await,
            Ok(Some(StreamMessage::Stderr(d))) => write(stderr, &d).await,
            Ok(Some(StreamMessage::Event(e))) => match e {
                ServerEvent::Exit(x) => return Ok(x),
                ServerEvent::Dropped { reason } => return Err(reason),
                ServerEvent::Error { message, .. } => return Err(message),
                _ => {}
            },
            Ok(None) => return Err("burrowd closed the stream before the process exited".into()),
            Err(e) => return Err(format!("lost the stream: {e}")),
        }
    }
}

/// Writes to an output; once a write fails (a file system full, a reader that
/// cannot be written to) later output is dropped and the process goes on.
async fn write(sink: &mut Option<Sink>, d: &[u8]) {
    if let Some(s) = sink.as_mut() {
        if s.write_all(d).await.is_err() {
            *sink = None;
        }
    }
}

/// The process's input: containerd's FIFO, opened for reading when its writer
/// comes (the open waits for it, on a thread), read to its end, which is the
/// process's end of input, as under runc's shim.
struct Input {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
    opened: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Input {
    fn start(path: PathBuf, tx: mpsc::Sender<Up>) -> Input {
        let opened = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, flag) = (path.clone(), opened.clone());
        let task = tokio::spawn(async move {
            let file = tokio::task::spawn_blocking(move || std::fs::File::open(p)).await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            let Ok(Ok(file)) = file else { return };
            let is_fifo = file.metadata().is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_fifo()
            });
            let mut r: Box<dyn tokio::io::AsyncRead + Send + Unpin> = if is_fifo {
                match pipe::Receiver::from_file(file) {
                    Ok(r) => Box::new(r),
                    Err(_) => return,
                }
            } else {
                Box::new(tokio::fs::File::from_std(file))
            };
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match r.read(&mut buf).await {
                    Ok(n) if n > 0 => {
                        if tx.send(Up::Data(buf[..n].to_vec())).await.is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    _ => {
                        let _ = tx.send(Up::Eof).await;
                        return;
                    }
                }
            }
        });
        Input { path, task, opened }
    }
}

impl Drop for Input {
    fn drop(&mut self) {
        self.task.abort();
        // An open still waiting for a writer holds a thread: be that writer
        // for a moment (a non-blocking open for writing succeeds only while a
        // reader waits), so that the open returns and the thread ends.
        if !self.opened.load(std::sync::atomic::Ordering::SeqCst) {
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdio_uris_are_read_or_refused_by_name() {
        assert_eq!(
            target("stdout", "/run/x/c-stdout"),
            Ok(PathBuf::from("/run/x/c-stdout"))
        );
        assert_eq!(
            target("stdout", "file:///var/log/c.log"),
            Ok(PathBuf::from("/var/log/c.log"))
        );
        let (path, args) = parse_binary("binary:///usr/bin/log%20ger?x=1&flag&y=a+b%2Fc").unwrap();
        assert_eq!(path, PathBuf::from("/usr/bin/log ger"));
        assert_eq!(args, ["x", "1", "flag", "y", "a b/c"]);
        for bad in ["binary://rel/logger", "binary:///x?%zz=1", "binary:///x%00"] {
            let e = parse_binary(bad).unwrap_err();
            assert!(e.starts_with("stdout: "), "{e}");
        }
        let e = target("stdin", "http://x").unwrap_err();
        assert!(e.contains("unknown URI scheme"), "{e}");
    }
}
