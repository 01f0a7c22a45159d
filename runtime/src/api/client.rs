//! A client of burrowd's API over its Unix socket: one typed method per route,
//! plus what every front door needs on top of them (chunked file reads and
//! writes, building an image that is missing). [`super::connect`] finds or
//! starts the daemon this client talks to.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use super::types::*;
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
    /// An image build ended in an error (the daemon's line) or without a result.
    #[error("{0}")]
    ImageBuild(String),
    /// Reading what a file write sends.
    #[error("read input: {0}")]
    Input(std::io::Error),
    /// Writing what a file read received.
    #[error("write output: {0}")]
    Output(std::io::Error),
    #[error("talking to the daemon: {0}")]
    Transport(String),
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

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
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
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
    ) -> Result<T> {
        let body = match body {
            Some(b) => {
                Some(serde_json::to_vec(b).map_err(|e| ClientError::Transport(e.to_string()))?)
            }
            None => None,
        };
        let bytes = self.bytes(method, path, body).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Transport(format!("bad answer: {e}")))
    }

    /// One request; the answer's body as bytes, or the daemon's error.
    async fn bytes(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Bytes> {
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
        Ok(bytes)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::GET, path, None::<&()>).await
    }

    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// A request whose answer is a stream of text lines, handed to `on_line` as
    /// they arrive.
    pub async fn stream_lines(
        &self,
        method: Method,
        path: &str,
        mut on_line: impl FnMut(&str),
    ) -> Result<()> {
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

/// The routes, one method each (docs/api.md says what each does).
impl Client {
    async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::DELETE, path, None::<&()>).await
    }

    /// A POST whose route takes no body.
    async fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::POST, path, None::<&()>).await
    }

    pub async fn daemon_status(&self) -> Result<DaemonStatus> {
        self.get("/v1/daemon").await
    }

    /// Asks the daemon to stop; it answers first. Running VMs keep running.
    pub async fn daemon_shutdown(&self) -> Result<Stopping> {
        self.post_empty("/v1/daemon/shutdown").await
    }

    pub async fn images(&self) -> Result<Vec<ImageInfo>> {
        self.get("/v1/images").await
    }

    /// Builds image `name` (and the guest kernel and initramfs if missing),
    /// handing each progress line to `on_progress` as it arrives. Ends with the
    /// build's own error if it fails.
    pub async fn build_image(
        &self,
        name: &str,
        q: &BuildQuery,
        mut on_progress: impl FnMut(&str),
    ) -> Result<()> {
        let path = format!("/v1/images/{}/build?{}", seg(name), query(q)?);
        let mut last = String::new();
        self.stream_lines(Method::POST, &path, |line| {
            if line != BUILD_OK && !line.starts_with(BUILD_ERROR) {
                on_progress(line);
            }
            last = line.to_string();
        })
        .await?;
        match last.strip_prefix(BUILD_ERROR) {
            Some(e) => Err(ClientError::ImageBuild(e.to_string())),
            None if last == BUILD_OK => Ok(()),
            None => Err(ClientError::ImageBuild(
                "the image build ended without a result".into(),
            )),
        }
    }

    /// Builds image `name` unless it is built already; true when it built it.
    /// `on_progress` sees the build's progress lines, so a caller can say why
    /// it waits before the first one.
    pub async fn ensure_image(&self, name: &str, on_progress: impl FnMut(&str)) -> Result<bool> {
        if self.images().await?.iter().any(|i| i.name == name) {
            return Ok(false);
        }
        self.build_image(name, &BuildQuery { force: false }, on_progress)
            .await?;
        Ok(true)
    }

    pub async fn list(&self, q: &ListQuery) -> Result<Vec<WorkspaceInfo>> {
        let q = query(q)?;
        if q.is_empty() {
            self.get("/v1/workspaces").await
        } else {
            self.get(&format!("/v1/workspaces?{q}")).await
        }
    }

    /// Creates a workspace; answers once its agent is ready.
    pub async fn create(&self, p: &CreateParams) -> Result<WorkspaceInfo> {
        self.post("/v1/workspaces", p).await
    }

    /// Boots a VM for an OCI container; answers once its agent is ready.
    pub async fn container_vm_create(&self, r: &ContainerVmRequest) -> Result<WorkspaceInfo> {
        self.post("/v1/containers", r).await
    }

    /// The container VM burrowd made for OCI id `id` under `root`, if any (a
    /// caller that died before it recorded burrowd's answer finds it here).
    pub async fn container_vm(&self, root: &str, id: &str) -> Result<Option<String>> {
        Ok(self
            .list(&ListQuery::default())
            .await?
            .into_iter()
            .find(|w| {
                w.container
                    .as_ref()
                    .is_some_and(|c| c.id == id && c.root == root)
            })
            .map(|w| w.id))
    }

    /// Shares a container's files with running container VM `ws` (a pod's member).
    pub async fn container_share(
        &self,
        ws: &str,
        r: &ContainerVmRequest,
    ) -> Result<ContainerShared> {
        self.post(&ws_path(ws, "/containers/share"), r).await
    }

    /// Takes a container added with [`Client::container_share`] out of VM `ws`.
    pub async fn container_unshare(&self, ws: &str, id: &str) -> Result<Deleted> {
        self.delete(&ws_path(ws, &format!("/containers/share/{}", seg(id))))
            .await
    }

    /// A request on a container inside VM `ws`.
    pub async fn container_op(&self, ws: &str, op: &ContainerOp) -> Result<ContainerAnswer> {
        self.post(&ws_path(ws, "/containers"), op).await
    }

    pub async fn info(&self, ws: &str) -> Result<WorkspaceInfo> {
        self.get(&ws_path(ws, "")).await
    }

    pub async fn destroy(&self, ws: &str) -> Result<Destroyed> {
        self.delete(&ws_path(ws, "")).await
    }

    pub async fn start(&self, ws: &str, r: &StartRequest) -> Result<WorkspaceInfo> {
        self.post(&ws_path(ws, "/start"), r).await
    }

    pub async fn stop(&self, ws: &str) -> Result<WorkspaceInfo> {
        self.post_empty(&ws_path(ws, "/stop")).await
    }

    /// Runs a command to its end; its output comes back whole (capped).
    pub async fn exec(&self, ws: &str, r: &Exec) -> Result<ExecResult> {
        self.post(&ws_path(ws, "/exec"), r).await
    }

    pub async fn job_start(&self, ws: &str, r: &JobStart) -> Result<JobStarted> {
        self.post(&ws_path(ws, "/jobs"), r).await
    }

    /// `job` as the user gave it: the daemon says when it is not a job id.
    pub async fn job_poll(&self, ws: &str, job: &str) -> Result<JobStatus> {
        self.get(&ws_path(ws, &format!("/jobs/{}", seg(job)))).await
    }

    pub async fn job_kill(&self, ws: &str, job: &str, r: &JobKillRequest) -> Result<Killed> {
        self.post(&ws_path(ws, &format!("/jobs/{}/kill", seg(job))), r)
            .await
    }

    /// Every job the agent keeps, without output.
    pub async fn job_list(&self, ws: &str) -> Result<Vec<burrow_proto::JobInfo>> {
        self.get(&ws_path(ws, "/jobs")).await
    }

    /// Waits, as long as it takes, for a job to end.
    pub async fn job_wait(&self, ws: &str, job: &str) -> Result<JobStatus> {
        self.post_empty(&ws_path(ws, &format!("/jobs/{}/wait", seg(job))))
            .await
    }

    pub async fn terminal_new(
        &self,
        ws: &str,
        r: &burrow_proto::TerminalNew,
    ) -> Result<burrow_proto::TerminalInfo> {
        self.post(&ws_path(ws, "/terminals"), r).await
    }

    pub async fn terminal_list(&self, ws: &str) -> Result<Vec<burrow_proto::TerminalInfo>> {
        self.get(&ws_path(ws, "/terminals")).await
    }

    pub async fn terminal_kill(&self, ws: &str, name: &str) -> Result<TerminalKilled> {
        self.delete(&ws_path(ws, &format!("/terminals/{}", seg(name))))
            .await
    }

    /// A session's recording, an asciicast v2 file.
    pub async fn terminal_recording(&self, ws: &str, name: &str) -> Result<Vec<u8>> {
        let path = ws_path(ws, &format!("/terminals/{}/recording", seg(name)));
        Ok(self.bytes(Method::GET, &path, None).await?.to_vec())
    }

    /// The log's tail, then each new line as it is written, to `on_line`, until
    /// the workspace stops.
    pub async fn logs_follow(
        &self,
        ws: &str,
        q: &LogsQuery,
        on_line: impl FnMut(&str),
    ) -> Result<()> {
        let path = ws_path(ws, &format!("/logs/follow?{}", query(q)?));
        self.stream_lines(Method::GET, &path, on_line).await
    }

    pub async fn set_env(&self, ws: &str, r: &EnvRequest) -> Result<EnvUpdated> {
        self.post(&ws_path(ws, "/env"), r).await
    }

    /// One chunk of a file (at most [`burrow_proto::MAX_FILE_CHUNK`] bytes);
    /// [`Client::read_file`] reads any length.
    pub async fn file_read(&self, ws: &str, r: &FileRead) -> Result<FileData> {
        self.post(&ws_path(ws, "/files/read"), r).await
    }

    /// One chunk of a file; [`Client::write_file`] writes any length.
    pub async fn file_write(&self, ws: &str, r: &FileWrite) -> Result<Written> {
        self.post(&ws_path(ws, "/files/write"), r).await
    }

    pub async fn file_edit(&self, ws: &str, r: &FileEdit) -> Result<Edited> {
        self.post(&ws_path(ws, "/files/edit"), r).await
    }

    pub async fn file_list(&self, ws: &str, r: &FileListRequest) -> Result<Entries> {
        self.post(&ws_path(ws, "/files/list"), r).await
    }

    pub async fn logs(&self, ws: &str, q: &LogsQuery) -> Result<LogLines> {
        self.get(&ws_path(ws, &format!("/logs?{}", query(q)?)))
            .await
    }

    pub async fn snapshot_create(&self, ws: &str, r: &SnapshotRequest) -> Result<SnapshotInfo> {
        self.post(&ws_path(ws, "/snapshots"), r).await
    }

    pub async fn snapshot_list(&self, ws: &str) -> Result<Vec<SnapshotInfo>> {
        self.get(&ws_path(ws, "/snapshots")).await
    }

    pub async fn snapshot_restore(&self, ws: &str, name: &str) -> Result<WorkspaceInfo> {
        self.post_empty(&ws_path(ws, &format!("/snapshots/{}/restore", seg(name))))
            .await
    }

    pub async fn snapshot_delete(&self, ws: &str, name: &str) -> Result<Deleted> {
        self.delete(&ws_path(ws, &format!("/snapshots/{}", seg(name))))
            .await
    }

    pub async fn fork(&self, ws: &str, p: &ForkParams) -> Result<Vec<WorkspaceInfo>> {
        self.post(&ws_path(ws, "/fork"), p).await
    }

    pub async fn diff(&self, ws: &str, snapshot: &str) -> Result<Diff> {
        self.get(&ws_path(ws, &format!("/diff/{}", seg(snapshot))))
            .await
    }

    pub async fn network_policy(&self, ws: &str) -> Result<Policy> {
        self.get(&ws_path(ws, "/network-policy")).await
    }

    /// Changes the fields `change` names; answers with the policy in effect.
    pub async fn set_network_policy(&self, ws: &str, change: &PolicyChange) -> Result<Policy> {
        self.post(&ws_path(ws, "/network-policy"), change).await
    }

    pub async fn port_forwards(&self, ws: &str) -> Result<Vec<Forward>> {
        self.get(&ws_path(ws, "/port-forwards")).await
    }

    pub async fn port_forward_add(&self, ws: &str, p: &ForwardParams) -> Result<Forward> {
        self.post(&ws_path(ws, "/port-forwards"), p).await
    }

    pub async fn port_forward_rm(&self, ws: &str, guest_port: u16) -> Result<Removed> {
        self.delete(&ws_path(ws, &format!("/port-forwards/{guest_port}")))
            .await
    }

    /// Creates the team and its members; answers once every member runs.
    pub async fn team_create(&self, p: &TeamParams) -> Result<Vec<TeamMember>> {
        self.post("/v1/teams", p).await
    }

    pub async fn team_status(&self, name: &str) -> Result<Vec<TeamMember>> {
        self.get(&format!("/v1/teams/{}", seg(name))).await
    }

    pub async fn team_destroy(&self, name: &str) -> Result<Destroyed> {
        self.delete(&format!("/v1/teams/{}", seg(name))).await
    }
}

