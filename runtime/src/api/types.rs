//! Every request and response body of burrowd's API, one type each, used by the
//! daemon ([`super::server`]), the library client ([`super::client`]) and the CLI.
//!
//! Types that the engine, the guest protocol or netd own and that travel as they
//! are (a workspace's info, an exec, a network policy) are re-exported here, so a
//! front door finds the whole API in one module. Field names are the wire's: a
//! rename here is a breaking change of the API (docs/api.md lists them all).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

pub use crate::engine::{
    CreateParams, Diff, DiffPath, ForkParams, LogKind, PidsInfo, SnapshotInfo, TeamMember,
    TeamParams, WorkspaceInfo,
};
pub use crate::image::ImageInfo;
pub use burrow_netd::protocol::{Forward, Policy, PolicyChange};
pub use burrow_proto::{
    ContainerOp, ContainerStatus, DirEntry, Exec, ExecResult, FileData, FileEdit, FileKind,
    FileRead, FileWrite, JobStart, JobStatus,
};

/// The last line of an image build's progress stream when it succeeded.
pub const BUILD_OK: &str = "ok";
/// The prefix of the last line of an image build's progress stream when it failed.
pub const BUILD_ERROR: &str = "error: ";

/// `GET /v1/daemon`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    pub state_dir: String,
    pub cache_dir: String,
    /// The accelerator chosen at the first boot, if a VM has booted yet.
    pub accel: Option<String>,
    /// The volume store: `btrfs`, `fuse` or `copy`.
    pub store: String,
    pub workspaces: usize,
    pub running: usize,
}

/// `POST /v1/daemon/shutdown`: the daemon stops once it has answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stopping {
    pub stopping: bool,
}

/// Query of `POST /v1/images/{name}/build`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct BuildQuery {
    /// Rebuild even if the image is there.
    #[serde(default)]
    pub force: bool,
}

/// Query of `GET /v1/workspaces`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListQuery {
    /// Only workspaces in this state (`running`, `stopped`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// Body of `POST /v1/workspaces/{ws}/start` (optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StartRequest {
    #[serde(default)]
    pub boot_timeout_secs: Option<u64>,
}

/// `DELETE /v1/workspaces/{ws}` and `DELETE /v1/teams/{name}`: the reference
/// (workspace) or name (team) as the request gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destroyed {
    pub destroyed: String,
}

/// `POST /v1/workspaces/{ws}/jobs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStarted {
    pub job: u32,
}

/// Body of `POST /v1/workspaces/{ws}/jobs/{job}/kill`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct JobKillRequest {
    pub signal: i32,
}

/// `POST /v1/workspaces/{ws}/jobs/{job}/kill`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Killed {
    pub killed: bool,
}

/// `DELETE /v1/workspaces/{ws}/terminals/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalKilled {
    pub killed: String,
}

/// Body of `POST /v1/workspaces/{ws}/env`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EnvRequest {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub unset: Vec<String>,
}

/// `POST /v1/workspaces/{ws}/env`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvUpdated {
    pub ok: bool,
}

/// `POST /v1/workspaces/{ws}/files/write`: bytes written by this call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    pub bytes: u64,
}

/// `POST /v1/workspaces/{ws}/files/edit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edited {
    pub replacements: u64,
}

/// Body of `POST /v1/workspaces/{ws}/files/list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileListRequest {
    pub path: String,
}

/// `POST /v1/workspaces/{ws}/files/list`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Entries {
    pub entries: Vec<DirEntry>,
}

/// Query of `GET /v1/workspaces/{ws}/logs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LogsQuery {
    /// `console` (the default) or `agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#type: Option<LogKind>,
    /// The last this many lines (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<usize>,
}

/// `GET /v1/workspaces/{ws}/logs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LogLines {
    pub lines: Vec<String>,
}

/// Body of `POST /v1/workspaces/{ws}/snapshots`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotRequest {
    pub name: String,
}

/// `DELETE /v1/workspaces/{ws}/snapshots/{name}`: the snapshot's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub deleted: String,
}

/// Body of `POST /v1/workspaces/{ws}/port-forwards`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardParams {
    pub guest_port: u16,
    /// The host port (≥ 1024); chosen when left out.
    #[serde(default)]
    pub host_port: Option<u16>,
    /// The host address to listen on; 127.0.0.1 when left out.
    #[serde(default)]
    pub bind: Option<Ipv4Addr>,
}

/// `DELETE /v1/workspaces/{ws}/port-forwards/{port}`: the guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub removed: u16,
}

#[cfg(test)]
mod tests {
    use serde_json::{json, to_value};

    use super::*;

