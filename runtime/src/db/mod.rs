//! The state database: one SQLite file per state dir holding the workspace records.
//!
//! Records are written before the resources they describe are created, so a daemon
//! that crashed can find and reconcile whatever it left behind.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// The record exists; the volume is being made. A crash here undoes the create.
    Creating,
    Starting,
    Running,
    Stopping,
    Stopped,
    /// Being torn down. A crash here finishes the destroy.
    Destroying,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Creating => "creating",
            State::Starting => "starting",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Destroying => "destroying",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        Some(match s {
            "creating" => State::Creating,
            "starting" => State::Starting,
            "running" => State::Running,
            "stopping" => State::Stopping,
            "stopped" => State::Stopped,
            "destroying" => State::Destroying,
            _ => return None,
        })
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A process the engine started, identified beyond its pid: the start time (in clock
/// ticks since boot, from /proc/PID/stat) tells a live process from a recycled pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    pub pid: i32,
    pub start_time: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPids {
    pub qemu: ProcId,
    pub virtiofsd: ProcId,
    pub vsock: ProcId,
    /// The console writer (burrow-console), in QEMU's process group; absent in
    /// records of older builds, whose QEMU wrote its console itself.
    #[serde(default)]
    pub console: Option<ProcId>,
}

impl VmPids {
    /// The three processes the VM cannot run without.
    pub fn all(&self) -> [ProcId; 3] {
        [self.qemu, self.virtiofsd, self.vsock]
    }

    /// Every process of the VM, the console writer included.
    pub fn every(&self) -> Vec<ProcId> {
        let mut v = self.all().to_vec();
        v.extend(self.console);
        v
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceRecord {
    pub id: String,
    pub name: String,
    pub state: State,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub image: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// Accelerator of the current or last boot (`kvm` or `tcg`).
    pub accel: Option<String>,
    pub store: String,
    pub volume: PathBuf,
    pub pids: Option<VmPids>,
    /// The snapshot this workspace was forked from.
    pub forked_from: Option<ForkedFrom>,
    /// Most bytes its volume may hold (see `Store::set_disk_limit`); none on
    /// stores that cannot limit.
    pub disk_limit: Option<u64>,
    pub kind: Kind,
    /// The OCI container a `container` VM was made for.
    pub container: Option<ContainerRef>,
}

/// What a VM is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A workspace: its own volume as the root file system.
    #[default]
    Workspace,
    /// One OCI container (docs/oci.md): no volume; the bundle's root file system
    /// and mounts reach it through a shared directory.
    Container,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Workspace => "workspace",
            Kind::Container => "container",
        }
    }
}

/// The OCI container a container VM serves, as the OCI runtime's caller named it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRef {
    /// The container's id.
    pub id: String,
    /// The OCI runtime's state root (`--root`).
    pub root: String,
    /// The bundle directory on the host.
    pub bundle: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkedFrom {
    pub workspace_id: String,
    /// The source's name when the fork was made.
    pub workspace: String,
    pub snapshot: String,
}

mod snapshots;
mod teams;

pub use snapshots::{SnapshotRecord, SnapshotState};

