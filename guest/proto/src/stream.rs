//! Streams: a process's standard I/O or a terminal, live, on a connection of its own.
//!
//! A stream is opened on a fresh connection: the handshake, then one [`Request`]
//! whose op is [`Op::Stream`](crate::Op::Stream), answered by one [`Response`]
//! (`stream_started` or an error). From then on both sides send binary stream
//! frames until the stream ends:
//!
//! ```text
//! [u32 big-endian length][u8 kind][length - 1 bytes of payload]
//! ```
//!
//! Host to guest: [`HostFrame::Stdin`] (kind 0x01, raw bytes) and
//! [`HostFrame::Control`] (kind 0x02, JSON [`StreamControl`]). Guest to host:
//! [`GuestFrame::Stdout`] (0x11), [`GuestFrame::Stderr`] (0x12), [`GuestFrame::Record`]
//! (0x13: u64 offset, u64 microseconds, bytes; terminal recordings) and
//! [`GuestFrame::Event`] (0x14, JSON [`StreamEvent`]).
//!
//! Why a connection per stream rather than frames multiplexed on one: vsock gives
//! every connection its own credit-based flow control, so a reader that stops reading
//! stalls its own process only (the agent stops reading that process's pipe), never
//! another stream nor the control requests; and a stream's end is the connection's end,
//! which both sides notice without a protocol of their own. Connections are cheap: one
//! `CONNECT` line through the vsock proxy.
//!
//! An exec's standard input is the exception: it comes on a second connection
//! ([`StreamOpen::Input`]). vhost-device-vsock (0.3) stops sending a connection's
//! credit updates to the guest while the guest is not taking that connection's
//! host-to-guest data, so a connection saturated both ways (`cat` whose output the
//! host reads while it sends input) would hang. With input apart, the output
//! connection only ever carries small control frames towards the guest, which the
//! agent always reads at once.
//!
//! Data travels as raw bytes, not base64 JSON, so a stream costs one copy per hop.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::FrameError;
#[allow(unused_imports)] // for the docs
use crate::{Request, Response};

/// Most bytes of data one stream frame carries. Writers split larger writes.
pub const MAX_STREAM_CHUNK: usize = 128 << 10;

/// Largest stream frame (kind, record header and a full chunk); larger ones are a
/// protocol error that ends the stream.
pub const MAX_STREAM_FRAME: usize = MAX_STREAM_CHUNK + 64;

const KIND_STDIN: u8 = 0x01;
const KIND_CONTROL: u8 = 0x02;
const KIND_STDOUT: u8 = 0x11;
const KIND_STDERR: u8 = 0x12;
const KIND_RECORD: u8 = 0x13;
const KIND_EVENT: u8 = 0x14;

/// What a stream connection carries, chosen when it is opened.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "stream", rename_all = "snake_case")]
pub enum StreamOpen {
    /// Runs a process whose life is the connection's: its output arrives as it is
    /// written, its input as the host sends it, and when the connection drops its
    /// whole process group is killed.
    Exec(Spawn),
    /// A job's output: what is kept of it, then (with `follow`) live output until the
    /// job ends. Ends with an `exit` event, or `caught_up` when not following a job
    /// that still runs.
    JobOutput {
        job: String,
        #[serde(default)]
        follow: bool,
    },
    /// A viewer of a terminal session: the tail of its output (the screen), then
    /// live output; input frames go to the terminal unless `read_only`. An ended
    /// session sends its tail and its `exit` event.
    TerminalAttach {
        name: String,
        #[serde(default)]
        read_only: bool,
        /// The viewer's window; a writer's size becomes the terminal's.
        #[serde(default)]
        size: Option<WinSize>,
    },
    /// The standard input of an `Exec` stream opened with `stdin: true`, whose
    /// `stream_started` gave `token`: stdin frames until the host closes this
    /// connection, which is the end of input. Input has a connection of its own
    /// because an emulated vsock device may stop a connection's credit updates
    /// while the guest is not taking that connection's input (see the module
    /// docs): on one connection, a process that writes before it reads (`cat`)
    /// would stall the very output the host is waiting for.
    Input { token: u64 },
    /// The session's output with offsets and times, for a recording, starting at
    /// byte `from` of its output (a `gap` event says what was no longer kept). Not
    /// counted as a viewer; never dropped for reading slowly.
    TerminalRecord {
        name: String,
        #[serde(default)]
        from: u64,
    },
    /// Creates an OCI container; the stream is its process's standard I/O (see
    /// [`crate::container`]).
    ContainerCreate(crate::container::ContainerCreate),
    /// Runs another process in a running container (`runc exec`).
    ContainerExec(crate::container::ContainerExec),
    /// Takes up a durable container stream again.
    ContainerAttach(crate::container::ContainerAttach),
}

