//! Guest images: the kernel, the initramfs that carries the agent, and base root
//! file systems. Built by the scripts in `images/` (embedded here), cached in the
//! cache dir, which is shared between state dirs and so guarded by a file lock.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::paths::CacheDir;

const KERNEL_SH: &str = include_str!("../../images/kernel.sh");
const INITRAMFS_SH: &str = include_str!("../../images/initramfs.sh");
const ROOTFS_DEBIAN_SH: &str = include_str!("../../images/rootfs-debian.sh");

/// The images this build knows how to make.
pub const IMAGES: &[&str] = &["debian"];
pub const DEFAULT_IMAGE: &str = "debian";

/// Progress lines of a build, for whoever shows them.
pub type Progress = mpsc::UnboundedSender<String>;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageInfo {
    pub name: String,
    #[serde(default)]
    pub suite: String,
    pub built_at: i64,
    pub size_bytes: u64,
    #[serde(default)]
    pub packages: u64,
    #[serde(default)]
    pub path: PathBuf,
}

/// What a VM boots: kernel, initramfs and the root file system to copy.
#[derive(Debug, Clone)]
pub struct BootArtifacts {
    pub kernel: PathBuf,
    pub kernel_version: String,
    pub initramfs: PathBuf,
}

pub struct ImageCache {
    dir: CacheDir,
    agent: PathBuf,
    /// Serialises builds inside this daemon; the file lock covers other daemons.
    build: tokio::sync::Mutex<()>,
}

impl ImageCache {
    pub fn new(dir: CacheDir, agent: PathBuf) -> Self {
        ImageCache {
            dir,
            agent,
            build: tokio::sync::Mutex::new(()),
        }
    }

    pub fn dir(&self) -> &CacheDir {
        &self.dir
    }

    pub fn rootfs(&self, name: &str) -> PathBuf {
        self.dir.image_dir(name).join("rootfs")
    }

    pub fn info(&self, name: &str) -> Option<ImageInfo> {
        let dir = self.dir.image_dir(name);
        let text = std::fs::read_to_string(dir.join("manifest.json")).ok()?;
        let mut info: ImageInfo = serde_json::from_str(&text).ok()?;
        info.path = dir.join("rootfs");
        Some(info)
    }

    pub fn list(&self) -> Vec<ImageInfo> {
        IMAGES.iter().filter_map(|n| self.info(n)).collect()
    }

    pub fn validate(name: &str) -> Result<()> {
        if IMAGES.contains(&name) {
            Ok(())
        } else {
            Err(Error::invalid(
                "image",
                format!(
                    "{name:?} is not a known image; known: {}",
                    IMAGES.join(", ")
                ),
            ))
        }
    }

    /// Builds the image `name` (and the kernel) if missing. With `force`, rebuilds
    /// the root file system even if present.
    pub async fn build(
        &self,
        name: &str,
        force: bool,
        progress: Option<&Progress>,
    ) -> Result<ImageInfo> {
        Self::validate(name)?;
        let _guard = self.build.lock().await;
        let _flock = self.file_lock().await?;
        self.kernel_locked(progress).await?;
        let dir = self.dir.image_dir(name);
        if force {
            let manifest = dir.join("manifest.json");
            if manifest.exists() {
                std::fs::remove_file(&manifest)
                    .map_err(|e| Error::io(format!("remove {}", manifest.display()), e))?;
            }
        }
        if self.info(name).is_none() {
            let script = match name {
                "debian" => ROOTFS_DEBIAN_SH,
                _ => return Err(Error::ImageNotFound(name.to_string())),
            };
            say(
                progress,
                format!("building image {name} (takes a few minutes the first time)"),
            );
            run_script(script, &[self.dir.root().as_os_str()], progress).await?;
        }
        self.info(name).ok_or_else(|| {
            Error::ImageBuild(format!("the {name} build finished without a manifest"))
        })
    }

