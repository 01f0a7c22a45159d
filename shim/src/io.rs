//! A task process's standard I/O: what containerd hands the shim (FIFOs it
//! reads and writes, or `file://` paths), relayed to and from the process's
//! stream on burrowd.

use std::path::PathBuf;

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
}

impl Opened {
    pub fn has_stdin(&self) -> bool {
        self.stdin.is_some()
    }
}

/// Where a stdio string points: a FIFO or file path, or a `file://` URI.
/// `binary://` (a logging program containerd would have the shim start) is
/// refused by name.
fn target(field: &str, uri: &str) -> Result<PathBuf, String> {
    if let Some(rest) = uri.strip_prefix("file://") {
        return Ok(PathBuf::from(rest));
    }
    if uri.starts_with("binary://") {
        return Err(format!(
            "{field}: {uri:?}: logging binaries (binary://) are not supported by burrow's shim"
        ));
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

/// Opens what `stdio` names.
pub async fn open(stdio: &Stdio) -> Result<Opened, String> {
    let stdin = if stdio.stdin.is_empty() {
        None
    } else {
        let path = target("stdin", &stdio.stdin)?;
        tokio::fs::metadata(&path)
            .await
            .map_err(|e| format!("stdin: {}: {e}", path.display()))?;
        Some(path)
    };
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
    })
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
    drop(reading);
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
        let e = target("stderr", "binary:///usr/bin/logger?x=1").unwrap_err();
        assert!(e.starts_with("stderr: ") && e.contains("binary://"), "{e}");
        let e = target("stdin", "http://x").unwrap_err();
        assert!(e.contains("unknown URI scheme"), "{e}");
    }
}
