//! Background jobs: started, polled for their output so far, signalled.
//!
//! Jobs belong to the agent, not to a connection, so a host that reconnects can
//! still poll them. A finished job keeps its status and output until it is
//! evicted to make room (see [`MAX_JOBS`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burrow_proto::{AgentError, ErrorKind, JobStart, JobStatus};

use crate::env::Environment;
use crate::exec::{millis, resolve_workdir, validate_argv};
use crate::process::{
    self, lock, output_cap, Capture, ExitStatus, ProcessTable, SharedCapture, Spec,
};

/// Jobs kept at most. Past it, the oldest finished job is forgotten, so a host that
/// never stops starting jobs cannot grow the agent without bound (each finished job
/// holds up to two capped outputs).
pub const MAX_JOBS: usize = 1024;

struct Job {
    argv: Vec<String>,
    /// Process group to signal; `None` when the process never started.
    pgid: Option<i32>,
    started: Instant,
    stdout: SharedCapture,
    stderr: SharedCapture,
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
        let workdir = resolve_workdir(req.workdir.as_deref())?;
        let env = base.merged(&req.env)?;
        let cap = output_cap(req.max_output_bytes);
        let spec = Spec {
            argv: &req.argv,
            workdir: &workdir,
            env: &env,
            stdin: None,
            max_output: cap,
        };
        let mut running = match process::start(table, spec) {
            Ok(r) => r,
            Err(not_started) => {
                let mut stderr = Capture::new(cap);
                stderr.push(not_started.stderr.as_bytes());
                let job = Job {
                    argv: req.argv,
                    pgid: None,
                    started: Instant::now(),
                    stdout: Arc::new(Mutex::new(Capture::new(cap))),
                    stderr: Arc::new(Mutex::new(stderr)),
                    state: Mutex::new(JobState::Finished {
                        status: ExitStatus::Exited(not_started.exit_code),
                        duration: Duration::ZERO,
                    }),
                };
                return Ok(lock(&self.inner).insert(Arc::new(job)));
            }
        };
        let job = Arc::new(Job {
            argv: req.argv,
            pgid: Some(running.pid),
            started: running.started,
            stdout: Arc::clone(&running.stdout),
            stderr: Arc::clone(&running.stderr),
            state: Mutex::new(JobState::Running),
        });
        let id = lock(&self.inner).insert(Arc::clone(&job));
        tokio::spawn(async move {
            let finished = running.wait(None).await;
            *lock(&job.state) = JobState::Finished {
                status: finished.status,
                duration: finished.duration,
            };
        });
        Ok(id)
    }

    /// The id of the job `reference` names: its number.
    pub fn resolve(&self, reference: &str) -> Result<u32, AgentError> {
        reference.parse().map_err(|_| {
            AgentError::new(ErrorKind::NotFound, format!("job {reference}: no such job"))
        })
    }

    fn get(&self, id: u32) -> Result<Arc<Job>, AgentError> {
        lock(&self.inner)
            .jobs
            .get(&id)
            .cloned()
            .ok_or_else(|| AgentError::new(ErrorKind::NotFound, format!("job {id}: no such job")))
    }

    /// The job's state and all its output so far.
    pub fn poll(&self, id: u32) -> Result<JobStatus, AgentError> {
        let job = self.get(id)?;
        // Read the state before the output: a job seen finished then has all of its
        // output in the captures (it is marked finished only after its pipes closed
        // or the grace period ran out).
        let state = *lock(&job.state);
        let (stdout, stdout_truncated) = lock(&job.stdout).snapshot();
        let (stderr, stderr_truncated) = lock(&job.stderr).snapshot();
        let (running, status, duration) = match state {
            JobState::Running => (true, None, job.started.elapsed()),
            JobState::Finished { status, duration } => (false, Some(status), duration),
        };
        Ok(JobStatus {
            job: id,
            name: None,
            argv: job.argv.clone(),
            running,
            exit_code: status.map(ExitStatus::code),
            signal: status.and_then(ExitStatus::signal),
            stdout,
            stderr,
            stdout_truncated,
            stderr_truncated,
            duration_ms: millis(duration),
        })
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
            argv: vec!["x".into()],
            pgid: None,
            started: Instant::now(),
            stdout: Arc::default(),
            stderr: Arc::default(),
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
