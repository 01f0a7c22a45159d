//! The FUSE backend: a copy-on-write layer file system for hosts whose state dir
//! is not on Btrfs and for users who are not root.
//!
//! A volume is a chain of frozen layers plus a writable upper layer, merged by a
//! FUSE server (`burrow-cowfs`, one per store) and mounted at
//! `<root>/mnt/volumes/<id>`; virtiofsd shares that directory with the guest like
//! any other. A snapshot freezes the upper layer and gives the volume a new,
//! empty one; a fork is a new upper layer on a snapshot's chain; a restore puts
//! the volume on a new upper layer over the snapshot's chain. Each is one
//! directory and one small file: O(1) in the size of the volume.
//!
//! [`FuseStore`] is the client side: it imports images, starts (or finds) the
//! server, and asks it for every change over `<root>/control.sock`, one JSON line
//! per request. Reads of the catalog (list, get, snapshots) go to its files.

mod catalog;
mod fuse;
mod fusermount;
mod layer;
pub mod server;
mod tree;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use crate::layout::PARTIAL;
use crate::{
    validate_id, validate_snapshot_name, ImageSource, Snapshot, Store, StoreError, Usage, Volume,
};

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Control {
    Ping,
    Create {
        id: String,
        image: String,
    },
    Delete {
        id: String,
    },
    Snapshot {
        volume: String,
        name: String,
    },
    Restore {
        volume: String,
        name: String,
    },
    Clone {
        volume: String,
        name: String,
        id: String,
    },
    DeleteSnapshot {
        volume: String,
        name: String,
    },
    Collect {
        keep_image: Option<String>,
    },
    SetLimit {
        id: String,
        bytes: Option<u64>,
    },
    DiskUsage {
        id: String,
    },
    Shutdown,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Reply {
    Ok,
    Collected(Vec<PathBuf>),
    DiskUsage(crate::DiskUsage),
    Exists(String),
    NotFound(String),
    SnapshotExists { volume: String, name: String },
    SnapshotNotFound { volume: String, name: String },
    Failed(String),
}

/// The directories of layer files, sealed nosuid,nodev as root.
const SEALED: [&str; 2] = ["images", "layers"];

pub struct FuseStore {
    root: PathBuf,
    binary: PathBuf,
    /// One request at a time: the server answers in order anyway, and a restart
    /// after a server crash must not race another.
    control: Mutex<Option<BufReader<UnixStream>>>,
    importing: Mutex<()>,
    /// Set when a server was started in place of one that died mounted.
    replaced: std::sync::atomic::AtomicBool,
}

impl FuseStore {
    /// A store in `root`, served by `binary` (`burrow-cowfs`). Starts the server
    /// unless one already serves `root`.
    pub fn open(root: impl Into<PathBuf>, binary: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        // Layers hold guests' files as they made them (setuid bits, device
        // nodes) on the host's own file system, which may allow both: only
        // root may reach them.
        crate::private_dir(&root)?;
        for d in ["images", "layers", "meta", "meta/volumes", "meta/snapshots"] {
            crate::private_dir(&root.join(d))?;
        }
        // Mounted already when a server serves it (a daemon restart).
        crate::private_mountpoint(&root.join("mnt"))?;
        seal(&root)?;
        let store = FuseStore {
            root,
            binary: binary.into(),
            control: Mutex::new(None),
            importing: Mutex::new(()),
            replaced: std::sync::atomic::AtomicBool::new(false),
        };
        store.request(&Control::Ping)?;
        Ok(store)
    }

    pub fn mountpoint(&self) -> PathBuf {
        self.root.join("mnt")
    }

    fn meta(&self) -> PathBuf {
        self.root.join("meta")
    }

    /// Sends one request, starting the server first if none answers.
    fn request(&self, req: &Control) -> Result<Reply, StoreError> {
        let mut conn = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let mut line = serde_json::to_vec(req).map_err(|e| self.failed(e.to_string()))?;
        line.push(b'\n');
        for attempt in 0..2 {
            if conn.is_none() {
                // A server that failed a request once is replaced: it may be dying
                // (still holding its socket) or hung.
                let existing = match attempt {
                    0 => UnixStream::connect(self.root.join("control.sock")).ok(),
                    _ => None,
                };
                *conn = Some(BufReader::new(match existing {
                    Some(s) => s,
                    None => self.start()?,
                }));
            }
            let Some(c) = conn.as_mut() else { continue };
            let mut answer = String::new();
            let sent = c
                .get_mut()
                .write_all(&line)
                .and_then(|_| c.read_line(&mut answer));
            match sent {
                Ok(n) if n > 0 => {
                    return serde_json::from_str(&answer)
                        .map_err(|e| self.failed(format!("bad answer {answer:?}: {e}")))
                }
                // The server went away (killed, or a previous one): start anew.
                _ => *conn = None,
            }
        }
        Err(self.failed("the server does not answer".into()))
    }

    fn failed(&self, message: String) -> StoreError {
        StoreError::Io {
            op: "burrow-cowfs",
            path: self.root.clone(),
            source: std::io::Error::other(message),
        }
    }

    /// Starts the server: clears what a dead one left (its mount, its process),
    /// then waits for its `ready` and connects.
    fn start(&self) -> Result<UnixStream, StoreError> {
        let mnt = self.mountpoint();
        if crate::loop_image::is_mountpoint(&mnt) {
            // A server died (or hangs) with its volumes mounted: whatever ran
            // on them lost them.
            self.replaced
                .store(true, std::sync::atomic::Ordering::Release);
        }
        self.end_previous();
        seal(&self.root)?;
        let log = self.root.join("cowfs.log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| StoreError::io("open", &log, e))?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("serve")
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        // Its own session: a signal to the starter's process group (a daemon being
        // stopped) must not take the volumes of running VMs with it.
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            })
        };
        let mut child = cmd
            .spawn()
            .map_err(|e| StoreError::io("spawn", &self.binary, e))?;
        let mut out = String::new();
        if let Some(stdout) = child.stdout.take() {
            let _ = BufReader::new(stdout).read_line(&mut out);
        }
        // Reap it whenever it exits; the store does not wait for it otherwise.
        std::thread::spawn(move || child.wait());
        if out.trim() != "ready" {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let last = tail.lines().last().unwrap_or("exited before mounting");
            return Err(self.failed(format!("mount {}: {last}", mnt.display())));
        }
        UnixStream::connect(self.root.join("control.sock"))
            .map_err(|e| StoreError::io("connect", &self.root, e))
    }

    /// Ends a server that no longer answers and detaches its mount.
    fn end_previous(&self) {
        if let Some(pid) = self.server_pid() {
            // SAFETY: kill of a pid read from our own pid file, checked to be a
            // burrow-cowfs serving this root.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            wait_exit(pid, Duration::from_secs(5));
        }
        detach(&self.mountpoint());
    }

    /// The pid of a live server of this store, from its pid file.
    fn server_pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.root.join("cowfs.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let root = self.root.as_os_str().as_encoded_bytes();
        let serves_us = cmdline.split(|b| *b == 0).any(|arg| arg == root);
        serves_us.then_some(pid)
    }

    fn expect_ok(&self, reply: Reply) -> Result<(), StoreError> {
        match reply {
            Reply::Ok | Reply::Collected(_) | Reply::DiskUsage(_) => Ok(()),
            Reply::Exists(id) => Err(StoreError::Exists(id)),
            Reply::NotFound(id) => Err(StoreError::NotFound(id)),
            Reply::SnapshotExists { volume, name } => {
                Err(StoreError::SnapshotExists { volume, name })
            }
            Reply::SnapshotNotFound { volume, name } => {
                Err(StoreError::SnapshotNotFound { volume, name })
            }
            Reply::Failed(m) => Err(self.failed(m)),
        }
    }

    fn ask(&self, req: Control) -> Result<(), StoreError> {
        let reply = self.request(&req)?;
        self.expect_ok(reply)
    }

    /// Imports `image` as a layer once (a copy; reflinked where the file system
    /// can), returning its layer name.
    fn import(&self, image: &ImageSource) -> Result<String, StoreError> {
        validate_id(&image.key)?;
        let layer = format!("images/{}", image.key);
        let dest = self.root.join(&layer);
        if dest.is_dir() {
            return Ok(layer);
        }
        let _one = self.importing.lock().unwrap_or_else(|p| p.into_inner());
        if dest.is_dir() {
            return Ok(layer);
        }
        if !image.root.is_dir() {
            return Err(StoreError::BadImage(image.root.clone()));
        }
        let partial = self.root.join(format!("images/{PARTIAL}{}", image.key));
        let _ = std::fs::remove_dir_all(&partial);
        let status = Command::new("cp")
            .arg("-a")
            .arg("--reflink=auto")
            .arg(&image.root)
            .arg(&partial)
            .status()
            .map_err(|e| StoreError::io("cp", &image.root, e))?;
        if !status.success() {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(StoreError::io(
                "copy",
                &image.root,
                std::io::Error::other(format!("cp exited with {status}")),
            ));
        }
        std::fs::rename(&partial, &dest).map_err(|e| StoreError::io("rename", &dest, e))?;
        Ok(layer)
    }

    fn chain_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.meta().join("volumes"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        for dir in crate::layout::subdirs(&self.meta().join("snapshots")) {
            files.extend(
                std::fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        }
        files.retain(|p| {
            p.extension().is_some_and(|x| x == "json")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        });
        files
    }
}

