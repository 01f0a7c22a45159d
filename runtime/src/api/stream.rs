//! Streams over the API: a WebSocket per stream, which a web page, `websocat` or any
//! language's WebSocket library can speak.
//!
//! `GET /v1/workspaces/{ws}/stream` upgrades to a WebSocket. The client's first
//! message is a text message holding a [`StreamOpen`] (the same JSON as the guest
//! protocol's: `{"stream":"exec","argv":["sh"],"tty":{"rows":24,"cols":80},"stdin":true}`).
//! The server answers `{"type":"started","pid":N}` or `{"type":"error",...}`, then:
//!
//! - client → server: binary messages are standard input bytes; text messages are
//!   [`StreamControl`] JSON (`close_stdin`, `resize`, `signal`).
//! - server → client: binary messages are `[kind][bytes]`, kind 1 = stdout, 2 =
//!   stderr, 3 = a recording chunk (`[3][u64 offset][u64 µs][bytes]`, big-endian);
//!   text messages are [`ServerEvent`] JSON. `exit`, `caught_up`, `dropped` and
//!   `error` are last: the server closes the socket after them.
//!
//! Flow control is the socket's: the server reads the guest only as fast as the
//! client takes its messages, and reads the client only as fast as the guest takes
//! its input. A client that goes away ends the stream (an exec is killed; jobs and
//! terminals live on).

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use burrow_proto::stream::split_record;
use burrow_proto::{ExitInfo, GuestFrame, HostFrame, StreamControl, StreamEvent, StreamOpen};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;
use tokio_tungstenite::tungstenite::protocol::{Message as WsMessage, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use super::client::{seg, Client, ClientError};
use super::server::{AppState, Path};
use crate::engine::{validate_control, Engine};
use crate::error::ErrorClass;

/// Kind byte of a binary message from the server.
pub const KIND_STDOUT: u8 = 1;
pub const KIND_STDERR: u8 = 2;
pub const KIND_RECORD: u8 = 3;

/// Largest message a client may send (input comes in chunks far smaller).
const MAX_CLIENT_MESSAGE: usize = 1 << 20;

/// A text message from the server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerEvent {
    /// The stream is open; `pid` is the process's when one was started.
    Started {
        #[serde(default)]
        pid: Option<i32>,
    },
    Exit(ExitInfo),
    CaughtUp,
    Gap {
        bytes: u64,
    },
    Resize {
        rows: u16,
        cols: u16,
        t_us: u64,
    },
    Dropped {
        reason: String,
    },
    /// The stream could not open or broke; `class` as in error answers.
    Error {
        message: String,
        #[serde(default)]
        class: Option<ErrorClass>,
    },
}

impl ServerEvent {
    /// Whether the server closes the stream after this event.
    pub fn is_last(&self) -> bool {
        !matches!(
            self,
            ServerEvent::Started { .. } | ServerEvent::Gap { .. } | ServerEvent::Resize { .. }
        )
    }

    fn from_guest(e: StreamEvent) -> Self {
        match e {
            StreamEvent::Exit(x) => ServerEvent::Exit(x),
            StreamEvent::CaughtUp => ServerEvent::CaughtUp,
            StreamEvent::Gap { bytes } => ServerEvent::Gap { bytes },
            StreamEvent::Resize { rows, cols, t_us } => ServerEvent::Resize { rows, cols, t_us },
            StreamEvent::Dropped { reason } => ServerEvent::Dropped { reason },
            StreamEvent::Error { message } => ServerEvent::Error {
                message,
                class: None,
            },
        }
    }

    fn error(e: &crate::error::Error) -> Self {
        ServerEvent::Error {
            message: e.to_string(),
            class: Some(e.class()),
        }
    }
}

fn text(e: &ServerEvent) -> Message {
    Message::Text(serde_json::to_string(e).unwrap_or_default().into())
}

/// `GET /v1/workspaces/{ws}/stream`.
pub async fn stream_route(
    State(s): State<AppState>,
    Path(ws): Path<String>,
    upgrade: WebSocketUpgrade,
) -> Response {
    upgrade
        .max_message_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| relay(s.engine, ws, socket))
}

