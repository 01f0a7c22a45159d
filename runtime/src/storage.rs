//! Choosing and opening a state dir's volume store.
//!
//! - `auto` (default): a state dir on Btrfs gets the Btrfs store in place; else, as
//!   root, a sparse Btrfs image in the state dir, loop-mounted; else the FUSE
//!   copy-on-write store; full copies only where FUSE is missing too.
//! - `btrfs`: the Btrfs part of `auto`, failing instead of falling back.
//! - `fuse`: the FUSE layer store (any file system; as a user through fusermount3).
//! - `copy`: full copies (any file system, no privileges).
//!
//! A state dir keeps the store it started with (recorded in `$STATE/store`): its
//! volumes live there.

use std::path::Path;
use std::sync::Arc;

use burrow_fs::{is_btrfs, BtrfsImage, BtrfsStore, CopyStore, FuseStore, Store};

use crate::error::{Error, Result};
use crate::paths::StateDir;

/// The loop image's default size (it is sparse: this bounds its growth, not
/// what it takes at once): half of the free space of the state dir's file
/// system when it is made, at least [`MIN_IMAGE`], at most [`MAX_IMAGE`]. With
/// less free space than that floor needs (twice it), no image is made and
/// `BURROW_STORE_SIZE_MIB` must say how large one may be. So the store can
/// never take the last half of the host's free disk.
const MAX_IMAGE: u64 = 1 << 40;
const MIN_IMAGE: u64 = 2 << 30;

/// The default loop image size for `free` bytes free (see [`MAX_IMAGE`]).
pub fn default_image_size(free: u64) -> Result<u64> {
    if free < 2 * MIN_IMAGE {
        return Err(Error::invalid(
            "BURROW_STORE_SIZE_MIB",
            format!(
                "unset, and {} MiB free is too little for the default store (half the free space, at least {} MiB): set it",
                free >> 20,
                MIN_IMAGE >> 20
            ),
        ));
    }
    Ok((free / 2).clamp(MIN_IMAGE, MAX_IMAGE))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Auto,
    Btrfs,
    Fuse,
    Copy,
}

impl StoreKind {
    pub fn parse(s: &str) -> Result<StoreKind> {
        match s {
            "auto" => Ok(StoreKind::Auto),
            "btrfs" => Ok(StoreKind::Btrfs),
            "fuse" => Ok(StoreKind::Fuse),
            "copy" => Ok(StoreKind::Copy),
            other => Err(Error::invalid(
                "store",
                format!("{other:?} is not one of auto, btrfs, fuse, copy"),
            )),
        }
    }
}

/// An open store, and the loop mount it lives on if it has one.
pub struct OpenStore {
    pub store: Arc<dyn Store>,
    pub mount: Option<BtrfsImage>,
}

pub fn open(state: &StateDir, wanted: StoreKind) -> Result<OpenStore> {
    let record = state.root().join("store");
    let recorded = std::fs::read_to_string(&record)
        .ok()
        .map(|s| s.trim().to_string());
    let kind = match (recorded.as_deref(), wanted) {
        (Some("btrfs"), StoreKind::Auto | StoreKind::Btrfs) => StoreKind::Btrfs,
        (Some("fuse"), StoreKind::Auto | StoreKind::Fuse) => StoreKind::Fuse,
        (Some("copy"), StoreKind::Auto | StoreKind::Copy) => StoreKind::Copy,
        (Some(r), w) => {
            return Err(Error::invalid(
                "store",
                format!(
                    "{} holds volumes of the {r} store; it cannot switch to {w:?}",
                    state.root().display()
                ),
            ))
        }
        (None, w) => w,
    };
    let opened = match kind {
        StoreKind::Copy => copy(state)?,
        StoreKind::Btrfs => btrfs(state)?,
        StoreKind::Fuse => fuse(state)?,
        StoreKind::Auto => match btrfs(state) {
            Ok(s) => s,
            Err(e) => {
                tracing::info!("no Btrfs store ({e}); trying the FUSE layer store");
                match fuse(state) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("no FUSE store ({e}); using full copies");
                        copy(state)?
                    }
                }
            }
        },
    };
    if recorded.is_none() {
        std::fs::write(&record, format!("{}\n", opened.store.kind()))
            .map_err(|e| Error::io(format!("write {}", record.display()), e))?;
    }
    Ok(opened)
}

fn copy(state: &StateDir) -> Result<OpenStore> {
    Ok(OpenStore {
        store: Arc::new(CopyStore::new(state.volumes())?),
        mount: None,
    })
}

fn fuse(state: &StateDir) -> Result<OpenStore> {
    if !Path::new("/dev/fuse").exists() {
        return Err(Error::invalid("store", "the FUSE store needs /dev/fuse"));
    }
    let binary = crate::paths::companion_binary("BURROW_COWFS", "burrow-cowfs")
        .ok_or_else(|| Error::invalid("store", "burrow-cowfs is not installed next to burrowd"))?;
    Ok(OpenStore {
        store: Arc::new(FuseStore::open(state.root().join("fuse"), binary)?),
        mount: None,
    })
}

fn btrfs(state: &StateDir) -> Result<OpenStore> {
    if is_btrfs(state.root())? {
        return Ok(OpenStore {
            store: Arc::new(BtrfsStore::new(state.root().join("store"))?),
            mount: None,
        });
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::invalid("store", "a loop-mounted Btrfs needs root"));
    }
    let mountpoint = state.root().join("btrfs");
    let image = state.root().join("btrfs.img");
    // Only when the image is made: an existing image keeps its size.
    let size = match std::env::var("BURROW_STORE_SIZE_MIB") {
        Ok(v) => {
            v.parse::<u64>().ok().filter(|m| *m >= 256).ok_or_else(|| {
                Error::invalid(
                    "BURROW_STORE_SIZE_MIB",
                    format!("{v:?} is not a size of at least 256 MiB"),
                )
            })? << 20
        }
        Err(_) if image.exists() => 0,
        Err(_) => default_image_size(free_bytes(state.root()))?,
    };
    let mount = BtrfsImage::ensure(&image, &mountpoint, size)?;
    let store = BtrfsStore::new(mountpoint.join("store"))?;
    Ok(OpenStore {
        store: Arc::new(store),
        mount: Some(mount),
    })
}

fn free_bytes(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs writes into the zeroed struct we own.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the path is NUL-terminated.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    st.f_bavail * st.f_frsize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_store_takes_half_the_free_space_within_bounds() {
        assert_eq!(default_image_size(100 << 30).unwrap(), 50 << 30);
        assert_eq!(default_image_size(5 << 30).unwrap(), MIN_IMAGE.max(5 << 29));
        assert_eq!(default_image_size(10 << 40).unwrap(), MAX_IMAGE);
        let e = default_image_size(3 << 30).unwrap_err().to_string();
        assert!(e.contains("BURROW_STORE_SIZE_MIB"), "{e}");
    }
}
