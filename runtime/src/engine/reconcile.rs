//! Start-up reconciliation: make the records and the host agree again.
//!
//! After a crash (kill -9 of the daemon, a host reboot) records may describe VMs that
//! died, and processes may run that no record describes. For every record:
//! - `creating`: the create never finished, so undo it;
//! - `destroying`: finish the destroy;
//! - `starting`, `running`, `stopping`: re-adopt the VM if its three processes are
//!   the very ones recorded and its agent answers; otherwise end what is left and
//!   mark it stopped;
//! - `stopped`: nothing should run.
//!
//! Then every process that names a run dir of this state dir but belongs to no
//! adopted VM is killed, and run dirs of VMs that do not run are removed.

use std::collections::HashSet;
use std::time::Duration;

use burrow_proto::Op;

use super::{all_alive, Engine};
use crate::db::{State, WorkspaceRecord};
use crate::error::Result;

impl Engine {
    pub(super) async fn reconcile(self: &std::sync::Arc<Self>) -> Result<()> {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.reconcile()).await {
            Ok(Ok(removed)) => {
                for p in removed {
                    tracing::info!("reconcile: removed half-made volume {}", p.display());
                }
            }
            Ok(Err(e)) => tracing::warn!("reconcile volumes: {e}"),
            Err(e) => tracing::warn!("reconcile volumes: {e}"),
        }
        // Snapshots a crash caught half made or half deleted go.
        for snap in self.db.snapshots(None)? {
            if snap.state != crate::db::SnapshotState::Ready {
                tracing::info!(workspace = %snap.workspace_id, "reconcile: removing unfinished snapshot {}", snap.name);
                self.delete_snapshot_locked(&snap.workspace_id, &snap.name)
                    .await?;
            }
        }
        let mut adopted: HashSet<String> = HashSet::new();
        for rec in self.db.list()? {
            match rec.state {
                State::Creating | State::Destroying => {
                    tracing::info!(workspace = %rec.id, "reconcile: removing workspace left {}", rec.state);
                    self.remove_locked(&rec).await?;
                }
                State::Running if self.adoptable(&rec).await => {
                    tracing::info!(workspace = %rec.id, "reconcile: re-adopted running VM");
                    if let Some(pids) = rec.pids {
                        self.watch(rec.id.clone(), pids);
                    }
                    adopted.insert(rec.id.clone());
                }
                State::Starting | State::Running | State::Stopping => {
                    tracing::info!(workspace = %rec.id, "reconcile: VM of a {} workspace is gone; marking it stopped", rec.state);
                    if let Some(pids) = rec.pids {
                        for p in pids.every() {
                            p.kill().await;
                        }
                    }
                    self.release_cgroup(&rec.id).await;
                    self.clear_run_dir(&rec.id);
                    self.db.set_pids(&rec.id, None)?;
                    self.db.set_state(&rec.id, State::Stopped)?;
                }
                State::Stopped => {
                    if rec.pids.is_some() {
                        self.db.set_pids(&rec.id, None)?;
                    }
                }
            }
        }
        // The network keeps addresses for the workspaces there are, no others.
        if let Ok(net) = &self.net {
            let ids = self.db.list()?.into_iter().map(|r| r.id).collect();
            net.sync(ids, self.db.teams()?);
        }
        self.sweep_orphans(&adopted).await;
        self.sweep_container_dirs().await;
        Ok(())
    }

    /// The recorded processes still run and the agent answers.
    async fn adoptable(&self, rec: &WorkspaceRecord) -> bool {
        let Some(pids) = rec.pids else { return false };
        if !all_alive(&pids) {
            return false;
        }
        let guest = self.guest(rec);
        guest
            .call(Op::Ping, Some(Duration::from_secs(10)))
            .await
            .is_ok()
    }

    async fn sweep_orphans(&self, adopted: &HashSet<String>) {
        let run_root = self.state.run_root();
        let mut keep = HashSet::new();
        for id in adopted {
            if let Ok(Some(rec)) = self.db.get(id) {
                if let Some(p) = rec.pids {
                    keep.extend(p.every().iter().map(|p| p.pid));
                }
            }
        }
        let volumes = self.store.volumes_dir();
        // A container VM's virtiofsd names its shared dir, under containers/.
        let containers = self.state.containers_root();
        for p in crate::process::processes_mentioning(&[&run_root, &volumes, &containers]) {
            // A helper forked by an adopted process (virtiofsd's sandboxed child)
            // shares its process group: it belongs to that VM.
            // SAFETY: getpgid has no memory effects.
            let group = unsafe { libc::getpgid(p.pid) };
            if !keep.contains(&p.pid) && !keep.contains(&group) {
                tracing::info!(pid = p.pid, "reconcile: killing orphaned VM process");
                p.kill().await;
            }
        }
        // Cgroups of VMs that do not run: what is left in them is killed, then they
        // go. Adopted VMs keep theirs.
        if let Some(cgroups) = &self.vmm.cgroups {
            for id in cgroups.ids() {
                if !adopted.contains(&id) {
                    tracing::info!(workspace = %id, "reconcile: removing a stale cgroup");
                    self.release_cgroup(&id).await;
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir(&run_root) {
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !adopted.contains(&name) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }
}
