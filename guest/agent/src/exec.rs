//! `Exec`: run a process to completion and return its output.

use std::path::PathBuf;
use std::time::Duration;

use burrow_proto::{AgentError, ErrorKind, Exec, ExecResult};

use crate::env::Environment;
use crate::process::{self, lock, output_cap, NotStarted, ProcessTable, Spec};

/// Where a process runs when the request names no directory.
const DEFAULT_WORKDIR: &str = "/";

/// Checks `argv`: at least a program, and no NUL bytes (which `execve` cannot carry).
pub fn validate_argv(argv: &[String]) -> Result<(), AgentError> {
    let invalid = |m: String| Err(AgentError::new(ErrorKind::InvalidArgument, m));
    match argv.first() {
        None => return invalid("argv: must not be empty".into()),
        Some(p) if p.is_empty() => return invalid("argv[0]: must not be empty".into()),
        Some(_) => {}
    }
    for (i, a) in argv.iter().enumerate() {
        if a.contains('\0') {
            return invalid(format!("argv[{i}]: contains a NUL byte"));
        }
    }
    Ok(())
}

/// Resolves the working directory: absolute, existing, a directory.
pub fn resolve_workdir(workdir: Option<&str>) -> Result<PathBuf, AgentError> {
    let Some(dir) = workdir else {
        return Ok(PathBuf::from(DEFAULT_WORKDIR));
    };
    if !dir.starts_with('/') || dir.contains('\0') {
        return Err(AgentError::new(
            ErrorKind::InvalidArgument,
            format!("workdir: {dir:?} is not an absolute path"),
        ));
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(PathBuf::from(dir)),
        Ok(_) => Err(AgentError::new(
            ErrorKind::NotADirectory,
            format!("workdir {dir}: not a directory"),
        )),
        Err(e) => Err(AgentError::io(&format!("workdir {dir}"), &e)),
    }
}

/// Runs `req` with `base` as the starting environment.
pub async fn run(
    table: &ProcessTable,
    base: &Environment,
    req: Exec,
) -> Result<ExecResult, AgentError> {
    validate_argv(&req.argv)?;
    let workdir = resolve_workdir(req.workdir.as_deref())?;
    let env = base.merged(&req.env)?;
    let spec = Spec {
        argv: &req.argv,
        workdir: &workdir,
        env: &env,
        stdin: req.stdin,
        max_output: output_cap(req.max_output_bytes),
        ring: None,
    };
    let mut running = match process::start(table, spec) {
        Ok(r) => r,
        Err(not_started) => return Ok(not_started_result(not_started)),
    };
    let finished = running
        .wait(req.timeout_ms.map(Duration::from_millis))
        .await;
    let (stdout, stdout_truncated) = lock(&running.stdout).take();
    let (stderr, stderr_truncated) = lock(&running.stderr).take();
    Ok(ExecResult {
        stdout,
        stderr,
        exit_code: finished.status.code(),
        signal: finished.status.signal(),
        stdout_truncated,
        stderr_truncated,
        timed_out: finished.timed_out,
        duration_ms: millis(finished.duration),
    })
}

fn not_started_result(n: NotStarted) -> ExecResult {
    ExecResult {
        stdout: Vec::new(),
        stderr: n.stderr.into_bytes(),
        exit_code: n.exit_code,
        signal: None,
        stdout_truncated: false,
        stderr_truncated: false,
        timed_out: false,
        duration_ms: 0,
    }
}

pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_rules() {
        assert!(validate_argv(&["true".into()]).is_ok());
        let e = validate_argv(&[]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.starts_with("argv:"), "{e}");
        assert!(validate_argv(&["".into()])
            .unwrap_err()
            .message
            .starts_with("argv[0]"));
        assert!(validate_argv(&["a".into(), "b\0".into()])
            .unwrap_err()
            .message
            .starts_with("argv[1]"));
    }

    #[test]
    fn workdir_rules() {
        assert_eq!(resolve_workdir(None).unwrap(), PathBuf::from("/"));
        assert_eq!(resolve_workdir(Some("/")).unwrap(), PathBuf::from("/"));
        let e = resolve_workdir(Some("rel")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        let e = resolve_workdir(Some("/no/such/dir")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.contains("/no/such/dir"), "{e}");
    }
}
