//! `burrow-cowfs serve <root>`: mounts the store's merged views on `<root>/mnt` and
//! answers catalog changes on `<root>/control.sock`.
//!
//! The server is its own process (in its own session) so that the volumes of
//! running VMs stay mounted when the daemon that started it dies or restarts; the
//! next daemon finds it by its socket. It prints `ready` on stdout once mounted.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fuser::MountOption;

use super::catalog::{remove_doomed, Catalog};
use super::fuse::CowFs;
use super::fusermount;
use super::tree::{Stale, State};
use super::{Control, Reply};
use crate::layout::subdirs;

pub fn serve(root: &Path) -> std::io::Result<()> {
    // Modes of new entries arrive already masked by the kernel.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0) };
    let catalog = Catalog::load(root)?;
    // Scratch left by a crash in the middle of a copy-up.
    for layer in subdirs(&root.join("layers")) {
        let _ = std::fs::remove_dir_all(layer.join(super::layer::WORK_DIR));
    }
    remove_doomed(catalog.collect(None));
    let state = Arc::new(Mutex::new(State::new(catalog)));

    let sock = root.join("control.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)?;
    // Bound under umask 0: only its owner may connect (the peer is checked too).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    }

    // SAFETY: geteuid has no preconditions.
    let as_root = unsafe { libc::geteuid() } == 0;
    let mut options = vec![
        MountOption::FSName("burrow".into()),
        MountOption::Subtype("cowfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoAtime,
    ];
    if as_root {
        // virtiofsd acts as the guest's users; the kernel's permission checks
        // (default_permissions) still apply to them.
        options.push(MountOption::AllowOther);
    }
    let fs = CowFs {
        state: state.clone(),
    };
    let mnt = root.join("mnt");
    let (mut session, unprivileged) = match fuser::Session::new(fs, &mnt, &options) {
        Ok(s) => (s, false),
        // /dev/fuse closed to this user: the set-user-ID helper mounts for us.
        Err(e) if !as_root && e.kind() == std::io::ErrorKind::PermissionDenied => {
            let fd = fusermount::mount(
                &mnt,
                "fsname=burrow,subtype=cowfs,default_permissions,nosuid,nodev,noatime",
            )?;
            let fs = CowFs {
                state: state.clone(),
            };
            (
                fuser::Session::from_fd(fs, fd, fuser::SessionACL::Owner),
                true,
            )
        }
        Err(e) => return Err(e),
    };
    let notifier = session.notifier();
    let unmounter = Arc::new(Mutex::new(session.unmount_callable()));
    {
        let state = state.clone();
        let root = root.to_path_buf();
        let mnt = mnt.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                if !same_user(&conn) {
                    continue;
                }
                let shutdown = answer(conn, &root, &state, &notifier);
                if shutdown {
                    let done = if unprivileged {
                        fusermount::unmount(&mnt)
                    } else {
                        let mut u = unmounter.lock().unwrap_or_else(|p| p.into_inner());
                        u.unmount()
                    };
                    if let Err(e) = done {
                        eprintln!("burrow-cowfs: unmount: {e}");
                    }
                    std::process::exit(0);
                }
            }
        });
    }
    std::fs::write(root.join("cowfs.pid"), format!("{}\n", std::process::id()))?;
    println!("ready");
    std::io::stdout().flush()?;
    // Nothing more goes to stdout: the starter stops reading it.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto stdout with an fd we own.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
    session.run()?;
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

/// Answers the requests of one connection; true when asked to shut down.
fn answer(conn: UnixStream, root: &Path, state: &Mutex<State>, notifier: &fuser::Notifier) -> bool {
    let Ok(mut writer) = conn.try_clone() else {
        return false;
    };
    let reader = BufReader::new(conn);
    for line in reader.lines() {
        let Ok(line) = line else { break };
        let req: Control = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                let _ = reply(&mut writer, &Reply::Failed(format!("bad request: {e}")));
                continue;
            }
        };
        if matches!(req, Control::Shutdown) {
            let _ = reply(&mut writer, &Reply::Ok);
            return true;
        }
        if let Control::Snapshot { volume, .. } = &req {
            // Writes the kernel still holds in its writeback cache belong before
            // the snapshot: flush them to the upper layer about to be frozen. No
            // lock is held: the flush goes through the FUSE request loop.
            flush(&root.join("mnt/volumes").join(volume));
        }
        let (answer, stale, doomed) = {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            apply(&mut s, root, req)
        };
        // Outside the lock: the kernel may be waiting on a request that needs it.
        for (parent, name) in stale {
            let _ = notifier.inval_entry(parent, &name);
        }
        remove_doomed(doomed);
        if reply(&mut writer, &answer).is_err() {
            break;
        }
    }
    false
}

/// Whether the peer of `conn` runs as this server's user (root serves root).
fn same_user(conn: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills the ucred we own; len says its size.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: geteuid has no preconditions.
    r == 0 && cred.uid == unsafe { libc::geteuid() }
}

fn flush(volume: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(dir) = std::fs::File::open(volume) {
        // SAFETY: syncfs on an fd we own.
        unsafe { libc::syncfs(dir.as_raw_fd()) };
    }
}

fn reply(w: &mut UnixStream, r: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)
}

