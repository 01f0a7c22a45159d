//! burrowd's HTTP/JSON API. Each handler parses, calls the engine, and answers.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use tokio::sync::mpsc;

use super::types::*;
use super::{ApiError, ErrorBody};
use crate::db::State as WsState;
use crate::engine::Engine;
use crate::error::{Error, ErrorClass};

/// Largest request body: a file-write chunk (4 MiB) in base64 plus its envelope.
const BODY_LIMIT: usize = 16 << 20;

#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub shutdown: mpsc::UnboundedSender<()>,
    pub cache_dir: String,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/daemon", get(daemon_status))
        .route("/v1/daemon/shutdown", post(daemon_shutdown))
        .route("/v1/images", get(images))
        .route("/v1/images/{name}/build", post(image_build))
        .route("/v1/workspaces", get(list).post(create))
        .route(
            "/v1/workspaces/{ws}/port-forwards",
            get(forward_ls).post(forward_add),
        )
        .route(
            "/v1/workspaces/{ws}/port-forwards/{port}",
            axum::routing::delete(forward_rm),
        )
        .route("/v1/containers", post(container_vm_create))
        .route("/v1/workspaces/{ws}/containers", post(container_op))
        .route(
            "/v1/workspaces/{ws}/containers/share",
            post(container_share),
        )
        .route(
            "/v1/workspaces/{ws}/containers/share/{id}",
            axum::routing::delete(container_unshare),
        )
        .route("/v1/teams", axum::routing::post(team_create))
        .route("/v1/teams/{name}", get(team_status).delete(team_destroy))
        .route("/v1/workspaces/{ws}", get(info).delete(destroy))
        .route("/v1/workspaces/{ws}/start", post(start))
        .route("/v1/workspaces/{ws}/stop", post(stop))
        .route("/v1/workspaces/{ws}/exec", post(exec))
        .route(
            "/v1/workspaces/{ws}/jobs",
            post(job_start).get(super::sessions::job_list),
        )
        .route("/v1/workspaces/{ws}/jobs/{job}", get(job_poll))
        .route("/v1/workspaces/{ws}/jobs/{job}/kill", post(job_kill))
        .route(
            "/v1/workspaces/{ws}/jobs/{job}/wait",
            post(super::sessions::job_wait),
        )
        .route(
            "/v1/workspaces/{ws}/stream",
            get(super::stream::stream_route),
        )
        .route(
            "/v1/workspaces/{ws}/terminals",
            get(super::sessions::terminal_list).post(super::sessions::terminal_new),
        )
        .route(
            "/v1/workspaces/{ws}/terminals/{name}",
            axum::routing::delete(super::sessions::terminal_kill),
        )
        .route(
            "/v1/workspaces/{ws}/terminals/{name}/recording",
            get(super::sessions::terminal_recording),
        )
        .route(
            "/v1/workspaces/{ws}/logs/follow",
            get(super::sessions::logs_follow),
        )
        .route("/v1/workspaces/{ws}/env", post(set_env))
        .route("/v1/workspaces/{ws}/files/read", post(file_read))
        .route("/v1/workspaces/{ws}/files/write", post(file_write))
        .route("/v1/workspaces/{ws}/files/edit", post(file_edit))
        .route("/v1/workspaces/{ws}/files/list", post(file_list))
        .route("/v1/workspaces/{ws}/logs", get(logs))
        .route(
            "/v1/workspaces/{ws}/snapshots",
            get(snapshot_list).post(snapshot_create),
        )
        .route(
            "/v1/workspaces/{ws}/snapshots/{name}",
            axum::routing::delete(snapshot_delete),
        )
        .route(
            "/v1/workspaces/{ws}/snapshots/{name}/restore",
            post(snapshot_restore),
        )
        .route("/v1/workspaces/{ws}/fork", post(fork))
        .route("/v1/workspaces/{ws}/diff/{name}", get(diff))
        .route(
            "/v1/workspaces/{ws}/network-policy",
            get(network_policy).post(set_network_policy),
        )
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorClass::NotFound,
                "no such API route",
            )
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(ErrorBody {
                error: self.message,
                class: self.class,
            }),
        )
            .into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let class = e.class();
        let status = match class {
            ErrorClass::NotFound => StatusCode::NOT_FOUND,
            ErrorClass::Conflict => StatusCode::CONFLICT,
            ErrorClass::Invalid => StatusCode::BAD_REQUEST,
            ErrorClass::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorClass::Forbidden => StatusCode::FORBIDDEN,
            ErrorClass::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, class, e.to_string())
    }
}

