//! What can go wrong in a runtime call: one variant per cause, each printed as
//! the one line containerd quotes after "OCI runtime create failed:".

use std::path::PathBuf;

use burrow::api::client::ClientError;
use burrow::api::connect::ConnectError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad argument or a bad field of the bundle: names the field.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("container {0:?} does not exist")]
    NotFound(String),
    #[error("container {0:?} already exists")]
    Exists(String),
    /// The container is not in a state the call allows.
    #[error("container {id:?} is {status}: {why}")]
    WrongState {
        id: String,
        status: &'static str,
        why: &'static str,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("{0}")]
    Client(#[from] ClientError),
    /// The holder process could not be started or did not say the container exists.
    #[error("{0}")]
    Holder(String),
    /// A hook of the spec failed: names it (`hooks.prestart[0]: ...`).
    #[error("{0}")]
    Hook(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
