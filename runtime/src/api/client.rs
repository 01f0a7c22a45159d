//! A client of burrowd's API over its Unix socket.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use super::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing serves the socket: the daemon is not running.
    #[error("no daemon at {path}: {source}")]
    NotRunning {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The socket is there but closed to this user.
    #[error("permission denied: {path}: burrowd serves root and the members of its --group only")]
    Forbidden { path: PathBuf },
    /// The daemon answered with an error.
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("talking to the daemon: {0}")]
    Transport(String),
}

#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| match source.kind() {
                    std::io::ErrorKind::PermissionDenied => ClientError::Forbidden {
                        path: self.socket.clone(),
                    },
                    _ => ClientError::NotRunning {
                        path: self.socket.clone(),
                        source,
                    },
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://burrowd{path}"))
            .header("host", "burrowd");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))
    }

    /// One JSON request, one JSON answer.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = match body {
            Some(b) => {
                Some(serde_json::to_vec(b).map_err(|e| ClientError::Transport(e.to_string()))?)
            }
            None => None,
        };
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Transport(format!("bad answer: {e}")))
    }

    /// A GET whose answer is raw bytes (a file), not JSON.
    pub async fn get_bytes(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        let resp = self.send(Method::GET, path, None).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        Ok(bytes.to_vec())
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// A request whose answer is a stream of text lines, handed to `on_line` as
    /// they arrive.
    pub async fn stream_lines(
        &self,
        method: Method,
        path: &str,
        mut on_line: impl FnMut(&str),
    ) -> Result<(), ClientError> {
        let resp = self.send(method, path, None).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map_err(|e| ClientError::Transport(e.to_string()))?
                .to_bytes();
            return Err(api_error(status, &bytes));
        }
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Transport(e.to_string()))?;
            if let Some(data) = frame.data_ref() {
                pending.extend_from_slice(data);
                while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=i).collect();
                    on_line(String::from_utf8_lossy(&line[..line.len() - 1]).as_ref());
                }
            }
        }
        if !pending.is_empty() {
            on_line(String::from_utf8_lossy(&pending).as_ref());
        }
        Ok(())
    }
}

fn api_error(status: StatusCode, bytes: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<ErrorBody>(bytes)
        .map(|b| b.error)
        .unwrap_or_else(|_| {
            format!(
                "daemon answered {status}: {}",
                String::from_utf8_lossy(bytes).trim()
            )
        });
    ClientError::Api {
        status: status.as_u16(),
        message,
    }
}

/// Percent-encodes one path segment (a workspace reference may hold '.').
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
