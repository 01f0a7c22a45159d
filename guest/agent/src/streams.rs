//! Stream connections: a process's live I/O (`Exec`) and a job's output
//! (`JobOutput`). Terminal streams are in [`crate::terminal`].
//!
//! A stream is opened in two steps so that the host hears of bad input before the
//! connection changes its nature: [`open`] validates and starts what it must and
//! answers `stream_started` (or an error, after which the connection stays an
//! ordinary request connection); then [`Opened::run`] carries the frames until
//! the last guest frame, after which the agent closes the connection.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use burrow_proto::{
    AgentError, ErrorKind, ExitInfo, FrameError, GuestFrame, HostFrame, Spawn, StreamControl,
    StreamEvent, MAX_STREAM_CHUNK,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::watch;

use crate::env::Environment;
use crate::exec::{resolve_workdir, validate_argv};
use crate::jobs::valid_signal;
use crate::process::{
    signal_group, ExitStatus, ExitWaiter, NotStarted, ProcessTable, OUTPUT_GRACE,
};
use crate::pty::{self, PtyMaster, DEFAULT_TERM};
use crate::ring::{Cursor, Item, Next, Output, Piece, Tag};
use crate::terminal::{self, Session};

/// What an opened stream goes on to do.
pub enum Opened {
    Exec(ExecProc),
    /// The command could not be started: its shell-like message and status.
    NotStarted(NotStarted),
    JobOutput {
        output: Arc<Output>,
        follow: bool,
    },
    Attach {
        session: Arc<Session>,
        read_only: bool,
    },
    Record {
        session: Arc<Session>,
        from: u64,
    },
    /// An exec's input connection: its reading half goes to the exec.
    Input(tokio::sync::oneshot::Sender<InputReader>),
    /// A process the agent did not spawn itself (a container's, made by the OCI
    /// helper), carried as an exec; `on_end` runs once its stream is over, however
    /// it ended.
    Adopted {
        proc: ExecProc,
        on_end: Box<dyn FnOnce() + Send>,
    },
    /// A connection to a durable container stream.
    Durable(crate::containers::Attachment),
}

/// The reading half of an input connection.
pub type InputReader = Box<dyn AsyncRead + Unpin + Send>;

/// Exec streams waiting for their input connection, by token.
#[derive(Default)]
pub struct Inputs {
    next: std::sync::atomic::AtomicU64,
    waiting:
        std::sync::Mutex<std::collections::HashMap<u64, tokio::sync::oneshot::Sender<InputReader>>>,
}

impl Inputs {
    pub(crate) fn register(self: &Arc<Self>) -> InputSlot {
        // Tokens need not be secret: only the host reaches the agent's port, and
        // root in the guest can touch any process anyway. They must not repeat.
        let token = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        crate::process::lock(&self.waiting).insert(token, tx);
        InputSlot {
            token,
            rx,
            inputs: Arc::clone(self),
        }
    }

    /// The exec waiting for input connection `token`.
    pub fn take(&self, token: u64) -> Result<Opened, AgentError> {
        crate::process::lock(&self.waiting)
            .remove(&token)
            .map(Opened::Input)
            .ok_or_else(|| {
                AgentError::new(
                    ErrorKind::NotFound,
                    format!("token: no exec waits for input connection {token}"),
                )
            })
    }
}

/// An exec's claim on its input connection; given up when dropped.
pub(crate) struct InputSlot {
    token: u64,
    rx: tokio::sync::oneshot::Receiver<InputReader>,
    inputs: Arc<Inputs>,
}

impl InputSlot {
    pub(crate) fn token(&self) -> u64 {
        self.token
    }

    /// The input connection, once the host opened it.
    pub(crate) async fn connection(mut self) -> Option<InputReader> {
        (&mut self.rx).await.ok()
    }
}

impl Drop for InputSlot {
    fn drop(&mut self) {
        crate::process::lock(&self.inputs.waiting).remove(&self.token);
    }
}

