//! Team records: a team is recorded before its members are made, and its members
//! as each is made, so that reconciliation sees what a crash left.

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension};

use super::Db;
use crate::error::Result;

impl Db {
    /// Records team `name`; false if it exists.
    pub fn insert_team(&self, name: &str, created_at: &str) -> Result<bool> {
        let n = self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO teams (name, created_at) VALUES (?1, ?2)",
                params![name, created_at],
            )
        })?;
        Ok(n == 1)
    }

    pub fn team_exists(&self, name: &str) -> Result<bool> {
        let found: Option<String> = self.with(|c| {
            c.query_row("SELECT name FROM teams WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
        })?;
        Ok(found.is_some())
    }

    pub fn add_team_member(&self, team: &str, workspace_id: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO team_members (team, workspace_id) VALUES (?1, ?2)",
                params![team, workspace_id],
            )
        })?;
        Ok(())
    }

    /// Workspace ids of team `name`'s members.
    pub fn team_members(&self, name: &str) -> Result<Vec<String>> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT workspace_id FROM team_members WHERE team = ?1 ORDER BY rowid")?;
            let rows = st.query_map([name], |r| r.get(0))?;
            rows.collect()
        })
    }

    /// The team `workspace_id` belongs to, if any.
    pub fn team_of(&self, workspace_id: &str) -> Result<Option<String>> {
        self.with(|c| {
            c.query_row(
                "SELECT team FROM team_members WHERE workspace_id = ?1",
                [workspace_id],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// Every team with its members' workspace ids.
    pub fn teams(&self) -> Result<BTreeMap<String, Vec<String>>> {
        let names: Vec<String> = self.with(|c| {
            let mut st = c.prepare("SELECT name FROM teams ORDER BY name")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect()
        })?;
        names
            .into_iter()
            .map(|n| {
                let m = self.team_members(&n)?;
                Ok((n, m))
            })
            .collect()
    }

    pub fn delete_team(&self, name: &str) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM team_members WHERE team = ?1", [name])?;
            c.execute("DELETE FROM teams WHERE name = ?1", [name])
        })?;
        Ok(())
    }
}
