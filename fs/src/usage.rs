//! What a tree costs on disk: every byte it references, and the bytes that only it
//! holds (what deleting it would free).
//!
//! Computed exactly from the file system's own extent maps (FIEMAP): an extent the
//! file system flags as shared (with a snapshot, a fork or a reflink copy) counts as
//! referenced but not exclusive. Each inode counts once, however many hard links it
//! has. Works on any file system; only copy-on-write ones ever share.

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::path::Path;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Bytes of data the tree refers to.
    pub referenced_bytes: u64,
    /// Bytes no other tree refers to.
    pub exclusive_bytes: u64,
}

// The FIEMAP ioctl and its structures, from <linux/fiemap.h> and <linux/fs.h>.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
const EXTENTS_PER_CALL: usize = 128;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
    fm_extents: [FiemapExtent; EXTENTS_PER_CALL],
}

/// The usage of the tree at `root` (not following symlinks, not crossing into
/// other file systems; walked by directory fds, so at any depth).
pub fn usage(root: &Path) -> std::io::Result<Usage> {
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut total = Usage::default();
    crate::walk::walk_tree(root, &mut |e| {
        if !e.is_file() || !seen.insert((e.stat.st_dev, e.stat.st_ino)) {
            return;
        }
        let blocks = e.stat.st_blocks as u64 * 512;
        let u = e.open().and_then(|f| file_usage(&f)).unwrap_or(Usage {
            referenced_bytes: blocks,
            exclusive_bytes: blocks,
        });
        total.referenced_bytes += u.referenced_bytes;
        total.exclusive_bytes += u.exclusive_bytes;
    })?;
    Ok(total)
}

fn file_usage(f: &std::fs::File) -> std::io::Result<Usage> {
    let mut u = Usage::default();
    let mut start = 0u64;
    loop {
        let mut map = Fiemap {
            fm_start: start,
            fm_length: u64::MAX - start,
            fm_flags: 0,
            fm_mapped_extents: 0,
            fm_extent_count: EXTENTS_PER_CALL as u32,
            fm_reserved: 0,
            fm_extents: [FiemapExtent::default(); EXTENTS_PER_CALL],
        };
        // SAFETY: FS_IOC_FIEMAP reads and writes the struct we own, whose extent
        // array holds fm_extent_count entries as the ioctl requires.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP, &mut map as *mut Fiemap) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = (map.fm_mapped_extents as usize).min(EXTENTS_PER_CALL);
        if n == 0 {
            return Ok(u);
        }
        for e in &map.fm_extents[..n] {
            u.referenced_bytes += e.fe_length;
            if e.fe_flags & FIEMAP_EXTENT_SHARED == 0 {
                u.exclusive_bytes += e.fe_length;
            }
        }
        let last = map.fm_extents[n - 1];
        if last.fe_flags & FIEMAP_EXTENT_LAST != 0 {
            return Ok(u);
        }
        start = last.fe_logical + last.fe_length;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_tree_is_all_exclusive_and_links_count_once() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("d")).unwrap();
        std::fs::write(t.path().join("d/a"), vec![1u8; 256 * 1024]).unwrap();
        std::fs::hard_link(t.path().join("d/a"), t.path().join("b")).unwrap();
        std::fs::File::create(t.path().join("sparse"))
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        // Data reaches the extent map once written back.
        std::process::Command::new("sync").status().unwrap();
        let u = usage(t.path()).unwrap();
        assert!(
            u.referenced_bytes >= 256 * 1024 && u.referenced_bytes < 512 * 1024,
            "{u:?}"
        );
        assert_eq!(u.exclusive_bytes, u.referenced_bytes);
    }
}
