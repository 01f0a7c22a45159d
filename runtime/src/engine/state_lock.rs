//! The single owner of a state dir.
//!
//! Opening an engine reconciles the state dir with the processes that really run:
//! it kills VM processes no record owns, removes their run dirs and takes over
//! the store. A second engine on the same state dir would do that to the first
//! one's work, so [`Engine::open`](super::Engine::open) takes this lock before it
//! touches anything, and holds it for the engine's life.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use crate::error::{Error, Result};
use crate::paths::StateDir;

/// An exclusive `flock` on the state dir's lock file. The kernel drops it when
/// the file closes: on drop, or when the process dies however it dies, so a
/// crashed daemon never leaves a state dir locked. The file itself stays (a
/// removed lock file would let a newcomer lock a fresh inode while the old
/// owner still works), and is opened close-on-exec so that no VM process or
/// helper the engine starts inherits it and outlives the engine holding it.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Takes the lock without waiting; refused with [`Error::AlreadyServed`]
    /// while another engine (in this process or another) holds it.
    pub fn acquire(state: &StateDir) -> Result<StateLock> {
        let path = state.lock_file();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) => Error::AlreadyServed(state.root().to_path_buf()),
                _ => Error::io(format!("lock {}", path.display()), e),
            });
        }
        Ok(StateLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_dir_has_one_owner_at_a_time() {
        let t = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(t.path()).expect("state dir");
        let first = StateLock::acquire(&state).expect("first lock");
        let second = StateLock::acquire(&state).expect_err("second lock");
        assert!(
            matches!(&second, Error::AlreadyServed(p) if p == state.root()),
            "{second:?}"
        );
        assert_eq!(
            second.to_string(),
            format!("another burrowd already serves {}", t.path().display())
        );
        drop(first);
        StateLock::acquire(&state).expect("the lock is free once dropped");
    }

    fn listing(dir: &std::path::Path) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| {
                let e = e.expect("entry");
                let len = e.metadata().expect("metadata").len();
                (e.file_name().to_string_lossy().into_owned(), len)
            })
            .collect();
        v.sort();
        v
    }

    /// An engine opened on a state dir another engine serves is refused before
    /// it creates, reconciles or locks anything else there.
    #[tokio::test]
    async fn a_second_engine_is_refused_and_changes_nothing() {
        let t = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(t.path().join("state")).expect("state dir");
        std::fs::create_dir(state.root()).expect("mkdir");
        // The serving engine's hold, as Engine::open takes it.
        let _serving = StateLock::acquire(&state).expect("first lock");
        std::fs::write(state.pid_file(), "4242\n").expect("pid file");
        let before = listing(state.root());
        let cache = crate::paths::CacheDir::new(t.path().join("cache")).expect("cache dir");
        let refused = super::super::Engine::open(
            state.clone(),
            cache,
            t.path().join("burrow-agent"),
            crate::storage::StoreKind::Copy,
        )
        .await
        .err()
        .expect("a second engine is refused");
        assert!(matches!(refused, Error::AlreadyServed(_)), "{refused:?}");
        assert_eq!(listing(state.root()), before);
        assert!(!t.path().join("cache").exists());
    }
}
