//! Listening and the per-connection protocol loop.
//!
//! A connection is a handshake, then requests answered one by one in order.
//! Connections are served concurrently. A `stream` request turns its connection
//! into a stream (see `streams`): answered `stream_started`, it carries stream
//! frames until the stream's last frame, then the agent closes it. A `stream`
//! request that fails is answered with the error and the connection stays a
//! request connection. Nothing read from the wire can panic the
//! agent: every decoding failure becomes an error reply or the end of that
//! connection.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burrow_proto::{
    read_frame, read_message, write_message, AgentError, ErrorKind, FrameError, Hello, HelloReply,
    Op, Outcome, Reply, Request, Response, AGENT_PORT, MAX_FRAME, PROTOCOL_VERSION, READY_PORT,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY, VMADDR_CID_HOST};

use crate::agent::Agent;

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `vsock[:PORT]`: the guest's vsock, any CID.
    Vsock(u32),
    /// `unix:PATH`: a Unix socket, for development and tests on the host.
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "vsock" {
            return Ok(ListenAddr::Vsock(AGENT_PORT));
        }
        if let Some(port) = s.strip_prefix("vsock:") {
            return port
                .parse()
                .map(ListenAddr::Vsock)
                .map_err(|_| format!("{port:?} is not a vsock port number"));
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        Err(format!("{s:?}: expected vsock[:PORT] or unix:PATH"))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Vsock(port) => write!(f, "vsock:{port}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

pub enum Listener {
    Vsock(VsockListener),
    Unix(UnixListener),
}

impl Listener {
    /// Binds `addr`. The vsock transport may still be settling right after its
    /// module loaded, so a vsock bind is retried for a bounded time.
    pub async fn bind(addr: &ListenAddr) -> std::io::Result<Listener> {
        match addr {
            ListenAddr::Vsock(port) => {
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    match VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, *port)) {
                        Ok(l) => return Ok(Listener::Vsock(l)),
                        Err(e) if Instant::now() >= deadline => return Err(e),
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            }
            ListenAddr::Unix(path) => {
                // A socket file left by an earlier run would make bind fail.
                if std::fs::symlink_metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    let _ = std::fs::remove_file(path);
                }
                Ok(Listener::Unix(UnixListener::bind(path)?))
            }
        }
    }

    /// Tells whoever waits that requests can come: on vsock, connects to the
    /// host's [`READY_PORT`] and sends one [`HelloReply`], so the host never has to
    /// poll a booting guest; on a Unix socket (dev mode), prints `ready` on stdout
    /// for whoever started the agent.
    pub fn announce_ready(&self) {
        match self {
            Listener::Vsock(_) => {
                tokio::spawn(announce_ready());
            }
            Listener::Unix(_) => {
                use std::io::Write;
                let mut out = std::io::stdout();
                let _ = writeln!(out, "ready").and_then(|_| out.flush());
            }
        }
    }

    /// Accepts connections forever, serving each on its own task.
    pub async fn serve(self, agent: Arc<Agent>) -> std::io::Result<()> {
        loop {
            let accepted = match &self {
                Listener::Vsock(l) => l.accept().await.map(|(s, peer)| {
                    let agent = Arc::clone(&agent);
                    tracing::debug!("connection from vsock cid {}", peer.cid());
                    tokio::spawn(serve_connection(agent, s));
                }),
                Listener::Unix(l) => l.accept().await.map(|(s, _)| {
                    tracing::debug!("connection on unix socket");
                    tokio::spawn(serve_connection(Arc::clone(&agent), s));
                }),
            };
            if let Err(e) = accepted {
                // Out of descriptors or a transient error: log, pause, go on.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves one connection to its end.
pub async fn serve_connection<S>(agent: Arc<Agent>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    if !handshake(&mut rd, &mut wr).await {
        return;
    }
    loop {
        let (id, outcome, shutdown) = match read_request(&mut rd).await {
            Ok(Request {
                id,
                op: Op::Stream(open),
            }) => match agent.open_stream(open).await {
                Ok(opened) => {
                    if opened.is_input() {
                        // The exec gets its input connection before the host
                        // hears it is open, so that no end of input the host
                        // sends on the stream connection can overtake it.
                        let started = Reply::StreamStarted {
                            pid: None,
                            input: None,
                        };
                        opened.run(rd, NoWrite).await;
                        let resp = Response {
                            id,
                            outcome: Outcome::Ok(started),
                        };
                        let _ = send_response(&mut wr, resp).await;
                        // The exec holds the reading half; this half may go.
                        return;
                    }
                    let started = Reply::StreamStarted {
                        pid: opened.pid(),
                        input: opened.input_token(),
                    };
                    let resp = Response {
                        id,
                        outcome: Outcome::Ok(started),
                    };
                    if send_response(&mut wr, resp).await {
                        opened.run(rd, wr).await;
                    } else {
                        // The host is gone before the stream began.
                        opened.abandon();
                    }
                    return;
                }
                // The connection stays a request connection.
                Err(e) => (id, Outcome::Err(e), false),
            },
            Ok(req) => {
                let shutdown = matches!(req.op, Op::Shutdown);
                let outcome: Outcome = agent.handle(req.op).await.into();
                (req.id, outcome, shutdown)
            }
            Err(Unreadable::Frame(FrameError::TooLarge { len, max })) => (
                0,
                Outcome::Err(AgentError::new(
                    ErrorKind::TooLarge,
                    format!("request of {len} bytes exceeds the {max}-byte frame limit"),
                )),
                false,
            ),
            Err(Unreadable::Frame(_)) => return, // closed or broken
            Err(Unreadable::Malformed { id, error }) => (
                id,
                Outcome::Err(AgentError::new(
                    ErrorKind::Malformed,
                    format!("malformed request: {error}"),
                )),
                false,
            ),
        };
        if !send_response(&mut wr, Response { id, outcome }).await {
            return;
        }
        if shutdown {
            agent.shutdown().await;
            return;
        }
    }
}

/// A writer for a stream that writes nothing (an input connection's run).
struct NoWrite;

impl AsyncWrite for NoWrite {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Reads the host's `Hello` and answers it. Returns whether requests may follow.
async fn handshake<R, W>(rd: &mut R, wr: &mut W) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let error = match read_message::<Hello, _>(rd).await {
        Ok(hello) if hello.version == PROTOCOL_VERSION => {
            tracing::debug!("hello from {:?}", hello.client);
            return write_message(wr, &hello_reply(None)).await.is_ok();
        }
        Ok(hello) => format!(
            "protocol version {} is not supported; this agent speaks {PROTOCOL_VERSION}",
            hello.version
        ),
        Err(e) if e.is_recoverable() => format!("bad hello: {e}"),
        Err(_) => return false,
    };
    tracing::warn!("handshake refused: {error}");
    let _ = write_message(wr, &hello_reply(Some(error))).await;
    false
}

fn hello_reply(error: Option<String>) -> HelloReply {
    HelloReply {
        version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        error,
    }
}

/// Sends the ready announcement, retrying for a bounded time: the host listens
/// before it boots the VM, so a failure here is a transport still settling.
async fn announce_ready() {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sent = async {
            let mut s = VsockStream::connect(VsockAddr::new(VMADDR_CID_HOST, READY_PORT)).await?;
            // write_message flushes; dropping the stream then closes it.
            write_message(&mut s, &hello_reply(None))
                .await
                .map_err(std::io::Error::other)
        }
        .await;
        match sent {
            Ok(()) => {
                tracing::info!("ready");
                return;
            }
            Err(e) if Instant::now() >= deadline => {
                tracing::warn!("ready announcement to host port {READY_PORT}: {e}");
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

enum Unreadable {
    /// The frame layer failed: too large (stream still in step), closed or broken.
    Frame(FrameError),
    /// A frame arrived but is not a request. `id` is the request's id when the
    /// JSON is an object with a numeric `id` (e.g. an op this agent does not
    /// know), so the host can match the error to its request; 0 otherwise.
    Malformed { id: u64, error: serde_json::Error },
}

async fn read_request<R: AsyncRead + Unpin>(rd: &mut R) -> Result<Request, Unreadable> {
    let body = read_frame(rd, MAX_FRAME).await.map_err(Unreadable::Frame)?;
    serde_json::from_slice(&body).map_err(|error| {
        let id = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("id")?.as_u64())
            .unwrap_or(0);
        Unreadable::Malformed { id, error }
    })
}

/// Writes a response; a reply too large for one frame becomes an error reply for
/// the same id. Returns whether the connection is still usable.
async fn send_response<W: AsyncWrite + Unpin>(wr: &mut W, resp: Response) -> bool {
    let id = resp.id;
    match write_message(wr, &resp).await {
        Ok(()) => true,
        Err(FrameError::TooLarge { len, max }) => {
            let err = Response {
                id,
                outcome: Outcome::Err(AgentError::new(
                    ErrorKind::TooLarge,
                    format!("reply of {len} bytes exceeds the {max}-byte frame limit"),
                )),
            };
            write_message(wr, &err).await.is_ok()
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!("vsock".parse(), Ok(ListenAddr::Vsock(AGENT_PORT)));
        assert_eq!("vsock:5000".parse(), Ok(ListenAddr::Vsock(5000)));
        assert_eq!(
            "unix:/tmp/a.sock".parse(),
            Ok(ListenAddr::Unix("/tmp/a.sock".into()))
        );
        assert!("vsock:x".parse::<ListenAddr>().is_err());
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("tcp:1".parse::<ListenAddr>().is_err());
        assert_eq!(ListenAddr::Vsock(1024).to_string(), "vsock:1024");
    }
}
