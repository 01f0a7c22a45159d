//! The host end of the host–guest protocol, over hybrid vsock.
//!
//! vhost-device-vsock exposes the guest's vsock on a Unix socket: connect, write
//! `CONNECT <port>\n`, read `OK <host-port>\n`, and the rest is a byte stream to the
//! guest port. Guest-initiated connections to host port P arrive on `<uds>_P`, which
//! is how the agent announces that it is ready.

use std::path::{Path, PathBuf};
use std::time::Duration;

use burrow_proto::{
    read_message, write_message, FrameError, GuestFrame, Hello, HelloReply, HostFrame, Op, Reply,
    Request, Response, StreamOpen, AGENT_PORT, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::error::{Error, Result};

/// How long connecting and the handshake may take before the agent counts as gone.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct GuestClient {
    uds: PathBuf,
    name: String,
}

impl GuestClient {
    /// `name` is the workspace's, for error messages.
    pub fn new(uds: PathBuf, name: impl Into<String>) -> Self {
        GuestClient {
            uds,
            name: name.into(),
        }
    }

    fn unreachable(&self, reason: impl std::fmt::Display) -> Error {
        Error::GuestUnreachable {
            name: self.name.clone(),
            reason: reason.to_string(),
        }
    }

    /// Opens a connection and completes the handshake.
    pub async fn connect(&self) -> Result<GuestConn> {
        let fut = async {
            let mut stream = UnixStream::connect(&self.uds)
                .await
                .map_err(|e| self.unreachable(e))?;
            stream
                .write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())
                .await
                .map_err(|e| self.unreachable(e))?;
            let line = read_line(&mut stream)
                .await
                .map_err(|e| self.unreachable(e))?;
            if !line.starts_with("OK ") {
                return Err(self.unreachable(format!("vsock proxy answered {line:?}")));
            }
            let hello = Hello {
                version: PROTOCOL_VERSION,
                client: "burrowd".into(),
            };
            write_message(&mut stream, &hello)
                .await
                .map_err(|e| self.unreachable(e))?;
            let reply: HelloReply = read_message(&mut stream)
                .await
                .map_err(|e| self.unreachable(e))?;
            if let Some(err) = reply.error {
                return Err(self.unreachable(format!("handshake refused: {err}")));
            }
            Ok(GuestConn {
                stream,
                next_id: 1,
                client: self.clone(),
            })
        };
        tokio::time::timeout(CONNECT_TIMEOUT, fut)
            .await
            .map_err(|_| self.unreachable("connection timed out"))?
    }

    /// Opens a stream (see [`burrow_proto::stream`]) on a connection of its own. The
    /// agent's refusal (an unknown job, a bad command) is the error.
    pub async fn open_stream(&self, open: StreamOpen) -> Result<GuestStream> {
        let mut conn = self.connect().await?;
        let (pid, token) = self.start_stream(&mut conn, open).await?;
        // An exec's input goes on a connection of its own (see
        // burrow_proto::stream): opened now, before any input is sent.
        let input = match token {
            Some(token) => {
                let mut c = self.connect().await?;
                match self.start_stream(&mut c, StreamOpen::Input { token }).await {
                    Ok(_) => {
                        let (_, wr) = c.stream.into_split();
                        Some(GuestStreamWriter {
                            wr,
                            client: self.clone(),
                        })
                    }
                    // The process ended, and its stream with it, before this
                    // connection came (a quick `docker exec c hostname`): no
                    // input can reach it any more, and its output and exit
                    // wait on the stream connection.
                    Err(Error::Guest(e)) if e.kind == burrow_proto::ErrorKind::NotFound => None,
                    Err(e) => return Err(e),
                }
            }
            None => None,
        };
        let (rd, wr) = conn.stream.into_split();
        Ok(GuestStream {
            pid,
            input,
            reader: GuestStreamReader {
                rd: tokio::io::BufReader::with_capacity(256 << 10, rd),
                client: self.clone(),
            },
            writer: GuestStreamWriter {
                wr,
                client: self.clone(),
            },
        })
    }

    async fn start_stream(
        &self,
        conn: &mut GuestConn,
        open: StreamOpen,
    ) -> Result<(Option<i32>, Option<u64>)> {
        match tokio::time::timeout(CONNECT_TIMEOUT, conn.call(Op::Stream(open)))
            .await
            .map_err(|_| self.unreachable("opening the stream timed out"))??
        {
            Reply::StreamStarted { pid, input } => Ok((pid, input)),
            r => Err(Error::Vmm(format!("agent answered a stream with {r:?}"))),
        }
    }

    /// One request on a fresh connection. `timeout` bounds the whole call; None
    /// waits as long as the guest takes (an exec without a timeout).
    pub async fn call(&self, op: Op, timeout: Option<Duration>) -> Result<Reply> {
        let fut = async {
            let mut conn = self.connect().await?;
            conn.call(op).await
        };
        match timeout {
            Some(t) => tokio::time::timeout(t, fut)
                .await
                .map_err(|_| self.unreachable("request timed out"))?,
            None => fut.await,
        }
    }
}