/// A process to run with live I/O.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Spawn {
    pub argv: Vec<String>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Run on a new pseudo-terminal of this size (stdout and stderr are then one
    /// stream); otherwise on pipes.
    #[serde(default)]
    pub tty: Option<WinSize>,
    /// Whether the host sends standard input; without it the process reads
    /// `/dev/null` (pipes) or nothing (terminal).
    #[serde(default)]
    pub stdin: bool,
    /// Kill the process group after this many milliseconds (`exit` says `timed_out`).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

impl WinSize {
    /// Sizes a terminal can have: 1..=1000 in each direction.
    pub fn validate(&self) -> Result<(), String> {
        for (field, v) in [("rows", self.rows), ("cols", self.cols)] {
            if !(1..=1000).contains(&v) {
                return Err(format!("{field}: {v} is not between 1 and 1000"));
            }
        }
        Ok(())
    }
}

/// Host-to-guest control of a stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamControl {
    /// End of standard input: the process reads end of file (on a terminal, the
    /// line discipline's EOF character is sent).
    CloseStdin,
    Resize(WinSize),
    /// A signal for the process group (on a terminal, its foreground group).
    Signal {
        signal: i32,
    },
}

/// How a process ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitInfo {
    /// The exit status; 128 + n when killed by signal n.
    pub exit_code: i32,
    #[serde(default)]
    pub signal: Option<i32>,
    #[serde(default)]
    pub timed_out: bool,
    /// A container's process: the kernel's OOM killer killed a process of its
    /// cgroup while it ran (told only when true).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub oom_killed: bool,
}

/// Guest-to-host events of a stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    /// The process ended and all of its output has been sent. Last frame.
    Exit(ExitInfo),
    /// Everything kept of a still-running job's output has been sent (`JobOutput`
    /// without `follow`). Last frame.
    CaughtUp,
    /// `bytes` of output were no longer kept and are missing here.
    Gap { bytes: u64 },
    /// The terminal was resized (recordings), `t_us` after the session started.
    Resize { rows: u16, cols: u16, t_us: u64 },
    /// This viewer is dropped (e.g. it read too slowly). Last frame.
    Dropped { reason: String },
    /// The stream failed. Last frame.
    Error { message: String },
}

impl StreamEvent {
    /// Whether the stream ends after this event.
    pub fn is_last(&self) -> bool {
        !matches!(self, StreamEvent::Gap { .. } | StreamEvent::Resize { .. })
    }
}

/// A frame from host to guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostFrame {
    Stdin(Vec<u8>),
    Control(StreamControl),
}

/// A frame from guest to host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestFrame {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Terminal output at byte `offset` of the session's output, `t_us`
    /// microseconds after the session started.
    Record {
        offset: u64,
        t_us: u64,
        data: Vec<u8>,
    },
    Event(StreamEvent),
}

async fn write_raw<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: u8,
    head: &[u8],
    body: &[u8],
) -> Result<(), FrameError> {
    let len = 1 + head.len() + body.len();
    if len > MAX_STREAM_FRAME {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_STREAM_FRAME,
        });
    }
    // One write per frame: under an emulated CPU a system call costs more than
    // copying the payload once.
    let mut buf = Vec::with_capacity(5 + head.len() + body.len());
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    buf.push(kind);
    buf.extend_from_slice(head);
    buf.extend_from_slice(body);
    w.write_all(&buf).await?;
    Ok(())
}

/// Reads one raw frame: its kind and payload. `Closed` at a clean end between frames.
async fn read_raw<R: AsyncRead + Unpin>(r: &mut R) -> Result<(u8, Vec<u8>), FrameError> {
    let len = crate::frame::read_len(r).await?;
    // A frame of the wrong size cannot be skipped safely in a byte stream whose
    // peer is not trusted: the stream ends.
    if len == 0 || len > MAX_STREAM_FRAME {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_STREAM_FRAME,
        });
    }
    let eof = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Closed,
        _ => FrameError::Io(e),
    };
    let mut kind = [0u8; 1];
    r.read_exact(&mut kind).await.map_err(eof)?;
    let mut buf = vec![0u8; len - 1];
    r.read_exact(&mut buf).await.map_err(eof)?;
    let kind = kind[0];
    Ok((kind, buf))
}

