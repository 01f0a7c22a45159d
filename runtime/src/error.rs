//! The engine's error type: one enum for everything a front door can be told.
//! Each message is one line that names what was wrong.

use burrow_proto::{AgentError, ErrorKind as AgentErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another engine holds the state dir's lock (see `engine::StateLock`).
    #[error("another burrowd already serves {}", .0.display())]
    AlreadyServed(std::path::PathBuf),
    #[error("workspace {0:?} not found")]
    WorkspaceNotFound(String),
    #[error("name {0:?} is taken by another workspace")]
    NameTaken(String),
    #[error("container {id:?} already exists in root {root:?} (VM {vm})")]
    ContainerExists {
        id: String,
        root: String,
        vm: String,
    },
    #[error("{name} is a container VM: it has no volume, so no {what}")]
    NoVolume { name: String, what: &'static str },
    #[error("team {0:?} not found")]
    TeamNotFound(String),
    #[error("team {0:?} already exists")]
    TeamExists(String),
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("workspace {name} is {state}: {action} needs a {wanted} workspace")]
    WrongState {
        name: String,
        state: String,
        action: &'static str,
        wanted: &'static str,
    },
    #[error("snapshot {name:?} of workspace {workspace} not found")]
    SnapshotNotFound { workspace: String, name: String },
    #[error("snapshot {name:?} of workspace {workspace} already exists")]
    SnapshotExists { workspace: String, name: String },
    #[error("snapshot {snapshot:?} has forks that depend on it: {forks}")]
    HasDependents { snapshot: String, forks: String },
    #[error("no recording of a terminal {name:?} in workspace {workspace}")]
    NoRecording { workspace: String, name: String },
    #[error("image {0:?} not found: build it with `burrow image build {0}`")]
    ImageNotFound(String),
    #[error("image build failed: {0}")]
    ImageBuild(String),
    #[error("guest of {name} did not come up within {secs} s; console tail: {tail}")]
    BootTimeout {
        name: String,
        secs: u64,
        tail: String,
    },
    #[error("guest of {name} failed to boot: {reason}; console tail: {tail}")]
    BootFailed {
        name: String,
        reason: String,
        tail: String,
    },
    #[error("{0}")]
    Guest(#[from] AgentError),
    #[error("guest agent of {name}: {reason}")]
    GuestUnreachable { name: String, reason: String },
    #[error("{0}")]
    Vmm(String),
    #[error("VMM confinement: {0}")]
    Confinement(crate::vmm::ConfigError),
    #[error("volume: {0}")]
    Store(#[from] burrow_fs::StoreError),
    #[error("state database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an error is, for front doors that map it to a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    NotFound,
    Conflict,
    Invalid,
    Unavailable,
    /// The client may not use this daemon.
    Forbidden,
    Internal,
}

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// An `Invalid` from a checker whose one-line message already starts with
    /// `field: ` (as the protocol's checks do); the prefix is not repeated.
    pub fn invalid_line(field: &'static str, message: String) -> Self {
        let reason = match message
            .strip_prefix(field)
            .and_then(|m| m.strip_prefix(": "))
        {
            Some(rest) => rest.to_string(),
            None => message,
        };
        Error::Invalid { field, reason }
    }

    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Invalid {
            field,
            reason: reason.into(),
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            Error::WorkspaceNotFound(_)
            | Error::TeamNotFound(_)
            | Error::ImageNotFound(_)
            | Error::SnapshotNotFound { .. }
            | Error::NoRecording { .. } => ErrorClass::NotFound,
            Error::NameTaken(_)
            | Error::AlreadyServed(_)
            | Error::TeamExists(_)
            | Error::ContainerExists { .. }
            | Error::WrongState { .. }
            | Error::SnapshotExists { .. }
            | Error::HasDependents { .. } => ErrorClass::Conflict,
            Error::Invalid { .. } | Error::NoVolume { .. } => ErrorClass::Invalid,
            Error::Guest(e) => match e.kind {
                AgentErrorKind::NotFound => ErrorClass::NotFound,
                AgentErrorKind::AlreadyExists => ErrorClass::Conflict,
                AgentErrorKind::Io => ErrorClass::Internal,
                _ => ErrorClass::Invalid,
            },
            Error::BootTimeout { .. }
            | Error::BootFailed { .. }
            | Error::GuestUnreachable { .. } => ErrorClass::Unavailable,
            _ => ErrorClass::Internal,
        }
    }
}
