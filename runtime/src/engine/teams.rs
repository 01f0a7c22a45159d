//! Teams: workspaces made together that reach each other on the network (and
//! nothing else unless their own policy says so), destroyed together.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{CreateParams, Engine, State};
use crate::error::{Error, Result};
use crate::names::validate_name;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TeamParams {
    pub name: String,
    /// Names of the member workspaces to create.
    pub members: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TeamMember {
    pub name: String,
    pub workspace_id: String,
    pub ip: Option<String>,
    pub state: State,
}

impl Engine {
    /// Creates team `name` and its member workspaces, in parallel. All or nothing.
    pub async fn team_create(self: &Arc<Self>, p: TeamParams) -> Result<Vec<TeamMember>> {
        burrow_netd::protocol::validate_team(&p.name).map_err(|m| Error::invalid("team", m))?;
        if p.members.is_empty() {
            return Err(Error::invalid("member", "a team needs at least one member"));
        }
        for (i, m) in p.members.iter().enumerate() {
            validate_name("member", m)?;
            if p.members[..i].contains(m) {
                return Err(Error::invalid("member", format!("{m:?} is given twice")));
            }
            if self.db.resolve(m).is_ok_and(|r| r.name == *m) {
                return Err(Error::NameTaken(m.clone()));
            }
        }
        let net = self.network()?;
        if !self.db.insert_team(&p.name, &super::now_rfc3339())? {
            return Err(Error::TeamExists(p.name));
        }
        let made = futures_util::future::join_all(p.members.iter().map(|m| {
            self.create(
                CreateParams {
                    name: Some(m.clone()),
                    ..Default::default()
                },
                None,
            )
        }))
        .await;
        let mut ids = Vec::new();
        let mut failure = None;
        for r in made {
            match r {
                Ok(w) => ids.push(w.id),
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        if let Some(e) = failure {
            futures_util::future::join_all(ids.iter().map(|id| self.destroy(id))).await;
            self.db.delete_team(&p.name)?;
            return Err(e);
        }
        for id in &ids {
            self.db.add_team_member(&p.name, id)?;
        }
        let name = p.name.clone();
        tokio::task::spawn_blocking(move || net.set_team(&name, ids))
            .await
            .map_err(|e| Error::Vmm(format!("network task: {e}")))?
            .map_err(|e| Error::Vmm(e.to_string()))?;
        self.team_status(&p.name).await
    }

    pub async fn team_status(&self, name: &str) -> Result<Vec<TeamMember>> {
        if !self.db.team_exists(name)? {
            return Err(Error::TeamNotFound(name.to_string()));
        }
        self.db
            .team_members(name)?
            .into_iter()
            .map(|id| {
                let w = self.info(&id)?;
                Ok(TeamMember {
                    name: w.name,
                    workspace_id: w.id,
                    ip: w.ip,
                    state: w.state,
                })
            })
            .collect()
    }

    /// Destroys every member (in parallel), then the team's rules and record.
    pub async fn team_destroy(self: &Arc<Self>, name: &str) -> Result<()> {
        if !self.db.team_exists(name)? {
            return Err(Error::TeamNotFound(name.to_string()));
        }
        let ids = self.db.team_members(name)?;
        let done = futures_util::future::join_all(ids.iter().map(|id| self.destroy(id))).await;
        if let Some(Err(e)) = done.into_iter().find(Result::is_err) {
            return Err(e);
        }
        if let Ok(net) = &self.net {
            let net = net.clone();
            let n = name.to_string();
            let _ = tokio::task::spawn_blocking(move || net.remove_team(&n)).await;
        }
        self.db.delete_team(name)
    }
}
