//! Validation of user-chosen names and generation of ids.

use crate::error::{Error, Result};

/// Names of workspaces, snapshots and teams: `[A-Za-z0-9._-]{1,64}`, but not `.`
/// or `..` (they name directories on the host and in URLs).
pub fn validate_name(field: &'static str, name: &str) -> Result<()> {
    if name == "." || name == ".." {
        return Err(Error::invalid(
            field,
            format!("{name:?} is reserved; choose another name"),
        ));
    }
    if name.is_empty() || name.len() > 64 {
        return Err(Error::invalid(
            field,
            format!("{name:?} must be 1 to 64 characters"),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(Error::invalid(
            field,
            format!("{name:?} contains {c:?}; use letters, digits, '.', '_' and '-'"),
        ));
    }
    Ok(())
}

/// A new workspace id: 12 lowercase hex digits from the kernel's random pool.
pub fn new_id() -> Result<String> {
    let mut buf = [0u8; 6];
    // SAFETY: getrandom writes at most buf.len() bytes into the valid buffer.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        return Err(Error::io("getrandom", std::io::Error::last_os_error()));
    }
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether `s` has the shape of an id from [`new_id`].
pub fn looks_like_id(s: &str) -> bool {
    s.len() == 12
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["dev", "a", "A.b_c-9", &"x".repeat(64)] {
            validate_name("name", ok).unwrap();
        }
        for bad in ["", "a b", "a/b", "ü", &"x".repeat(65), "a;rm", ".", ".."] {
            let e = validate_name("name", bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid name:"), "{e}");
        }
    }

    #[test]
    fn ids() {
        let a = new_id().unwrap();
        assert!(looks_like_id(&a), "{a}");
        assert_ne!(a, new_id().unwrap());
        assert!(!looks_like_id("dev"));
    }
}
