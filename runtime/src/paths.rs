//! Where burrow keeps things on the host.
//!
//! A state dir holds one daemon's world: its socket, database, logs, volumes and the
//! run dirs of live VMs. Several state dirs can be served side by side (tests do).
//! The cache dir holds built images and is shared between state dirs.

use std::path::{Path, PathBuf};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/burrow";
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/burrow";

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Uses `root` made absolute, so that paths recorded in the database and in
    /// process command lines mean the same thing from any working directory.
    pub fn new(root: impl AsRef<Path>) -> std::io::Result<Self> {
        let root = std::path::absolute(root.as_ref())?;
        Ok(StateDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn socket(&self) -> PathBuf {
        self.root.join("burrowd.sock")
    }
    /// Locked by the engine serving this state dir for as long as it serves it
    /// (see `engine::StateLock`); never removed.
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("engine.lock")
    }
    /// burrowd's pid, written once it holds the state dir.
    pub fn pid_file(&self) -> PathBuf {
        self.root.join("burrowd.pid")
    }
    pub fn daemon_log(&self) -> PathBuf {
        self.root.join("burrowd.log")
    }
    pub fn database(&self) -> PathBuf {
        self.root.join("burrow.db")
    }
    pub fn volumes(&self) -> PathBuf {
        self.root.join("volumes")
    }
    /// Parent of every VM's run dir. Every process a VM owns names its run dir on its
    /// command line, which is how orphans are found after a crash.
    pub fn run_root(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.run_root().join(id)
    }
    /// Parent of every container VM's dir (docs/oci.md); 0700.
    pub fn containers_root(&self) -> PathBuf {
        self.root.join("containers")
    }
    /// A container VM's dir: `shared/` in it is what its virtio-fs serves.
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.containers_root().join(id)
    }
    /// Per-workspace logs that outlive the VM (console, sidecars).
    pub fn log_dir(&self, id: &str) -> PathBuf {
        self.root.join("logs").join(id)
    }
}

#[derive(Debug, Clone)]
pub struct CacheDir {
    root: PathBuf,
}

impl CacheDir {
    pub fn new(root: impl AsRef<Path>) -> std::io::Result<Self> {
        Ok(CacheDir {
            root: std::path::absolute(root.as_ref())?,
        })
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn kernel_dir(&self) -> PathBuf {
        self.root.join("kernel")
    }
    pub fn kernel(&self) -> PathBuf {
        self.kernel_dir().join("vmlinuz")
    }
    pub fn initramfs_dir(&self) -> PathBuf {
        self.root.join("initramfs")
    }
    pub fn image_dir(&self, name: &str) -> PathBuf {
        self.root.join("images").join(name)
    }
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }
    pub fn accel_probe(&self) -> PathBuf {
        self.root.join("accel-probe.json")
    }
}

/// A companion binary: the path in env var `env` if set, else `name` next to the
/// running executable if it is there.
pub fn companion_binary(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let dir = std::env::current_exe().ok()?.parent()?.to_path_buf();
    let p = dir.join(name);
    p.exists().then_some(p)
}
