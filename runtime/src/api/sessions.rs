//! Handlers for jobs, terminal sessions and followed logs (the streams themselves
//! are in [`super::stream`]).

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use burrow_proto::{JobInfo, JobStatus, TerminalInfo, TerminalNew};
use tokio::sync::mpsc;

use super::server::{ApiJson, AppState, Path, Query};
use super::{ApiError, LogsQuery, TerminalKilled};

type ApiResult<T> = Result<axum::Json<T>, ApiError>;

pub async fn job_list(
    State(s): State<AppState>,
    Path(ws): Path<String>,
) -> ApiResult<Vec<JobInfo>> {
    Ok(axum::Json(s.engine.job_list(&ws).await?))
}

pub async fn job_wait(
    State(s): State<AppState>,
    Path((ws, job)): Path<(String, String)>,
) -> ApiResult<JobStatus> {
    Ok(axum::Json(s.engine.job_wait(&ws, &job).await?))
}

pub async fn terminal_new(
    State(s): State<AppState>,
    Path(ws): Path<String>,
    ApiJson(req): ApiJson<TerminalNew>,
) -> ApiResult<TerminalInfo> {
    Ok(axum::Json(s.engine.terminal_new(&ws, req).await?))
}

pub async fn terminal_list(
    State(s): State<AppState>,
    Path(ws): Path<String>,
) -> ApiResult<Vec<TerminalInfo>> {
    Ok(axum::Json(s.engine.terminal_list(&ws).await?))
}

pub async fn terminal_kill(
    State(s): State<AppState>,
    Path((ws, name)): Path<(String, String)>,
) -> ApiResult<TerminalKilled> {
    s.engine.terminal_kill(&ws, &name).await?;
    Ok(axum::Json(TerminalKilled { killed: name }))
}

/// The session's recording, an asciicast v2 file.
pub async fn terminal_recording(
    State(s): State<AppState>,
    Path((ws, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let body = s.engine.terminal_recording(&ws, &name).await?;
    Ok(([(header::CONTENT_TYPE, "application/x-asciicast")], body).into_response())
}

/// `GET /v1/workspaces/{ws}/logs/follow`: the tail, then new lines as text lines
/// until the workspace stops.
pub async fn logs_follow(
    State(s): State<AppState>,
    Path(ws): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    // Resolve first, so that an unknown workspace is an error answer, not a stream.
    s.engine.info(&ws)?;
    let (tx, rx) = mpsc::channel::<String>(256);
    let engine = s.engine.clone();
    let kind = q.r#type.unwrap_or_default();
    let lines = q.lines.unwrap_or(100);
    tokio::spawn(async move {
        let _ = engine.follow_logs(&ws, kind, lines, tx).await;
    });
    let stream =
        futures_util::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), |l| {
            Ok::<_, std::io::Error>(format!("{l}\n"))
        });
    Ok(Response::new(axum::body::Body::from_stream(stream)))
}