impl Opened {
    /// The pid `stream_started` reports.
    pub fn pid(&self) -> Option<i32> {
        match self {
            Opened::Exec(p) | Opened::Adopted { proc: p, .. } => Some(p.pid),
            Opened::Durable(a) => a.pid(),
            _ => None,
        }
    }

    /// Whether this is an exec's input connection.
    pub fn is_input(&self) -> bool {
        matches!(self, Opened::Input(_))
    }

    /// The token of the exec's input connection, when it takes input.
    pub fn input_token(&self) -> Option<u64> {
        match self {
            Opened::Exec(ExecProc {
                stdin: Some((slot, _)),
                ..
            })
            | Opened::Adopted {
                proc:
                    ExecProc {
                        stdin: Some((slot, _)),
                        ..
                    },
                ..
            } => Some(slot.token),
            Opened::Durable(a) => a.input_token(),
            _ => None,
        }
    }

    /// Ends a stream that never ran: an exec's process group is killed, as when
    /// its host goes away (a durable stream's process goes on).
    pub fn abandon(self) {
        match self {
            Opened::Exec(p) => signal_group(p.pid, libc::SIGKILL),
            Opened::Adopted { proc, on_end } => {
                signal_group(proc.pid, libc::SIGKILL);
                on_end();
            }
            _ => {}
        }
    }

    /// Carries the stream to its end.
    pub async fn run<R, W>(self, rd: R, mut wr: W)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send,
    {
        match self {
            Opened::Exec(p) => run_exec(p, rd, &mut wr).await,
            Opened::Adopted { proc, on_end } => {
                run_exec(proc, rd, &mut wr).await;
                on_end();
            }
            Opened::Durable(a) => a.run(rd, &mut wr).await,
            Opened::NotStarted(n) => {
                let _ = GuestFrame::Stderr(n.stderr.into_bytes())
                    .write(&mut wr)
                    .await;
                let exit = ExitInfo {
                    exit_code: n.exit_code,
                    signal: None,
                    timed_out: false,
                    oom_killed: false,
                };
                let _ = GuestFrame::Event(StreamEvent::Exit(exit))
                    .write(&mut wr)
                    .await;
            }
            Opened::JobOutput { output, follow } => {
                run_job_output(&output, follow, rd, &mut wr).await
            }
            Opened::Attach { session, read_only } => {
                terminal::run_attach(session, read_only, rd, &mut wr).await
            }
            Opened::Record { session, from } => {
                terminal::run_record(&session, from, rd, &mut wr).await
            }
            Opened::Input(tx) => {
                // The exec reads it from here on; nothing goes back this way.
                let _ = tx.send(Box::new(rd));
            }
        }
        let _ = wr.shutdown().await;
    }
}

/// Where the input connection's bytes go.
enum StdinSink {
    Pipe(OwnedFd),
    Pty(Arc<PtyMaster>),
}

/// Input for the process, from either connection.
enum In {
    Data(Vec<u8>),
    /// End of input: the pipe closes; a terminal gets its EOF character.
    Close,
}

/// A process started for an `Exec` stream.
pub struct ExecProc {
    pid: i32,
    exit: ExitWaiter,
    /// The terminal, for resizes and signals to its foreground group.
    master: Option<Arc<PtyMaster>>,
    /// With `stdin`: the input connection's slot and where input goes.
    stdin: Option<(InputSlot, StdinSink)>,
    output: ExecOutput,
    timeout: Option<Duration>,
    /// A container process's: set (before its exit is sent) when the OOM killer
    /// killed a process of its cgroup while it ran.
    oom_killed: Option<Arc<AtomicBool>>,
}

enum ExecOutput {
    Pipes(Option<OwnedFd>, Option<OwnedFd>),
    Pty(Arc<PtyMaster>),
}

