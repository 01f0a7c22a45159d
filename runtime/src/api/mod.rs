//! The daemon's API: HTTP/JSON over a Unix socket (served by [`server`], spoken by
//! [`client`], which [`connect`] finds or starts). Every body is a type of
//! [`types`], re-exported here; the same types serve a TCP listener later.

pub mod client;
pub mod connect;
pub mod server;
pub mod sessions;
pub mod stream;
pub mod types;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

pub use types::*;

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