async fn relay(engine: Arc<Engine>, ws: String, socket: WebSocket) {
    let (mut tx, mut rx) = socket.split();
    let open = match rx.next().await {
        Some(Ok(Message::Text(t))) => serde_json::from_str::<StreamOpen>(&t)
            .map_err(|e| crate::error::Error::invalid("stream", e.to_string())),
        Some(Ok(_)) => Err(crate::error::Error::invalid(
            "stream",
            "the first message must be a text message holding the stream request",
        )),
        _ => return,
    };
    let stream = match open {
        Ok(open) => engine.open_stream(&ws, open).await,
        Err(e) => Err(e),
    };
    let stream = match stream {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(text(&ServerEvent::error(&e))).await;
            let _ = tx.close().await;
            return;
        }
    };
    if tx
        .send(text(&ServerEvent::Started { pid: stream.pid }))
        .await
        .is_err()
    {
        return;
    }
    let crate::guest::GuestStream {
        mut reader,
        mut writer,
        mut input,
        ..
    } = stream;
    // Guest → client. Ends with the guest's last event, or an error line.
    let down = async {
        loop {
            let msg = match reader.next().await {
                Ok(GuestFrame::Stdout(d)) => binary(KIND_STDOUT, &[], &d),
                Ok(GuestFrame::Stderr(d)) => binary(KIND_STDERR, &[], &d),
                Ok(GuestFrame::Record { offset, t_us, data }) => {
                    let mut head = offset.to_be_bytes().to_vec();
                    head.extend_from_slice(&t_us.to_be_bytes());
                    binary(KIND_RECORD, &head, &data)
                }
                Ok(GuestFrame::Event(e)) => {
                    let e = ServerEvent::from_guest(e);
                    let last = e.is_last();
                    if tx.send(text(&e)).await.is_err() || last {
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    let _ = tx.send(text(&ServerEvent::error(&e))).await;
                    break;
                }
            };
            if tx.send(msg).await.is_err() {
                break;
            }
        }
        let _ = tx.close().await;
    };
    // Client → guest. Ends when the client goes away.
    let up = async {
        while let Some(Ok(msg)) = rx.next().await {
            let frame = match msg {
                Message::Binary(b) => HostFrame::Stdin(b.to_vec()),
                Message::Text(t) => match serde_json::from_str::<StreamControl>(&t) {
                    Ok(c) if validate_control(&c).is_ok() => HostFrame::Control(c),
                    // A bad control message changes nothing; the stream goes on.
                    _ => continue,
                },
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            let sent = match (&frame, &mut input) {
                // Input takes its own connection when the exec has one.
                (HostFrame::Stdin(_), Some(w)) => w.send(&frame).await,
                (HostFrame::Control(StreamControl::CloseStdin), Some(w)) => {
                    // The input connection says so before it closes (a durable
                    // stream's input ends only then: a connection that breaks
                    // may be burrowd's end); the stream connection says so too
                    // (a terminal's EOF character).
                    let _ = w.send(&frame).await;
                    input = None;
                    writer.send(&frame).await
                }
                _ => writer.send(&frame).await,
            };
            if sent.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        _ = down => {}
        _ = up => {}
    }
}

fn binary(kind: u8, head: &[u8], data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(1 + head.len() + data.len());
    v.push(kind);
    v.extend_from_slice(head);
    v.extend_from_slice(data);
    Message::Binary(v.into())
}

/// What a client receives.
#[derive(Debug)]
pub enum StreamMessage {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Record {
        offset: u64,
        t_us: u64,
        data: Vec<u8>,
    },
    Event(ServerEvent),
}

/// The client end of a stream.
pub struct ClientStream {
    /// The process started, when the stream started one.
    pub pid: Option<i32>,
    pub sender: StreamSender,
    pub receiver: StreamReceiver,
}

pub struct StreamSender {
    sink: futures_util::stream::SplitSink<WebSocketStream<UnixStream>, WsMessage>,
}

pub struct StreamReceiver {
    source: futures_util::stream::SplitStream<WebSocketStream<UnixStream>>,
}

impl Client {
    /// Opens a stream in workspace `ws`; the daemon's refusal (unknown workspace,
    /// job or session, bad request) is the error.
    pub async fn open_stream(
        &self,
        ws: &str,
        open: &StreamOpen,
    ) -> Result<ClientStream, ClientError> {
        let transport = |e: &dyn std::fmt::Display| ClientError::Transport(e.to_string());
        let sock =
            UnixStream::connect(self.socket())
                .await
                .map_err(|source| match source.kind() {
                    std::io::ErrorKind::PermissionDenied => ClientError::Forbidden {
                        path: self.socket().to_path_buf(),
                    },
                    _ => ClientError::NotRunning {
                        path: self.socket().to_path_buf(),
                        source,
                    },
                })?;
        let url = format!("ws://burrowd/v1/workspaces/{}/stream", seg(ws));
        let mut config = WebSocketConfig::default();
        config.max_message_size = Some(1 << 20);
        let (socket, _) = tokio_tungstenite::client_async_with_config(url, sock, Some(config))
            .await
            .map_err(|e| transport(&e))?;
        let (mut sink, source) = socket.split();
        let open = serde_json::to_string(open).map_err(|e| transport(&e))?;
        sink.send(WsMessage::Text(open.into()))
            .await
            .map_err(|e| transport(&e))?;
        let mut receiver = StreamReceiver { source };
        match receiver.next().await? {
            Some(StreamMessage::Event(ServerEvent::Started { pid })) => Ok(ClientStream {
                pid,
                sender: StreamSender { sink },
                receiver,
            }),
            Some(StreamMessage::Event(ServerEvent::Error { message, class })) => {
                Err(ClientError::Api {
                    status: class.map(status_of).unwrap_or(500),
                    message,
                })
            }
            other => Err(ClientError::Transport(format!(
                "the stream did not start: {other:?}"
            ))),
        }
    }
}

fn status_of(class: ErrorClass) -> u16 {
    match class {
        ErrorClass::NotFound => 404,
        ErrorClass::Conflict => 409,
        ErrorClass::Invalid => 400,
        ErrorClass::Unavailable => 503,
        ErrorClass::Forbidden => 403,
        ErrorClass::Internal => 500,
    }
}

impl StreamSender {
    pub async fn stdin(&mut self, data: Vec<u8>) -> Result<(), ClientError> {
        self.sink
            .send(WsMessage::Binary(data.into()))
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))
    }

    pub async fn control(&mut self, c: &StreamControl) -> Result<(), ClientError> {
        let t = serde_json::to_string(c).map_err(|e| ClientError::Transport(e.to_string()))?;
        self.sink
            .send(WsMessage::Text(t.into()))
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))
    }

    /// Ends the stream from this side.
    pub async fn close(&mut self) {
        let _ = self.sink.close().await;
    }

    /// Sends what `rx` carries up the stream, in order, until `rx` closes or
    /// the stream breaks: a relay's input and controls from several tasks.
    pub async fn pump(mut self, mut rx: tokio::sync::mpsc::Receiver<Up>) {
        self.pump_kept(&mut rx, &mut None).await
    }

    /// As [`StreamSender::pump`], keeping in `pending` what is being sent until
    /// it is sent: what a stream that broke (or a pump that was dropped) did not
    /// send is there for the next stream of the same process.
    pub async fn pump_kept(
        &mut self,
        rx: &mut tokio::sync::mpsc::Receiver<Up>,
        pending: &mut Option<Up>,
    ) {
        loop {
            if pending.is_none() {
                *pending = rx.recv().await;
            }
            let sent = match &*pending {
                None => return,
                Some(Up::Data(d)) => self.stdin(d.clone()).await,
                Some(Up::Eof) => self.control(&StreamControl::CloseStdin).await,
                Some(Up::Control(c)) => self.control(c).await,
            };
            if sent.is_err() {
                return;
            }
            *pending = None;
        }
    }
}

