//! Background jobs: started (optionally named), polled for the tail of their
//! output, waited for, listed, signalled, and streamed (`JobOutput`).
//!
//! Jobs belong to the agent, not to a connection, so a host that reconnects can
//! still poll them. A finished job keeps its status and output until it is
//! evicted to make room (see [`MAX_JOBS`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burrow_proto::{validate_name, AgentError, ErrorKind, ExitInfo, JobInfo, JobStart, JobStatus};

use crate::env::Environment;
use crate::exec::{millis, resolve_workdir, validate_argv};
use crate::process::{self, lock, output_cap, ExitStatus, ProcessTable, Spec};
use crate::ring::{Output, Tag};

/// Jobs kept at most. Past it, the oldest finished job is forgotten, so a host that
/// never stops starting jobs cannot grow the agent without bound (each finished job
/// holds a ring of at most twice its output cap).
pub const MAX_JOBS: usize = 1024;

pub struct Job {
    name: Option<String>,
    argv: Vec<String>,
    /// Process group to signal; `None` when the process never started.
    pgid: Option<i32>,
    started: Instant,
    /// Both streams, tagged, in one ring of twice the job's output cap; complete
    /// (with the exit) once the job has ended and its pipes are drained.
    pub output: Arc<Output>,
    state: Mutex<JobState>,
}

#[derive(Clone, Copy)]
enum JobState {
    Running,
    Finished {
        status: ExitStatus,
        duration: Duration,
    },
}

#[derive(Default)]
pub struct Jobs {
    inner: Mutex<JobTable>,
}

#[derive(Default)]
struct JobTable {
    last_id: u32,
    jobs: BTreeMap<u32, Arc<Job>>,
}

impl JobTable {
    fn name_taken(&self, name: &str) -> bool {
        self.jobs.values().any(|j| j.name.as_deref() == Some(name))
    }

    fn insert(&mut self, job: Arc<Job>) -> u32 {
        if self.jobs.len() >= MAX_JOBS {
            let oldest_finished = self
                .jobs
                .iter()
                .find(|(_, j)| matches!(*lock(&j.state), JobState::Finished { .. }))
                .map(|(id, _)| *id);
            if let Some(id) = oldest_finished {
                self.jobs.remove(&id);
            }
        }
        self.last_id = self.last_id.wrapping_add(1).max(1);
        self.jobs.insert(self.last_id, job);
        self.last_id
    }
}

fn exit_info(status: ExitStatus) -> ExitInfo {
    ExitInfo {
        exit_code: status.code(),
        signal: status.signal(),
        timed_out: false,
        oom_killed: false,
    }
}

impl Jobs {
    /// Starts a job; its id counts from 1. A command that cannot be started gives a
    /// job that has already finished the way a shell would report it (exit 127 and
    /// a message on stderr), like `Exec` does.
    pub fn start(
        &self,
        table: &ProcessTable,
        base: &Environment,
        req: JobStart,
    ) -> Result<u32, AgentError> {
        validate_argv(&req.argv)?;
        if let Some(name) = &req.name {
            validate_name("name", name)
                .map_err(|m| AgentError::new(ErrorKind::InvalidArgument, m))?;
        }
        let workdir = resolve_workdir(req.workdir.as_deref())?;
        let env = base.merged(&req.env)?;
        let cap = output_cap(req.max_output_bytes);
        let output = Arc::new(Output::new(cap.saturating_mul(2)));
        // The name is checked and the job inserted under one lock, so two starts
        // with one name cannot both win; the spawn happens under it too (it is
        // short: a posix_spawn).
        let mut jobs = lock(&self.inner);
        if let Some(name) = &req.name {
            if jobs.name_taken(name) {
                return Err(AgentError::new(
                    ErrorKind::AlreadyExists,
                    format!("name: a job named {name:?} already exists"),
                ));
            }
        }
        let spec = Spec {
            argv: &req.argv,
            workdir: &workdir,
            env: &env,
            stdin: None,
            max_output: cap,
            ring: Some(Arc::clone(&output)),
        };
        let mut running = match process::start(table, spec) {
            Ok(r) => r,
            Err(not_started) => {
                output.push(Tag::Stderr, not_started.stderr.as_bytes());
                let status = ExitStatus::Exited(not_started.exit_code);
                output.finish(exit_info(status));
                let job = Job {
                    name: req.name,
                    argv: req.argv,
                    pgid: None,
                    started: Instant::now(),
                    output,
                    state: Mutex::new(JobState::Finished {
                        status,
                        duration: Duration::ZERO,
                    }),
                };
                return Ok(jobs.insert(Arc::new(job)));
            }
        };
        let job = Arc::new(Job {
            name: req.name,
            argv: req.argv,
            pgid: Some(running.pid),
            started: running.started,
            output,
            state: Mutex::new(JobState::Running),
        });
        let id = jobs.insert(Arc::clone(&job));
        drop(jobs);
        tokio::spawn(async move {
            let finished = running.wait(None).await;
            *lock(&job.state) = JobState::Finished {
                status: finished.status,
                duration: finished.duration,
            };
            job.output.finish(exit_info(finished.status));
        });
        Ok(id)
    }

    /// The id of the job `reference` names: its number, or its name.
    pub fn resolve(&self, reference: &str) -> Result<u32, AgentError> {
        let jobs = lock(&self.inner);
        let found = match reference.parse::<u32>() {
            Ok(id) => jobs.jobs.contains_key(&id).then_some(id),
            Err(_) => jobs
                .jobs
                .iter()
                .find(|(_, j)| j.name.as_deref() == Some(reference))
                .map(|(id, _)| *id),
        };
        found.ok_or_else(|| {
            AgentError::new(
                ErrorKind::NotFound,
                format!("job {}: no such job", reference.escape_debug()),
            )
        })
    }

