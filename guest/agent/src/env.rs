//! The environment every exec and job starts from: the agent's own, with PID-1
//! defaults, plus what the host set with `SetEnv`. Held in memory only.

use std::collections::BTreeMap;

use burrow_proto::{AgentError, ErrorKind};

/// `PATH` for children when the agent is init (the kernel gives init none).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// `HOME` for children when the agent is init (the kernel sets `HOME=/`).
pub const DEFAULT_HOME: &str = "/root";

#[derive(Debug, Clone, Default)]
pub struct Environment {
    vars: BTreeMap<String, String>,
}

impl Environment {
    /// Starts from the agent's own environment. As init, `PATH` and `HOME` are
    /// replaced by sane defaults; otherwise `PATH` is only filled in when missing.
    pub fn from_process(init: bool) -> Self {
        // Variables that are not UTF-8 cannot be carried on the wire; they are
        // left out rather than mangled.
        let vars = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        let mut env = Environment { vars };
        if init {
            env.vars.insert("PATH".into(), DEFAULT_PATH.into());
            env.vars.insert("HOME".into(), DEFAULT_HOME.into());
        } else {
            env.vars
                .entry("PATH".into())
                .or_insert_with(|| DEFAULT_PATH.into());
        }
        env
    }

    #[cfg(test)]
    pub fn from_vars(vars: BTreeMap<String, String>) -> Self {
        Environment { vars }
    }

    /// Applies a `SetEnv`: all of it, or — when any name or value is invalid —
    /// none of it.
    pub fn apply(
        &mut self,
        set: &BTreeMap<String, String>,
        unset: &[String],
    ) -> Result<(), AgentError> {
        validate_vars("set", set)?;
        for key in unset {
            validate_name("unset", key)?;
        }
        for key in unset {
            self.vars.remove(key);
        }
        for (k, v) in set {
            self.vars.insert(k.clone(), v.clone());
        }
        Ok(())
    }

    /// This environment with a request's own variables on top.
    pub fn merged(
        &self,
        extra: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, AgentError> {
        validate_vars("env", extra)?;
        let mut vars = self.vars.clone();
        vars.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(vars)
    }

    #[cfg(test)]
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }
}

/// Checks names and values of `vars`; errors name the field and the key, never the
/// value (values may be secrets).
fn validate_vars(field: &str, vars: &BTreeMap<String, String>) -> Result<(), AgentError> {
    for (k, v) in vars {
        validate_name(field, k)?;
        if v.contains('\0') {
            return Err(AgentError::new(
                ErrorKind::InvalidArgument,
                format!("{field}.{k}: value contains a NUL byte"),
            ));
        }
    }
    Ok(())
}

/// A variable name must be non-empty and hold no '=' or NUL: anything else cannot
/// be represented in `environ`.
pub fn validate_name(field: &str, key: &str) -> Result<(), AgentError> {
    if key.is_empty() || key.contains(['=', '\0']) {
        return Err(AgentError::new(
            ErrorKind::InvalidArgument,
            format!("{field}: invalid variable name {key:?}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("set", "FOO_1").is_ok());
        assert!(validate_name("set", "lower.dots-ok").is_ok());
        for bad in ["", "A=B", "=", "A\0"] {
            let e = validate_name("set", bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidArgument);
            assert!(e.message.starts_with("set: invalid variable name"), "{e}");
        }
    }

    #[test]
    fn apply_is_all_or_nothing() {
        let mut env = Environment::from_vars(map(&[("A", "1")]));
        let err = env
            .apply(&map(&[("B", "2"), ("C=", "3")]), &["A".into()])
            .unwrap_err();
        assert!(err.message.contains("\"C=\""), "{err}");
        assert_eq!(env.get("A"), Some("1"));
        assert_eq!(env.get("B"), None);

        let err = env.apply(&map(&[("B", "2")]), &["".into()]).unwrap_err();
        assert!(err.message.starts_with("unset:"), "{err}");
        assert_eq!(env.get("B"), None);

        env.apply(&map(&[("B", "2")]), &["A".into()]).unwrap();
        assert_eq!(env.get("A"), None);
        assert_eq!(env.get("B"), Some("2"));
    }

    #[test]
    fn set_wins_over_unset_of_the_same_key() {
        let mut env = Environment::default();
        env.apply(&map(&[("A", "1")]), &["A".into()]).unwrap();
        assert_eq!(env.get("A"), Some("1"));
    }

    #[test]
    fn nul_in_value_is_refused_without_echoing_it() {
        let mut env = Environment::default();
        let err = env.apply(&map(&[("K", "sec\0ret")]), &[]).unwrap_err();
        assert_eq!(err.message, "set.K: value contains a NUL byte");
    }

    #[test]
    fn request_env_overrides_base() {
        let env = Environment::from_vars(map(&[("A", "1"), ("B", "2")]));
        let merged = env.merged(&map(&[("B", "3"), ("C", "4")])).unwrap();
        assert_eq!(merged, map(&[("A", "1"), ("B", "3"), ("C", "4")]));
        assert!(env.merged(&map(&[("", "x")])).is_err());
    }

    #[test]
    fn init_defaults() {
        let env = Environment::from_process(true);
        assert_eq!(env.get("PATH"), Some(DEFAULT_PATH));
        assert_eq!(env.get("HOME"), Some(DEFAULT_HOME));
        assert!(Environment::from_process(false).get("PATH").is_some());
    }
}