fn read_chain(path: &Path) -> Option<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct ChainFile {
        layers: Vec<String>,
    }
    let f: ChainFile = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    Some(f.layers)
}

/// As root, seals the layer directories: bind-mounted nosuid,nodev, so that
/// even a layer file reached by other means than its path (a leaked fd, a
/// loosened mode) is inert. (As a user, the files are that user's own.)
fn seal(root: &Path) -> Result<(), StoreError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        for d in SEALED {
            crate::loop_image::seal_dir(&root.join(d))?;
        }
    }
    Ok(())
}

/// Waits until process `pid` has exited, up to `timeout`; false if it has not.
fn wait_exit(pid: i32, timeout: Duration) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return true; // no such process
    }
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // A pidfd becomes readable when the process exits.
    // SAFETY: one pollfd that lives across the call.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) > 0 }
}

/// Detaches a FUSE mount whose server is gone (the mount then answers ENOTCONN).
fn detach(mnt: &Path) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        if let Ok(c) = layer::cpath(mnt) {
            // SAFETY: umount2 with a NUL-terminated path; failing is harmless.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    } else {
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(mnt)
            .stderr(Stdio::null())
            .status();
    }
}

impl Store for FuseStore {
    fn kind(&self) -> &'static str {
        "fuse"
    }

    fn volume_path(&self, id: &str) -> PathBuf {
        self.volumes_dir().join(id)
    }

    fn volumes_dir(&self) -> PathBuf {
        self.mountpoint().join("volumes")
    }

    fn create(&self, id: &str, image: &ImageSource) -> Result<Volume, StoreError> {
        validate_id(id)?;
        let layer = self.import(image)?;
        self.ask(Control::Create {
            id: id.to_string(),
            image: layer,
        })?;
        Ok(Volume {
            id: id.to_string(),
            path: self.volume_path(id),
        })
    }

    fn prepare(&self, image: &ImageSource) -> Result<(), StoreError> {
        let layer = self.import(image)?;
        self.ask(Control::Collect {
            keep_image: Some(layer),
        })
    }

    fn delete(&self, id: &str) -> Result<(), StoreError> {
        validate_id(id)?;
        self.ask(Control::Delete { id: id.to_string() })
    }

    fn get(&self, id: &str) -> Option<Volume> {
        validate_id(id).ok()?;
        self.meta()
            .join("volumes")
            .join(format!("{id}.json"))
            .is_file()
            .then(|| Volume {
                id: id.to_string(),
                path: self.volume_path(id),
            })
    }

    fn list(&self) -> Result<Vec<Volume>, StoreError> {
        let dir = self.meta().join("volumes");
        let rd = std::fs::read_dir(&dir).map_err(|e| StoreError::io("read", &dir, e))?;
        let mut out: Vec<Volume> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let id = name.strip_suffix(".json")?;
                validate_id(id).ok()?;
                Some(Volume {
                    id: id.to_string(),
                    path: self.volume_path(id),
                })
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn snapshot(&self, volume: &str, name: &str) -> Result<Snapshot, StoreError> {
        validate_id(volume)?;
        validate_snapshot_name(name)?;
        self.ask(Control::Snapshot {
            volume: volume.to_string(),
            name: name.to_string(),
        })?;
        Ok(Snapshot {
            volume: volume.to_string(),
            name: name.to_string(),
            path: self.mountpoint().join("snapshots").join(volume).join(name),
        })
    }

    fn restore(&self, volume: &str, name: &str) -> Result<(), StoreError> {
        validate_id(volume)?;
        validate_snapshot_name(name)?;
        self.ask(Control::Restore {
            volume: volume.to_string(),
            name: name.to_string(),
        })
    }

    fn clone_snapshot(&self, volume: &str, name: &str, id: &str) -> Result<Volume, StoreError> {
        validate_id(volume)?;
        validate_snapshot_name(name)?;
        validate_id(id)?;
        self.ask(Control::Clone {
            volume: volume.to_string(),
            name: name.to_string(),
            id: id.to_string(),
        })?;
        Ok(Volume {
            id: id.to_string(),
            path: self.volume_path(id),
        })
    }

    fn delete_snapshot(&self, volume: &str, name: &str) -> Result<(), StoreError> {
        validate_id(volume)?;
        validate_snapshot_name(name)?;
        self.ask(Control::DeleteSnapshot {
            volume: volume.to_string(),
            name: name.to_string(),
        })
    }

    fn snapshots(&self, volume: &str) -> Result<Vec<Snapshot>, StoreError> {
        validate_id(volume)?;
        let dir = self.meta().join("snapshots").join(volume);
        // The catalog keeps `<name>.json`; the snapshot is seen in the mount.
        let mut out: Vec<Snapshot> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let file = e.file_name().to_string_lossy().into_owned();
                let name = file.strip_suffix(".json")?;
                validate_snapshot_name(name).ok()?;
                Some(Snapshot {
                    volume: volume.to_string(),
                    name: name.to_string(),
                    path: self.mountpoint().join("snapshots").join(volume).join(name),
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn snapshot_usage(&self, volume: &str, name: &str) -> Result<Usage, StoreError> {
        validate_id(volume)?;
        validate_snapshot_name(name)?;
        let file = self
            .meta()
            .join("snapshots")
            .join(volume)
            .join(format!("{name}.json"));
        let chain = read_chain(&file).ok_or_else(|| StoreError::SnapshotNotFound {
            volume: volume.to_string(),
            name: name.to_string(),
        })?;
        let mut refs: BTreeMap<String, usize> = BTreeMap::new();
        for f in self.chain_files() {
            for l in read_chain(&f).unwrap_or_default() {
                *refs.entry(l).or_insert(0) += 1;
            }
        }
        let mut usage = Usage::default();
        for l in &chain {
            let path = self.root.join(l);
            let bytes = crate::usage(&path)
                .map_err(|e| StoreError::io("measure", &path, e))?
                .referenced_bytes;
            usage.referenced_bytes += bytes;
            // Only this snapshot names it: deleting the snapshot frees it.
            if refs.get(l) == Some(&1) {
                usage.exclusive_bytes += bytes;
            }
        }
        Ok(usage)
    }

    /// The layer server counts the bytes allocated in the volume's upper layer
    /// (what it wrote since it was made, forked, restored or last snapshotted:
    /// older layers are its snapshots' cost) and refuses writes past the limit
    /// with ENOSPC.
    fn set_disk_limit(&self, id: &str, bytes: Option<u64>) -> Result<(), StoreError> {
        validate_id(id)?;
        self.ask(Control::SetLimit {
            id: id.to_string(),
            bytes,
        })
    }

    fn disk_usage(&self, id: &str) -> Result<crate::DiskUsage, StoreError> {
        validate_id(id)?;
        match self.request(&Control::DiskUsage { id: id.to_string() })? {
            Reply::DiskUsage(u) => Ok(u),
            other => self
                .expect_ok(other)
                .and_then(|_| Err(self.failed("no usage in the answer".into()))),
        }
    }

    fn limits_disk(&self) -> bool {
        true
    }

    fn server_pid(&self) -> Option<i32> {
        FuseStore::server_pid(self)
    }

    fn ensure_ready(&self) -> Result<(), StoreError> {
        self.ask(Control::Ping)
    }

    fn take_server_replaced(&self) -> bool {
        self.replaced
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    fn reconcile(&self) -> Result<Vec<PathBuf>, StoreError> {
        match self.request(&Control::Collect { keep_image: None })? {
            Reply::Collected(paths) => Ok(paths),
            other => self.expect_ok(other).map(|_| Vec::new()),
        }
    }

    fn shutdown(&self) -> Result<(), StoreError> {
        let pid = self.server_pid();
        let mut conn = self.control.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = conn.as_mut() {
            let _ = c.get_mut().write_all(b"{\"op\":\"shutdown\"}\n");
            let mut answer = String::new();
            let _ = c.read_line(&mut answer);
        } else if let Ok(mut s) = UnixStream::connect(self.root.join("control.sock")) {
            let _ = s.write_all(b"{\"op\":\"shutdown\"}\n");
            let _ = BufReader::new(s).read_line(&mut String::new());
        }
        *conn = None;
        // The server exits once unmounted; wait for that so no process outlives us.
        match pid {
            Some(pid) if !wait_exit(pid, Duration::from_secs(10)) => {
                Err(self.failed(format!("server {pid} did not exit")))
            }
            _ => {
                for d in SEALED {
                    crate::loop_image::unseal_dir(&self.root.join(d))?;
                }
                Ok(())
            }
        }
    }
}