/// The standard I/O of a process the agent did not spawn (a container's).
pub enum AdoptedIo {
    /// Pipes: the writing end of its stdin (when it takes input), the reading
    /// ends of its stdout and stderr.
    Pipes {
        stdin: Option<OwnedFd>,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    /// Its terminal's master.
    Pty(Arc<PtyMaster>),
}

impl ExecProc {
    /// An exec stream's process for `pid`, whose exit `exit` delivers (and
    /// `oom_killed` whether the OOM killer struck). With a terminal, `stdin`
    /// says whether the host's input goes to it.
    pub fn adopt(
        inputs: &Arc<Inputs>,
        pid: i32,
        exit: ExitWaiter,
        io: AdoptedIo,
        stdin: bool,
        oom_killed: Arc<AtomicBool>,
    ) -> ExecProc {
        let oom_killed = Some(oom_killed);
        match io {
            AdoptedIo::Pipes {
                stdin: input,
                stdout,
                stderr,
            } => ExecProc {
                pid,
                exit,
                master: None,
                stdin: input.map(|fd| (inputs.register(), StdinSink::Pipe(fd))),
                output: ExecOutput::Pipes(Some(stdout), Some(stderr)),
                timeout: None,
                oom_killed,
            },
            AdoptedIo::Pty(master) => ExecProc {
                pid,
                exit,
                master: Some(Arc::clone(&master)),
                stdin: stdin.then(|| (inputs.register(), StdinSink::Pty(Arc::clone(&master)))),
                output: ExecOutput::Pty(master),
                timeout: None,
                oom_killed,
            },
        }
    }
}

/// Validates `req` and starts its process (in a process group of its own).
pub fn start_exec(
    table: &ProcessTable,
    inputs: &Arc<Inputs>,
    base: &Environment,
    req: Spawn,
) -> Result<Opened, AgentError> {
    validate_argv(&req.argv)?;
    if let Some(size) = req.tty {
        size.validate()
            .map_err(|m| AgentError::new(ErrorKind::InvalidArgument, format!("tty.{m}")))?;
    }
    let workdir = resolve_workdir(req.workdir.as_deref())?;
    let mut env = base.merged(&req.env)?;
    let (program, args) = req
        .argv
        .split_first()
        .ok_or_else(|| AgentError::new(ErrorKind::InvalidArgument, "argv: must not be empty"))?;
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(&workdir);
    let timeout = req.timeout_ms.map(Duration::from_millis);
    let not_started =
        |e: &std::io::Error| Ok(Opened::NotStarted(NotStarted::from_spawn_error(program, e)));
    if let Some(size) = req.tty {
        if !req.env.contains_key("TERM") {
            env.insert("TERM".into(), DEFAULT_TERM.into());
        }
        cmd.env_clear().envs(&env);
        let child = match pty::spawn(table, cmd, size) {
            Ok(c) => c,
            Err(e) => return not_started(&e),
        };
        let master = Arc::new(child.master);
        let stdin = req
            .stdin
            .then(|| (inputs.register(), StdinSink::Pty(Arc::clone(&master))));
        return Ok(Opened::Exec(ExecProc {
            pid: child.pid,
            exit: child.exit,
            master: Some(Arc::clone(&master)),
            stdin,
            output: ExecOutput::Pty(master),
            timeout,
            oom_killed: None,
        }));
    }
    cmd.env_clear()
        .envs(&env)
        .process_group(0)
        .stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (mut child, exit) = match table.spawn(&mut cmd) {
        Ok(c) => c,
        Err(e) => return not_started(&e),
    };
    let stdin = child
        .stdin
        .take()
        .map(|p| (inputs.register(), StdinSink::Pipe(OwnedFd::from(p))));
    Ok(Opened::Exec(ExecProc {
        pid: child.id() as i32,
        exit,
        master: None,
        stdin,
        output: ExecOutput::Pipes(
            child.stdout.take().map(OwnedFd::from),
            child.stderr.take().map(OwnedFd::from),
        ),
        timeout,
        oom_killed: None,
    }))
}

/// Runs an exec stream: output frames as the process writes (each awaited before
/// the pipe is read again), input from the host, then the exit. The host going
/// away kills the process group.
async fn run_exec<R, W>(p: ExecProc, rd: R, mut wr: W)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send,
{
    let ExecProc {
        pid,
        mut exit,
        master,
        stdin,
        output,
        timeout,
        oom_killed,
    } = p;
    let alive = Arc::new(AtomicBool::new(true));
    // In-band input (small: keys) and input from the input connection meet in
    // one task that owns the process's stdin.
    let (inband_tx, inband_rx) = tokio::sync::mpsc::channel::<In>(4);
    let inband = stdin.is_some().then_some(inband_tx);
    let mut input_task = tokio::spawn(input_loop(rd, master, inband, pid, Arc::clone(&alive)));
    // Aborted when the exec ends, whether or not its connection came.
    let _stdin_task =
        stdin.map(|(slot, sink)| AbortOnDrop(tokio::spawn(stdin_loop(slot, sink, inband_rx))));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut status: Option<ExitStatus> = None;
    let mut timed_out = false;
    let mut host_gone = false;
    {
        let pump = async {
            match output {
                ExecOutput::Pipes(out, err) => pump_pipes(&mut wr, out, err, stop_rx).await,
                ExecOutput::Pty(master) => pump_pty(&mut wr, &master, stop_rx).await,
            }
        };
        tokio::pin!(pump);
        let deadline = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        let never = || tokio::time::Instant::now() + Duration::from_secs(1 << 30);
        let grace = tokio::time::sleep_until(never());
        tokio::pin!(grace);
        let mut pump_done = false;
        while !pump_done || status.is_none() {
            tokio::select! {
                r = &mut pump, if !pump_done => {
                    if r.is_err() {
                        host_gone = true;
                        break;
                    }
                    pump_done = true;
                }
                st = exit.wait(), if status.is_none() => {
                    alive.store(false, Ordering::SeqCst);
                    status = Some(st);
                    grace.as_mut().reset(tokio::time::Instant::now() + OUTPUT_GRACE);
                }
                _ = &mut grace, if status.is_some() => {
                    // A background process still holds the output: stop reading it.
                    let _ = stop_tx.send(true);
                    grace.as_mut().reset(never());
                }
                _ = &mut deadline, if status.is_none() && !timed_out => {
                    timed_out = true;
                    signal_group(pid, libc::SIGKILL);
                }
                _ = &mut input_task => {
                    host_gone = true;
                    break;
                }
            }
        }
    }
    if host_gone {
        if alive.load(Ordering::SeqCst) {
            signal_group(pid, libc::SIGKILL);
        }
        input_task.abort();
        return;
    }
    input_task.abort();
    let status = status.unwrap_or(ExitStatus::Signaled(libc::SIGKILL));
    let exit = ExitInfo {
        exit_code: status.code(),
        signal: status.signal(),
        timed_out,
        oom_killed: oom_killed.is_some_and(|f| f.load(Ordering::SeqCst)),
    };
    let _ = GuestFrame::Event(StreamEvent::Exit(exit))
        .write(&mut wr)
        .await;
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Writes the process's input: frames from its input connection (once the host
/// opened it) and in-band input from the stream connection, each write awaited
/// (a process that does not read stalls its input, nothing else). The input
/// connection's end is the end of input on a pipe.
async fn stdin_loop(
    mut slot: InputSlot,
    sink: StdinSink,
    mut inband: tokio::sync::mpsc::Receiver<In>,
) {
    let (mut pipe, master) = match sink {
        StdinSink::Pipe(fd) => (pipe::Sender::from_owned_fd(fd).ok(), None),
        StdinSink::Pty(master) => (None, Some(master)),
    };
    let mut conn: Option<InputReader> = None;
    let mut waiting = true;
    // An in-band end of input waits for the input connection's end, so that no
    // input still on its way there is cut off.
    let mut close_pending = false;
    loop {
        let input = tokio::select! {
            // The input connection first: an in-band end of input that came after
            // it must wait for it (see `close_pending`).
            biased;
            r = &mut slot.rx, if waiting => {
                waiting = false;
                conn = r.ok();
                continue;
            }
            m = inband.recv() => match m {
                Some(In::Close) if conn.is_some() => {
                    close_pending = true;
                    continue;
                }
                Some(m) => m,
                // The stream connection is gone: so is the exec.
                None => return,
            },
            f = read_input(&mut conn) => match f {
                Some(data) => In::Data(data),
                None => {
                    conn = None;
                    // A terminal's input ends only when the host says so.
                    if master.is_some() && !close_pending { continue } else { In::Close }
                }
            },
        };
        match (input, &master) {
            (In::Data(data), None) => {
                if let Some(tx) = &mut pipe {
                    // EPIPE: the process closed its input; later input is dropped.
                    if tx.write_all(&data).await.is_err() {
                        pipe = None;
                    }
                }
            }
            (In::Data(data), Some(m)) => {
                let _ = m.write_all(&data).await;
            }
            (In::Close, None) => pipe = None,
            (In::Close, Some(m)) => {
                let _ = m.write_all(&[m.eof_char()]).await;
            }
        }
    }
}

/// The next input frame's bytes from the input connection; `None` at its end;
/// pending forever while there is none.
async fn read_input(conn: &mut Option<InputReader>) -> Option<Vec<u8>> {
    let Some(rd) = conn else {
        return std::future::pending().await;
    };
    loop {
        match HostFrame::read(rd).await {
            Ok(HostFrame::Stdin(data)) => return Some(data),
            Ok(HostFrame::Control(_)) | Err(FrameError::Malformed(_)) => continue,
            Err(_) => return None,
        }
    }
}

/// Reads what may be read from an optional pipe; pending forever without one.
async fn read_opt(p: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> std::io::Result<usize> {
    match p {
        Some(p) => p.read(buf).await,
        None => std::future::pending().await,
    }
}

/// A process's output pipe, made large enough for a whole stream chunk, so that a
/// fast writer fills a frame per read (the default 64 KiB would mean twice the
/// reads, writes and frames; under an emulated CPU each costs).
fn output_pipe(fd: OwnedFd) -> Option<pipe::Receiver> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a pipe fd we own; a refusal leaves the size as it was.
    unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            MAX_STREAM_CHUNK as libc::c_int,
        )
    };
    pipe::Receiver::from_owned_fd(fd).ok()
}