fn unknown_kind(kind: u8) -> FrameError {
    FrameError::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("unknown stream frame kind {kind:#04x}"),
    ))
}

/// Bytes before a recording chunk's data: its offset and time, big-endian.
pub const RECORD_HEADER: usize = 16;

/// A recording chunk's header and data: `(offset, t_us, data)`, or `None` when
/// it is shorter than its header.
pub fn split_record(b: &[u8]) -> Option<(u64, u64, &[u8])> {
    let offset = u64::from_be_bytes(b.get(..8)?.try_into().ok()?);
    let t_us = u64::from_be_bytes(b.get(8..RECORD_HEADER)?.try_into().ok()?);
    Some((offset, t_us, &b[RECORD_HEADER..]))
}

impl HostFrame {
    /// Writes the frame. Stdin data longer than [`MAX_STREAM_CHUNK`] is split.
    pub async fn write<W: AsyncWrite + Unpin>(&self, w: &mut W) -> Result<(), FrameError> {
        match self {
            HostFrame::Stdin(data) => {
                for chunk in data.chunks(MAX_STREAM_CHUNK) {
                    write_raw(w, KIND_STDIN, &[], chunk).await?;
                }
            }
            HostFrame::Control(c) => {
                write_raw(w, KIND_CONTROL, &[], &serde_json::to_vec(c)?).await?
            }
        }
        w.flush().await?;
        Ok(())
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<HostFrame, FrameError> {
        let (kind, body) = read_raw(r).await?;
        match kind {
            KIND_STDIN => Ok(HostFrame::Stdin(body)),
            KIND_CONTROL => Ok(HostFrame::Control(serde_json::from_slice(&body)?)),
            k => Err(unknown_kind(k)),
        }
    }
}

impl GuestFrame {
    /// Writes `data` as stdout (or stderr) frames, borrowed: a process's output
    /// goes from the read buffer to the frame with one copy.
    pub async fn write_output<W: AsyncWrite + Unpin>(
        w: &mut W,
        stderr: bool,
        data: &[u8],
    ) -> Result<(), FrameError> {
        let kind = if stderr { KIND_STDERR } else { KIND_STDOUT };
        for chunk in data.chunks(MAX_STREAM_CHUNK) {
            write_raw(w, kind, &[], chunk).await?;
        }
        w.flush().await?;
        Ok(())
    }

