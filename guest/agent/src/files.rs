//! File operations: read, write, edit, list. Paths must be absolute: the agent's
//! working directory is no one's business, so a relative path is a mistake.
//!
//! These functions block; the dispatcher runs them on tokio's blocking pool.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use burrow_proto::{
    AgentError, DirEntry, ErrorKind, FileData, FileEdit, FileKind, FileRead, FileWrite,
    MAX_FILE_CHUNK,
};

/// Largest file `FileEdit` loads into memory.
pub const MAX_EDIT_SIZE: u64 = 64 << 20;

fn invalid(message: String) -> AgentError {
    AgentError::new(ErrorKind::InvalidArgument, message)
}

/// Checks that `path` is absolute and representable.
pub fn check_path(path: &str) -> Result<&Path, AgentError> {
    if !path.starts_with('/') {
        return Err(invalid(format!("path: {path:?} is not an absolute path")));
    }
    if path.contains('\0') {
        return Err(invalid("path: contains a NUL byte".into()));
    }
    Ok(Path::new(path))
}

fn is_a_directory(path: &str) -> AgentError {
    AgentError::new(ErrorKind::IsADirectory, format!("{path}: is a directory"))
}

/// Reads up to `limit` bytes (at most [`MAX_FILE_CHUNK`]) from `offset`.
pub fn read(req: &FileRead) -> Result<FileData, AgentError> {
    let path = check_path(&req.path)?;
    let io_err = |e: io::Error| AgentError::io(&req.path, &e);
    let meta = fs::metadata(path).map_err(io_err)?;
    if meta.is_dir() {
        return Err(is_a_directory(&req.path));
    }
    // FIFOs, sockets and devices could block forever or never end.
    if !meta.is_file() {
        return Err(invalid(format!("{}: not a regular file", req.path)));
    }
    let limit = req
        .limit
        .unwrap_or(MAX_FILE_CHUNK as u64)
        .min(MAX_FILE_CHUNK as u64);
    let mut file = File::open(path).map_err(io_err)?;
    file.seek(SeekFrom::Start(req.offset)).map_err(io_err)?;
    let mut data = Vec::new();
    file.take(limit).read_to_end(&mut data).map_err(io_err)?;
    let size = meta.len();
    let got = data.len() as u64;
    // Files under /proc and /sys report size 0 but have contents: for them, the end
    // is reached when a read comes back short.
    let eof = if size > 0 {
        req.offset.saturating_add(got) >= size
    } else {
        got < limit
    };
    Ok(FileData { data, size, eof })
}

/// Writes (or appends) `data`, creating parent directories.
pub fn write(req: &FileWrite) -> Result<u64, AgentError> {
    let path = check_path(&req.path)?;
    let io_err = |e: io::Error| AgentError::io(&req.path, &e);
    if let Some(mode) = req.mode {
        if mode > 0o7777 {
            return Err(invalid(format!("mode: {mode:#o} is not a permission mode")));
        }
    }
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => return Err(is_a_directory(&req.path)),
        _ => {}
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| match e.kind() {
            // mkdir met a file where a directory was needed.
            io::ErrorKind::AlreadyExists => AgentError::new(
                ErrorKind::NotADirectory,
                format!("{}: a parent is not a directory", req.path),
            ),
            _ => io_err(e),
        })?;
    }
    let mut opts = OpenOptions::new();
    opts.write(true).create(true);
    if req.append {
        opts.append(true);
    } else {
        opts.truncate(true);
    }
    if let Some(mode) = req.mode {
        opts.mode(mode);
    }
    let mut file = opts.open(path).map_err(io_err)?;
    file.write_all(&req.data).map_err(io_err)?;
    // The open mode only applies to a new file, and through the umask: set it
    // explicitly so that the bits asked for are the bits on disk.
    if let Some(mode) = req.mode {
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err)?;
    }
    Ok(req.data.len() as u64)
}

/// Why an edit matched nothing to replace.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EditMismatch {
    #[error("old string not found")]
    Absent,
    #[error("old string occurs {0} times; set all to replace every one")]
    Ambiguous(usize),
}

/// Replaces `old` by `new` in `text`: exactly one occurrence, or every one with
/// `all`. Returns the new text and the number of replacements.
pub fn replace(
    text: &[u8],
    old: &[u8],
    new: &[u8],
    all: bool,
) -> Result<(Vec<u8>, usize), EditMismatch> {
    if old.is_empty() {
        // Callers refuse an empty `old` with a clearer message; this only keeps the
        // loop below from matching everywhere.
        return Err(EditMismatch::Absent);
    }
    let hits = find_all(text, old);
    match hits.len() {
        0 => return Err(EditMismatch::Absent),
        n if n > 1 && !all => return Err(EditMismatch::Ambiguous(n)),
        _ => {}
    }
    let mut out = Vec::with_capacity(text.len() - hits.len() * old.len() + hits.len() * new.len());
    let mut at = 0;
    for &hit in &hits {
        out.extend_from_slice(&text[at..hit]);
        out.extend_from_slice(new);
        at = hit + old.len();
    }
    out.extend_from_slice(&text[at..]);
    Ok((out, hits.len()))
}

/// Start offsets of the non-overlapping occurrences of `needle`, left to right.
fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    let mut hits = Vec::new();
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        if &hay[i..i + needle.len()] == needle {
            hits.push(i);
            i += needle.len();
        } else {
            i += 1;
        }
    }
    hits
}