/// `Json` whose rejection is our one-line error naming what was wrong.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(e) => Err(rejection(e)),
        }
    }
}

fn rejection(e: JsonRejection) -> ApiError {
    let text = e.body_text();
    // serde's message already names the field ("missing field `argv`").
    let text = text
        .strip_prefix("Failed to deserialize the JSON body into the target type: ")
        .unwrap_or(&text);
    ApiError::new(
        StatusCode::BAD_REQUEST,
        ErrorClass::Invalid,
        format!("invalid request body: {text}"),
    )
}

/// axum's `Path`, with our JSON error for a segment that does not parse (a port
/// that is not a number, a name that is not UTF-8).
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorClass::Invalid,
                format!("invalid path: {}", e.body_text()),
            )),
        }
    }
}

/// axum's `Query`, with our JSON error naming the parameter that does not parse.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(e) => {
                let text = e.body_text();
                let text = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text)
                    .to_string();
                Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorClass::Invalid,
                    format!("invalid query: {text}"),
                ))
            }
        }
    }
}

type ApiResult<T> = Result<axum::Json<T>, ApiError>;

fn ok<T: Serialize>(v: T) -> ApiResult<T> {
    Ok(axum::Json(v))
}

async fn daemon_status(State(s): State<AppState>) -> ApiResult<DaemonStatus> {
    let all = s.engine.list(None)?;
    ok(DaemonStatus {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        state_dir: s.engine.state_dir().root().display().to_string(),
        cache_dir: s.cache_dir.clone(),
        accel: s.engine.accel().map(|a| a.as_str().to_string()),
        store: s.engine.store_kind().to_string(),
        workspaces: all.len(),
        running: all.iter().filter(|w| w.state == WsState::Running).count(),
    })
}

async fn daemon_shutdown(State(s): State<AppState>) -> ApiResult<Stopping> {
    let _ = s.shutdown.send(());
    ok(Stopping { stopping: true })
}

async fn images(State(s): State<AppState>) -> ApiResult<Vec<ImageInfo>> {
    ok(s.engine.images().list())
}

/// Streams the build's progress as text lines; the last line is `ok` or `error: …`.
async fn image_build(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<BuildQuery>,
) -> Result<Response, ApiError> {
    crate::image::ImageCache::validate(&name)?;
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    let engine = s.engine.clone();
    tokio::spawn(async move {
        let res = engine.images().build(&name, q.force, Some(&tx)).await;
        let last = match res {
            Ok(_) => BUILD_OK.to_string(),
            Err(e) => format!("{BUILD_ERROR}{e}"),
        };
        let _ = tx.send(last);
    });
    let stream = futures_util::StreamExt::map(
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        |l| Ok::<_, std::io::Error>(format!("{l}\n")),
    );
    Ok(Response::new(axum::body::Body::from_stream(stream)))
}