    /// Writes the frame. Data longer than [`MAX_STREAM_CHUNK`] is split.
    pub async fn write<W: AsyncWrite + Unpin>(&self, w: &mut W) -> Result<(), FrameError> {
        match self {
            GuestFrame::Stdout(d) => return GuestFrame::write_output(w, false, d).await,
            GuestFrame::Stderr(d) => return GuestFrame::write_output(w, true, d).await,
            GuestFrame::Record { offset, t_us, data } => {
                let mut at = *offset;
                for chunk in data.chunks(MAX_STREAM_CHUNK) {
                    let mut head = [0u8; 16];
                    head[..8].copy_from_slice(&at.to_be_bytes());
                    head[8..].copy_from_slice(&t_us.to_be_bytes());
                    write_raw(w, KIND_RECORD, &head, chunk).await?;
                    at += chunk.len() as u64;
                }
            }
            GuestFrame::Event(e) => write_raw(w, KIND_EVENT, &[], &serde_json::to_vec(e)?).await?,
        }
        w.flush().await?;
        Ok(())
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<GuestFrame, FrameError> {
        let (kind, mut body) = read_raw(r).await?;
        match kind {
            KIND_STDOUT => Ok(GuestFrame::Stdout(body)),
            KIND_STDERR => Ok(GuestFrame::Stderr(body)),
            KIND_RECORD => {
                let (offset, t_us, _) = split_record(&body).ok_or_else(|| {
                    FrameError::Io(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "record frame shorter than its header",
                    ))
                })?;
                let data = body.split_off(RECORD_HEADER);
                Ok(GuestFrame::Record { offset, t_us, data })
            }
            KIND_EVENT => Ok(GuestFrame::Event(serde_json::from_slice(&body)?)),
            k => Err(unknown_kind(k)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn host_frames_round_trip_and_split() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let big = vec![7u8; MAX_STREAM_CHUNK + 10];
        HostFrame::Stdin(big).write(&mut a).await.unwrap();
        HostFrame::Control(StreamControl::Resize(WinSize { rows: 24, cols: 80 }))
            .write(&mut a)
            .await
            .unwrap();
        HostFrame::Control(StreamControl::CloseStdin)
            .write(&mut a)
            .await
            .unwrap();
        drop(a);
        let f1 = HostFrame::read(&mut b).await.unwrap();
        assert!(matches!(f1, HostFrame::Stdin(ref d) if d.len() == MAX_STREAM_CHUNK));
        assert_eq!(
            HostFrame::read(&mut b).await.unwrap(),
            HostFrame::Stdin(vec![7; 10])
        );
        assert_eq!(
            HostFrame::read(&mut b).await.unwrap(),
            HostFrame::Control(StreamControl::Resize(WinSize { rows: 24, cols: 80 }))
        );
        assert_eq!(
            HostFrame::read(&mut b).await.unwrap(),
            HostFrame::Control(StreamControl::CloseStdin)
        );
        assert!(matches!(
            HostFrame::read(&mut b).await,
            Err(FrameError::Closed)
        ));
    }

    #[tokio::test]
    async fn guest_frames_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let frames = vec![
            GuestFrame::Stdout(b"out".to_vec()),
            GuestFrame::Stderr(b"err".to_vec()),
            GuestFrame::Record {
                offset: 5,
                t_us: 9,
                data: b"rec".to_vec(),
            },
            GuestFrame::Event(StreamEvent::Gap { bytes: 3 }),
            GuestFrame::Event(StreamEvent::Exit(ExitInfo {
                exit_code: 130,
                signal: Some(2),
                timed_out: false,
                oom_killed: false,
            })),
        ];
        for f in &frames {
            f.write(&mut a).await.unwrap();
        }
        for f in frames {
            assert_eq!(GuestFrame::read(&mut b).await.unwrap(), f);
        }
    }

    #[tokio::test]
    async fn record_frames_split_with_advancing_offsets() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let data = vec![1u8; MAX_STREAM_CHUNK + 1];
        GuestFrame::Record {
            offset: 100,
            t_us: 1,
            data,
        }
        .write(&mut a)
        .await
        .unwrap();
        let GuestFrame::Record { offset, .. } = GuestFrame::read(&mut b).await.unwrap() else {
            panic!("not a record")
        };
        assert_eq!(offset, 100);
        let GuestFrame::Record { offset, data, .. } = GuestFrame::read(&mut b).await.unwrap()
        else {
            panic!("not a record")
        };
        assert_eq!((offset, data.len()), (100 + MAX_STREAM_CHUNK as u64, 1));
    }

    #[tokio::test]
    async fn hostile_frames_end_the_stream_without_panicking() {
        for raw in [
            vec![0, 0, 0, 0],                   // empty frame
            vec![0xff, 0xff, 0xff, 0xff, 1],    // oversized
            vec![0, 0, 0, 2, 0x77, 0],          // unknown kind
            vec![0, 0, 0, 3, 0x13, 1, 2],       // short record header
            vec![0, 0, 0, 3, 0x02, b'{', b'x'], // bad control JSON
            vec![0, 0, 0, 9, 0x01, 1],          // truncated
        ] {
            let mut r = raw.as_slice();
            assert!(HostFrame::read(&mut r).await.is_err());
            let mut r = raw.as_slice();
            assert!(GuestFrame::read(&mut r).await.is_err());
        }
    }

    #[test]
    fn wire_shapes() {
        let open = StreamOpen::TerminalAttach {
            name: "main".into(),
            read_only: true,
            size: None,
        };
        assert_eq!(
            serde_json::to_string(&open).unwrap(),
            r#"{"stream":"terminal_attach","name":"main","read_only":true,"size":null}"#
        );
        assert_eq!(
            serde_json::to_string(&StreamControl::Signal { signal: 2 }).unwrap(),
            r#"{"type":"signal","signal":2}"#
        );
        assert_eq!(
            serde_json::to_string(&StreamControl::Resize(WinSize { rows: 2, cols: 3 })).unwrap(),
            r#"{"type":"resize","rows":2,"cols":3}"#
        );
        assert_eq!(
            serde_json::to_string(&StreamEvent::Exit(ExitInfo {
                exit_code: 3,
                signal: None,
                timed_out: false,
                oom_killed: false,
            }))
            .unwrap(),
            r#"{"type":"exit","exit_code":3,"signal":null,"timed_out":false}"#
        );
        assert!(WinSize { rows: 0, cols: 80 }.validate().is_err());
        assert!(WinSize {
            rows: 24,
            cols: 1001
        }
        .validate()
        .is_err());
        assert!(WinSize { rows: 24, cols: 80 }.validate().is_ok());
    }
}