/// Files of any length, in chunks the API takes.
impl Client {
    /// Copies file `path` of `ws` from `offset` (at most `limit` bytes, else to
    /// its end) to `out`, a chunk at a time; returns the bytes copied.
    pub async fn read_file(
        &self,
        ws: &str,
        path: &str,
        offset: u64,
        limit: Option<u64>,
        out: &mut (impl AsyncWrite + Unpin),
    ) -> Result<u64> {
        let mut offset = offset;
        let mut left = limit;
        let mut copied = 0u64;
        loop {
            let chunk = left.map_or(MAX_CHUNK, |l| l.min(MAX_CHUNK));
            let req = FileRead {
                path: path.to_string(),
                offset,
                limit: Some(chunk),
            };
            let d = self.file_read(ws, &req).await?;
            out.write_all(&d.data).await.map_err(ClientError::Output)?;
            let n = d.data.len() as u64;
            offset += n;
            copied += n;
            if let Some(l) = left.as_mut() {
                *l -= n.min(*l);
            }
            if d.eof || n == 0 || left == Some(0) {
                break;
            }
        }
        out.flush().await.map_err(ClientError::Output)?;
        Ok(copied)
    }

    /// Writes all of `input` to file `path` of `ws` (parents created, `mode`
    /// if given), a chunk at a time: the first truncates the file, the rest
    /// append, so memory stays one chunk whatever the length. Empty input makes
    /// an empty file. Returns the bytes written.
    pub async fn write_file(
        &self,
        ws: &str,
        path: &str,
        mode: Option<u32>,
        input: &mut (impl AsyncRead + Unpin),
    ) -> Result<u64> {
        let mut written = 0u64;
        let mut append = false;
        loop {
            let mut data = Vec::new();
            (&mut *input)
                .take(MAX_CHUNK)
                .read_to_end(&mut data)
                .await
                .map_err(ClientError::Input)?;
            let last = (data.len() as u64) < MAX_CHUNK;
            // Input that ends on a chunk's edge has nothing left to append.
            if append && data.is_empty() {
                break;
            }
            let req = FileWrite {
                path: path.to_string(),
                data,
                mode,
                append,
            };
            written += self.file_write(ws, &req).await?.bytes;
            append = true;
            if last {
                break;
            }
        }
        Ok(written)
    }
}

const MAX_CHUNK: u64 = burrow_proto::MAX_FILE_CHUNK as u64;

fn ws_path(ws: &str, rest: &str) -> String {
    format!("/v1/workspaces/{}{rest}", seg(ws))
}

/// A query string from one of the query types (the server reads it back with
/// the same type).
fn query(q: &impl Serialize) -> Result<String> {
    serde_urlencoded::to_string(q).map_err(|e| ClientError::Transport(format!("query: {e}")))
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
