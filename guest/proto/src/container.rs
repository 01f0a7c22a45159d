//! OCI containers inside a VM.
//!
//! The host shares one directory with the VM over virtio-fs, mounted in the guest
//! at [`CONTAINERS_DIR`]. Each container has a directory in it, named by its id:
//!
//! ```text
//! <CONTAINERS_DIR>/<id>/config.json   the bundle's OCI spec, its paths rewritten
//!                                     for the guest (root.path "rootfs", bind
//!                                     mount sources under mounts/)
//! <CONTAINERS_DIR>/<id>/rootfs/       the bundle's root file system (a host bind mount)
//! <CONTAINERS_DIR>/<id>/mounts/<n>    the source of the spec's n-th mount, when it is
//!                                     a bind mount of a host path
//! ```
//!
//! The agent makes the container from that directory as runc would make it from a
//! bundle (namespaces, mounts, pivot, user, capabilities, cgroup), in a
//! single-threaded helper process, never on its own threads.
//!
//! A container's life: a [`StreamOpen::ContainerCreate`](crate::StreamOpen) stream
//! creates its process, which waits; [`ContainerOp::Start`] runs the spec's program;
//! the create stream carries the process's standard I/O and ends with its `exit`
//! event. When that stream's connection drops before the exit, the container is
//! killed, as an exec's process group is, unless the stream is *durable*: then
//! the process goes on, its output waits for a reader (the process blocks once
//! the buffers between are full), and a [`ContainerAttach`] stream takes it up
//! where it was left, the exit included (a shim whose burrowd restarted).
//! [`ContainerOp::Delete`] forgets a stopped container (with `force`, kills a
//! live one first) and its durable streams.

use serde::{Deserialize, Serialize};

use crate::stream::WinSize;

/// Where the guest mounts the directory the host shares for containers.
pub const CONTAINERS_DIR: &str = "/run/burrow/shared";

/// The virtio-fs tag of that directory.
pub const CONTAINERS_TAG: &str = "shared";

/// Longest container id.
pub const MAX_CONTAINER_ID: usize = 128;

/// Checks a container id: 1 to [`MAX_CONTAINER_ID`] characters of `A-Z a-z 0-9 _ . -`,
/// not starting with `.` or `-` (it names a directory and a libcontainer state dir).
pub fn validate_container_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_CONTAINER_ID {
        return Err(format!(
            "id: must be 1 to {MAX_CONTAINER_ID} characters, not {}",
            id.len()
        ));
    }
    if id.starts_with(['.', '-']) {
        return Err(format!("id: {id:?} must not start with '.' or '-'"));
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        Some(c) => Err(format!(
            "id: {c:?} is not allowed (letters, digits, '_', '.', '-')"
        )),
        None => Ok(()),
    }
}

/// Opens a container's creation stream: the agent creates the container from
/// `<CONTAINERS_DIR>/<id>/config.json` and answers `stream_started` with the
/// container process's pid once it exists (waiting for [`ContainerOp::Start`]).
/// Its standard I/O is the stream's: a terminal when the spec's `process.terminal`
/// is true (of `size`, resized by `resize` controls), pipes otherwise.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerCreate {
    /// On the wire `container`: a request's own `id` shares its JSON object.
    #[serde(rename = "container")]
    pub id: String,
    /// Whether the host sends standard input (on an input connection, as an
    /// exec's); without it the process reads `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub size: Option<WinSize>,
    /// The process outlives a dropped connection, for a [`ContainerAttach`].
    #[serde(default)]
    pub durable: bool,
}

/// Opens a stream running another process in a running container (`runc exec`):
/// `process` is an OCI runtime-spec `Process` object (args, env, cwd, user,
/// terminal, capabilities, ...). The stream ends with its `exit` event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerExec {
    /// On the wire `container`, as in [`ContainerCreate`].
    #[serde(rename = "container")]
    pub id: String,
    pub process: serde_json::Value,
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub size: Option<WinSize>,
    /// Names the exec (as a container id is named) and makes it durable: it
    /// outlives a dropped connection, for a [`ContainerAttach`] of this name.
    #[serde(default)]
    pub exec_id: Option<String>,
}