/// What a relay sends up a process's stream: input, its end, a control (a
/// window size, a signal).
#[derive(Debug)]
pub enum Up {
    Data(Vec<u8>),
    Eof,
    Control(StreamControl),
}

impl StreamReceiver {
    /// The next message; `None` once the server closed the stream.
    pub async fn next(&mut self) -> Result<Option<StreamMessage>, ClientError> {
        loop {
            let msg = match self.source.next().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(ClientError::Transport(e.to_string())),
                Some(Ok(m)) => m,
            };
            return Ok(Some(match msg {
                WsMessage::Binary(b) => {
                    let malformed =
                        || ClientError::Transport("malformed binary message on the stream".into());
                    match b.split_first() {
                        Some((&KIND_STDOUT, d)) => StreamMessage::Stdout(d.to_vec()),
                        Some((&KIND_STDERR, d)) => StreamMessage::Stderr(d.to_vec()),
                        Some((&KIND_RECORD, d)) => {
                            let (offset, t_us, data) = split_record(d).ok_or_else(malformed)?;
                            StreamMessage::Record {
                                offset,
                                t_us,
                                data: data.to_vec(),
                            }
                        }
                        _ => return Err(malformed()),
                    }
                }
                WsMessage::Text(t) => StreamMessage::Event(
                    serde_json::from_str(&t)
                        .map_err(|e| ClientError::Transport(format!("bad stream event: {e}")))?,
                ),
                WsMessage::Close(_) => return Ok(None),
                _ => continue,
            }));
        }
    }
}
