//! Running the OCI helper (`/proc/self/exe oci ...`) and reading its reports.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use burrow_proto::{AgentError, ErrorKind, ExitInfo};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::net::unix::pipe;

use crate::oci::STDIO_FDS;
use crate::process::{ExitWaiter, ProcessTable};
use crate::streams::AdoptedIo;

/// A running helper: its report lines and its exit.
pub struct Helper {
    pub lines: Lines<BufReader<pipe::Receiver>>,
    pub exit: ExitWaiter,
}

/// One report of the helper.
pub enum Report {
    Ok(Value),
    Exit(ExitInfo),
}

pub fn helper_garbled(what: impl std::fmt::Display) -> AgentError {
    AgentError::new(ErrorKind::Io, format!("oci helper: {what}"))
}

/// The pipes of a process's standard I/O: the agent's ends, and the helper's
/// (stdin, stdout, stderr; stdin is /dev/null without input).
pub fn stdio_pipes(stdin: bool) -> Result<(AdoptedIo, [OwnedFd; 3]), AgentError> {
    let pipe = || std::io::pipe().map_err(|e| AgentError::io("pipe", &e));
    let (in_r, in_w) = if stdin {
        let (r, w) = pipe()?;
        (OwnedFd::from(r), Some(OwnedFd::from(w)))
    } else {
        let null = std::fs::File::open("/dev/null").map_err(|e| AgentError::io("/dev/null", &e))?;
        (OwnedFd::from(null), None)
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    Ok((
        AdoptedIo::Pipes {
            stdin: in_w,
            stdout: out_r.into(),
            stderr: err_r.into(),
        },
        [in_r, out_w.into(), err_w.into()],
    ))
}

/// Starts `/proc/self/exe oci ...` in a process group of its own, reporting on a
/// pipe; `stdio` become its fds 3–5. Returns it and, with `input`, its stdin.
pub fn spawn_helper(
    table: &ProcessTable,
    args: Vec<OsString>,
    stdio: Option<[OwnedFd; 3]>,
    input: bool,
) -> Result<(Helper, Option<pipe::Sender>), AgentError> {
    // /proc/self/exe, not the path we were started from: it stays valid even if
    // the file was replaced or removed since.
    let mut cmd = Command::new("/proc/self/exe");
    cmd.args(args)
        .process_group(0)
        .stdin(if input { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(fds) = &stdio {
        let raw = fds.each_ref().map(|f| f.as_raw_fd());
        // SAFETY: the closure makes only async-signal-safe calls (fcntl, dup2,
        // close) on descriptors that exist in the child.
        unsafe {
            cmd.pre_exec(move || {
                // Out of the way first: a source may already sit on 3, 4 or 5.
                let mut high = [0; 3];
                for (h, fd) in high.iter_mut().zip(raw) {
                    *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                    if *h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (h, target) in high.into_iter().zip(STDIO_FDS) {
                    // dup2 leaves the target without close-on-exec.
                    if libc::dup2(h, target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(h);
                }
                Ok(())
            });
        }
    }
    let (mut child, exit) = table
        .spawn(&mut cmd)
        .map_err(|e| AgentError::new(ErrorKind::Io, format!("oci helper: {e}")))?;
    // The helper has its copies now; ours must go so that end of file works.
    drop(stdio);
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| helper_garbled("no stdout"))?;
    let stdout = pipe::Receiver::from_owned_fd(OwnedFd::from(stdout))
        .map_err(|e| helper_garbled(e.to_string()))?;
    let stdin = match child.stdin.take() {
        Some(s) => Some(
            pipe::Sender::from_owned_fd(OwnedFd::from(s))
                .map_err(|e| helper_garbled(e.to_string()))?,
        ),
        None => None,
    };
    Ok((
        Helper {
            lines: BufReader::new(stdout).lines(),
            exit,
        },
        stdin,
    ))
}

/// Reads the helper's next report. An `error` report becomes that error.
pub async fn next_report(
    lines: &mut Lines<BufReader<pipe::Receiver>>,
) -> Result<Report, AgentError> {
    let line = match lines.next_line().await {
        Ok(Some(l)) => l,
        Ok(None) => return Err(helper_garbled("ended without a report")),
        Err(e) => return Err(helper_garbled(e)),
    };
    parse_report(&line)
}

fn parse_report(line: &str) -> Result<Report, AgentError> {
    let v: Value = serde_json::from_str(line).map_err(helper_garbled)?;
    if let Some(ok) = v.get("ok") {
        return Ok(Report::Ok(ok.clone()));
    }
    if let Some(exit) = v.get("exit") {
        return serde_json::from_value::<ExitInfo>(exit.clone())
            .map(Report::Exit)
            .map_err(helper_garbled);
    }
    if let Some(err) = v.get("error") {
        return Err(serde_json::from_value::<AgentError>(err.clone()).map_err(helper_garbled)?);
    }
    Err(helper_garbled("unknown report"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_parsed() {
        assert!(matches!(
            parse_report(r#"{"ok":{"pid":42}}"#),
            Ok(Report::Ok(v)) if v["pid"] == 42
        ));
        assert!(matches!(
            parse_report(r#"{"exit":{"exit_code":137,"signal":9}}"#),
            Ok(Report::Exit(e)) if e.exit_code == 137 && e.signal == Some(9)
        ));
        let e = match parse_report(
            r#"{"error":{"kind":"not_found","message":"id: no container \"a\""}}"#,
        ) {
            Err(e) => e,
            Ok(_) => panic!("an error report must be an error"),
        };
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert_eq!(e.message, "id: no container \"a\"");
        assert!(parse_report("garbage").is_err());
        assert!(parse_report("{}").is_err());
    }
}