    /// Kernel and initramfs for the current agent, built if missing.
    pub async fn boot_artifacts(&self, progress: Option<&Progress>) -> Result<BootArtifacts> {
        if let Some(a) = self.ready_artifacts()? {
            return Ok(a);
        }
        let _guard = self.build.lock().await;
        let _flock = self.file_lock().await?;
        let kernel_version = self.kernel_locked(progress).await?;
        let initramfs = self.initramfs_path(&kernel_version)?;
        if !initramfs.exists() {
            say(progress, "building the initramfs".to_string());
            std::fs::create_dir_all(self.dir.initramfs_dir()).map_err(|e| {
                Error::io(format!("create {}", self.dir.initramfs_dir().display()), e)
            })?;
            exact_mode(&self.dir.initramfs_dir(), 0o755)?;
            let args = [
                self.dir.root().as_os_str(),
                self.agent.as_os_str(),
                initramfs.as_os_str(),
            ];
            run_script(INITRAMFS_SH, &args, progress).await?;
            self.drop_old_initramfs(&initramfs);
        }
        self.readable_by_the_vmm(&initramfs)?;
        Ok(BootArtifacts {
            kernel: self.dir.kernel(),
            kernel_version,
            initramfs,
        })
    }

    /// Every agent build gets its own initramfs; old ones would pile up. QEMU reads
    /// its initramfs at start, so removing one never disturbs a running VM; one
    /// used in the last hour is kept, as another daemon on this cache may boot it.
    fn drop_old_initramfs(&self, keep: &std::path::Path) {
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        let dir = self.dir.initramfs_dir();
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < hour_ago);
            if p != keep && old && e.file_name().to_string_lossy().starts_with("initramfs-") {
                let _ = std::fs::remove_file(&p);
            }
        }
    }

    /// QEMU runs as the unprivileged VMM user and reads the kernel and initramfs
    /// by their own modes: readable by all, writable by root alone, whatever the
    /// umask of whoever built them (a cache built before, or by a CLI under umask
    /// 000, is put right here). No directory of the cache may let anyone else swap
    /// them, or the image a volume is made from.
    fn readable_by_the_vmm(&self, initramfs: &std::path::Path) -> Result<()> {
        for dir in [self.dir.root().to_path_buf(), self.dir.images()] {
            if dir.exists() {
                exact_mode(&dir, 0o755)?;
            }
        }
        exact_mode(&self.dir.initramfs_dir(), 0o755)?;
        exact_mode(&self.dir.kernel_dir(), 0o755)?;
        exact_mode(initramfs, 0o644)?;
        exact_mode(&self.dir.kernel(), 0o644)
    }

    fn ready_artifacts(&self) -> Result<Option<BootArtifacts>> {
        let Some(kernel_version) = self.kernel_version() else {
            return Ok(None);
        };
        let initramfs = self.initramfs_path(&kernel_version)?;
        if !initramfs.exists() {
            return Ok(None);
        }
        self.readable_by_the_vmm(&initramfs)?;
        // Marks it used, for drop_old_initramfs.
        if let Ok(f) = std::fs::File::options().append(true).open(&initramfs) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        Ok(Some(BootArtifacts {
            kernel: self.dir.kernel(),
            kernel_version,
            initramfs,
        }))
    }

    fn kernel_version(&self) -> Option<String> {
        let v = std::fs::read_to_string(self.dir.kernel_dir().join("version")).ok()?;
        let v = v.trim().to_string();
        (self.dir.kernel().exists() && !v.is_empty()).then_some(v)
    }

    async fn kernel_locked(&self, progress: Option<&Progress>) -> Result<String> {
        if let Some(v) = self.kernel_version() {
            return Ok(v);
        }
        say(progress, "fetching the guest kernel".to_string());
        run_script(KERNEL_SH, &[self.dir.root().as_os_str()], progress).await?;
        self.kernel_version()
            .ok_or_else(|| Error::ImageBuild("the kernel build left no kernel".into()))
    }

    /// The initramfs is named by a hash of what goes into it, so a new agent build
    /// gets a new initramfs and running VMs keep the one they booted.
    fn initramfs_path(&self, kernel_version: &str) -> Result<PathBuf> {
        let mut agent = std::fs::File::open(&self.agent).map_err(|e| {
            Error::io(
                format!(
                    "agent binary {} (set BURROW_AGENT to its path)",
                    self.agent.display()
                ),
                e,
            )
        })?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = agent
                .read(&mut buf)
                .map_err(|e| Error::io(format!("read {}", self.agent.display()), e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        h.update(INITRAMFS_SH.as_bytes());
        h.update(kernel_version.as_bytes());
        let digest = h.finalize();
        let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Ok(self
            .dir
            .initramfs_dir()
            .join(format!("initramfs-{hex}.cpio")))
    }

    async fn file_lock(&self) -> Result<std::fs::File> {
        let root = self.dir.root().to_path_buf();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&root)
                .map_err(|e| Error::io(format!("create {}", root.display()), e))?;
            let path = root.join(".build.lock");
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
            // SAFETY: flock on an fd we own; blocks until other builders are done.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(Error::io(
                    format!("lock {}", path.display()),
                    std::io::Error::last_os_error(),
                ));
            }
            Ok(f)
        })
        .await
        .map_err(|e| Error::ImageBuild(format!("lock task: {e}")))?
    }
}

