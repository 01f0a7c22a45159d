//! The agent's state and the dispatch of one request to the code that serves it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burrow_proto::{AgentError, ErrorKind, Op, Reply, StreamOpen};

use crate::containers::{ContainerPaths, Containers};
use crate::env::Environment;
use crate::jobs::Jobs;
use crate::process::{lock, signal_group, ProcessTable};
use crate::streams::{self, Opened};
use crate::terminal::Terminals;
use crate::{exec, files, init};

/// Whether the agent is the guest's init.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 in the guest: shutdown powers the VM off.
    Init,
    /// A process among others (host-side development, tests): shutdown exits.
    Dev,
}

pub struct Agent {
    mode: Mode,
    started: Instant,
    /// Base environment of every exec and job; `SetEnv` changes it.
    env: Mutex<Environment>,
    processes: Arc<ProcessTable>,
    jobs: Jobs,
    terminals: Terminals,
    /// Exec streams waiting for their input connection.
    inputs: Arc<streams::Inputs>,
    containers: Arc<Containers>,
}

impl Agent {
    pub fn new(
        mode: Mode,
        env: Environment,
        processes: Arc<ProcessTable>,
        containers: ContainerPaths,
    ) -> Self {
        Agent {
            mode,
            started: Instant::now(),
            env: Mutex::new(env),
            processes,
            jobs: Jobs::default(),
            terminals: Terminals::default(),
            inputs: Arc::default(),
            containers: Arc::new(Containers::new(containers)),
        }
    }

    /// Serves one request. `Shutdown` only answers here; the connection calls
    /// [`Agent::shutdown`] once the answer is on its way.
    pub async fn handle(&self, op: Op) -> Result<Reply, AgentError> {
        match op {
            Op::Ping => Ok(Reply::Pong {
                uptime_ms: uptime_ms().unwrap_or_else(|| exec::millis(self.started.elapsed())),
            }),
            Op::Exec(req) => {
                let env = lock(&self.env).clone();
                exec::run(&self.processes, &env, req).await.map(Reply::Exec)
            }
            Op::JobStart(req) => {
                let env = lock(&self.env).clone();
                self.jobs
                    .start(&self.processes, &env, req)
                    .map(|job| Reply::JobStarted { job })
            }
            Op::JobPoll { job } => self.jobs.poll(self.jobs.resolve(&job)?).map(Reply::Job),
            Op::JobKill { job, signal } => self
                .jobs
                .kill(self.jobs.resolve(&job)?, signal)
                .map(|()| Reply::Done),
            Op::JobWait { job } => {
                let id = self.jobs.resolve(&job)?;
                self.jobs.wait(id).await.map(Reply::Job)
            }
            Op::JobList => Ok(Reply::Jobs {
                jobs: self.jobs.list(),
            }),
            Op::TerminalNew(req) => {
                let env = lock(&self.env).clone();
                self.terminals
                    .create(&self.processes, &env, req)
                    .map(Reply::Terminal)
            }
            Op::TerminalList => Ok(Reply::Terminals {
                terminals: self.terminals.list(),
            }),
            Op::TerminalKill { name } => self.terminals.kill(&name).await.map(|()| Reply::Done),
            // The connection serves streams itself (see `open_stream`).
            Op::Stream(_) => Err(AgentError::new(
                ErrorKind::InvalidArgument,
                "op: a stream is opened as a connection's request",
            )),
            Op::SetEnv { set, unset } => lock(&self.env).apply(&set, &unset).map(|()| Reply::Done),
            Op::FileRead(req) => blocking(move || files::read(&req))
                .await
                .map(Reply::FileData),
            Op::FileWrite(req) => blocking(move || files::write(&req))
                .await
                .map(|bytes| Reply::Written { bytes }),
            Op::FileEdit(req) => blocking(move || files::edit(&req))
                .await
                .map(|replacements| Reply::Edited { replacements }),
            Op::FileList { path } => blocking(move || files::list(&path))
                .await
                .map(|entries| Reply::Entries { entries }),
            Op::Container(op) => self.containers.op(&self.processes, op).await,
            Op::Shutdown => Ok(Reply::Done),
        }
    }

    /// Validates a stream request and starts what it needs; the connection then
    /// answers `stream_started` and runs the returned stream.
    pub async fn open_stream(&self, open: StreamOpen) -> Result<Opened, AgentError> {
        match open {
            StreamOpen::Exec(spawn) => {
                let env = lock(&self.env).clone();
                streams::start_exec(&self.processes, &self.inputs, &env, spawn)
            }
            StreamOpen::Input { token } => self.inputs.take(token),
            StreamOpen::JobOutput { job, follow } => {
                let job = self.jobs.get(self.jobs.resolve(&job)?)?;
                Ok(Opened::JobOutput {
                    output: Arc::clone(&job.output),
                    follow,
                })
            }
            StreamOpen::TerminalAttach {
                name,
                read_only,
                size,
            } => {
                if let Some(size) = size {
                    size.validate().map_err(|m| {
                        AgentError::new(ErrorKind::InvalidArgument, format!("size.{m}"))
                    })?;
                }
                let session = self.terminals.get(&name)?;
                if let (false, Some(size)) = (read_only, size) {
                    session.resize(size);
                }
                Ok(Opened::Attach { session, read_only })
            }
            StreamOpen::TerminalRecord { name, from } => Ok(Opened::Record {
                session: self.terminals.get(&name)?,
                from,
            }),
            StreamOpen::ContainerCreate(req) => {
                self.containers
                    .create(&self.processes, &self.inputs, req)
                    .await
            }
            StreamOpen::ContainerExec(req) => {
                self.containers
                    .exec(&self.processes, &self.inputs, req)
                    .await
            }
            StreamOpen::ContainerAttach(req) => self.containers.attach(&self.inputs, req),
        }
    }

    /// Powers the guest off (init) or ends the process (dev mode). In dev mode the
    /// agent's children are stopped first, so nothing it started outlives it.
    pub async fn shutdown(&self) {
        match self.mode {
            Mode::Init => {
                // Blocking work (bounded waits, sync) off the async threads.
                let _ = tokio::task::spawn_blocking(|| init::power_off()).await;
            }
            Mode::Dev => {
                self.stop_children().await;
                tracing::info!("shutdown: exiting");
                std::process::exit(0);
            }
        }
    }

    /// SIGTERM to every process group the agent started (execs, jobs, terminal
    /// sessions: each is its own group), up to a second for them to go, then SIGKILL.
    pub async fn stop_children(&self) {
        // Containers first: their processes are not the agent's children.
        self.containers.shutdown(&self.processes).await;
        let groups = |agent: &Agent| {
            let mut g = agent.jobs.running_groups();
            g.extend(agent.processes.pids());
            g.sort_unstable();
            g.dedup();
            g
        };
        for pgid in groups(self) {
            signal_group(pgid, libc::SIGTERM);
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.processes.all_exited()).await;
        for pgid in groups(self) {
            signal_group(pgid, libc::SIGKILL);
        }
    }
}

/// Milliseconds since boot, from /proc/uptime.
fn uptime_ms() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((secs * 1000.0) as u64)
}

/// Runs blocking file work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(AgentError::new(
            ErrorKind::Io,
            format!("internal error: {e}"),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_is_read() {
        assert!(uptime_ms().is_some_and(|ms| ms > 0));
    }
}
