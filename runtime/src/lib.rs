//! burrow's engine: workspaces as microVMs.
//!
//! The front doors (`burrowd`'s HTTP API, the `burrow` CLI through it) are thin:
//! they parse, call [`engine::Engine`], and format the answer.

pub mod access;
pub mod api;
pub mod db;
pub mod engine;
pub mod error;
pub mod guest;
pub mod image;
pub mod names;
pub mod net;
pub mod paths;
pub mod process;
pub mod storage;
pub mod vmm;

pub use error::{Error, Result};