    /// The small answers keep the shapes they had when they were built by hand.
    #[test]
    fn answers_keep_their_wire_shape() {
        let cases = [
            (
                to_value(Stopping { stopping: true }),
                json!({"stopping": true}),
            ),
            (
                to_value(Destroyed {
                    destroyed: "dev".into(),
                }),
                json!({"destroyed": "dev"}),
            ),
            (to_value(JobStarted { job: 3 }), json!({"job": 3})),
            (to_value(Killed { killed: true }), json!({"killed": true})),
            (to_value(EnvUpdated { ok: true }), json!({"ok": true})),
            (to_value(Written { bytes: 5 }), json!({"bytes": 5})),
            (
                to_value(Edited { replacements: 2 }),
                json!({"replacements": 2}),
            ),
            (
                to_value(Entries { entries: vec![] }),
                json!({"entries": []}),
            ),
            (
                to_value(LogLines {
                    lines: vec!["a".into()],
                }),
                json!({"lines": ["a"]}),
            ),
            (
                to_value(Deleted {
                    deleted: "s1".into(),
                }),
                json!({"deleted": "s1"}),
            ),
            (to_value(Removed { removed: 80 }), json!({"removed": 80})),
        ];
        for (got, want) in cases {
            assert_eq!(got.expect("encodes"), want);
        }
    }

    /// Queries are written by the client and read by the server with the same
    /// type; what one writes the other reads back.
    #[test]
    fn queries_round_trip() {
        let q = LogsQuery {
            r#type: Some(LogKind::Agent),
            lines: Some(7),
        };
        let s = serde_urlencoded::to_string(&q).expect("encodes");
        assert_eq!(s, "type=agent&lines=7");
        let back: LogsQuery = serde_urlencoded::from_str(&s).expect("decodes");
        assert_eq!((back.r#type, back.lines), (Some(LogKind::Agent), Some(7)));
        let s = serde_urlencoded::to_string(ListQuery {
            state: Some("running".into()),
        })
        .expect("encodes");
        assert_eq!(s, "state=running");
        assert_eq!(
            serde_urlencoded::to_string(ListQuery::default()).expect("encodes"),
            ""
        );
        assert_eq!(
            serde_urlencoded::to_string(BuildQuery { force: true }).expect("encodes"),
            "force=true"
        );
    }

    /// docs/api.md names every type of this module, defined or re-exported, so
    /// that a new body cannot go undocumented.
    #[test]
    fn the_api_page_names_every_type() {
        let source = include_str!("types.rs");
        let source = &source[..source.find("#[cfg(test)]").expect("tests")];
        let page = include_str!("../../../docs/api.md");
        let mut names: Vec<&str> = source
            .split("pub struct ")
            .skip(1)
            .filter_map(|s| s.split([' ', '{', '<']).next())
            .collect();
        for stmt in source.split("pub use ").skip(1) {
            let stmt = stmt.split(';').next().unwrap_or_default();
            let list = match stmt.split_once('{') {
                Some((_, l)) => l,
                None => stmt.rsplit("::").next().unwrap_or_default(),
            };
            names.extend(
                list.split([',', '}', ' ', '\n'])
                    .filter(|n| n.starts_with(|c: char| c.is_ascii_uppercase())),
            );
        }
        assert!(names.len() > 40, "{names:?}");
        for n in names {
            let named = page.contains(&format!("`{n}`")) || page.contains(&format!("`[{n}]`"));
            assert!(named, "docs/api.md does not name {n}");
        }
    }
}

/// `POST /v1/containers`: boots a VM for one OCI container (docs/oci.md). The
/// engine shares the bundle's root file system and bind-mount sources with it and
/// writes the spec, its paths rewritten for the guest; the container's process is
/// then created by a `container_create` stream on the VM. Answered with the VM's
/// [`WorkspaceInfo`] once its agent is ready.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerVmRequest {
    /// The id the OCI runtime's caller knows the container by.
    pub id: String,
    /// The OCI runtime's state root (`--root`): ids are unique within one root.
    pub root: String,
    /// The bundle directory on the host; relative paths of the spec are relative to it.
    pub bundle: std::path::PathBuf,
    /// The bundle's config.json as the caller read it.
    pub spec: serde_json::Value,
}

/// `POST /v1/workspaces/{ws}/containers/share`: a container shared with VM `vm`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerShared {
    pub id: String,
    pub vm: String,
}

/// `POST /v1/workspaces/{ws}/containers`: what a [`ContainerOp`] answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ContainerAnswer {
    Status(ContainerStatus),
    Pids { pids: Vec<i32> },
    Stats { stats: serde_json::Value },
}