/// Sends the two pipes' output as frames until both end or `stop` is set. Each
/// frame is written (awaited) before its pipe is read again.
async fn pump_pipes<W: AsyncWrite + Unpin>(
    wr: &mut W,
    out: Option<OwnedFd>,
    err: Option<OwnedFd>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut out = out.and_then(output_pipe);
    let mut err = err.and_then(output_pipe);
    let mut bo = vec![0u8; MAX_STREAM_CHUNK];
    let mut be = vec![0u8; MAX_STREAM_CHUNK];
    while out.is_some() || err.is_some() {
        let (stderr, n) = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return Ok(()),
            r = read_opt(&mut out, &mut bo) => match r {
                Ok(n) if n > 0 => (false, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                _ => { out = None; continue; }
            },
            r = read_opt(&mut err, &mut be) => match r {
                Ok(n) if n > 0 => (true, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                _ => { err = None; continue; }
            },
        };
        let data = if stderr { &be[..n] } else { &bo[..n] };
        GuestFrame::write_output(wr, stderr, data)
            .await
            .map_err(frame_io)?;
    }
    Ok(())
}

async fn pump_pty<W: AsyncWrite + Unpin>(
    wr: &mut W,
    master: &PtyMaster,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_STREAM_CHUNK];
    loop {
        let n = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return Ok(()),
            r = master.read(&mut buf) => match r {
                Ok(n) if n > 0 => n,
                _ => return Ok(()),
            },
        };
        GuestFrame::write_output(wr, false, &buf[..n])
            .await
            .map_err(frame_io)?;
    }
}