pub struct Db {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS workspaces (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    vcpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    image TEXT NOT NULL,
    created_at TEXT NOT NULL,
    accel TEXT,
    store TEXT NOT NULL,
    volume TEXT NOT NULL,
    pids TEXT,
    forked_from TEXT,
    head TEXT,
    disk_limit INTEGER,
    kind TEXT,
    oci_id TEXT,
    oci_root TEXT,
    oci_bundle TEXT
);
CREATE TABLE IF NOT EXISTS teams (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS team_members (
    team TEXT NOT NULL,
    workspace_id TEXT NOT NULL,
    PRIMARY KEY (team, workspace_id)
);
CREATE TABLE IF NOT EXISTS snapshots (
    workspace_id TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at TEXT NOT NULL,
    state TEXT NOT NULL,
    parent TEXT,
    PRIMARY KEY (workspace_id, name)
);
";

const COLUMNS: &str = "id, name, state, vcpus, memory_mib, image, created_at, accel, store, \
     volume, pids, forked_from, disk_limit, kind, oci_id, oci_root, oci_bundle";

impl Db {
    pub fn open(path: &Path) -> Result<Db> {
        let conn = Connection::open(path)?;
        // WAL + synchronous=NORMAL: a committed record survives a daemon crash (the
        // case that matters); only a host power cut can lose the last transaction.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        // Columns added after the first release: state dirs made before lack them.
        for (table, column, kind) in [
            ("workspaces", "forked_from", "TEXT"),
            ("workspaces", "head", "TEXT"),
            ("snapshots", "parent", "TEXT"),
            ("workspaces", "disk_limit", "INTEGER"),
            ("workspaces", "kind", "TEXT"),
            ("workspaces", "oci_id", "TEXT"),
            ("workspaces", "oci_root", "TEXT"),
            ("workspaces", "oci_bundle", "TEXT"),
        ] {
            if conn
                .prepare(&format!("SELECT {column} FROM {table} LIMIT 0"))
                .is_err()
            {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
            }
        }
        Ok(Db {
            conn: Mutex::new(conn),
        })
    }

    pub(crate) fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        // A poisoned lock only means another thread panicked mid-call; SQLite's own
        // transaction state is still consistent, so keep going.
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&conn)?)
    }

    /// Inserts a new record; a name already in use is [`Error::NameTaken`].
    pub fn insert(&self, w: &WorkspaceRecord) -> Result<()> {
        let pids = pids_json(w.pids.as_ref());
        let forked_from = w
            .forked_from
            .as_ref()
            .and_then(|f| serde_json::to_string(f).ok());
        let res = self.with(|c| {
            c.execute(
                &format!("INSERT INTO workspaces ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"),
                params![
                    w.id,
                    w.name,
                    w.state.as_str(),
                    w.vcpus,
                    w.memory_mib,
                    w.image,
                    w.created_at,
                    w.accel,
                    w.store,
                    w.volume.to_string_lossy(),
                    pids,
                    forked_from,
                    w.disk_limit.map(|b| b.min(i64::MAX as u64) as i64),
                    w.kind.as_str(),
                    w.container.as_ref().map(|c| c.id.as_str()),
                    w.container.as_ref().map(|c| c.root.as_str()),
                    w.container
                        .as_ref()
                        .map(|c| c.bundle.to_string_lossy().into_owned()),
                ],
            )
        });
        match res {
            Err(Error::Db(rusqlite::Error::SqliteFailure(e, _)))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(Error::NameTaken(w.name.clone()))
            }
            other => other.map(|_| ()),
        }
    }

    pub fn get(&self, id: &str) -> Result<Option<WorkspaceRecord>> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM workspaces WHERE id = ?1"),
                [id],
                row,
            )
            .optional()
        })
    }

    /// Finds a workspace by id or by name; an exact id wins, as in Docker.
    pub fn resolve(&self, reference: &str) -> Result<WorkspaceRecord> {
        let found = self.with(|c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM workspaces WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC LIMIT 1"),
                [reference],
                row,
            )
            .optional()
        })?;
        found.ok_or_else(|| Error::WorkspaceNotFound(reference.to_string()))
    }

    pub fn list(&self) -> Result<Vec<WorkspaceRecord>> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {COLUMNS} FROM workspaces ORDER BY created_at, name"
            ))?;
            let rows = stmt.query_map([], row)?;
            rows.collect()
        })
    }

    pub fn set_state(&self, id: &str, state: State) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE workspaces SET state = ?2 WHERE id = ?1",
                params![id, state.as_str()],
            )
        })?;
        Ok(())
    }

    pub fn set_pids(&self, id: &str, pids: Option<&VmPids>) -> Result<()> {
        let pids = pids_json(pids);
        self.with(|c| {
            c.execute(
                "UPDATE workspaces SET pids = ?2 WHERE id = ?1",
                params![id, pids],
            )
        })?;
        Ok(())
    }

    pub fn set_accel(&self, id: &str, accel: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE workspaces SET accel = ?2 WHERE id = ?1",
                params![id, accel],
            )
        })?;
        Ok(())
    }

    /// The snapshot the workspace's disk last came from or was frozen as
    /// (`name`, or `workspace@name` for the snapshot a fork started from).
    pub fn head(&self, id: &str) -> Result<Option<String>> {
        Ok(self
            .with(|c| {
                c.query_row("SELECT head FROM workspaces WHERE id = ?1", [id], |r| {
                    r.get(0)
                })
                .optional()
            })?
            .flatten())
    }

    pub fn set_head(&self, id: &str, head: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE workspaces SET head = ?2 WHERE id = ?1",
                params![id, head],
            )
        })?;
        Ok(())
    }

    pub fn delete(&self, id: &str) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM team_members WHERE workspace_id = ?1", [id])?;
            c.execute("DELETE FROM workspaces WHERE id = ?1", [id])
        })?;
        Ok(())
    }
}

fn pids_json(p: Option<&VmPids>) -> Option<String> {
    p.and_then(|p| serde_json::to_string(p).ok())
}

