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
pub(super) const QUICK: Duration = Duration::from_secs(60);
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

pub(super) fn unexpected(op: &str, r: Reply) -> Error {
    Error::Vmm(format!("agent answered {op} with {r:?}"))
}

pub(super) fn validate_env(vars: &BTreeMap<String, String>) -> Result<()> {
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
        super::streams::validate_job_start(&req)?;
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

/// How often a followed log is checked for new lines (as `tail -f` does without
/// inotify; the console is written by another process at its own pace).
const FOLLOW_TICK: Duration = Duration::from_millis(200);

impl Engine {
    /// Sends the last `lines` lines of a workspace's log, then every new line as it
    /// is written, until the workspace stops running (and its log is read to the
    /// end), it is destroyed, or the receiver goes away.
    pub async fn follow_logs(
        &self,
        reference: &str,
        kind: LogKind,
        lines: usize,
        tx: tokio::sync::mpsc::Sender<String>,
    ) -> Result<()> {
        let rec = self.db.resolve(reference)?;
        let paths = self.paths(&rec.id);
        let keep = |l: &str| kind == LogKind::Console || l.contains("burrow-agent: ");
        // Where the tail ends: the current size of the newest part.
        let mut pos = std::fs::metadata(paths.console()).map_or(0, |m| m.len());
        let mut ino = std::fs::metadata(paths.console())
            .map_or(0, |m| std::os::unix::fs::MetadataExt::ino(&m));
        for l in self.logs(reference, kind, lines)? {
            if tx.send(l).await.is_err() {
                return Ok(());
            }
        }
        let mut partial: Vec<u8> = Vec::new();
        loop {
            let running = matches!(
                self.db.get(&rec.id),
                Ok(Some(r)) if r.state == crate::db::State::Running
            );
            let meta = std::fs::metadata(paths.console()).ok();
            let (len, now_ino) = meta.map_or((0, 0), |m| {
                (m.len(), std::os::unix::fs::MetadataExt::ino(&m))
            });
            // Rotated (a new file) or truncated: read the new one from its start.
            if now_ino != ino || len < pos {
                ino = now_ino;
                pos = 0;
                partial.clear();
            }
            if len > pos {
                let chunk = read_range(&paths.console(), pos, (len - pos).min(1 << 20));
                pos += chunk.len() as u64;
                partial.extend_from_slice(&chunk);
                while let Some(i) = partial.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = partial.drain(..=i).collect();
                    let line = String::from_utf8_lossy(&line[..i]);
                    let line = line.trim_end_matches('\r');
                    if keep(line) && tx.send(line.to_string()).await.is_err() {
                        return Ok(());
                    }
                }
                // A guest that never ends a line must not grow this buffer.
                if partial.len() > 64 << 10 {
                    partial.clear();
                }
                continue;
            }
            if !running {
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_TICK) => {}
                _ = tx.closed() => return Ok(()),
            }
        }
    }
}

fn read_range(path: &std::path::Path, pos: u64, len: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(pos)).is_ok() {
        let _ = f.take(len).read_to_end(&mut buf);
    }
    buf
}