    pub fn get(&self, id: u32) -> Result<Arc<Job>, AgentError> {
        lock(&self.inner)
            .jobs
            .get(&id)
            .cloned()
            .ok_or_else(|| AgentError::new(ErrorKind::NotFound, format!("job {id}: no such job")))
    }

    /// The job's state and the output kept: the tail of each stream (a job keeps
    /// at most twice its cap of both together; `*_truncated` says bytes of that
    /// stream were dropped from the head).
    pub fn poll(&self, id: u32) -> Result<JobStatus, AgentError> {
        let job = self.get(id)?;
        // Read the state before the output: a job seen finished then has all of its
        // output in the ring (it is marked finished only after its pipes closed or
        // the grace period ran out).
        let state = *lock(&job.state);
        let stdout = job.output.kept(Tag::Stdout);
        let stderr = job.output.kept(Tag::Stderr);
        let (_, out_dropped, err_dropped) = job.output.counts();
        let info = info(id, &job, state);
        Ok(JobStatus {
            job: id,
            name: info.name,
            argv: info.argv,
            running: info.running,
            exit_code: info.exit_code,
            signal: info.signal,
            stdout,
            stderr,
            stdout_truncated: out_dropped > 0,
            stderr_truncated: err_dropped > 0,
            duration_ms: info.duration_ms,
        })
    }

    /// Waits until the job has ended (and its output is complete), then polls it.
    pub async fn wait(&self, id: u32) -> Result<JobStatus, AgentError> {
        let job = self.get(id)?;
        job.output.ended().await;
        self.poll(id)
    }

    /// Every job kept, by id.
    pub fn list(&self) -> Vec<JobInfo> {
        let jobs: Vec<(u32, Arc<Job>)> = lock(&self.inner)
            .jobs
            .iter()
            .map(|(id, j)| (*id, Arc::clone(j)))
            .collect();
        jobs.iter()
            .map(|(id, j)| info(*id, j, *lock(&j.state)))
            .collect()
    }

    /// Sends `signal` to the job's process group. A finished job is not signalled:
    /// its group id may by now belong to someone else.
    pub fn kill(&self, id: u32, signal: i32) -> Result<(), AgentError> {
        if !valid_signal(signal) {
            return Err(AgentError::new(
                ErrorKind::InvalidArgument,
                format!("signal: {signal} is not a valid signal number"),
            ));
        }
        let job = self.get(id)?;
        if let (JobState::Running, Some(pgid)) = (*lock(&job.state), job.pgid) {
            process::signal_group(pgid, signal);
        }
        Ok(())
    }

    /// Process groups of the jobs still running.
    pub fn running_groups(&self) -> Vec<i32> {
        lock(&self.inner)
            .jobs
            .values()
            .filter(|j| matches!(*lock(&j.state), JobState::Running))
            .filter_map(|j| j.pgid)
            .collect()
    }
}

fn info(id: u32, job: &Job, state: JobState) -> JobInfo {
    let (running, status, duration) = match state {
        JobState::Running => (true, None, job.started.elapsed()),
        JobState::Finished { status, duration } => (false, Some(status), duration),
    };
    JobInfo {
        job: id,
        name: job.name.clone(),
        argv: job.argv.clone(),
        running,
        exit_code: status.map(ExitStatus::code),
        signal: status.and_then(ExitStatus::signal),
        duration_ms: millis(duration),
    }
}

/// Signal numbers 1 to SIGRTMAX. 0 (the existence probe) is refused: it sends
/// nothing, so asking for it is a mistake.
pub fn valid_signal(signal: i32) -> bool {
    (1..=libc::SIGRTMAX()).contains(&signal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_range() {
        assert!(valid_signal(libc::SIGTERM));
        assert!(valid_signal(libc::SIGKILL));
        assert!(valid_signal(libc::SIGRTMAX()));
        assert!(!valid_signal(0));
        assert!(!valid_signal(-9));
        assert!(!valid_signal(libc::SIGRTMAX() + 1));
    }

    fn finished_job() -> Arc<Job> {
        Arc::new(Job {
            name: None,
            argv: vec!["x".into()],
            pgid: None,
            started: Instant::now(),
            output: Arc::new(Output::new(0)),
            state: Mutex::new(JobState::Finished {
                status: ExitStatus::Exited(0),
                duration: Duration::ZERO,
            }),
        })
    }

    #[test]
    fn ids_count_from_one_and_old_finished_jobs_are_evicted() {
        let mut t = JobTable::default();
        assert_eq!(t.insert(finished_job()), 1);
        assert_eq!(t.insert(finished_job()), 2);
        for _ in 2..MAX_JOBS {
            t.insert(finished_job());
        }
        assert_eq!(t.jobs.len(), MAX_JOBS);
        let id = t.insert(finished_job());
        assert_eq!(id as usize, MAX_JOBS + 1);
        assert_eq!(t.jobs.len(), MAX_JOBS);
        assert!(!t.jobs.contains_key(&1));
        assert!(t.jobs.contains_key(&2));
    }

    #[test]
    fn unknown_job_is_not_found() {
        let jobs = Jobs::default();
        let e = jobs.resolve("7").unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert_eq!(e.message, "job 7: no such job");
        assert_eq!(
            jobs.resolve("build").unwrap_err().message,
            "job build: no such job"
        );
        let e = jobs.poll(7).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.contains('7'));
        assert_eq!(jobs.kill(7, 15).unwrap_err().kind, ErrorKind::NotFound);
        assert_eq!(
            jobs.kill(7, 0).unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
    }
}