/// The target the static agent is built for (`--target` keeps the static flag off
/// build scripts and proc-macros): `RUSTFLAGS='-C target-feature=+crt-static' cargo
/// build -p burrow-agent --target x86_64-unknown-linux-gnu`.
pub const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Where the agent binary is: `BURROW_AGENT`; else, for an executable in cargo's
/// `target/<profile>/`, the static build of the same profile,
/// `target/x86_64-unknown-linux-gnu/<profile>/burrow-agent`; else next to the
/// running executable; else the install location. The one agent serves workspaces
/// and container VMs, so it is linked statically (the initramfs build refuses a
/// dynamic one).
pub fn find_agent() -> PathBuf {
    if let Some(p) = std::env::var_os("BURROW_AGENT") {
        return PathBuf::from(p);
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(std::path::Path::to_path_buf));
    if let Some(dir) = &exe_dir {
        if let Some(p) = cargo_static_agent(dir) {
            return p;
        }
    }
    crate::paths::companion_binary("BURROW_AGENT", "burrow-agent")
        .unwrap_or_else(|| PathBuf::from("/usr/local/lib/burrow/burrow-agent"))
}

/// `<target>/<AGENT_TARGET>/<profile>/burrow-agent` for `dir` = `<target>/<profile>`,
/// if it exists.
pub fn cargo_static_agent(dir: &std::path::Path) -> Option<PathBuf> {
    let profile = dir.file_name()?;
    let target = dir.parent()?;
    let p = target.join(AGENT_TARGET).join(profile).join("burrow-agent");
    p.is_file().then_some(p)
}

fn say(progress: Option<&Progress>, line: String) {
    tracing::info!("{line}");
    if let Some(p) = progress {
        let _ = p.send(line);
    }
}

/// Gives `path` exactly `mode` (permission bits), if it has another.
fn exact_mode(path: &std::path::Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(path).map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    if meta.permissions().mode() & 0o7777 != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
    }
    Ok(())
}

/// Runs an embedded build script with bash, forwarding its stderr lines as progress
/// and keeping the last ones for the error message.
async fn run_script(
    script: &str,
    args: &[&std::ffi::OsStr],
    progress: Option<&Progress>,
) -> Result<()> {
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg("-c")
        .arg(script)
        .arg("burrow-image-build")
        .args(args);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // What the scripts make (the kernel bundle, the initramfs, the image's root
    // file system) gets the usual modes whatever the umask of the daemon (077) or
    // of the CLI that asked: a guest's /etc/apt/sources.list must be readable by
    // its users, the VMM user must read the kernel.
    // SAFETY: umask is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| Error::io("run bash", e))?;
    let mut tail: Vec<String> = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(p) = progress {
                let _ = p.send(line.clone());
            }
            tracing::debug!(target: "image", "{line}");
            tail.push(line);
            if tail.len() > 5 {
                tail.remove(0);
            }
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|e| Error::io("wait for bash", e))?;
    if status.success() {
        Ok(())
    } else {
        let last = tail
            .last()
            .cloned()
            .unwrap_or_else(|| format!("build script exited with {status}"));
        Err(Error::ImageBuild(last))
    }
}
