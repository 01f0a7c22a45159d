//! Streams, named jobs and terminal sessions, driven against the real
//! `burrow-agent` binary on a Unix socket (`--no-init --listen unix:PATH`).
//! Synchronisation is on what the agent sends, never on timers.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use burrow_proto::{
    read_message, write_message, AgentError, ErrorKind, ExitInfo, GuestFrame, Hello, HelloReply,
    HostFrame, JobStart, JobStatus, Op, Reply, Request, Response, Spawn, StreamControl,
    StreamEvent, StreamOpen, TerminalInfo, TerminalNew, WinSize, PROTOCOL_VERSION,
};
use tokio::net::UnixStream;

struct AgentProcess {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl AgentProcess {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("a.sock");
        let log = fs::File::create(dir.path().join("agent.log")).expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_burrow-agent"))
            .arg("--no-init")
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn burrow-agent");
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line);
        }
        assert_eq!(line.trim(), "ready", "agent not ready");
        AgentProcess {
            child,
            sock,
            _dir: dir,
        }
    }

    async fn connect(&self) -> UnixStream {
        let mut stream = UnixStream::connect(&self.sock).await.expect("connect");
        write_message(
            &mut stream,
            &Hello {
                version: PROTOCOL_VERSION,
                client: "streams-test".into(),
            },
        )
        .await
        .expect("hello");
        let reply: HelloReply = read_message(&mut stream).await.expect("hello reply");
        assert_eq!(reply.error, None);
        stream
    }

    async fn call(&self, op: Op) -> Result<Reply, AgentError> {
        let mut s = self.connect().await;
        write_message(&mut s, &Request { id: 1, op })
            .await
            .expect("send");
        let resp: Response = read_message(&mut s).await.expect("response");
        resp.outcome.into()
    }

    async fn ok(&self, op: Op) -> Reply {
        self.call(op).await.unwrap_or_else(|e| panic!("{e}"))
    }

    async fn err(&self, op: Op) -> AgentError {
        match self.call(op).await {
            Ok(r) => panic!("unexpected success {r:?}"),
            Err(e) => e,
        }
    }

    /// Opens a stream; returns the connection and the started pid.
    async fn stream(&self, open: StreamOpen) -> Result<(UnixStream, Option<i32>), AgentError> {
        let mut s = self.connect().await;
        write_message(
            &mut s,
            &Request {
                id: 7,
                op: Op::Stream(open),
            },
        )
        .await
        .expect("send");
        let resp: Response = read_message(&mut s).await.expect("response");
        assert_eq!(resp.id, 7);
        match Result::<Reply, AgentError>::from(resp.outcome)? {
            Reply::StreamStarted { pid, .. } => Ok((s, pid)),
            other => panic!("unexpected {other:?}"),
        }
    }

    async fn open(&self, open: StreamOpen) -> UnixStream {
        self.stream(open).await.expect("stream").0
    }

    async fn terminals(&self) -> Vec<TerminalInfo> {
        match self.ok(Op::TerminalList).await {
            Reply::Terminals { terminals } => terminals,
            other => panic!("unexpected {other:?}"),
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // SAFETY: kill has no memory effects; the pid is our unreaped child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

fn spawn(argv: &[&str]) -> Spawn {
    Spawn {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn exec(argv: &[&str]) -> StreamOpen {
    StreamOpen::Exec(spawn(argv))
}

/// Everything a stream sends up to its last frame.
#[derive(Default, Debug)]
struct Collected {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    events: Vec<StreamEvent>,
}

impl Collected {
    fn last(&self) -> &StreamEvent {
        self.events.last().expect("no last event")
    }

    fn exit(&self) -> ExitInfo {
        match self.last() {
            StreamEvent::Exit(e) => *e,
            other => panic!("ended with {other:?}, not exit"),
        }
    }
}

async fn frame(s: &mut UnixStream) -> GuestFrame {
    GuestFrame::read(s).await.expect("stream frame")
}

async fn collect(s: &mut UnixStream) -> Collected {
    let mut c = Collected::default();
    loop {
        match frame(s).await {
            GuestFrame::Stdout(d) => c.stdout.extend(d),
            GuestFrame::Stderr(d) => c.stderr.extend(d),
            GuestFrame::Record { data, .. } => c.stdout.extend(data),
            GuestFrame::Event(e) => {
                let last = e.is_last();
                c.events.push(e);
                if last {
                    // The agent closes the connection after the last frame.
                    assert!(matches!(
                        GuestFrame::read(s).await,
                        Err(burrow_proto::FrameError::Closed)
                    ));
                    return c;
                }
            }
        }
    }
}

/// Reads stdout frames until `needle` has appeared; returns all read.
async fn read_until(s: &mut UnixStream, needle: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while !out.windows(needle.len()).any(|w| w == needle) {
        match frame(s).await {
            GuestFrame::Stdout(d) | GuestFrame::Stderr(d) => out.extend(d),
            GuestFrame::Record { data, .. } => out.extend(data),
            GuestFrame::Event(e) => panic!(
                "event {e:?} before {:?} in {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&out)
            ),
        }
    }
    out
}

async fn send(s: &mut UnixStream, f: HostFrame) {
    f.write(s).await.expect("send frame");
}

fn ctl(c: StreamControl) -> HostFrame {
    HostFrame::Control(c)
}

/// Whether `pid` is gone (or a zombie): signal 0 fails, or /proc says Z.
fn gone(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return true;
    }
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

/// Waits, bounded, for `pid` to exit, on a pidfd (readable once it has).
async fn wait_gone(pid: i32) {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return; // already gone (and reaped)
    }
    // SAFETY: a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the fd is owned by the AsyncFd from here on and closed with it.
    let fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }.expect("pidfd");
    let exited = tokio::time::timeout(Duration::from_secs(20), fd.readable()).await;
    assert!(exited.is_ok(), "pid {pid} still alive");
}

fn fnv(hash: &mut u64, data: &[u8]) {
    for b in data {
        *hash ^= *b as u64;
        *hash = hash.wrapping_mul(0x100_0000_01b3);
    }
}

#[tokio::test]
async fn exec_streams_on_pipes() {
    let agent = AgentProcess::start();

    // Live arrival: the first line comes while the process waits for our input.
    let mut s = agent
        .open(StreamOpen::Exec(Spawn {
            stdin: true,
            ..spawn(&["sh", "-c", "echo first; read x; echo got $x; echo err >&2"])
        }))
        .await;
    assert_eq!(frame(&mut s).await, GuestFrame::Stdout(b"first\n".to_vec()));
    send(&mut s, HostFrame::Stdin(b"hello\n".to_vec())).await;
    let c = collect(&mut s).await;
    assert_eq!(c.stdout, b"got hello\n");
    assert_eq!(c.stderr, b"err\n");
    assert_eq!(
        c.exit(),
        ExitInfo {
            exit_code: 0,
            signal: None,
            timed_out: false,
            oom_killed: false,
        }
    );

    // 64 MiB through `cat`, stdin closed at the end, checksummed both ways.
    let (s, pid) = agent
        .stream(StreamOpen::Exec(Spawn {
            stdin: true,
            ..spawn(&["cat"])
        }))
        .await
        .expect("cat");
    assert!(pid.is_some_and(|p| p > 1));
    let (mut rd, mut wr) = s.into_split();
    let total = 64usize << 20;
    let writer = tokio::spawn(async move {
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        let mut x = 1u32;
        let mut sent = 0;
        while sent < total {
            let chunk: Vec<u8> = (0..200_000.min(total - sent))
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            fnv(&mut hash, &chunk);
            sent += chunk.len();
            HostFrame::Stdin(chunk).write(&mut wr).await.expect("stdin");
        }
        ctl(StreamControl::CloseStdin)
            .write(&mut wr)
            .await
            .expect("close stdin");
        (hash, wr)
    });
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut got = 0;
    let exit = loop {
        match GuestFrame::read(&mut rd).await.expect("frame") {
            GuestFrame::Stdout(d) => {
                assert!(d.len() <= burrow_proto::MAX_STREAM_CHUNK);
                fnv(&mut hash, &d);
                got += d.len();
            }
            GuestFrame::Event(StreamEvent::Exit(e)) => break e,
            other => panic!("unexpected {other:?}"),
        }
    };
    let (sent_hash, _wr) = writer.await.expect("writer");
    assert_eq!((got, hash), (total, sent_hash));
    assert_eq!(exit.exit_code, 0);

    // Exit codes, signals from inside and from the host.
    let c = collect(&mut agent.open(exec(&["sh", "-c", "exit 3"])).await).await;
    assert_eq!(c.exit().exit_code, 3);
    let c = collect(&mut agent.open(exec(&["sh", "-c", "kill -TERM $$"])).await).await;
    assert_eq!((c.exit().exit_code, c.exit().signal), (143, Some(15)));
    let mut s = agent
        .open(exec(&["sh", "-c", "echo up; exec sleep 30"]))
        .await;
    assert_eq!(frame(&mut s).await, GuestFrame::Stdout(b"up\n".to_vec()));
    send(&mut s, ctl(StreamControl::Signal { signal: 0 })).await; // ignored
    send(
        &mut s,
        ctl(StreamControl::Resize(WinSize { rows: 5, cols: 5 })),
    )
    .await; // ignored
    send(&mut s, ctl(StreamControl::Signal { signal: 10 })).await;
    let c = collect(&mut s).await;
    assert_eq!((c.exit().exit_code, c.exit().signal), (138, Some(10)));

    // Timeout: the group is killed and the exit says so.
    let c = collect(
        &mut agent
            .open(StreamOpen::Exec(Spawn {
                timeout_ms: Some(300),
                ..spawn(&["sleep", "30"])
            }))
            .await,
    )
    .await;
    assert_eq!(
        c.exit(),
        ExitInfo {
            exit_code: 137,
            signal: Some(9),
            timed_out: true,
            oom_killed: false,
        }
    );

    // A command that cannot start reads like a shell.
    let (mut s, pid) = agent
        .stream(exec(&["burrow-no-such-command"]))
        .await
        .expect("stream");
    assert_eq!(pid, None);
    let c = collect(&mut s).await;
    assert_eq!(c.stderr, b"burrow-no-such-command: command not found\n");
    assert_eq!(c.exit().exit_code, 127);

    // Bad input is refused before the stream starts; the connection stays usable.
    let e = agent.stream(exec(&[])).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.starts_with("argv"), "{}", e.message);
    let e = agent
        .stream(StreamOpen::Exec(Spawn {
            tty: Some(WinSize { rows: 0, cols: 80 }),
            ..spawn(&["true"])
        }))
        .await
        .unwrap_err();
    assert!(e.message.starts_with("tty.rows"), "{}", e.message);

    // A host that stops reading stalls its own process only.
    let mut yes = agent.open(exec(&["yes"])).await;
    assert!(matches!(frame(&mut yes).await, GuestFrame::Stdout(_)));
    let c = collect(&mut agent.open(exec(&["echo", "other"])).await).await;
    assert_eq!(
        (c.stdout.as_slice(), c.exit().exit_code),
        (&b"other\n"[..], 0)
    );

    // Dropping the connection kills the whole process group, background too.
    let mut s = agent
        .open(exec(&["sh", "-c", "sleep 300 & echo $!; wait"]))
        .await;
    let line = read_until(&mut s, b"\n").await;
    let bg: i32 = String::from_utf8_lossy(&line).trim().parse().expect("pid");
    assert!(!gone(bg));
    drop(s);
    wait_gone(bg).await;
    drop(yes);
}

#[tokio::test]
async fn exec_streams_on_a_terminal() {
    let agent = AgentProcess::start();
    let tty = |argv: &[&str], stdin: bool| {
        StreamOpen::Exec(Spawn {
            tty: Some(WinSize { rows: 24, cols: 80 }),
            stdin,
            ..spawn(argv)
        })
    };

    let c = collect(&mut agent.open(tty(&["tty", "-s"], false)).await).await;
    assert_eq!(c.exit().exit_code, 0);
    // Pipes are not a terminal.
    let c = collect(&mut agent.open(exec(&["tty", "-s"])).await).await;
    assert_ne!(c.exit().exit_code, 0);

    let c = collect(&mut agent.open(tty(&["sh", "-c", "echo $TERM"], false)).await).await;
    assert!(c.stdout.starts_with(b"xterm-256color"), "{:?}", c.stdout);

    // The size, a resize, and the size again.
    let mut s = agent
        .open(tty(&["sh", "-c", "stty size; read x; stty size"], true))
        .await;
    read_until(&mut s, b"24 80").await;
    send(
        &mut s,
        ctl(StreamControl::Resize(WinSize {
            rows: 30,
            cols: 100,
        })),
    )
    .await;
    send(&mut s, HostFrame::Stdin(b"\r".to_vec())).await;
    read_until(&mut s, b"30 100").await;
    assert_eq!(collect(&mut s).await.exit().exit_code, 0);

    // Ctrl-C reaches the foreground process.
    let mut s = agent.open(tty(&["sleep", "30"], true)).await;
    send(&mut s, HostFrame::Stdin(vec![0x03])).await;
    let c = collect(&mut s).await;
    assert_eq!((c.exit().exit_code, c.exit().signal), (130, Some(2)));

    // Close of stdin on a terminal is ^D: `cat` sees end of file.
    let mut s = agent.open(tty(&["cat"], true)).await;
    send(&mut s, HostFrame::Stdin(b"abc\r".to_vec())).await;
    read_until(&mut s, b"abc\r\nabc\r\n").await;
    send(&mut s, ctl(StreamControl::CloseStdin)).await;
    assert_eq!(collect(&mut s).await.exit().exit_code, 0);

    // A signal from the host goes to the foreground group.
    let mut s = agent
        .open(tty(&["sh", "-c", "echo up; sleep 30"], true))
        .await;
    read_until(&mut s, b"up").await;
    send(&mut s, ctl(StreamControl::Signal { signal: 15 })).await;
    assert_ne!(collect(&mut s).await.exit().exit_code, 0);
}

async fn job(agent: &AgentProcess, req: JobStart) -> Result<u32, AgentError> {
    match agent.call(Op::JobStart(req)).await? {
        Reply::JobStarted { job } => Ok(job),
        other => panic!("unexpected {other:?}"),
    }
}

fn job_req(name: Option<&str>, script: &str) -> JobStart {
    JobStart {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        name: name.map(str::to_string),
        ..Default::default()
    }
}

async fn wait_job(agent: &AgentProcess, job: &str) -> JobStatus {
    match agent.ok(Op::JobWait { job: job.into() }).await {
        Reply::Job(s) => s,
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn named_jobs_wait_list_and_output_streams() {
    let agent = AgentProcess::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("fifo");
    let cpath = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).expect("path");
    // SAFETY: mkfifo reads a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(cpath.as_ptr(), 0o600) }, 0);

    let script = format!("echo one; read x < {}; echo two; exit 5", fifo.display());
    let id = job(&agent, job_req(Some("build"), &script))
        .await
        .expect("start");
    let e = job(&agent, job_req(Some("build"), "true"))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::AlreadyExists);
    assert!(e.message.contains("build"), "{}", e.message);
    let e = job(&agent, job_req(Some("12"), "true")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.starts_with("name:"), "{}", e.message);

    // Follow: the first line live, then what comes after we let it go on.
    let mut logs = agent
        .open(StreamOpen::JobOutput {
            job: "build".into(),
            follow: true,
        })
        .await;
    read_until(&mut logs, b"one\n").await;
    // Without follow: what is kept, then caught_up while it runs.
    let c = collect(
        &mut agent
            .open(StreamOpen::JobOutput {
                job: id.to_string(),
                follow: false,
            })
            .await,
    )
    .await;
    assert_eq!(
        (c.stdout.as_slice(), c.last()),
        (&b"one\n"[..], &StreamEvent::CaughtUp)
    );
    match agent.ok(Op::JobList).await {
        Reply::Jobs { jobs } => {
            assert_eq!(jobs.len(), 1);
            assert_eq!(jobs[0].name.as_deref(), Some("build"));
            assert!(jobs[0].running);
        }
        other => panic!("unexpected {other:?}"),
    }
    fs::write(&fifo, b"go\n").expect("write fifo");
    let c = collect(&mut logs).await;
    assert_eq!(c.stdout, b"two\n");
    assert_eq!(c.exit().exit_code, 5);
    let st = wait_job(&agent, "build").await;
    assert_eq!(
        (st.running, st.exit_code, st.name.as_deref()),
        (false, Some(5), Some("build"))
    );
    assert_eq!(st.stdout, b"one\ntwo\n");

    // Wait on a job killed by a signal: 128 + n.
    let id = job(&agent, job_req(Some("sleeper"), "echo up; exec sleep 30"))
        .await
        .expect("start");
    let mut logs = agent
        .open(StreamOpen::JobOutput {
            job: "sleeper".into(),
            follow: true,
        })
        .await;
    read_until(&mut logs, b"up\n").await;
    assert_eq!(
        agent
            .ok(Op::JobKill {
                job: "sleeper".into(),
                signal: 15
            })
            .await,
        Reply::Done
    );
    let st = wait_job(&agent, &id.to_string()).await;
    assert_eq!((st.exit_code, st.signal), (Some(143), Some(15)));
    assert_eq!(collect(&mut logs).await.exit().exit_code, 143);

    // A tiny ring: the head is dropped and the stream says how much.
    let id = job(
        &agent,
        JobStart {
            max_output_bytes: Some(4),
            ..job_req(None, "echo 0123456789")
        },
    )
    .await
    .expect("start");
    wait_job(&agent, &id.to_string()).await;
    let c = collect(
        &mut agent
            .open(StreamOpen::JobOutput {
                job: id.to_string(),
                follow: false,
            })
            .await,
    )
    .await;
    assert_eq!(c.events[0], StreamEvent::Gap { bytes: 3 });
    assert_eq!(c.stdout, b"3456789\n");
    assert_eq!(c.exit().exit_code, 0);

    for op in [
        Op::JobPoll { job: "nope".into() },
        Op::JobWait { job: "nope".into() },
        Op::JobKill {
            job: "nope".into(),
            signal: 15,
        },
        Op::JobWait { job: "99".into() },
    ] {
        let e = agent.err(op).await;
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.starts_with("job "), "{}", e.message);
    }
    let e = agent
        .stream(StreamOpen::JobOutput {
            job: "nope".into(),
            follow: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.message, "job nope: no such job");
}

fn term(name: &str, script: &str) -> Op {
    Op::TerminalNew(TerminalNew {
        name: name.into(),
        argv: Some(vec!["sh".into(), "-c".into(), script.into()]),
        ..Default::default()
    })
}

fn attach(name: &str, read_only: bool) -> StreamOpen {
    StreamOpen::TerminalAttach {
        name: name.into(),
        read_only,
        size: None,
    }
}

#[tokio::test]
async fn terminal_sessions() {
    let agent = AgentProcess::start();
    let shell = Op::TerminalNew(TerminalNew {
        name: "main".into(),
        argv: Some(vec!["sh".into()]),
        env: [("PS1".to_string(), "$ ".to_string())].into(),
        ..Default::default()
    });
    match agent.ok(shell.clone()).await {
        Reply::Terminal(info) => {
            assert!(info.alive);
            assert_eq!(info.size, WinSize { rows: 24, cols: 80 });
        }
        other => panic!("unexpected {other:?}"),
    }
    let e = agent.err(shell).await;
    assert_eq!(e.kind, ErrorKind::AlreadyExists);

    let mut w = agent.open(attach("main", false)).await;
    let mut ro = agent.open(attach("main", true)).await;
    send(&mut ro, HostFrame::Stdin(b"echo nope\r".to_vec())).await;
    send(&mut w, HostFrame::Stdin(b"echo hi\r".to_vec())).await;
    let seen = read_until(&mut w, b"hi\r\n$ ").await;
    let seen_ro = read_until(&mut ro, b"hi\r\n$ ").await;
    assert!(!String::from_utf8_lossy(&seen).contains("nope"));
    assert!(!String::from_utf8_lossy(&seen_ro).contains("nope"));
    let list = agent.terminals().await;
    assert_eq!((list.len(), list[0].viewers), (1, 2));
    assert_eq!(list[0].argv, vec!["sh"]);

    // A recording from the start: the initial size, records in order.
    let mut rec = agent
        .open(StreamOpen::TerminalRecord {
            name: "main".into(),
            from: 0,
        })
        .await;
    assert!(matches!(
        frame(&mut rec).await,
        GuestFrame::Event(StreamEvent::Resize {
            rows: 24,
            cols: 80,
            ..
        })
    ));

    // Detach the writer; a new one sees the tail and resizes.
    drop(w);
    let mut w = agent
        .open(StreamOpen::TerminalAttach {
            name: "main".into(),
            read_only: false,
            size: Some(WinSize {
                rows: 40,
                cols: 120,
            }),
        })
        .await;
    read_until(&mut w, b"hi\r\n").await;
    send(&mut w, HostFrame::Stdin(b"stty size\r".to_vec())).await;
    read_until(&mut w, b"40 120").await;

    // The recording: increasing offsets, and the resize in its place.
    let mut next_offset = 0;
    let mut resized = false;
    while !resized {
        match frame(&mut rec).await {
            GuestFrame::Record { offset, data, .. } => {
                assert_eq!(offset, next_offset);
                next_offset += data.len() as u64;
            }
            GuestFrame::Event(StreamEvent::Resize {
                rows: 40,
                cols: 120,
                ..
            }) => resized = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(next_offset > 0);

    // Kill: viewers and the recording get the exit; the session is forgotten.
    assert_eq!(
        agent
            .ok(Op::TerminalKill {
                name: "main".into()
            })
            .await,
        Reply::Done
    );
    assert!(matches!(collect(&mut w).await.last(), StreamEvent::Exit(_)));
    assert!(matches!(
        collect(&mut ro).await.last(),
        StreamEvent::Exit(_)
    ));
    assert!(matches!(
        collect(&mut rec).await.last(),
        StreamEvent::Exit(_)
    ));
    assert!(agent.terminals().await.is_empty());
    for e in [
        agent
            .err(Op::TerminalKill {
                name: "main".into(),
            })
            .await,
        agent.stream(attach("main", false)).await.unwrap_err(),
    ] {
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert_eq!(e.message, "terminal main: no such session");
    }

    // Attach to an ended session: its tail, then its exit at once.
    agent.ok(term("short", "echo bye; exit 7")).await;
    let mut rec = agent
        .open(StreamOpen::TerminalRecord {
            name: "short".into(),
            from: 0,
        })
        .await;
    assert_eq!(collect(&mut rec).await.exit().exit_code, 7);
    let c = collect(&mut agent.open(attach("short", true)).await).await;
    assert!(c.stdout.starts_with(b"bye"), "{:?}", c.stdout);
    assert_eq!(c.exit().exit_code, 7);
    let list = agent.terminals().await;
    assert_eq!((list[0].alive, list[0].exit_code), (false, Some(7)));
    // Its name may be taken again.
    agent.ok(term("short", "exit 0")).await;

    // A viewer that stops reading is dropped; another keeps streaming. The flood
    // is paced by the fast viewer (a round per line it types), so only the slow
    // one falls behind.
    let (round, rounds) = (200_000usize, 10);
    agent
        .ok(term(
            "flood",
            &format!("while read x; do head -c {round} /dev/zero | tr '\\0' a; done"),
        ))
        .await;
    let mut slow = agent.open(attach("flood", true)).await;
    let mut fast = agent.open(attach("flood", false)).await;
    let mut seen = 0;
    for r in 1..=rounds {
        send(&mut fast, HostFrame::Stdin(b"\r".to_vec())).await;
        while seen < r * round {
            match frame(&mut fast).await {
                GuestFrame::Stdout(d) => seen += d.iter().filter(|b| **b == b'a').count(),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let c = collect(&mut slow).await;
    assert_eq!(
        c.last(),
        &StreamEvent::Dropped {
            reason: "viewer dropped: it fell more than 1 MiB behind".into()
        }
    );
    assert_eq!(
        agent
            .terminals()
            .await
            .iter()
            .find(|t| t.name == "flood")
            .map(|t| t.viewers),
        Some(1)
    );
    send(&mut fast, ctl(StreamControl::CloseStdin)).await;
    assert_eq!(collect(&mut fast).await.exit().exit_code, 0);

    // The login shell when no command is given.
    match agent
        .ok(Op::TerminalNew(TerminalNew {
            name: "login".into(),
            ..Default::default()
        }))
        .await
    {
        Reply::Terminal(info) => assert!(info.argv[0].starts_with('/'), "{:?}", info.argv),
        other => panic!("unexpected {other:?}"),
    }
    agent
        .ok(Op::TerminalKill {
            name: "login".into(),
        })
        .await;
    let e = agent
        .err(Op::TerminalNew(TerminalNew {
            name: "bad/name".into(),
            ..Default::default()
        }))
        .await;
    assert!(e.message.starts_with("name:"), "{}", e.message);
}

#[tokio::test]
async fn terminal_sessions_are_bounded_and_stopped_with_the_agent() {
    let agent = AgentProcess::start();
    // One session that ends at once, then live ones up to the limit.
    agent.ok(term("ended", "exit 3")).await;
    let mut rec = agent
        .open(StreamOpen::TerminalRecord {
            name: "ended".into(),
            from: 0,
        })
        .await;
    assert_eq!(collect(&mut rec).await.exit().exit_code, 3);
    for i in 1..64 {
        agent
            .ok(term(&format!("t{i}"), "echo $$; exec sleep 300"))
            .await;
    }
    // Full: the ended session makes room, then nothing can.
    agent.ok(term("t64", "echo $$; exec sleep 300")).await;
    let names: Vec<String> = agent
        .terminals()
        .await
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names.len(), 64);
    assert!(!names.contains(&"ended".to_string()));
    let e = agent.err(term("t65", "true")).await;
    assert_eq!(e.kind, ErrorKind::TooLarge);
    assert!(e.message.contains("64"), "{}", e.message);

    // Their pids, from their own output; all gone once the agent stops.
    let mut pids = Vec::new();
    for name in ["t1", "t64"] {
        let mut s = agent.open(attach(name, true)).await;
        let out = read_until(&mut s, b"\r\n").await;
        let pid: i32 = String::from_utf8_lossy(&out).trim().parse().expect("pid");
        assert!(!gone(pid));
        pids.push(pid);
    }
    drop(agent);
    for pid in pids {
        wait_gone(pid).await;
    }
}