async fn list(
    State(s): State<AppState>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Vec<WorkspaceInfo>> {
    let state = match q.state.as_deref() {
        None | Some("") => None,
        Some(v) => Some(WsState::parse(v).ok_or_else(|| {
            Error::invalid("state", format!("{v:?} is not one of creating, starting, running, stopping, stopped, destroying"))
        })?),
    };
    ok(s.engine.list(state)?)
}

async fn create(
    State(s): State<AppState>,
    ApiJson(p): ApiJson<CreateParams>,
) -> ApiResult<WorkspaceInfo> {
    ok(s.engine.create(p, None).await?)
}

async fn container_vm_create(
    State(s): State<AppState>,
    ApiJson(r): ApiJson<ContainerVmRequest>,
) -> ApiResult<WorkspaceInfo> {
    ok(s.engine.container_vm_create(r).await?)
}

async fn container_op(
    State(s): State<AppState>,
    Path(ws): Path<String>,
    ApiJson(op): ApiJson<ContainerOp>,
) -> ApiResult<ContainerAnswer> {
    ok(s.engine.container_op(&ws, op).await?)
}

async fn container_share(
    State(s): State<AppState>,
    Path(ws): Path<String>,
    ApiJson(r): ApiJson<ContainerVmRequest>,
) -> ApiResult<ContainerShared> {
    ok(s.engine.container_share(&ws, r).await?)
}

async fn container_unshare(
    State(s): State<AppState>,
    Path((ws, id)): Path<(String, String)>,
) -> ApiResult<Deleted> {
    s.engine.container_unshare(&ws, &id).await?;
    ok(Deleted { deleted: id })
}

async fn info(State(s): State<AppState>, Path(ws): Path<String>) -> ApiResult<WorkspaceInfo> {
    ok(s.engine.info(&ws)?)
}

async fn destroy(State(s): State<AppState>, Path(ws): Path<String>) -> ApiResult<Destroyed> {
    s.engine.destroy(&ws).await?;
    ok(Destroyed { destroyed: ws })
}

async fn start(
    State(s): State<AppState>,
    Path(ws): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<WorkspaceInfo> {
    // The body is optional: an empty one means defaults.
    let req: StartRequest = if body.is_empty() {
        StartRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorClass::Invalid,
                format!("invalid request body: {e}"),
            )
        })?
    };
    let timeout = req.boot_timeout_secs;
    ok(s.engine.start(&ws, timeout).await?)
}

async fn stop(State(s): State<AppState>, Path(ws): Path<String>) -> ApiResult<WorkspaceInfo> {
    ok(s.engine.stop(&ws).await?)
}

async fn exec(
    State(s): State<AppState>,
    Path(ws): Path<String>,
    ApiJson(r): ApiJson<Exec>,
) -> ApiResult<ExecResult> {
    ok(s.engine.exec(&ws, r).await?)
}

async fn job_start(
    State(s): State<AppState>,
    Path(ws): Path<String>,
    ApiJson(r): ApiJson<JobStart>,
) -> ApiResult<JobStarted> {
    let job = s.engine.job_start(&ws, r).await?;
    ok(JobStarted { job })
}

async fn job_poll(
    State(s): State<AppState>,
    Path((ws, job)): Path<(String, String)>,
) -> ApiResult<JobStatus> {
    ok(s.engine.job_poll(&ws, &job).await?)
}

async fn job_kill(
    State(s): State<AppState>,
    Path((ws, job)): Path<(String, String)>,
    ApiJson(r): ApiJson<JobKillRequest>,
) -> ApiResult<Killed> {
    s.engine.job_kill(&ws, &job, r.signal).await?;
    ok(Killed { killed: true })
}

async fn set_env(
    State(s): State<AppState>,
    Path(ws): Path<String>,
    ApiJson(r): ApiJson<EnvRequest>,
) -> ApiResult<EnvUpdated> {
    s.engine.set_env(&ws, r.set, r.unset).await?;
    ok(EnvUpdated { ok: true })
}

async fn file_read(
    State(s): State<AppState>,
    Path(ws): Path<String>,
    ApiJson(r): ApiJson<FileRead>,
) -> ApiResult<FileData> {
    ok(s.engine.file_read(&ws, r).await?)
}

async fn file_write(
    State(s): State<AppState>,
    Path(ws): Path<String>,
    ApiJson(r): ApiJson<FileWrite>,
) -> ApiResult<Written> {
    let bytes = s.engine.file_write(&ws, r).await?;
    ok(Written { bytes })
}

async fn file_edit(
    State(s): State<AppState>,
    Path(ws): Path<String>,
    ApiJson(r): ApiJson<FileEdit>,
) -> ApiResult<Edited> {
    let replacements = s.engine.file_edit(&ws, r).await?;
    ok(Edited { replacements })
}

async fn file_list(
    State(s): State<AppState>,
    Path(ws): Path<String>,
    ApiJson(r): ApiJson<FileListRequest>,
) -> ApiResult<Entries> {
    let entries = s.engine.file_list(&ws, r.path).await?;
    ok(Entries { entries })
}

