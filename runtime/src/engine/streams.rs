//! Live streams (exec with live I/O, job output, terminal viewers), named jobs and
//! terminal sessions. The agent owns jobs and sessions; the engine checks what a
//! front door asks for, opens the guest stream, and records terminal sessions.

use std::sync::Arc;

use burrow_proto::{
    validate_name, JobInfo, JobStart, JobStatus, Op, Reply, StreamControl, StreamOpen,
    TerminalInfo, TerminalNew,
};

use super::guest_ops::{unexpected, validate_env, QUICK};
use super::Engine;
use crate::error::{Error, Result};
use crate::guest::GuestStream;

/// Longest exec timeout a stream may ask for: a day.
const MAX_TIMEOUT_MS: u64 = 86_400_000;

impl Engine {
    /// Opens a stream in a running workspace. For `exec` the process lives as long
    /// as the returned stream: dropping it kills the process group.
    pub async fn open_stream(&self, reference: &str, open: StreamOpen) -> Result<GuestStream> {
        validate_open(&open)?;
        let (_, guest) = self.running(reference)?;
        guest.open_stream(open).await
    }

    /// Waits, as long as it takes, for a job to end.
    pub async fn job_wait(&self, reference: &str, job: &str) -> Result<JobStatus> {
        let (_, guest) = self.running(reference)?;
        let op = Op::JobWait {
            job: job.to_string(),
        };
        match guest.call(op, None).await? {
            Reply::Job(s) => Ok(s),
            r => Err(unexpected("job wait", r)),
        }
    }

    pub async fn job_list(&self, reference: &str) -> Result<Vec<JobInfo>> {
        let (_, guest) = self.running(reference)?;
        match guest.call(Op::JobList, Some(QUICK)).await? {
            Reply::Jobs { jobs } => Ok(jobs),
            r => Err(unexpected("job list", r)),
        }
    }

    /// Starts a terminal session and its recording.
    pub async fn terminal_new(
        self: &Arc<Self>,
        reference: &str,
        req: TerminalNew,
    ) -> Result<TerminalInfo> {
        validate_name("name", &req.name).map_err(|e| Error::invalid_line("name", e))?;
        if let Some(argv) = &req.argv {
            if argv.is_empty() {
                return Err(Error::invalid("argv", "no command given"));
            }
        }
        if let Some(size) = &req.size {
            size.validate()
                .map_err(|e| Error::invalid_line("size", e))?;
        }
        validate_env(&req.env)?;
        let (rec, guest) = self.running(reference)?;
        let info = match guest.call(Op::TerminalNew(req), Some(QUICK)).await? {
            Reply::Terminal(t) => t,
            r => return Err(unexpected("terminal new", r)),
        };
        // A new session of an old name starts a new recording.
        self.recordings.start(self, &rec, &info, true);
        Ok(info)
    }

    pub async fn terminal_list(&self, reference: &str) -> Result<Vec<TerminalInfo>> {
        let (_, guest) = self.running(reference)?;
        match guest.call(Op::TerminalList, Some(QUICK)).await? {
            Reply::Terminals { terminals } => Ok(terminals),
            r => Err(unexpected("terminal list", r)),
        }
    }

    pub async fn terminal_kill(&self, reference: &str, name: &str) -> Result<()> {
        validate_name("name", name).map_err(|e| Error::invalid_line("name", e))?;
        let (_, guest) = self.running(reference)?;
        let op = Op::TerminalKill {
            name: name.to_string(),
        };
        match guest.call(op, Some(QUICK)).await? {
            Reply::Done => Ok(()),
            r => Err(unexpected("terminal kill", r)),
        }
    }

    /// The recording of a session, as an asciicast v2 file. Kept until the
    /// workspace is destroyed, whether or not it runs.
    pub async fn terminal_recording(&self, reference: &str, name: &str) -> Result<Vec<u8>> {
        validate_name("name", name).map_err(|e| Error::invalid_line("name", e))?;
        let rec = self.db.resolve(reference)?;
        let path = super::recording::cast_path(&self.state.log_dir(&rec.id), name);
        match tokio::fs::read(&path).await {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NoRecording {
                workspace: rec.name,
                name: name.to_string(),
            }),
            Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
        }
    }

    /// Starts (again) the recorders of every session in every running workspace:
    /// after the daemon restarts, sessions that lived on are recorded from where
    /// the last recorder stopped.
    pub(super) fn resume_recordings(self: &Arc<Self>) {
        let Ok(list) = self.db.list() else { return };
        for rec in list
            .into_iter()
            .filter(|r| r.state == crate::db::State::Running)
        {
            let engine = Arc::clone(self);
            tokio::spawn(async move {
                let Ok(sessions) = engine.terminal_list(&rec.id).await else {
                    return;
                };
                for info in sessions {
                    // Names come from the guest: only valid ones name files.
                    if validate_name("name", &info.name).is_ok() {
                        engine.recordings.start(&engine, &rec, &info, false);
                    }
                }
            });
        }
    }
}

