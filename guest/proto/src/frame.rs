//! Length-prefixed JSON frames.
//!
//! `[u32 big-endian length][length bytes of JSON]`. The cap protects both sides from a
//! peer that announces gigabytes: an oversized frame is read and thrown away, never
//! buffered, and the caller gets an error it can answer while the stream stays usable.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame either side accepts or sends.
pub const MAX_FRAME: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the stream between frames.
    #[error("connection closed")]
    Closed,
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// Whether the stream is still in step after this error, so that the next frame
    /// can be read. A closed or broken stream is not.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, FrameError::TooLarge { .. } | FrameError::Malformed(_))
    }
}

/// Reads a frame's 4-byte big-endian length; `Closed` at a clean end between
/// frames. Message and stream frames share it.
pub(crate) async fn read_len<R: AsyncRead + Unpin>(r: &mut R) -> Result<usize, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => Ok(u32::from_be_bytes(len) as usize),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Closed),
        Err(e) => Err(e.into()),
    }
}

/// Reads one frame's payload. An oversized frame is drained and reported.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let len = read_len(r).await?;
    if len > max {
        let drained = tokio::io::copy(&mut r.take(len as u64), &mut tokio::io::sink()).await?;
        if drained < len as u64 {
            return Err(FrameError::Closed);
        }
        return Err(FrameError::TooLarge { len, max });
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Closed,
        _ => FrameError::Io(e),
    })?;
    Ok(buf)
}

/// Reads and decodes one message.
pub async fn read_message<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<T, FrameError> {
    let buf = read_frame(r, MAX_FRAME).await?;
    Ok(serde_json::from_slice(&buf)?)
}

/// Encodes and writes one message. A message that would exceed [`MAX_FRAME`] is not
/// sent: the caller gets [`FrameError::TooLarge`] and the stream is untouched.
pub async fn write_message<T: Serialize, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max: MAX_FRAME,
        });
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Op, Request};

    fn raw(len: u32, body: &[u8]) -> Vec<u8> {
        let mut v = len.to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    #[tokio::test]
    async fn round_trip() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let req = Request {
            id: 7,
            op: Op::Ping,
        };
        write_message(&mut a, &req).await.unwrap();
        let got: Request = read_message(&mut b).await.unwrap();
        assert_eq!(got.id, 7);
        assert!(matches!(got.op, Op::Ping));
    }

    #[tokio::test]
    async fn oversized_frame_is_drained_and_stream_stays_in_step() {
        let mut input = raw(64, &[b'x'; 64]);
        input.extend(raw(2, b"{}"));
        let mut r = input.as_slice();
        let err = read_frame(&mut r, 16).await.unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len: 64, max: 16 }),
            "{err}"
        );
        assert!(err.is_recoverable());
        assert_eq!(read_frame(&mut r, 16).await.unwrap(), b"{}");
    }

    #[tokio::test]
    async fn truncated_oversized_frame_is_closed() {
        let input = raw(1000, &[0; 10]);
        let err = read_frame(&mut input.as_slice(), 16).await.unwrap_err();
        assert!(matches!(err, FrameError::Closed));
    }

    #[tokio::test]
    async fn malformed_json_is_recoverable() {
        let mut input = raw(5, b"{nope");
        input.extend(raw(22, br#"{"id":1,"op":"ping"}  "#));
        let mut r = input.as_slice();
        let err = read_message::<Request, _>(&mut r).await.unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)));
        assert!(err.is_recoverable());
        let next: Request = read_message(&mut r).await.unwrap();
        assert_eq!(next.id, 1);
    }

    #[tokio::test]
    async fn short_header_and_short_body_are_closed() {
        assert!(matches!(
            read_frame(&mut &[0u8, 0][..], 16).await,
            Err(FrameError::Closed)
        ));
        let input = raw(10, b"abc");
        assert!(matches!(
            read_frame(&mut input.as_slice(), 16).await,
            Err(FrameError::Closed)
        ));
    }

    #[tokio::test]
    async fn unknown_op_is_malformed() {
        let input = raw(22, br#"{"id":1,"op":"launch"}"#);
        let err = read_message::<Request, _>(&mut input.as_slice())
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");
    }

    #[tokio::test]
    async fn writer_refuses_oversized_message() {
        let (mut a, _b) = tokio::io::duplex(64);
        let data = vec![0u8; MAX_FRAME];
        let req = Request {
            id: 1,
            op: Op::FileWrite(crate::FileWrite {
                path: "/x".into(),
                data,
                mode: None,
                append: false,
            }),
        };
        assert!(matches!(
            write_message(&mut a, &req).await,
            Err(FrameError::TooLarge { .. })
        ));
    }

    /// Random streams, some with plausible length prefixes and JSON fragments: the
    /// reader never panics, never buffers past the cap, and always reaches the end.
    #[tokio::test]
    async fn random_streams_never_panic() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let pieces: [&[u8]; 6] = [
            br#"{"id":1,"op":"ping"}"#,
            br#"{"id":"#,
            b"\xff\xfe",
            br#""op":"exec","argv":[1]"#,
            b"{}",
            br#"{"id":2,"op":"file_read","path":"/x","offset":-1}"#,
        ];
        for _ in 0..500 {
            let mut stream = Vec::new();
            for _ in 0..(next() % 8) {
                let body: Vec<u8> = match next() % 3 {
                    0 => pieces[(next() % 6) as usize].to_vec(),
                    1 => (0..next() % 64).map(|_| next() as u8).collect(),
                    _ => Vec::new(),
                };
                let len = if next() % 5 == 0 {
                    (next() % (2 * MAX_FRAME as u64)) as u32
                } else {
                    body.len() as u32
                };
                stream.extend_from_slice(&len.to_be_bytes());
                stream.extend_from_slice(&body);
            }
            let mut r = stream.as_slice();
            let mut frames = 0;
            loop {
                match read_message::<Request, _>(&mut r).await {
                    Ok(_) => {}
                    Err(e) if e.is_recoverable() => {}
                    Err(_) => break,
                }
                frames += 1;
                assert!(frames <= 8, "the reader did not advance");
            }
        }
    }
}
