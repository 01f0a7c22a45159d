//! Choosing the accelerator: KVM only when a guest really boots under it.
//!
//! `/dev/kvm` can exist and still be unusable: under nested paravirtual KVM
//! (`kvm_pvm`) stock kernels die with "failed to set MSR 0x10a". So the probe boots
//! the real guest kernel and initramfs under KVM with a root tag that does not exist:
//! if the initramfs gets far enough to report that, KVM works. The answer is cached
//! per host kernel, QEMU build and guest kernel.

use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::image::BootArtifacts;
use crate::paths::CacheDir;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

#[derive(Serialize, Deserialize, PartialEq, Eq)]
struct ProbeKey {
    host_kernel: String,
    qemu: String,
    guest_kernel: String,
}

#[derive(Serialize, Deserialize)]
struct ProbeRecord {
    key: ProbeKey,
    accel: Accel,
}

/// Marker the initramfs prints when it cannot mount the root: proof it ran.
const INIT_MARKER: &str = "BURROW-INIT-FAILED";

pub async fn choose(cache: &CacheDir, boot: &BootArtifacts) -> Accel {
    match std::env::var("BURROW_ACCEL").as_deref() {
        Ok("kvm") => return Accel::Kvm,
        Ok("tcg") => return Accel::Tcg,
        _ => {}
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Accel::Tcg;
    }
    let key = ProbeKey {
        host_kernel: host_kernel(),
        qemu: qemu_version().await,
        guest_kernel: boot.kernel_version.clone(),
    };
    let path = cache.accel_probe();
    if let Some(rec) = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<ProbeRecord>(&b).ok())
    {
        if rec.key == key {
            return rec.accel;
        }
    }
    let accel = if probe_kvm(boot).await {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    tracing::info!(accel = accel.as_str(), "accelerator probe");
    if let Ok(bytes) = serde_json::to_vec(&ProbeRecord { key, accel }) {
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, bytes).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    accel
}

fn host_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

async fn qemu_version() -> String {
    let out = tokio::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .await;
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    })
    .unwrap_or_default()
}

async fn probe_kvm(boot: &BootArtifacts) -> bool {
    let Ok(dir) = tempfile_dir() else {
        return false;
    };
    let console = dir.join("console.log");
    let mut cmd = tokio::process::Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,isa-serial=on",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "256M",
    ])
    .args([
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-monitor",
        "none",
    ])
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .arg("-kernel")
    .arg(&boot.kernel)
    .arg("-initrd")
    .arg(&boot.initramfs)
    .args([
        "-append",
        "console=ttyS0 panic=-1 burrow.root=burrow-accel-probe",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .kill_on_drop(true);
    let ok = match cmd.spawn() {
        Ok(mut child) => {
            let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
            let _ = child.kill().await;
            std::fs::read_to_string(&console)
                .map(|c| c.contains(INIT_MARKER))
                .unwrap_or(false)
        }
        Err(_) => false,
    };
    let _ = std::fs::remove_dir_all(&dir);
    ok
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("burrow-accel-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