fn row(r: &Row<'_>) -> rusqlite::Result<WorkspaceRecord> {
    let state: String = r.get(2)?;
    let pids: Option<String> = r.get(10)?;
    let volume: String = r.get(9)?;
    let forked_from: Option<String> = r.get(11)?;
    let disk_limit: Option<i64> = r.get(12)?;
    let kind: Option<String> = r.get(13)?;
    let oci_id: Option<String> = r.get(14)?;
    let oci_root: Option<String> = r.get(15)?;
    let oci_bundle: Option<String> = r.get(16)?;
    // Records made before kinds existed are workspaces.
    let kind = match kind.as_deref() {
        Some("container") => Kind::Container,
        _ => Kind::Workspace,
    };
    let container = match (oci_id, oci_root, oci_bundle) {
        (Some(id), Some(root), Some(bundle)) => Some(ContainerRef {
            id,
            root,
            bundle: PathBuf::from(bundle),
        }),
        _ => None,
    };
    Ok(WorkspaceRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        // A state string this build does not know can only come from a newer build;
        // treating it as stopped makes reconciliation look at the processes.
        state: State::parse(&state).unwrap_or(State::Stopped),
        vcpus: r.get(3)?,
        memory_mib: r.get(4)?,
        image: r.get(5)?,
        created_at: r.get(6)?,
        accel: r.get(7)?,
        store: r.get(8)?,
        volume: PathBuf::from(volume),
        pids: pids.and_then(|s| serde_json::from_str(&s).ok()),
        forked_from: forked_from.and_then(|s| serde_json::from_str(&s).ok()),
        disk_limit: disk_limit.and_then(|b| u64::try_from(b).ok()),
        kind,
        container,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, name: &str) -> WorkspaceRecord {
        WorkspaceRecord {
            id: id.into(),
            name: name.into(),
            state: State::Creating,
            vcpus: 1,
            memory_mib: 512,
            image: "debian".into(),
            created_at: "2026-01-01T00:00:00Z".into(),
            accel: None,
            store: "copy".into(),
            volume: "/v/a".into(),
            pids: None,
            forked_from: None,
            disk_limit: Some(1 << 30),
            kind: Kind::Workspace,
            container: None,
        }
    }

    #[test]
    fn insert_resolve_update_delete() {
        let t = tempfile::tempdir().unwrap();
        let db = Db::open(&t.path().join("db")).unwrap();
        db.insert(&rec("aaaaaaaaaaaa", "dev")).unwrap();
        assert!(matches!(
            db.insert(&rec("bbbbbbbbbbbb", "dev")),
            Err(Error::NameTaken(_))
        ));
        assert_eq!(db.resolve("dev").unwrap().id, "aaaaaaaaaaaa");
        assert_eq!(db.resolve("aaaaaaaaaaaa").unwrap().name, "dev");
        assert!(matches!(
            db.resolve("nope"),
            Err(Error::WorkspaceNotFound(_))
        ));
        let pids = VmPids {
            qemu: ProcId {
                pid: 1,
                start_time: 2,
            },
            virtiofsd: ProcId {
                pid: 3,
                start_time: 4,
            },
            vsock: ProcId {
                pid: 5,
                start_time: 6,
            },
            console: Some(ProcId {
                pid: 7,
                start_time: 8,
            }),
        };
        db.set_pids("aaaaaaaaaaaa", Some(&pids)).unwrap();
        db.set_state("aaaaaaaaaaaa", State::Running).unwrap();
        let got = db.get("aaaaaaaaaaaa").unwrap().unwrap();
        assert_eq!(got.pids, Some(pids));
        assert_eq!(got.state, State::Running);
        db.delete("aaaaaaaaaaaa").unwrap();
        assert!(db.list().unwrap().is_empty());
    }

    #[test]
    fn a_container_vm_keeps_its_kind_and_container() {
        let t = tempfile::tempdir().unwrap();
        let db = Db::open(&t.path().join("db")).unwrap();
        let mut r = rec("cccccccccccc", "c-0123456789ab");
        r.kind = Kind::Container;
        r.container = Some(ContainerRef {
            id: "web".into(),
            root: "/run/burrow-runtime".into(),
            bundle: "/b/web".into(),
        });
        db.insert(&r).unwrap();
        db.insert(&rec("aaaaaaaaaaaa", "dev")).unwrap();
        assert_eq!(db.get("cccccccccccc").unwrap(), Some(r));
        let w = db.get("aaaaaaaaaaaa").unwrap().unwrap();
        assert_eq!((w.kind, w.container), (Kind::Workspace, None));
    }

    /// A state dir made before kinds existed gains the columns; its records are
    /// workspaces.
    #[test]
    fn old_databases_gain_the_kind_columns() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE workspaces (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, \
                 state TEXT NOT NULL, vcpus INTEGER NOT NULL, memory_mib INTEGER NOT NULL, \
                 image TEXT NOT NULL, created_at TEXT NOT NULL, accel TEXT, store TEXT NOT NULL, \
                 volume TEXT NOT NULL, pids TEXT); \
                 INSERT INTO workspaces VALUES ('aaaaaaaaaaaa', 'old', 'stopped', 1, 512, \
                 'debian', '2026-01-01T00:00:00Z', NULL, 'copy', '/v/a', NULL);",
            )
            .unwrap();
        }
        let db = Db::open(&path).unwrap();
        let w = db.get("aaaaaaaaaaaa").unwrap().unwrap();
        assert_eq!(
            (w.name.as_str(), w.kind, w.container),
            ("old", Kind::Workspace, None)
        );
    }

    #[test]
    fn an_id_wins_over_a_name() {
        let t = tempfile::tempdir().unwrap();
        let db = Db::open(&t.path().join("db")).unwrap();
        db.insert(&rec("aaaaaaaaaaaa", "x")).unwrap();
        db.insert(&rec("bbbbbbbbbbbb", "aaaaaaaaaaaa")).unwrap();
        assert_eq!(db.resolve("aaaaaaaaaaaa").unwrap().id, "aaaaaaaaaaaa");
    }
}