fn frame_io(e: FrameError) -> std::io::Error {
    match e {
        FrameError::Io(e) => e,
        other => std::io::Error::other(other.to_string()),
    }
}

/// Applies the host's frames to the process until the host closes or breaks the
/// connection (which is when this returns). Stdin writes are awaited, so a process
/// that does not read its input stalls the host's sending, not the agent's memory.
async fn input_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    master: Option<Arc<PtyMaster>>,
    stdin: Option<tokio::sync::mpsc::Sender<In>>,
    pgid: i32,
    alive: Arc<AtomicBool>,
) {
    loop {
        let frame = match HostFrame::read(&mut rd).await {
            Ok(f) => f,
            Err(FrameError::Malformed(e)) => {
                tracing::debug!("stream: bad control frame ignored: {e}");
                continue;
            }
            Err(_) => return,
        };
        let input = match frame {
            HostFrame::Stdin(data) => In::Data(data),
            HostFrame::Control(StreamControl::CloseStdin) => In::Close,
            HostFrame::Control(StreamControl::Resize(size)) => {
                if let (Some(m), true) = (&master, size.validate().is_ok()) {
                    let _ = m.resize(size);
                }
                continue;
            }
            HostFrame::Control(StreamControl::Signal { signal }) => {
                if valid_signal(signal) && alive.load(Ordering::SeqCst) {
                    let group = master.as_ref().and_then(|m| m.foreground()).unwrap_or(pgid);
                    signal_group(group, signal);
                }
                continue;
            }
        };
        // Without `stdin` the process takes no input.
        if let Some(tx) = &stdin {
            if tx.send(input).await.is_err() {
                return;
            }
        }
    }
}

