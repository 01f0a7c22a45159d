//! The daemon's API: HTTP/JSON over a Unix socket (served by [`server`], spoken by
//! [`client`]). The same types serve a TCP listener later.

pub mod client;
pub mod server;
pub mod sessions;
pub mod stream;

use std::collections::BTreeMap;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::engine::LogKind;
use crate::error::ErrorClass;

/// Body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub class: ErrorClass,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub class: ErrorClass,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, class: ErrorClass, message: impl Into<String>) -> Self {
        ApiError {
            status,
            class,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    pub state_dir: String,
    pub cache_dir: String,
    /// The accelerator chosen at the first boot, if a VM has booted yet.
    pub accel: Option<String>,
    /// The volume store: `btrfs` or `copy`.
    pub store: String,
    pub workspaces: usize,
    pub running: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    pub state: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StartRequest {
    #[serde(default)]
    pub boot_timeout_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobKillRequest {
    pub signal: i32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EnvRequest {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub unset: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LogsQuery {
    #[serde(default)]
    pub r#type: Option<LogKind>,
    #[serde(default)]
    pub lines: Option<usize>,
}
