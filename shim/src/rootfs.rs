//! The task's root file system as containerd hands it over: a list of mounts
//! (a snapshotter's overlay) the shim mounts at `<bundle>/rootfs`, which
//! burrowd then shares with the VM; or none, when the bundle already has one.

use std::path::Path;

use containerd_shim::protos::api::Mount;

/// Mounts `mounts` on `<bundle>/rootfs`; whether there were any. On failure
/// nothing stays mounted.
pub async fn mount(bundle: &Path, mounts: &[Mount]) -> Result<bool, String> {
    if mounts.is_empty() {
        return Ok(false);
    }
    let target = bundle.join("rootfs");
    if let Err(e) = tokio::fs::create_dir_all(&target).await {
        return Err(format!("rootfs: create {}: {e}", target.display()));
    }
    for (i, m) in mounts.iter().enumerate() {
        if let Err(e) = containerd_shim::asynchronous::util::mount_rootfs(m, &target).await {
            unmount(bundle).await;
            return Err(format!(
                "rootfs[{i}]: mount {} ({}) on {}: {e}",
                m.source,
                m.type_,
                target.display()
            ));
        }
    }
    Ok(true)
}

/// Unmounts everything on `<bundle>/rootfs` (lazily: a reader that lingers
/// does not keep the task's delete waiting).
pub async fn unmount(bundle: &Path) {
    let target = bundle.join("rootfs");
    let _ = tokio::task::spawn_blocking(move || {
        let Ok(c) = std::ffi::CString::new(target.into_os_string().into_encoded_bytes()) else {
            return;
        };
        // One umount per stacked mount; EINVAL once nothing is mounted there.
        for _ in 0..16 {
            // SAFETY: umount2 reads a NUL-terminated path.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                break;
            }
        }
    })
    .await;
}
