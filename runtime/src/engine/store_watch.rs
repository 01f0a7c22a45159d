//! Watching the volume store's server (the FUSE layer server): when it dies,
//! every running VM's root file system goes with it. The engine waits on the
//! server's pidfd; on its death it starts a new server and boots the VMs that
//! ran again on it (their volumes are intact: only the server's memory is
//! lost, and the kernel dropped the writes it had not passed on yet, as a
//! crash would).

use std::sync::Arc;

use super::{now_rfc3339, vm::append_line, Engine};
use crate::db::{ProcId, State};
use crate::error::{Error, Result};

impl Engine {
    /// Starts watching the store's server, unless a watch runs already or the
    /// store has none.
    pub(super) fn watch_store(self: &Arc<Self>) {
        let mut slot = self.store_watch.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let Some(proc) = self.store.server_pid().and_then(ProcId::of) else {
            return;
        };
        let engine = Arc::downgrade(self);
        *slot = Some(tokio::spawn(async move {
            let mut proc = proc;
            loop {
                proc.exited().await;
                let Some(engine) = engine.upgrade() else {
                    return;
                };
                engine.store_server_died(proc.pid).await;
                match engine.store.server_pid().and_then(ProcId::of) {
                    Some(next) => proc = next,
                    // Not running again: the next boot starts it and a watch.
                    None => return,
                }
            }
        }));
    }

    /// Stops watching (the daemon is about to shut the server down itself).
    pub(super) fn unwatch_store(&self) {
        if let Some(t) = self
            .store_watch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
        }
    }

    /// After the daemon's start: if opening the store had to replace a server
    /// that died while the daemon was down, the VMs re-adopted on its volumes
    /// boot again on the new one.
    pub(super) fn recover_store_replaced_at_open(self: &Arc<Self>) {
        if self.store.take_server_replaced() {
            let engine = self.clone();
            tokio::spawn(async move { engine.store_server_died(0).await });
        }
    }

    async fn store_server_died(self: &Arc<Self>, pid: i32) {
        let running: Vec<String> = match self.db.list() {
            Ok(l) => l
                .into_iter()
                .filter(|w| matches!(w.state, State::Running | State::Starting))
                .map(|w| w.id)
                .collect(),
            Err(e) => {
                tracing::error!("store server {pid} died; listing workspaces: {e}");
                return;
            }
        };
        tracing::warn!(
            pid,
            workspaces = running.len(),
            "the volume store's server died; starting a new one and rebooting its VMs"
        );
        let store = self.store.clone();
        let revived = match tokio::task::spawn_blocking(move || store.ensure_ready()).await {
            Ok(r) => r.map_err(Error::from),
            Err(e) => Err(Error::Vmm(format!("volume task: {e}"))),
        };
        // This very death is being dealt with.
        self.store.take_server_replaced();
        for id in running {
            let reason = match &revived {
                Ok(()) => self.reboot_on_new_server(&id).await.err(),
                Err(e) => {
                    self.stop_dead_vm(&id).await;
                    Some(format!("{e}"))
                }
            };
            if let Some(reason) = reason {
                tracing::error!(workspace = %id, "after the store server died: {reason}");
                let _ = append_line(
                    &self.paths(&id).console(),
                    &format!(
                        "--- burrow: stopped at {}: the volume server died and the workspace could not boot again: {reason} ---",
                        now_rfc3339()
                    ),
                );
            }
        }
    }

    /// Ends what is left of a VM whose volume went away, and marks it stopped.
    async fn stop_dead_vm(&self, id: &str) {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        let Ok(Some(rec)) = self.db.get(id) else {
            return;
        };
        self.cancel_watcher(id);
        if let Some(pids) = rec.pids {
            // Nothing to shut down cleanly: its root file system is gone.
            for p in pids.all() {
                p.kill().await;
            }
        }
        self.clear_run_dir(id);
        let _ = self.db.set_pids(id, None);
        let _ = self.db.set_state(id, State::Stopped);
    }

    async fn reboot_on_new_server(self: &Arc<Self>, id: &str) -> std::result::Result<(), String> {
        self.stop_dead_vm(id).await;
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        let rec = match self.db.get(id) {
            Ok(Some(r)) => r,
            // Destroyed meanwhile.
            Ok(None) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        if rec.state != State::Stopped {
            return Ok(());
        }
        let _ = append_line(
            &self.paths(id).console(),
            &format!(
                "--- burrow: the volume server died; booting again at {} ---",
                now_rfc3339()
            ),
        );
        let booted: Result<()> = self
            .start_locked(&rec, super::DEFAULT_BOOT_TIMEOUT, None)
            .await;
        booted.map_err(|e| e.to_string())
    }
}