pub struct GuestConn {
    stream: UnixStream,
    next_id: u64,
    client: GuestClient,
}

impl GuestConn {
    pub async fn call(&mut self, op: Op) -> Result<Reply> {
        let id = self.next_id;
        self.next_id += 1;
        write_message(&mut self.stream, &Request { id, op })
            .await
            .map_err(|e| match e {
                FrameError::TooLarge { len, max } => Error::invalid(
                    "request",
                    format!("{len} bytes exceeds the {max}-byte message limit"),
                ),
                e => self.client.unreachable(e),
            })?;
        loop {
            let resp: Response = match read_message(&mut self.stream).await {
                Ok(r) => r,
                Err(e) => return Err(self.client.unreachable(format!("reading reply: {e}"))),
            };
            // id 0 answers a frame the agent could not read: ours, since we send one
            // request at a time.
            if resp.id != id && resp.id != 0 {
                continue;
            }
            let r: std::result::Result<Reply, burrow_proto::AgentError> = resp.outcome.into();
            return r.map_err(Error::Guest);
        }
    }
}

/// A stream's two halves, each usable from its own task.
pub struct GuestStream {
    /// The process started, when the stream started one.
    pub pid: Option<i32>,
    /// Where an exec's standard input goes, when it takes input; closing it is
    /// the end of input.
    pub input: Option<GuestStreamWriter>,
    pub reader: GuestStreamReader,
    pub writer: GuestStreamWriter,
}

pub struct GuestStreamReader {
    rd: tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
    client: GuestClient,
}

impl GuestStreamReader {
    /// The next frame from the guest. A connection that ends without a last event
    /// (the VM stopped, the agent died) is an error that names the workspace.
    pub async fn next(&mut self) -> Result<GuestFrame> {
        GuestFrame::read(&mut self.rd).await.map_err(|e| match e {
            FrameError::Closed => self
                .client
                .unreachable("the stream ended early (the VM stopped or its agent died)"),
            e => self.client.unreachable(format!("stream: {e}")),
        })
    }
}

pub struct GuestStreamWriter {
    wr: tokio::net::unix::OwnedWriteHalf,
    client: GuestClient,
}

impl GuestStreamWriter {
    pub async fn send(&mut self, frame: &HostFrame) -> Result<()> {
        frame
            .write(&mut self.wr)
            .await
            .map_err(|e| self.client.unreachable(format!("stream: {e}")))
    }
}

async fn read_line(s: &mut UnixStream) -> std::io::Result<String> {
    let mut out = Vec::new();
    loop {
        let mut b = [0u8; 1];
        if s.read(&mut b).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "guest closed the connection (agent not listening)",
            ));
        }
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
        out.push(b[0]);
        if out.len() > 64 {
            return Err(std::io::Error::other(
                "overlong answer from the vsock proxy",
            ));
        }
    }
}

/// Listens for the agent's ready announcement on the VM's host-port socket.
pub struct ReadyListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ReadyListener {
    pub fn bind(path: &Path) -> Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .map_err(|e| Error::io(format!("bind {}", path.display()), e))?;
        Ok(ReadyListener {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Resolves when the agent connects and says hello.
    pub async fn ready(&self) -> std::io::Result<HelloReply> {
        loop {
            let (mut s, _) = self.listener.accept().await?;
            if let Ok(Ok(hello)) = tokio::time::timeout(
                Duration::from_secs(5),
                read_message::<HelloReply, _>(&mut s),
            )
            .await
            {
                return Ok(hello);
            }
        }
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
