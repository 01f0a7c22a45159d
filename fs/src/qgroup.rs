//! Btrfs quota groups through their ioctls (`<linux/btrfs.h>`), not the `btrfs`
//! tool: enabling quotas, limiting a subvolume's referenced bytes, and reading
//! what it references from the quota tree.
//!
//! A subvolume's level-0 qgroup (`0/<subvolume id>`) counts every byte the
//! subvolume refers to, shared with snapshots or not: what its guest sees as
//! its disk. Snapshots get qgroups of their own, so they never count against
//! the volume's limit a second time.

use std::os::fd::AsRawFd;
use std::path::Path;

use crate::StoreError;

const BTRFS_IOCTL_MAGIC: libc::c_ulong = 0x94;

/// `_IOC(dir, 0x94, nr, size)` as `<asm-generic/ioctl.h>` builds it.
const fn ioc(dir: libc::c_ulong, nr: libc::c_ulong, size: usize) -> libc::c_ulong {
    (dir << 30) | ((size as libc::c_ulong) << 16) | (BTRFS_IOCTL_MAGIC << 8) | nr
}
const IOC_WRITE: libc::c_ulong = 1;
const IOC_READ: libc::c_ulong = 2;

#[repr(C)]
struct QuotaCtlArgs {
    cmd: u64,
    status: u64,
}
const BTRFS_QUOTA_CTL_ENABLE: u64 = 1;
const BTRFS_IOC_QUOTA_CTL: libc::c_ulong = ioc(
    IOC_READ | IOC_WRITE,
    40,
    std::mem::size_of::<QuotaCtlArgs>(),
);
const BTRFS_IOC_QUOTA_RESCAN_WAIT: libc::c_ulong = ioc(0, 46, 0);

#[repr(C)]
#[derive(Default)]
struct QgroupLimit {
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}
#[repr(C)]
struct QgroupLimitArgs {
    qgroupid: u64,
    lim: QgroupLimit,
}
const BTRFS_QGROUP_LIMIT_MAX_RFER: u64 = 1;
/// A limit of all ones removes it (the kernel's CLEAR_VALUE).
const CLEAR_VALUE: u64 = u64::MAX;
const BTRFS_IOC_QGROUP_LIMIT: libc::c_ulong =
    ioc(IOC_READ, 43, std::mem::size_of::<QgroupLimitArgs>());

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct SearchKey {
    tree_id: u64,
    min_objectid: u64,
    max_objectid: u64,
    min_offset: u64,
    max_offset: u64,
    min_transid: u64,
    max_transid: u64,
    min_type: u32,
    max_type: u32,
    nr_items: u32,
    unused: u32,
    unused1: u64,
    unused2: u64,
    unused3: u64,
    unused4: u64,
}
const SEARCH_BUF: usize = 4096 - std::mem::size_of::<SearchKey>();
#[repr(C)]
struct SearchArgs {
    key: SearchKey,
    buf: [u8; SEARCH_BUF],
}
const BTRFS_IOC_TREE_SEARCH: libc::c_ulong =
    ioc(IOC_READ | IOC_WRITE, 17, std::mem::size_of::<SearchArgs>());
/// Header of each item the search returns: transid, objectid, offset (u64),
/// type, len (u32).
const SEARCH_HEADER: usize = 32;
const BTRFS_QUOTA_TREE_OBJECTID: u64 = 8;
const BTRFS_QGROUP_INFO_KEY: u32 = 242;
const BTRFS_QGROUP_LIMIT_KEY: u32 = 244;

fn open_dir(path: &Path) -> Result<std::fs::File, StoreError> {
    std::fs::File::open(path).map_err(|e| StoreError::io("open", path, e))
}

fn ioctl_err(op: &'static str, path: &Path) -> StoreError {
    StoreError::Btrfs {
        op,
        path: path.to_path_buf(),
        message: std::io::Error::last_os_error().to_string(),
    }
}

/// Turns quotas on for the file system `path` is on (nothing if they are on)
/// and waits for the first accounting scan, so numbers read next are right.
pub(crate) fn enable(path: &Path) -> Result<(), StoreError> {
    let dir = open_dir(path)?;
    let mut args = QuotaCtlArgs {
        cmd: BTRFS_QUOTA_CTL_ENABLE,
        status: 0,
    };
    // SAFETY: BTRFS_IOC_QUOTA_CTL reads and writes the args struct we own.
    if unsafe { libc::ioctl(dir.as_raw_fd(), BTRFS_IOC_QUOTA_CTL, &mut args) } != 0 {
        return Err(ioctl_err("enable quotas", path));
    }
    // SAFETY: an ioctl without an argument; it returns once no rescan runs.
    unsafe { libc::ioctl(dir.as_raw_fd(), BTRFS_IOC_QUOTA_RESCAN_WAIT, 0) };
    Ok(())
}