/// Checks a job start request (its name) on top of what `job_start` checks.
pub fn validate_job_start(req: &JobStart) -> Result<()> {
    if let Some(name) = &req.name {
        validate_name("name", name).map_err(|e| Error::invalid_line("name", e))?;
    }
    Ok(())
}

/// Checks what a front door asks of a stream before the guest sees it.
pub fn validate_open(open: &StreamOpen) -> Result<()> {
    match open {
        StreamOpen::Exec(spawn) => {
            if spawn.argv.is_empty() {
                return Err(Error::invalid("argv", "no command given"));
            }
            match spawn.timeout_ms {
                Some(0) => return Err(Error::invalid("timeout", "must be more than 0")),
                Some(t) if t > MAX_TIMEOUT_MS => {
                    return Err(Error::invalid("timeout", "must be at most 86400 s"))
                }
                _ => {}
            }
            if let Some(size) = &spawn.tty {
                size.validate().map_err(|e| Error::invalid_line("tty", e))?;
            }
            validate_env(&spawn.env)
        }
        StreamOpen::JobOutput { job, .. } => {
            if job.is_empty() {
                return Err(Error::invalid("job", "must not be empty"));
            }
            Ok(())
        }
        StreamOpen::TerminalAttach { name, size, .. } => {
            validate_name("name", name).map_err(|e| Error::invalid_line("name", e))?;
            if let Some(size) = size {
                size.validate()
                    .map_err(|e| Error::invalid_line("size", e))?;
            }
            Ok(())
        }
        // burrowd opens an exec's input connection itself.
        StreamOpen::Input { .. } => Err(Error::invalid(
            "stream",
            "input is opened with its exec stream, not on its own",
        )),
        StreamOpen::TerminalRecord { name, .. } => {
            validate_name("name", name).map_err(|e| Error::invalid_line("name", e))
        }
        StreamOpen::ContainerCreate(c) => {
            burrow_proto::validate_container_id(&c.id).map_err(|e| Error::invalid_line("id", e))?;
            validate_size(c.size.as_ref())
        }
        StreamOpen::ContainerExec(c) => {
            burrow_proto::validate_container_id(&c.id).map_err(|e| Error::invalid_line("id", e))?;
            if !c.process.is_object() {
                return Err(Error::invalid("process", "must be a JSON object"));
            }
            if let Some(exec) = &c.exec_id {
                burrow_proto::validate_container_id(exec)
                    .map_err(|e| Error::invalid_line("exec_id", e))?;
            }
            validate_size(c.size.as_ref())
        }
        StreamOpen::ContainerAttach(c) => {
            burrow_proto::validate_container_id(&c.id).map_err(|e| Error::invalid_line("id", e))?;
            if !c.exec.is_empty() {
                burrow_proto::validate_container_id(&c.exec)
                    .map_err(|e| Error::invalid_line("exec", e))?;
            }
            Ok(())
        }
    }
}

fn validate_size(size: Option<&burrow_proto::WinSize>) -> Result<()> {
    match size {
        Some(s) => s.validate().map_err(|e| Error::invalid_line("size", e)),
        None => Ok(()),
    }
}

/// Checks a control message from a front door.
pub fn validate_control(c: &StreamControl) -> Result<()> {
    match c {
        StreamControl::CloseStdin => Ok(()),
        StreamControl::Resize(size) => size.validate().map_err(|e| Error::invalid_line("size", e)),
        StreamControl::Signal { signal } => {
            if (1..=libc::SIGRTMAX()).contains(signal) {
                Ok(())
            } else {
                Err(Error::invalid(
                    "signal",
                    format!("{signal} is not a signal number"),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burrow_proto::{Spawn, WinSize};

    use super::*;

    #[test]
    fn stream_requests_are_checked() {
        let exec = |f: fn(&mut Spawn)| {
            let mut s = Spawn {
                argv: vec!["true".into()],
                ..Default::default()
            };
            f(&mut s);
            validate_open(&StreamOpen::Exec(s))
        };
        assert!(exec(|_| {}).is_ok());
        assert!(exec(|s| s.argv.clear())
            .unwrap_err()
            .to_string()
            .contains("argv"));
        assert!(exec(|s| s.timeout_ms = Some(0))
            .unwrap_err()
            .to_string()
            .contains("timeout"));
        assert!(exec(|s| s.tty = Some(WinSize { rows: 0, cols: 1 }))
            .unwrap_err()
            .to_string()
            .contains("rows"));
        let attach = StreamOpen::TerminalAttach {
            name: "../x".into(),
            read_only: false,
            size: None,
        };
        assert!(validate_open(&attach)
            .unwrap_err()
            .to_string()
            .contains("name"));
        assert!(validate_control(&StreamControl::Signal { signal: 0 }).is_err());
        assert!(validate_control(&StreamControl::Signal { signal: 2 }).is_ok());
    }
}