/// Edits a file in place, atomically: the new contents go to a temporary file in
/// the same directory, which takes the old file's mode and owner and is renamed
/// over it, so a reader sees the old file or the new one, never half of each.
pub fn edit(req: &FileEdit) -> Result<u64, AgentError> {
    let path = check_path(&req.path)?;
    if req.old.is_empty() {
        return Err(invalid("old: must not be empty".into()));
    }
    let io_err = |e: io::Error| AgentError::io(&req.path, &e);
    let meta = fs::metadata(path).map_err(io_err)?;
    if meta.is_dir() {
        return Err(is_a_directory(&req.path));
    }
    if !meta.is_file() {
        return Err(invalid(format!("{}: not a regular file", req.path)));
    }
    if meta.len() > MAX_EDIT_SIZE {
        return Err(AgentError::new(
            ErrorKind::TooLarge,
            format!(
                "{}: larger than {} bytes, too large to edit",
                req.path, MAX_EDIT_SIZE
            ),
        ));
    }
    let text = fs::read(path).map_err(io_err)?;
    let (new_text, count) = replace(&text, req.old.as_bytes(), req.new.as_bytes(), req.all)
        .map_err(|m| AgentError::new(ErrorKind::NoMatch, format!("{}: {m}", req.path)))?;
    // Replace the file a symlink points to, not the symlink.
    let target = fs::canonicalize(path).map_err(io_err)?;
    replace_file(&target, &new_text, &meta).map_err(io_err)?;
    Ok(count as u64)
}

fn replace_file(target: &Path, contents: &[u8], meta: &fs::Metadata) -> io::Result<()> {
    let dir = target.parent().unwrap_or(Path::new("/"));
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (tmp_path, mut tmp) = create_temp(dir, &name)?;
    let result = (|| {
        tmp.write_all(contents)?;
        tmp.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        // Keep the owner; only root may give a file away, and a non-root agent
        // (dev mode) editing its own file needs no change.
        if let Err(e) = std::os::unix::fs::fchown(&tmp, Some(meta.uid()), Some(meta.gid())) {
            if e.kind() != io::ErrorKind::PermissionDenied {
                return Err(e);
            }
        }
        fs::rename(&tmp_path, target)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp_path);
    }
    result
}

/// Creates a new file `.<name>.burrow-<pid>-<n>` next to the target.
fn create_temp(dir: &Path, name: &str) -> io::Result<(PathBuf, File)> {
    let pid = std::process::id();
    let mut last_err = None;
    for n in 0..100u32 {
        let candidate = dir.join(format!(".{name}.burrow-{pid}-{n}"));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&candidate)
        {
            Ok(f) => return Ok((candidate, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)))
}

/// Lists a directory, sorted by name. Entries are described with `lstat`: a
/// symlink is reported as one, not as what it points to.
pub fn list(path_str: &str) -> Result<Vec<DirEntry>, AgentError> {
    let path = check_path(path_str)?;
    let io_err = |e: io::Error| AgentError::io(path_str, &e);
    let meta = fs::metadata(path).map_err(io_err)?;
    if !meta.is_dir() {
        return Err(AgentError::new(
            ErrorKind::NotADirectory,
            format!("{path_str}: not a directory"),
        ));
    }
    let mut entries = Vec::new();
    for entry in fs::read_dir(path).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        // An entry removed between readdir and lstat is simply no longer there.
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        let ft = meta.file_type();
        let kind = if ft.is_file() {
            FileKind::File
        } else if ft.is_dir() {
            FileKind::Dir
        } else if ft.is_symlink() {
            FileKind::Symlink
        } else {
            FileKind::Other
        };
        entries.push(DirEntry {
            // Names that are not UTF-8 cannot travel in JSON strings as they are.
            name: entry.file_name().to_string_lossy().into_owned(),
            kind,
            size: meta.len(),
            mode: meta.mode() & 0o7777,
            modified: meta.mtime(),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_once() {
        assert_eq!(
            replace(b"a foo b", b"foo", b"bar", false),
            Ok((b"a bar b".to_vec(), 1))
        );
    }

    #[test]
    fn replace_absent_and_ambiguous() {
        assert_eq!(
            replace(b"abc", b"x", b"y", false),
            Err(EditMismatch::Absent)
        );
        assert_eq!(replace(b"abc", b"x", b"y", true), Err(EditMismatch::Absent));
        assert_eq!(
            replace(b"x x x", b"x", b"y", false),
            Err(EditMismatch::Ambiguous(3))
        );
        assert_eq!(
            EditMismatch::Ambiguous(3).to_string(),
            "old string occurs 3 times; set all to replace every one"
        );
    }

    #[test]
    fn replace_all_non_overlapping() {
        assert_eq!(replace(b"aaaa", b"aa", b"b", true), Ok((b"bb".to_vec(), 2)));
        assert_eq!(replace(b"aaa", b"aa", b"b", false), Ok((b"ba".to_vec(), 1)));
        assert_eq!(replace(b"x-x", b"x", b"", true), Ok((b"-".to_vec(), 2)));
        assert_eq!(
            replace(b"ab", b"ab", b"abab", true),
            Ok((b"abab".to_vec(), 1))
        );
    }

    #[test]
    fn relative_paths_are_refused() {
        for p in ["", "a/b", "./a"] {
            let e = check_path(p).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidArgument);
            assert!(e.message.starts_with("path:"), "{e}");
        }
        assert!(check_path("/a\0b").is_err());
        assert!(check_path("/a/b").is_ok());
    }

    #[test]
    fn edit_keeps_mode_and_follows_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.txt");
        fs::write(&real, "one two").unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o640)).unwrap();
        let link = dir.path().join("link.txt");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let n = edit(&FileEdit {
            path: link.to_string_lossy().into_owned(),
            old: "two".into(),
            new: "three".into(),
            all: false,
        })
        .unwrap();
        assert_eq!(n, 1);
        assert_eq!(fs::read_to_string(&real).unwrap(), "one three");
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::metadata(&real).unwrap().mode() & 0o7777, 0o640);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
