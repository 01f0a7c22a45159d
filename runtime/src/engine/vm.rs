//! A workspace's VM: booting it and waiting for its agent, stopping it, and
//! watching its processes while it runs.

use std::sync::Arc;
use std::time::Duration;

use burrow_proto::{Op, READY_PORT};

use super::{now_rfc3339, Engine};
use crate::db::{Kind, State, VmPids, WorkspaceRecord};
use crate::error::{Error, Result};
use crate::guest::ReadyListener;
use crate::image::Progress;
use crate::vmm::{self, BootMode, VmPaths, VmSpec};

/// How long a workspace's cgroup removal is retried while its last processes are
/// still being torn down: REMOVE_ATTEMPTS × REMOVE_RETRY.
const REMOVE_ATTEMPTS: u32 = 100;
const REMOVE_RETRY: Duration = Duration::from_millis(20);

impl Engine {
    pub(super) async fn start_locked(
        self: &Arc<Self>,
        rec: &WorkspaceRecord,
        timeout: Duration,
        progress: Option<&Progress>,
    ) -> Result<()> {
        let boot = self.images.boot_artifacts(progress).await?;
        let accel = *self
            .accel
            .get_or_init(|| vmm::accel::choose(self.images.dir(), &boot))
            .await;
        let container = rec.kind == Kind::Container;
        // The store's server may have died since the last boot: bring it back
        // (so `start` always recovers), then put the disk limit on the volume.
        // A container VM has no volume.
        if !container {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.ensure_ready())
                .await
                .map_err(|e| Error::Vmm(format!("volume task: {e}")))??;
            self.watch_store();
            self.apply_disk_limit(rec).await?;
        }
        let paths = self.paths(&rec.id);
        self.clear_run_dir(&rec.id);
        paths
            .prepare(self.vmm.confine.as_ref())
            .map_err(|e| Error::io(format!("create {}", paths.run_dir.display()), e))?;
        let _ = append_line(
            &paths.console(),
            &format!(
                "--- burrow: boot at {} ({}) ---",
                now_rfc3339(),
                accel.as_str()
            ),
        );
        self.db.set_state(&rec.id, State::Starting)?;
        self.db.set_accel(&rec.id, accel.as_str())?;
        let ready_path = paths.vsock_listener(READY_PORT);
        let ready = ReadyListener::bind(&ready_path)?;
        if let Some(user) = &self.vmm.confine {
            // vhost-device-vsock, as the VMM user, connects to it for the guest.
            if let Err(e) = user.own(&ready_path, 0o600) {
                return self.boot_aborted(rec, Error::Vmm(e.to_string()));
            }
        }
        // The cgroup is named by the id (its record): made before any process.
        let cgroup = match &self.vmm.cgroups {
            Some(c) => match c.create(&rec.id, &vmm::Limits::for_vm(rec.vcpus, rec.memory_mib)) {
                Ok(cg) => Some(cg),
                Err(e) => return self.boot_aborted(rec, Error::Vmm(e.to_string())),
            },
            None => None,
        };
        let net = match &self.net {
            // A container VM takes over the interface of the network namespace its
            // caller made, if any; it has no lease on burrow's network.
            _ if container => match self.container_net(&rec.id).await {
                Ok(net) => net,
                Err(e) => {
                    self.release_cgroup(&rec.id).await;
                    return self.boot_aborted(rec, Error::Vmm(format!("network: {e}")));
                }
            },
            Ok(n) => match n.attach(&rec.id) {
                Ok((lease, net)) => {
                    tracing::info!(workspace = %rec.id, ip = %lease.ip, tap = %lease.tap, "network");
                    Some(net)
                }
                Err(e) => {
                    self.release_cgroup(&rec.id).await;
                    return self.boot_aborted(rec, Error::Vmm(format!("network: {e}")));
                }
            },
            Err(_) => match self.network() {
                Err(e) => return self.boot_aborted(rec, e),
                Ok(_) => None,
            },
        };
        let spec = VmSpec {
            id: rec.id.clone(),
            hostname: rec.name.clone(),
            vcpus: rec.vcpus,
            memory_mib: rec.memory_mib,
            accel,
            kernel: boot.kernel,
            initramfs: boot.initramfs,
            root: rec.volume.clone(),
            mode: if container {
                BootMode::Container
            } else {
                BootMode::Workspace
            },
            run_dir: paths.run_dir.clone(),
            log_dir: paths.log_dir.clone(),
            net,
            confine: self.vmm.confine.clone(),
            cgroup,
            console: self.vmm.console.clone(),
        };
        let pids = match vmm::launch(&spec).await {
            Ok(p) => p,
            Err(e) => {
                self.release_cgroup(&rec.id).await;
                self.clear_run_dir(&rec.id);
                self.db.set_state(&rec.id, State::Stopped)?;
                return Err(Error::Vmm(e.to_string()));
            }
        };
        self.db.set_pids(&rec.id, Some(&pids))?;
        let started = tokio::time::Instant::now();
        let outcome = tokio::select! {
            r = ready.ready() => r.map_err(|e| Error::io("wait for the agent", e)),
            _ = pids.qemu.exited() => Err(Error::BootFailed {
                name: rec.name.clone(),
                reason: boot_failure_reason(&paths),
                tail: vmm::console_tail_one_line(&paths),
            }),
            _ = tokio::time::sleep(timeout) => Err(Error::BootTimeout {
                name: rec.name.clone(),
                secs: timeout.as_secs(),
                tail: vmm::console_tail_one_line(&paths),
            }),
        };
        drop(ready);
        if let Err(e) = outcome {
            self.shutdown_vm(rec, &pids).await;
            self.release_cgroup(&rec.id).await;
            self.clear_run_dir(&rec.id);
            self.db.set_pids(&rec.id, None)?;
            self.db.set_state(&rec.id, State::Stopped)?;
            return Err(e);
        }
        tracing::info!(workspace = %rec.id, ms = started.elapsed().as_millis() as u64, "agent ready");
        self.db.set_state(&rec.id, State::Running)?;
        self.watch(rec.id.clone(), pids);
        Ok(())
    }

    pub(super) async fn stop_locked(&self, rec: &WorkspaceRecord) -> Result<()> {
        self.db.set_state(&rec.id, State::Stopping)?;
        self.cancel_watcher(&rec.id);
        if let Some(pids) = rec.pids {
            self.shutdown_vm(rec, &pids).await;
        }
        self.release_cgroup(&rec.id).await;
        self.clear_run_dir(&rec.id);
        self.db.set_pids(&rec.id, None)?;
        self.db.set_state(&rec.id, State::Stopped)
    }

    /// Removes a workspace's cgroup once its VM is down. Whatever still runs in it
    /// is by construction a process of that VM (a straggler, or an orphan of a
    /// crashed daemon), so it is killed first.
    pub(super) async fn release_cgroup(&self, id: &str) {
        let Some(cgroups) = &self.vmm.cgroups else {
            return;
        };
        // A process that has exited can stay a member for a moment (a sidecar's
        // forked helper, exiting with its parent, until it is reaped), and the
        // kernel refuses to remove a populated cgroup (EBUSY). cgroup v1 has no
        // event for "empty" (v2's cgroup.events has, but one code path serves
        // both), so this retries, briefly and boundedly.
        let mut last = None;
        for attempt in 0..REMOVE_ATTEMPTS {
            for pid in cgroups.pids(id) {
                if let Some(p) = crate::db::ProcId::of(pid) {
                    if attempt == 0 {
                        tracing::info!(workspace = %id, pid, "killing a process left in the VM's cgroup");
                    }
                    p.kill().await;
                }
            }
            match cgroups.remove(id) {
                Ok(()) => return,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(REMOVE_RETRY).await;
        }
        if let Some(e) = last {
            tracing::warn!(workspace = %id, "{e}");
        }
    }

    /// Ends a VM: the agent powers the guest off; failing that QMP `quit`; failing
    /// that SIGKILL. Then the sidecars, which have nothing left to serve.
    pub(super) async fn shutdown_vm(&self, rec: &WorkspaceRecord, pids: &VmPids) {
        let qemu = pids.qemu;
        if qemu.is_alive() {
            let guest = self.guest(rec);
            let asked = guest
                .call(Op::Shutdown, Some(Duration::from_secs(5)))
                .await
                .is_ok();
            let exited = asked
                && tokio::time::timeout(Duration::from_secs(15), qemu.exited())
                    .await
                    .is_ok();
            if !exited && qemu.is_alive() {
                tracing::info!(workspace = %rec.id, "agent shutdown did not end the VM; QMP quit");
                let paths = self.paths(&rec.id);
                let quit = async {
                    if let Ok(mut q) =
                        vmm::qmp::Qmp::connect(&paths.qmp(), Duration::from_secs(3)).await
                    {
                        let _ = q.execute("quit", serde_json::json!({})).await;
                    }
                    qemu.exited().await;
                };
                if tokio::time::timeout(Duration::from_secs(5), quit)
                    .await
                    .is_err()
                {
                    qemu.kill().await;
                }
            }
        }
        qemu.reap();
        for p in [pids.virtiofsd, pids.vsock] {
            p.terminate(Duration::from_secs(3)).await;
        }
        // The console writer ends by itself once QEMU's end of the pipe closes.
        if let Some(c) = pids.console {
            if tokio::time::timeout(Duration::from_secs(3), c.exited())
                .await
                .is_err()
            {
                c.kill().await;
            }
        }
    }

    /// A boot given up before QEMU started: the workspace is stopped again.
    fn boot_aborted(&self, rec: &WorkspaceRecord, e: Error) -> Result<()> {
        self.clear_run_dir(&rec.id);
        self.db.set_state(&rec.id, State::Stopped)?;
        Err(e)
    }

    pub(super) fn clear_run_dir(&self, id: &str) {
        let dir = self.state.run_dir(id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("remove {}: {e}", dir.display());
            }
        }
    }

    /// Watches a running VM's processes; if any dies on its own, the rest are
    /// ended and the workspace is marked stopped.
    pub(super) fn watch(self: &Arc<Self>, id: String, pids: VmPids) {
        let engine = Arc::downgrade(self);
        let wid = id.clone();
        // The console needs no trimming here: its writer bounds it.
        let task = tokio::spawn(async move {
            let [a, b, c] = pids.all();
            let which = tokio::select! {
                _ = a.exited() => "qemu",
                _ = b.exited() => "virtiofsd",
                _ = c.exited() => "vhost-device-vsock",
            };
            let Some(engine) = engine.upgrade() else {
                return;
            };
            engine.vm_died(&wid, pids, which).await;
        });
        let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = w.insert(id, task) {
            old.abort();
        }
    }

    async fn vm_died(self: &Arc<Self>, id: &str, pids: VmPids, which: &str) {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        // Whoever held the lock may have dealt with this VM already.
        let Ok(Some(rec)) = self.db.get(id) else {
            return;
        };
        if rec.pids != Some(pids) {
            return;
        }
        tracing::warn!(workspace = %id, "{which} exited unexpectedly; stopping the workspace");
        let paths = self.paths(id);
        let _ = append_line(
            &paths.console(),
            &format!(
                "--- burrow: {which} exited unexpectedly at {} ---",
                now_rfc3339()
            ),
        );
        for p in pids.all() {
            p.kill().await;
        }
        if let Some(c) = pids.console {
            // Its pipe closed with QEMU: it ends by itself.
            let _ = tokio::time::timeout(Duration::from_secs(3), c.exited()).await;
        }
        self.release_cgroup(id).await;
        self.clear_run_dir(id);
        let _ = self.db.set_pids(id, None);
        let _ = self.db.set_state(id, State::Stopped);
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    pub(super) fn cancel_watcher(&self, id: &str) {
        if let Some(t) = self
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
        {
            t.abort();
        }
    }
}

/// Why QEMU exited during boot: the initramfs's own reason if it gave one, else
/// QEMU's last words.
fn boot_failure_reason(paths: &VmPaths) -> String {
    let console = vmm::console_tail(paths, 50);
    if let Some(l) = console
        .iter()
        .rev()
        .find(|l| l.contains("BURROW-INIT-FAILED"))
    {
        return l.trim().to_string();
    }
    let qemu = vmm::tail_lines(&paths.qemu_log(), 3);
    match qemu.last() {
        Some(l) => format!("qemu exited: {}", l.trim()),
        None => "qemu exited".to_string(),
    }
}

pub(super) fn append_line(path: &std::path::Path, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{line}")
}
