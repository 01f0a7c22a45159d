//! Snapshot records. Like workspaces, a snapshot is recorded (`creating`) before the
//! store makes it and marked `deleting` before the store removes it, so that start-up
//! reconciliation can finish or undo whatever a crash interrupted.

use rusqlite::{params, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use super::{Db, WorkspaceRecord};
use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotState {
    Creating,
    Ready,
    Deleting,
}

impl SnapshotState {
    fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Creating => "creating",
            SnapshotState::Ready => "ready",
            SnapshotState::Deleting => "deleting",
        }
    }

    fn parse(s: &str) -> SnapshotState {
        match s {
            "ready" => SnapshotState::Ready,
            "deleting" => SnapshotState::Deleting,
            // Anything else is unfinished: reconciliation undoes it.
            _ => SnapshotState::Creating,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub workspace_id: String,
    pub name: String,
    pub created_at: String,
    pub state: SnapshotState,
    /// The snapshot this one was taken on top of, if any.
    pub parent: Option<String>,
}

fn row(r: &Row<'_>) -> rusqlite::Result<SnapshotRecord> {
    let state: String = r.get(3)?;
    Ok(SnapshotRecord {
        workspace_id: r.get(0)?,
        name: r.get(1)?,
        created_at: r.get(2)?,
        state: SnapshotState::parse(&state),
        parent: r.get(4)?,
    })
}

const COLUMNS: &str = "workspace_id, name, created_at, state, parent";

impl Db {
    /// Records a snapshot about to be made. False if the name is taken.
    pub fn insert_snapshot(&self, s: &SnapshotRecord) -> Result<bool> {
        let n = self.with(|c| {
            c.execute(
                &format!("INSERT OR IGNORE INTO snapshots ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"),
                params![
                    s.workspace_id,
                    s.name,
                    s.created_at,
                    s.state.as_str(),
                    s.parent
                ],
            )
        })?;
        Ok(n == 1)
    }

    pub fn snapshot(&self, workspace_id: &str, name: &str) -> Result<Option<SnapshotRecord>> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM snapshots WHERE workspace_id = ?1 AND name = ?2"),
                [workspace_id, name],
                row,
            )
            .optional()
        })
    }

    /// Snapshots of one workspace, or of all with None, oldest first.
    pub fn snapshots(&self, workspace_id: Option<&str>) -> Result<Vec<SnapshotRecord>> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {COLUMNS} FROM snapshots WHERE ?1 IS NULL OR workspace_id = ?1 ORDER BY created_at, name"
            ))?;
            let rows = stmt.query_map([workspace_id], row)?;
            rows.collect()
        })
    }

    pub fn set_snapshot_state(
        &self,
        workspace_id: &str,
        name: &str,
        state: SnapshotState,
    ) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE snapshots SET state = ?3 WHERE workspace_id = ?1 AND name = ?2",
                params![workspace_id, name, state.as_str()],
            )
        })?;
        Ok(())
    }

    pub fn delete_snapshot(&self, workspace_id: &str, name: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM snapshots WHERE workspace_id = ?1 AND name = ?2",
                [workspace_id, name],
            )
        })?;
        Ok(())
    }

    /// Workspaces forked from snapshot `name` of `workspace_id`.
    pub fn forks_of(&self, workspace_id: &str, name: &str) -> Result<Vec<WorkspaceRecord>> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|w| {
                w.forked_from
                    .as_ref()
                    .is_some_and(|f| f.workspace_id == workspace_id && f.snapshot == name)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_records() {
        let t = tempfile::tempdir().unwrap();
        let db = Db::open(&t.path().join("db")).unwrap();
        let s = SnapshotRecord {
            workspace_id: "aaaaaaaaaaaa".into(),
            name: "s1".into(),
            created_at: "2026-01-01T00:00:00Z".into(),
            state: SnapshotState::Creating,
            parent: None,
        };
        assert!(db.insert_snapshot(&s).unwrap());
        assert!(!db.insert_snapshot(&s).unwrap(), "a name is taken once");
        db.set_snapshot_state("aaaaaaaaaaaa", "s1", SnapshotState::Ready)
            .unwrap();
        assert_eq!(
            db.snapshot("aaaaaaaaaaaa", "s1").unwrap().unwrap().state,
            SnapshotState::Ready
        );
        assert_eq!(db.snapshots(Some("aaaaaaaaaaaa")).unwrap().len(), 1);
        assert_eq!(db.snapshots(None).unwrap().len(), 1);
        assert!(db.snapshots(Some("bbbbbbbbbbbb")).unwrap().is_empty());
        db.delete_snapshot("aaaaaaaaaaaa", "s1").unwrap();
        assert!(db.snapshot("aaaaaaaaaaaa", "s1").unwrap().is_none());
    }
}