/// Takes up a durable stream again ([`ContainerCreate`] with `durable`, or a
/// [`ContainerExec`] with an `exec_id`): what the process wrote since the last
/// connection dropped, then live output, then its `exit` event; with
/// `stream_started` a new input token when the process still takes input. A
/// newer attach takes the stream from an older one. An attach after the exit was
/// delivered gets the exit again (until the container is deleted).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerAttach {
    /// On the wire `container`, as in [`ContainerCreate`].
    #[serde(rename = "container")]
    pub id: String,
    /// The exec's id; empty for the container's own process.
    #[serde(default)]
    pub exec: String,
}

/// Requests on an existing container. The container's id is `container` on the
/// wire (a request's `id` is the request's own, in the same JSON object). Each is
/// answered with
/// [`Reply::Container`](crate::Reply) (its status after the request), except
/// `Ps`, answered with [`Reply::Pids`](crate::Reply), and `Stats`, answered
/// with [`Reply::ContainerStats`](crate::Reply).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum ContainerOp {
    /// Runs the created container's program. Refused unless it is `created`.
    Start {
        #[serde(rename = "container")]
        id: String,
    },
    /// Sends `signal` to its process, or with `all` to every process in it.
    Kill {
        #[serde(rename = "container")]
        id: String,
        signal: i32,
        #[serde(default)]
        all: bool,
    },
    State {
        #[serde(rename = "container")]
        id: String,
    },
    /// Freezes every process in it (cgroup freezer).
    Pause {
        #[serde(rename = "container")]
        id: String,
    },
    Resume {
        #[serde(rename = "container")]
        id: String,
    },
    /// The guest pids of its processes.
    Ps {
        #[serde(rename = "container")]
        id: String,
    },
    /// Its cgroup's figures (CPU, memory, pids, I/O), as libcgroups reads them.
    Stats {
        #[serde(rename = "container")]
        id: String,
    },
    /// New cgroup limits: an OCI runtime-spec `LinuxResources` object.
    Update {
        #[serde(rename = "container")]
        id: String,
        resources: serde_json::Value,
    },
    /// Forgets a stopped container (its cgroup and state); with `force` a live one
    /// is killed first. Answered with its last status.
    Delete {
        #[serde(rename = "container")]
        id: String,
        #[serde(default)]
        force: bool,
    },
}

impl ContainerOp {
    pub fn id(&self) -> &str {
        match self {
            ContainerOp::Start { id }
            | ContainerOp::Kill { id, .. }
            | ContainerOp::State { id }
            | ContainerOp::Pause { id }
            | ContainerOp::Resume { id }
            | ContainerOp::Ps { id }
            | ContainerOp::Stats { id }
            | ContainerOp::Update { id, .. }
            | ContainerOp::Delete { id, .. } => id,
        }
    }
}

/// A container's status, as the OCI runtime spec names them.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ContainerStatusKind {
    Created,
    Running,
    Paused,
    Stopped,
}

impl ContainerStatusKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerStatusKind::Created => "created",
            ContainerStatusKind::Running => "running",
            ContainerStatusKind::Paused => "paused",
            ContainerStatusKind::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerStatus {
    pub id: String,
    pub status: ContainerStatusKind,
    /// The container process's pid in the guest, while it exists.
    #[serde(default)]
    pub pid: Option<i32>,
    /// How it ended, once `stopped`.
    #[serde(default)]
    pub exit: Option<crate::stream::ExitInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Op, Request, StreamOpen};

    /// Container requests share their JSON object with the request's own `id`.
    #[test]
    fn container_requests_round_trip() {
        let ops = [
            Op::Container(ContainerOp::Kill {
                id: "c1".into(),
                signal: 9,
                all: true,
            }),
            Op::Stream(StreamOpen::ContainerCreate(ContainerCreate {
                id: "c1".into(),
                stdin: true,
                size: None,
                durable: false,
            })),
            Op::Stream(StreamOpen::ContainerExec(ContainerExec {
                id: "c1".into(),
                process: serde_json::json!({"args": ["sh"]}),
                stdin: false,
                size: None,
                exec_id: None,
            })),
            Op::Stream(StreamOpen::ContainerAttach(ContainerAttach {
                id: "c1".into(),
                exec: "e1".into(),
            })),
        ];
        for op in ops {
            let text = serde_json::to_string(&Request { id: 7, op }).expect("serialize");
            let back: Request = serde_json::from_str(&text).expect(&text);
            assert_eq!(back.id, 7);
            let again = serde_json::to_string(&back).expect("serialize");
            assert_eq!(again, text);
            assert!(text.contains(r#""container":"c1""#), "{text}");
        }
    }
}