/// Resolves when the host closes or breaks the connection; frames it sends are
/// read and ignored.
pub async fn host_gone<R: AsyncRead + Unpin>(rd: &mut R) {
    loop {
        match HostFrame::read(rd).await {
            Ok(_) | Err(FrameError::Malformed(_)) => {}
            Err(_) => return,
        }
    }
}

/// Sends a job's kept output (a gap event first if its head was dropped), then
/// without `follow` `caught_up` or `exit`; with `follow` live output until the job
/// ends, then `exit`. A follower that falls behind the ring gets a gap and goes on.
async fn run_job_output<R, W>(output: &Output, follow: bool, mut rd: R, mut wr: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut cur = Cursor::at(0);
    let gone = host_gone(&mut rd);
    tokio::pin!(gone);
    if !follow {
        // An ended job's output is complete: all of it, then its exit. A running
        // job's: what it had written when the stream opened, then caught_up.
        let ended = output.exit();
        let (end, _, _) = output.counts();
        while ended.is_some() || cur.offset() < end {
            let pieces = output.read_now(&mut cur, MAX_STREAM_CHUNK);
            if pieces.is_empty() {
                break;
            }
            if send_job_pieces(&mut wr, pieces).await.is_err() {
                return;
            }
        }
        let last = match ended {
            Some(exit) => StreamEvent::Exit(exit),
            None => StreamEvent::CaughtUp,
        };
        let _ = GuestFrame::Event(last).write(&mut wr).await;
        return;
    }
    loop {
        let next = tokio::select! {
            n = output.next(&mut cur, MAX_STREAM_CHUNK) => n,
            _ = &mut gone => return,
        };
        match next {
            Next::Pieces(pieces) => {
                if send_job_pieces(&mut wr, pieces).await.is_err() {
                    return;
                }
            }
            Next::Ended(exit) => {
                let _ = GuestFrame::Event(StreamEvent::Exit(exit))
                    .write(&mut wr)
                    .await;
                return;
            }
        }
    }
}

async fn send_job_pieces<W: AsyncWrite + Unpin>(
    wr: &mut W,
    pieces: Vec<Piece>,
) -> Result<(), FrameError> {
    for p in pieces {
        let frame = match p {
            Piece::Gap(bytes) => GuestFrame::Event(StreamEvent::Gap { bytes }),
            Piece::Entry(e) => match e.item {
                Item::Data(Tag::Stdout, d) => GuestFrame::Stdout(d),
                Item::Data(Tag::Stderr, d) => GuestFrame::Stderr(d),
                Item::Resize(_) => continue,
            },
        };
        frame.write(wr).await?;
    }
    Ok(())
}