/// Limits the referenced bytes of the subvolume at `path` (`None` lifts it).
pub(crate) fn set_limit(path: &Path, bytes: Option<u64>) -> Result<(), StoreError> {
    let dir = open_dir(path)?;
    let mut args = QgroupLimitArgs {
        // 0: the qgroup of the subvolume the fd is in.
        qgroupid: 0,
        lim: QgroupLimit {
            flags: BTRFS_QGROUP_LIMIT_MAX_RFER,
            max_rfer: bytes.unwrap_or(CLEAR_VALUE),
            ..Default::default()
        },
    };
    // SAFETY: BTRFS_IOC_QGROUP_LIMIT reads the args struct we own.
    if unsafe { libc::ioctl(dir.as_raw_fd(), BTRFS_IOC_QGROUP_LIMIT, &mut args) } != 0 {
        return Err(ioctl_err("limit qgroup", path));
    }
    Ok(())
}

/// Referenced bytes and limit of the subvolume at `path`, from the quota tree.
pub(crate) fn usage(path: &Path) -> Result<crate::DiskUsage, StoreError> {
    let id = libbtrfsutil::subvolume_id(path).map_err(|e| StoreError::Btrfs {
        op: "subvolume id",
        path: path.to_path_buf(),
        message: e.os_error().to_string(),
    })?;
    let dir = open_dir(path)?;
    let mut out = crate::DiskUsage::default();
    let mut items = search(&dir, path, id, BTRFS_QGROUP_INFO_KEY)?;
    items.extend(search(&dir, path, id, BTRFS_QGROUP_LIMIT_KEY)?);
    for (kind, item) in items {
        let field = |i: usize| -> u64 {
            item.get(i * 8..i * 8 + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .unwrap_or(0)
        };
        match kind {
            // generation, rfer, rfer_cmpr, excl, excl_cmpr
            BTRFS_QGROUP_INFO_KEY => out.used_bytes = field(1),
            // flags, max_rfer, max_excl, rsv_rfer, rsv_excl
            BTRFS_QGROUP_LIMIT_KEY
                if field(0) & BTRFS_QGROUP_LIMIT_MAX_RFER != 0 && field(1) != CLEAR_VALUE =>
            {
                out.limit_bytes = Some(field(1));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The quota tree's item of type `kind` about qgroup `0/<id>` (key
/// `(0, kind, id)`: one key, so one item at most), as (key type, item bytes).
fn search(
    dir: &std::fs::File,
    path: &Path,
    id: u64,
    kind: u32,
) -> Result<Vec<(u32, Vec<u8>)>, StoreError> {
    let mut args = SearchArgs {
        key: SearchKey {
            tree_id: BTRFS_QUOTA_TREE_OBJECTID,
            min_objectid: 0,
            max_objectid: 0,
            min_offset: id,
            max_offset: id,
            min_transid: 0,
            max_transid: u64::MAX,
            min_type: kind,
            max_type: kind,
            nr_items: 1,
            ..Default::default()
        },
        buf: [0; SEARCH_BUF],
    };
    // SAFETY: BTRFS_IOC_TREE_SEARCH reads the key and fills the buffer of the
    // 4096-byte struct we own.
    if unsafe { libc::ioctl(dir.as_raw_fd(), BTRFS_IOC_TREE_SEARCH, &mut args) } != 0 {
        return Err(ioctl_err("search quota tree", path));
    }
    let mut items = Vec::new();
    let mut at = 0usize;
    for _ in 0..args.key.nr_items {
        let Some(h) = args.buf.get(at..at + SEARCH_HEADER) else {
            break;
        };
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let offset = u64::from_le_bytes([h[16], h[17], h[18], h[19], h[20], h[21], h[22], h[23]]);
        let (found, len) = (u32_at(24), u32_at(28) as usize);
        let Some(item) = args.buf.get(at + SEARCH_HEADER..at + SEARCH_HEADER + len) else {
            break;
        };
        if found == kind && offset == id {
            items.push((found, item.to_vec()));
        }
        at += SEARCH_HEADER + len;
    }
    Ok(items)
}