fn failed(e: std::io::Error) -> Reply {
    Reply::Failed(e.to_string())
}

/// Carries out one catalog change. Returns the answer, the kernel cache entries
/// it made stale and the layer directories to delete.
fn apply(s: &mut State, root: &Path, req: Control) -> (Reply, Vec<Stale>, Vec<PathBuf>) {
    let mut stale = Vec::new();
    let mut doomed = Vec::new();
    let answer = match req {
        Control::Ping | Control::Shutdown => Reply::Ok,
        Control::Create { id, image } => {
            if s.catalog.volumes.contains_key(&id) {
                Reply::Exists(id)
            } else if !root.join(&image).is_dir() {
                Reply::Failed(format!("image layer {image} is missing"))
            } else {
                match s
                    .catalog
                    .new_layer(&image)
                    .and_then(|upper| s.catalog.save_volume(&id, vec![image, upper]))
                {
                    Ok(()) => {
                        stale = s.end_volume_view(&id);
                        Reply::Ok
                    }
                    Err(e) => failed(e),
                }
            }
        }
        Control::Delete { id } => match s.catalog.remove_volume(&id) {
            Ok(()) => {
                stale = s.end_volume_view(&id);
                doomed = s.catalog.collect(None);
                Reply::Ok
            }
            Err(e) => failed(e),
        },
        Control::Snapshot { volume, name } => match s.catalog.volumes.get(&volume).cloned() {
            None => Reply::NotFound(volume),
            Some(_)
                if s.catalog
                    .snapshots
                    .contains_key(&(volume.clone(), name.clone())) =>
            {
                Reply::SnapshotExists { volume, name }
            }
            Some(chain) => {
                // Freeze the upper layer: the volume moves onto a new one first, so
                // a crash before the snapshot's file is written loses nothing.
                let frozen = chain.clone();
                let top = chain.last().cloned().unwrap_or_default();
                let result = s.catalog.new_layer(&top).and_then(|upper| {
                    let mut next = chain;
                    next.push(upper.clone());
                    s.catalog.save_volume(&volume, next)?;
                    s.push_layer(&volume, s.catalog.layer_path(&upper));
                    s.catalog.save_snapshot(&volume, &name, frozen)
                });
                match result {
                    Ok(()) => {
                        stale.push((super::tree::SNAPSHOTS, volume.into()));
                        Reply::Ok
                    }
                    Err(e) => failed(e),
                }
            }
        },
        Control::Restore { volume, name } => match snapshot_chain(s, &volume, &name) {
            Err(r) => r,
            Ok(_) if !s.catalog.volumes.contains_key(&volume) => Reply::NotFound(volume),
            Ok(chain) => {
                let top = chain.last().cloned().unwrap_or_default();
                match s.catalog.new_layer(&top).and_then(|upper| {
                    let mut next = chain;
                    next.push(upper);
                    s.catalog.save_volume(&volume, next)
                }) {
                    Ok(()) => {
                        stale = s.end_volume_view(&volume);
                        doomed = s.catalog.collect(None);
                        Reply::Ok
                    }
                    Err(e) => failed(e),
                }
            }
        },
        Control::Clone { volume, name, id } => match snapshot_chain(s, &volume, &name) {
            Err(r) => r,
            Ok(_) if s.catalog.volumes.contains_key(&id) => Reply::Exists(id),
            Ok(chain) => {
                let top = chain.last().cloned().unwrap_or_default();
                match s.catalog.new_layer(&top).and_then(|upper| {
                    let mut next = chain;
                    next.push(upper);
                    s.catalog.save_volume(&id, next)
                }) {
                    Ok(()) => {
                        stale = s.end_volume_view(&id);
                        Reply::Ok
                    }
                    Err(e) => failed(e),
                }
            }
        },
        Control::DeleteSnapshot { volume, name } => match snapshot_chain(s, &volume, &name) {
            Err(r) => r,
            Ok(_) => match s.catalog.remove_snapshot(&volume, &name) {
                Ok(()) => {
                    stale = s.end_snapshot_view(&volume, &name);
                    doomed = s.catalog.collect(None);
                    Reply::Ok
                }
                Err(e) => failed(e),
            },
        },
        Control::SetLimit { id, bytes } => {
            if !s.catalog.volumes.contains_key(&id) {
                Reply::NotFound(id)
            } else {
                match s.catalog.set_limit(&id, bytes) {
                    Ok(()) => {
                        s.set_limit(&id, bytes);
                        Reply::Ok
                    }
                    Err(e) => failed(e),
                }
            }
        }
        Control::DiskUsage { id } => match s.disk_usage(&id) {
            Some(u) => Reply::DiskUsage(u),
            None => Reply::NotFound(id),
        },
        Control::Collect { keep_image } => {
            doomed = s.catalog.collect(keep_image.as_deref());
            Reply::Collected(doomed.clone())
        }
    };
    (answer, stale, doomed)
}

/// The chain of a snapshot (which outlives its volume).
fn snapshot_chain(s: &State, volume: &str, name: &str) -> Result<Vec<String>, Reply> {
    s.catalog
        .snapshots
        .get(&(volume.to_string(), name.to_string()))
        .cloned()
        .ok_or_else(|| Reply::SnapshotNotFound {
            volume: volume.to_string(),
            name: name.to_string(),
        })
}