async fn logs(
    State(s): State<AppState>,
    Path(ws): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<LogLines> {
    let lines = s
        .engine
        .logs(&ws, q.r#type.unwrap_or_default(), q.lines.unwrap_or(100))?;
    ok(LogLines { lines })
}

async fn snapshot_create(
    State(s): State<AppState>,
    Path(ws): Path<String>,
    ApiJson(r): ApiJson<SnapshotRequest>,
) -> ApiResult<SnapshotInfo> {
    ok(s.engine.snapshot_create(&ws, &r.name).await?)
}

async fn snapshot_list(
    State(s): State<AppState>,
    Path(ws): Path<String>,
) -> ApiResult<Vec<SnapshotInfo>> {
    ok(s.engine.snapshot_list(&ws).await?)
}

async fn snapshot_restore(
    State(s): State<AppState>,
    Path((ws, name)): Path<(String, String)>,
) -> ApiResult<WorkspaceInfo> {
    ok(s.engine.snapshot_restore(&ws, &name).await?)
}

async fn snapshot_delete(
    State(s): State<AppState>,
    Path((ws, name)): Path<(String, String)>,
) -> ApiResult<Deleted> {
    s.engine.snapshot_delete(&ws, &name).await?;
    ok(Deleted { deleted: name })
}

async fn fork(
    State(s): State<AppState>,
    Path(ws): Path<String>,
    ApiJson(p): ApiJson<ForkParams>,
) -> ApiResult<Vec<WorkspaceInfo>> {
    ok(s.engine.fork(&ws, p).await?)
}

async fn forward_add(
    State(s): State<AppState>,
    Path(ws): Path<String>,
    ApiJson(p): ApiJson<ForwardParams>,
) -> ApiResult<Forward> {
    ok(s.engine
        .port_forward_add(&ws, p.guest_port, p.host_port, p.bind)
        .await?)
}

async fn forward_ls(State(s): State<AppState>, Path(ws): Path<String>) -> ApiResult<Vec<Forward>> {
    ok(s.engine.port_forward_ls(&ws).await?)
}

async fn forward_rm(
    State(s): State<AppState>,
    Path((ws, port)): Path<(String, u16)>,
) -> ApiResult<Removed> {
    s.engine.port_forward_rm(&ws, port).await?;
    ok(Removed { removed: port })
}

async fn team_create(
    State(s): State<AppState>,
    ApiJson(p): ApiJson<TeamParams>,
) -> ApiResult<Vec<TeamMember>> {
    ok(s.engine.team_create(p).await?)
}

async fn team_status(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Vec<TeamMember>> {
    ok(s.engine.team_status(&name).await?)
}

async fn team_destroy(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<Destroyed> {
    s.engine.team_destroy(&name).await?;
    ok(Destroyed { destroyed: name })
}

async fn network_policy(State(s): State<AppState>, Path(ws): Path<String>) -> ApiResult<Policy> {
    ok(s.engine.network_policy(&ws).await?)
}

async fn set_network_policy(
    State(s): State<AppState>,
    Path(ws): Path<String>,
    ApiJson(p): ApiJson<PolicyChange>,
) -> ApiResult<Policy> {
    ok(s.engine.set_network_policy(&ws, p).await?)
}

async fn diff(
    State(s): State<AppState>,
    Path((ws, name)): Path<(String, String)>,
) -> ApiResult<Diff> {
    ok(s.engine.diff(&ws, &name).await?)
}

#[cfg(test)]
mod tests {
    /// docs/api.md names every route the router serves, so the page cannot lag.
    #[test]
    fn the_api_page_lists_every_route() {
        let source = include_str!("server.rs");
        let page = include_str!("../../../docs/api.md");
        let routes: Vec<&str> = source
            .split(".route(")
            .skip(1)
            .filter_map(|r| r.trim_start().strip_prefix('"')?.split('"').next())
            .filter(|r| r.starts_with("/v1/"))
            .collect();
        assert!(routes.len() > 20, "{routes:?}");
        for r in routes {
            let listed = page.contains(&format!("`{r}`")) || page.contains(&format!("`{r}?"));
            assert!(listed, "docs/api.md does not list {r}");
        }
    }
}
