//! Operations carried out by the guest agent: exec, jobs, environment, files; and
//! the workspace's logs.

use std::collections::BTreeMap;
use std::time::Duration;

use burrow_proto::{
    DirEntry, Exec, ExecResult, FileData, FileEdit, FileRead, FileWrite, JobStart, JobStatus, Op,
    Reply,
};
use serde::{Deserialize, Serialize};

use super::Engine;
use crate::error::{Error, Result};
use crate::vmm;

/// Time a quick guest request (files, env, jobs) may take.
const QUICK: Duration = Duration::from_secs(60);
/// Extra time an exec gets over its own timeout for the reply to arrive.
const EXEC_SLACK: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogKind {
    /// Everything the guest printed on its serial console (kernel, init, agent).
    #[default]
    Console,
    /// The agent's own lines from the console.
    Agent,
}

fn unexpected(op: &str, r: Reply) -> Error {
    Error::Vmm(format!("agent answered {op} with {r:?}"))
}

fn validate_env(vars: &BTreeMap<String, String>) -> Result<()> {
    for k in vars.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(Error::invalid(
                "env",
                format!("{k:?} is not a variable name"),
            ));
        }
    }
    Ok(())
}

impl Engine {
    pub async fn exec(&self, reference: &str, req: Exec) -> Result<ExecResult> {
        if req.argv.is_empty() {
            return Err(Error::invalid("argv", "no command given"));
        }
        if req.timeout_ms == Some(0) {
            return Err(Error::invalid("timeout", "must be more than 0"));
        }
        validate_env(&req.env)?;
        let (_, guest) = self.running(reference)?;
        let limit = req
            .timeout_ms
            .map(|ms| Duration::from_millis(ms) + EXEC_SLACK);
        match guest.call(Op::Exec(req), limit).await? {
            Reply::Exec(r) => Ok(r),
            r => Err(unexpected("exec", r)),
        }
    }

    pub async fn job_start(&self, reference: &str, req: JobStart) -> Result<u32> {
        if req.argv.is_empty() {
            return Err(Error::invalid("argv", "no command given"));
        }
        validate_env(&req.env)?;
        let (_, guest) = self.running(reference)?;
        match guest.call(Op::JobStart(req), Some(QUICK)).await? {
            Reply::JobStarted { job } => Ok(job),
            r => Err(unexpected("job start", r)),
        }
    }

    pub async fn job_poll(&self, reference: &str, job: &str) -> Result<JobStatus> {
        let (_, guest) = self.running(reference)?;
        let job = job.to_string();
        match guest.call(Op::JobPoll { job }, Some(QUICK)).await? {
            Reply::Job(s) => Ok(s),
            r => Err(unexpected("job poll", r)),
        }
    }

    pub async fn job_kill(&self, reference: &str, job: &str, signal: i32) -> Result<()> {
        let (_, guest) = self.running(reference)?;
        let job = job.to_string();
        match guest.call(Op::JobKill { job, signal }, Some(QUICK)).await? {
            Reply::Done => Ok(()),
            r => Err(unexpected("job kill", r)),
        }
    }

    /// Sets variables for later execs; they live in the agent's memory only.
    pub async fn set_env(
        &self,
        reference: &str,
        set: BTreeMap<String, String>,
        unset: Vec<String>,
    ) -> Result<()> {
        validate_env(&set)?;
        let (_, guest) = self.running(reference)?;
        match guest.call(Op::SetEnv { set, unset }, Some(QUICK)).await? {
            Reply::Done => Ok(()),
            r => Err(unexpected("set env", r)),
        }
    }

    pub async fn file_read(&self, reference: &str, req: FileRead) -> Result<FileData> {
        let (_, guest) = self.running(reference)?;
        match guest.call(Op::FileRead(req), Some(QUICK)).await? {
            Reply::FileData(d) => Ok(d),
            r => Err(unexpected("file read", r)),
        }
    }

    pub async fn file_write(&self, reference: &str, req: FileWrite) -> Result<u64> {
        if let Some(m) = req.mode {
            if m > 0o7777 {
                return Err(Error::invalid(
                    "mode",
                    format!("{m:o} is not a permission mode"),
                ));
            }
        }
        let (_, guest) = self.running(reference)?;
        match guest.call(Op::FileWrite(req), Some(QUICK)).await? {
            Reply::Written { bytes } => Ok(bytes),
            r => Err(unexpected("file write", r)),
        }
    }

    pub async fn file_edit(&self, reference: &str, req: FileEdit) -> Result<u64> {
        if req.old.is_empty() {
            return Err(Error::invalid("old", "must not be empty"));
        }
        let (_, guest) = self.running(reference)?;
        match guest.call(Op::FileEdit(req), Some(QUICK)).await? {
            Reply::Edited { replacements } => Ok(replacements),
            r => Err(unexpected("file edit", r)),
        }
    }

    pub async fn file_list(&self, reference: &str, path: String) -> Result<Vec<DirEntry>> {
        let (_, guest) = self.running(reference)?;
        match guest.call(Op::FileList { path }, Some(QUICK)).await? {
            Reply::Entries { entries } => Ok(entries),
            r => Err(unexpected("file list", r)),
        }
    }

    /// The last `lines` lines of a workspace's log. Works whether or not it runs.
    pub fn logs(&self, reference: &str, kind: LogKind, lines: usize) -> Result<Vec<String>> {
        let rec = self.db.resolve(reference)?;
        let paths = self.paths(&rec.id);
        Ok(match kind {
            LogKind::Console => vmm::console_tail(&paths, lines),
            LogKind::Agent => {
                let all = vmm::console_tail(&paths, usize::MAX);
                let mine: Vec<String> = all
                    .into_iter()
                    .filter(|l| l.contains("burrow-agent: "))
                    .collect();
                let start = mine.len().saturating_sub(lines);
                mine[start..].to_vec()
            }
        })
    }
}
