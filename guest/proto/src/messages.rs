//! Message types. Byte payloads (file data, process output) travel as base64 strings.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// First frame on every connection, host → agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    /// Free text naming the client, for the agent's log.
    #[serde(default)]
    pub client: String,
}

/// The agent's answer to [`Hello`]. `error` is set, and the agent closes the
/// connection, when it does not speak the host's version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelloReply {
    pub version: u32,
    /// The agent's build version (its crate version).
    pub agent_version: String,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Liveness check; answered with [`Reply::Pong`].
    Ping,
    /// Runs a process to completion.
    Exec(Exec),
    /// Starts a background job.
    JobStart(JobStart),
    /// A job's state and kept output. `job` is its number or its name.
    JobPoll {
        job: String,
    },
    JobKill {
        job: String,
        signal: i32,
    },
    /// Waits until the job ends; answered with its [`JobStatus`].
    JobWait {
        job: String,
    },
    /// Every job the agent keeps, without output.
    JobList,
    /// Starts a persistent terminal session.
    TerminalNew(TerminalNew),
    TerminalList,
    /// Ends a session (hang-up, then SIGKILL of its process group) and forgets it.
    TerminalKill {
        name: String,
    },
    /// Turns this connection into a stream (see [`crate::stream`]).
    Stream(crate::stream::StreamOpen),
    /// Sets (and unsets) variables seen by every later exec and job. Held in the
    /// agent's memory only.
    SetEnv {
        #[serde(default)]
        set: BTreeMap<String, String>,
        #[serde(default)]
        unset: Vec<String>,
    },
    FileRead(FileRead),
    FileWrite(FileWrite),
    FileEdit(FileEdit),
    FileList {
        path: String,
    },
    /// A request on an OCI container (see [`crate::container`]).
    Container(crate::container::ContainerOp),
    /// Flushes file systems and powers the guest off after replying.
    Shutdown,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Exec {
    pub argv: Vec<String>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Kill the process (group) after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Cap per output stream; the agent clamps it to [`crate::MAX_OUTPUT`].
    #[serde(default)]
    pub max_output_bytes: Option<u64>,
    /// Bytes fed to the process's standard input, which is closed afterwards.
    #[serde(default, with = "b64_opt")]
    pub stdin: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecResult {
    #[serde(with = "b64")]
    pub stdout: Vec<u8>,
    #[serde(with = "b64")]
    pub stderr: Vec<u8>,
    /// The exit status; 128 + n when the process was killed by signal n.
    pub exit_code: i32,
    #[serde(default)]
    pub signal: Option<i32>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub timed_out: bool,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobStart {
    pub argv: Vec<String>,
    /// A name to refer to the job by, unique among the agent's jobs.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub max_output_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobStatus {
    pub job: u32,
    #[serde(default)]
    pub name: Option<String>,
    pub argv: Vec<String>,
    pub running: bool,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
    #[serde(with = "b64")]
    pub stdout: Vec<u8>,
    #[serde(with = "b64")]
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub duration_ms: u64,
}

/// One line of [`Op::JobList`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobInfo {
    pub job: u32,
    #[serde(default)]
    pub name: Option<String>,
    pub argv: Vec<String>,
    pub running: bool,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TerminalNew {
    pub name: String,
    /// The command; the login shell of root (from `/etc/passwd`) when absent.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// 24×80 when absent.
    #[serde(default)]
    pub size: Option<crate::stream::WinSize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TerminalInfo {
    pub name: String,
    pub argv: Vec<String>,
    /// Seconds since the epoch (the guest's clock).
    pub created_at: i64,
    /// Viewers attached now (recorders are not counted).
    pub viewers: u32,
    pub alive: bool,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
    pub size: crate::stream::WinSize,
    /// Bytes the session has written so far.
    pub output_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileRead {
    pub path: String,
    #[serde(default)]
    pub offset: u64,
    /// At most this many bytes; the agent clamps it to [`crate::MAX_FILE_CHUNK`].
    #[serde(default)]
    pub limit: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileData {
    #[serde(with = "b64")]
    pub data: Vec<u8>,
    /// Size of the whole file.
    pub size: u64,
    /// Whether `offset + data.len()` reached the end of the file.
    pub eof: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileWrite {
    pub path: String,
    #[serde(with = "b64")]
    pub data: Vec<u8>,
    /// Permission bits, e.g. `0o644`. Applied on every write when given.
    #[serde(default)]
    pub mode: Option<u32>,
    /// Append instead of truncating; how large contents are sent in chunks.
    #[serde(default)]
    pub append: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEdit {
    pub path: String,
    pub old: String,
    pub new: String,
    /// Replace every occurrence. Without it, `old` must occur exactly once.
    #[serde(default)]
    pub all: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub modified: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// The id of the request answered; 0 when the request could not be read.
    pub id: u64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok(Reply),
    Err(AgentError),
}

impl From<Result<Reply, AgentError>> for Outcome {
    fn from(r: Result<Reply, AgentError>) -> Self {
        match r {
            Ok(v) => Outcome::Ok(v),
            Err(e) => Outcome::Err(e),
        }
    }
}

impl From<Outcome> for Result<Reply, AgentError> {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Ok(v) => Ok(v),
            Outcome::Err(e) => Err(e),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Pong {
        uptime_ms: u64,
    },
    Exec(ExecResult),
    JobStarted {
        job: u32,
    },
    Job(JobStatus),
    FileData(FileData),
    /// Bytes written by a [`FileWrite`].
    Written {
        bytes: u64,
    },
    Edited {
        replacements: u64,
    },
    Entries {
        entries: Vec<DirEntry>,
    },
    Jobs {
        jobs: Vec<JobInfo>,
    },
    Terminal(TerminalInfo),
    Terminals {
        terminals: Vec<TerminalInfo>,
    },
    /// The connection is a stream from now on; `pid` is the process's when one
    /// was started.
    StreamStarted {
        #[serde(default)]
        pid: Option<i32>,
        /// For an exec with `stdin`: the token of its input connection
        /// ([`crate::stream::StreamOpen::Input`]).
        #[serde(default)]
        input: Option<u64>,
    },
    Container(crate::container::ContainerStatus),
    Pids {
        pids: Vec<i32>,
    },
    /// A container's cgroup figures (libcgroups' `Stats`, as JSON).
    ContainerStats {
        stats: serde_json::Value,
    },
    Done,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    IsADirectory,
    NotADirectory,
    PermissionDenied,
    InvalidArgument,
    /// `old` is absent from the file, or occurs more than once without `all`.
    NoMatch,
    TooLarge,
    Malformed,
    VersionMismatch,
    Io,
}

/// An error from the agent: a kind the host can map, and a one-line message that
/// names the offending field or path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    pub kind: ErrorKind,
    pub message: String,
}

impl AgentError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        AgentError {
            kind,
            message: message.into(),
        }
    }

    /// Maps an I/O error on `path` to a kind and a message that names the path.
    pub fn io(path: &str, err: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let kind = match err.kind() {
            K::NotFound => ErrorKind::NotFound,
            K::AlreadyExists => ErrorKind::AlreadyExists,
            K::PermissionDenied => ErrorKind::PermissionDenied,
            K::IsADirectory => ErrorKind::IsADirectory,
            K::NotADirectory => ErrorKind::NotADirectory,
            _ => ErrorKind::Io,
        };
        let what = match kind {
            ErrorKind::NotFound => "no such file or directory".to_string(),
            ErrorKind::IsADirectory => "is a directory".to_string(),
            ErrorKind::NotADirectory => "not a directory".to_string(),
            ErrorKind::PermissionDenied => "permission denied".to_string(),
            ErrorKind::AlreadyExists => "already exists".to_string(),
            _ => err.to_string(),
        };
        AgentError::new(kind, format!("{path}: {what}"))
    }
}

/// Checks a job or terminal name: 1 to 64 of `A-Z a-z 0-9 _ . -`, not starting with
/// `-` or `.`, and not all digits (a number refers to a job by its id). The error
/// names `field`.
pub fn validate_name(field: &str, name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    let why = if name.is_empty() || name.len() > 64 {
        "must be 1 to 64 characters"
    } else if !ok_chars {
        "may hold only letters, digits, '_', '.' and '-'"
    } else if name.starts_with(['-', '.']) {
        "must not start with '-' or '.'"
    } else if name.bytes().all(|b| b.is_ascii_digit()) {
        "must not be all digits (numbers are job ids)"
    } else {
        return Ok(());
    };
    Err(format!("{field}: {name:?} {why}"))
}

mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

mod b64_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::b64::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        use base64::engine::general_purpose::STANDARD;
        use base64::Engine;
        match Option::<String>::deserialize(d)? {
            Some(s) => STANDARD
                .decode(s.as_bytes())
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_shape_is_flat() {
        let req = Request {
            id: 3,
            op: Op::JobPoll { job: "2".into() },
        };
        let s = serde_json::to_string(&req).unwrap();
        assert_eq!(s, r#"{"id":3,"op":"job_poll","job":"2"}"#);
        let back: Request = serde_json::from_str(&s).unwrap();
        assert!(matches!(back.op, Op::JobPoll { job } if job == "2"));
    }

    #[test]
    fn bytes_travel_as_base64() {
        let r = Response {
            id: 9,
            outcome: Outcome::Ok(Reply::FileData(FileData {
                data: vec![0, 255, 10],
                size: 3,
                eof: true,
            })),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains(r#""data":"AP8K""#), "{s}");
        let back: Response = serde_json::from_str(&s).unwrap();
        assert!(
            matches!(back.outcome, Outcome::Ok(Reply::FileData(FileData { ref data, .. })) if data == &[0, 255, 10])
        );
    }

    #[test]
    fn errors_round_trip() {
        let r = Response {
            id: 1,
            outcome: Outcome::Err(AgentError::new(ErrorKind::NoMatch, "x")),
        };
        let s = serde_json::to_string(&r).unwrap();
        let back: Response = serde_json::from_str(&s).unwrap();
        let res: Result<Reply, AgentError> = back.outcome.into();
        assert_eq!(res.unwrap_err().kind, ErrorKind::NoMatch);
    }

    #[test]
    fn bad_base64_is_rejected() {
        let s = r#"{"id":1,"op":"file_write","path":"/a","data":"!!!"}"#;
        assert!(serde_json::from_str::<Request>(s).is_err());
    }

    #[test]
    fn stream_open_is_a_request() {
        let s = r#"{"id":1,"op":"stream","stream":"job_output","job":"build","follow":true}"#;
        let r: Request = serde_json::from_str(s).unwrap();
        assert!(matches!(
            r.op,
            Op::Stream(crate::stream::StreamOpen::JobOutput { ref job, follow: true }) if job == "build"
        ));
    }

    #[test]
    fn names() {
        assert!(validate_name("name", "build-1.x_y").is_ok());
        for bad in ["", "12", "-x", ".x", "a/b", "a b", &"x".repeat(65)] {
            let e = validate_name("name", bad).unwrap_err();
            assert!(e.starts_with("name: "), "{e}");
        }
    }

    #[test]
    fn exec_defaults() {
        let s = r#"{"id":1,"op":"exec","argv":["true"]}"#;
        let r: Request = serde_json::from_str(s).unwrap();
        match r.op {
            Op::Exec(e) => {
                assert_eq!(e.argv, vec!["true"]);
                assert!(e.timeout_ms.is_none() && e.stdin.is_none() && e.env.is_empty());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
