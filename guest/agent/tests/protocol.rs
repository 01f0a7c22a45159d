//! Drives the real `burrow-agent` binary over its real protocol on a Unix socket
//! (`--no-init --listen unix:PATH`), covering every operation and the framing
//! errors the agent must survive.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use burrow_proto::{
    read_frame, read_message, write_message, AgentError, DirEntry, ErrorKind, Exec, ExecResult,
    FileData, FileEdit, FileKind, FileRead, FileWrite, FrameError, Hello, HelloReply, JobStart,
    JobStatus, Op, Reply, Request, Response, MAX_FRAME, MAX_OUTPUT, PROTOCOL_VERSION,
};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

/// An agent process; stopped (SIGTERM, then SIGKILL) when dropped, so a failing
/// test leaves nothing running.
struct AgentProcess {
    child: Child,
    sock: PathBuf,
    dir: tempfile::TempDir,
}

impl AgentProcess {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("a.sock");
        let log = fs::File::create(dir.path().join("agent.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_burrow-agent"))
            .arg("--no-init")
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn burrow-agent");
        let mut agent = AgentProcess { child, sock, dir };
        agent.wait_ready();
        agent
    }

    /// Waits for the agent's `ready` line (printed once it listens); end of
    /// output instead means it exited.
    fn wait_ready(&mut self) {
        let mut line = String::new();
        if let Some(out) = self.child.stdout.take() {
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line);
        }
        assert_eq!(line.trim(), "ready", "agent not ready: {}", self.log());
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// A scratch directory for file operations.
    fn scratch(&self) -> PathBuf {
        let p = self.dir.path().join("scratch");
        fs::create_dir_all(&p).expect("scratch dir");
        p
    }

    async fn raw(&self) -> UnixStream {
        UnixStream::connect(&self.sock).await.expect("connect")
    }

    async fn client(&self) -> Client {
        let mut stream = self.raw().await;
        write_message(
            &mut stream,
            &Hello {
                version: PROTOCOL_VERSION,
                client: "protocol-test".into(),
            },
        )
        .await
        .expect("hello");
        let reply: HelloReply = read_message(&mut stream).await.expect("hello reply");
        assert_eq!(reply.error, None);
        assert_eq!(reply.version, PROTOCOL_VERSION);
        Client { stream, next_id: 1 }
    }

    /// Waits, bounded, for the agent to exit by itself.
    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        exited_within(&mut self.child, limit).expect("agent did not exit")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill has no memory effects; pid is our own child, not yet reaped.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        if exited_within(&mut self.child, Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits up to `limit` for `child` to exit (on a pidfd, which becomes readable
/// when it does) and reaps it.
fn exited_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    if fd >= 0 {
        // SAFETY: a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd that lives across the call.
        unsafe { libc::poll(&mut p, 1, limit.as_millis() as i32) };
    }
    child.try_wait().ok().flatten()
}

struct Client {
    stream: UnixStream,
    next_id: u64,
}

impl Client {
    async fn call(&mut self, op: Op) -> Result<Reply, AgentError> {
        let id = self.next_id;
        self.next_id += 1;
        write_message(&mut self.stream, &Request { id, op })
            .await
            .expect("send request");
        let resp: Response = read_message(&mut self.stream).await.expect("response");
        assert_eq!(resp.id, id, "response to another request");
        resp.outcome.into()
    }

    async fn ok(&mut self, op: Op) -> Reply {
        match self.call(op).await {
            Ok(r) => r,
            Err(e) => panic!("unexpected error {:?}: {}", e.kind, e.message),
        }
    }

    async fn err(&mut self, op: Op) -> AgentError {
        match self.call(op).await {
            Ok(r) => panic!("unexpected success {r:?}"),
            Err(e) => e,
        }
    }

    async fn exec(&mut self, req: Exec) -> ExecResult {
        match self.ok(Op::Exec(req)).await {
            Reply::Exec(r) => r,
            other => panic!("unexpected {other:?}"),
        }
    }

    async fn poll(&mut self, job: u32) -> JobStatus {
        match self
            .ok(Op::JobPoll {
                job: job.to_string(),
            })
            .await
        {
            Reply::Job(s) => s,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Polls a job until `done` holds, within a bounded time.
    async fn poll_until(&mut self, job: u32, done: impl Fn(&JobStatus) -> bool) -> JobStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.poll(job).await;
            if done(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "job {job} stuck: {s:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn start_job(&mut self, req: JobStart) -> u32 {
        match self.ok(Op::JobStart(req)).await {
            Reply::JobStarted { job } => job,
            other => panic!("unexpected {other:?}"),
        }
    }

    async fn read(&mut self, path: &Path, offset: u64, limit: Option<u64>) -> FileData {
        match self
            .ok(Op::FileRead(FileRead {
                path: s(path),
                offset,
                limit,
            }))
            .await
        {
            Reply::FileData(d) => d,
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn sh(script: &str) -> Exec {
    Exec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn write_op(path: &Path, data: &[u8], mode: Option<u32>, append: bool) -> Op {
    Op::FileWrite(FileWrite {
        path: s(path),
        data: data.to_vec(),
        mode,
        append,
    })
}

fn edit_op(path: &Path, old: &str, new: &str, all: bool) -> Op {
    Op::FileEdit(FileEdit {
        path: s(path),
        old: old.into(),
        new: new.into(),
        all,
    })
}

#[tokio::test]
async fn handshake_ping_and_version_mismatch() {
    let agent = AgentProcess::start();

    let mut c = agent.client().await;
    match c.ok(Op::Ping).await {
        Reply::Pong { uptime_ms } => assert!(uptime_ms > 0),
        other => panic!("unexpected {other:?}"),
    }

    let mut raw = agent.raw().await;
    write_message(
        &mut raw,
        &Hello {
            version: PROTOCOL_VERSION + 98,
            client: "old".into(),
        },
    )
    .await
    .unwrap();
    let reply: HelloReply = read_message(&mut raw).await.unwrap();
    let error = reply.error.expect("mismatch refused");
    assert!(
        error.contains(&(PROTOCOL_VERSION + 98).to_string()),
        "{error}"
    );
    assert_eq!(reply.version, PROTOCOL_VERSION);
    assert!(matches!(
        read_frame(&mut raw, MAX_FRAME).await,
        Err(FrameError::Closed)
    ));

    // Connections are served concurrently: a long exec on one does not hold up
    // another.
    // The slow exec blocks reading a FIFO; opening the FIFO for writing returns
    // only once that reader runs, which is the signal that the exec is in flight.
    let fifo = agent.scratch().join("gate");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let mut slow = agent.client().await;
    let script = format!("cat '{}'", fifo.display());
    let long = tokio::spawn(async move { slow.exec(sh(&script)).await });
    let writer = {
        let fifo = fifo.clone();
        tokio::task::spawn_blocking(move || fs::OpenOptions::new().write(true).open(fifo))
    };
    let mut writer = tokio::time::timeout(Duration::from_secs(20), writer)
        .await
        .expect("the slow exec never started")
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), c.ok(Op::Ping))
        .await
        .expect("ping waited for the other connection's exec");
    assert!(!long.is_finished());
    std::io::Write::write_all(&mut writer, b"released").unwrap();
    drop(writer);
    let r = long.await.unwrap();
    assert_eq!((r.exit_code, r.stdout.as_slice()), (0, &b"released"[..]));
}

#[tokio::test]
async fn exec_behaviour() {
    let agent = AgentProcess::start();
    let mut c = agent.client().await;
    let dir = agent.scratch();

    // Environment, working directory, both streams, exit code.
    let r = c
        .exec(Exec {
            workdir: Some(s(&dir)),
            env: vars(&[("FOO", "bar baz")]),
            ..sh("echo \"$FOO\"; pwd; echo oops >&2; exit 3")
        })
        .await;
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        format!("bar baz\n{}\n", dir.display())
    );
    assert_eq!(r.stderr, b"oops\n");
    assert_eq!((r.exit_code, r.signal, r.timed_out), (3, None, false));
    assert!(!r.stdout_truncated && !r.stderr_truncated);

    // Standard input is fed then closed; without it, it is /dev/null.
    let r = c
        .exec(Exec {
            argv: vec!["cat".into()],
            stdin: Some(b"hello\nworld".to_vec()),
            ..Default::default()
        })
        .await;
    assert_eq!(r.stdout, b"hello\nworld");
    let r = c
        .exec(Exec {
            argv: vec!["cat".into()],
            ..Default::default()
        })
        .await;
    assert_eq!((r.stdout.len(), r.exit_code), (0, 0));
    // A child that ignores a large stdin neither blocks nor fails the exec.
    let r = c
        .exec(Exec {
            stdin: Some(vec![b'x'; 1 << 20]),
            ..sh("exit 0")
        })
        .await;
    assert_eq!(r.exit_code, 0);

    // Children get SIGPIPE's default action back (the agent ignores it).
    let r = c.exec(sh("yes | head -n 1")).await;
    assert_eq!(
        (r.stdout.as_slice(), r.stderr.as_slice()),
        (&b"y\n"[..], &b""[..])
    );
    // An absurd timeout is no timeout, not an overflow.
    let r = c
        .exec(Exec {
            timeout_ms: Some(u64::MAX),
            ..sh("exit 0")
        })
        .await;
    assert_eq!((r.exit_code, r.timed_out), (0, false));

    // Death by signal: 128 + n, with the signal.
    let r = c.exec(sh("kill -TERM $$")).await;
    assert_eq!((r.exit_code, r.signal), (143, Some(15)));

    // Timeout: the group is killed, output so far is kept.
    let t = Instant::now();
    let r = c
        .exec(Exec {
            timeout_ms: Some(300),
            ..sh("echo before; sleep 30; echo after")
        })
        .await;
    assert!(r.timed_out);
    assert_eq!((r.exit_code, r.signal), (137, Some(9)));
    assert_eq!(r.stdout, b"before\n");
    assert!(
        r.duration_ms >= 300 && t.elapsed() < Duration::from_secs(10),
        "{r:?}"
    );

    // Truncation keeps the first bytes and drains the rest (the child finishes).
    let r = c
        .exec(Exec {
            max_output_bytes: Some(1000),
            ..sh("head -c 100000 /dev/zero; echo done >&2")
        })
        .await;
    assert_eq!(r.stdout.len(), 1000);
    assert!(r.stdout_truncated && !r.stderr_truncated);
    assert_eq!((r.stderr.as_slice(), r.exit_code), (&b"done\n"[..], 0));
    let r = c
        .exec(Exec {
            max_output_bytes: Some(u64::MAX),
            ..sh("head -c 3000000 /dev/zero")
        })
        .await;
    assert_eq!(r.stdout.len() as u64, MAX_OUTPUT);
    assert!(r.stdout_truncated);

    // A missing command reads as a shell would say it.
    let r = c
        .exec(Exec {
            argv: vec!["burrow-no-such-command".into(), "x".into()],
            ..Default::default()
        })
        .await;
    assert_eq!(r.exit_code, 127);
    assert_eq!(r.stderr, b"burrow-no-such-command: command not found\n");

    // A background grandchild holding the pipes does not hold the answer.
    let t = Instant::now();
    let r = c.exec(sh("sleep 5 & echo hi")).await;
    assert_eq!((r.stdout.as_slice(), r.exit_code), (&b"hi\n"[..], 0));
    assert!(t.elapsed() < Duration::from_secs(4));

    // Bad requests.
    let e = c.err(Op::Exec(Exec::default())).await;
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.contains("argv"), "{}", e.message);
    let missing = dir.join("no-such-dir");
    let e = c
        .err(Op::Exec(Exec {
            workdir: Some(s(&missing)),
            ..sh("true")
        }))
        .await;
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains(&s(&missing)), "{}", e.message);
    let e = c
        .err(Op::Exec(Exec {
            env: vars(&[("A=B", "x")]),
            ..sh("true")
        }))
        .await;
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
}

#[tokio::test]
async fn set_env_is_seen_by_later_execs_and_jobs() {
    let agent = AgentProcess::start();
    let mut c = agent.client().await;
    let echo = || sh("printf %s \"${BURROW_T-unset}\"");

    let set = Op::SetEnv {
        set: vars(&[("BURROW_T", "one")]),
        unset: vec![],
    };
    assert_eq!(c.ok(set).await, Reply::Done);
    assert_eq!(c.exec(echo()).await.stdout, b"one");
    // A request's own env wins over the set one.
    let r = c
        .exec(Exec {
            env: vars(&[("BURROW_T", "two")]),
            ..echo()
        })
        .await;
    assert_eq!(r.stdout, b"two");
    // Jobs see it too, and other connections (the environment is the agent's).
    let mut other = agent.client().await;
    let job = other
        .start_job(JobStart {
            argv: echo().argv,
            ..Default::default()
        })
        .await;
    let st = other.poll_until(job, |s| !s.running).await;
    assert_eq!(st.stdout, b"one");

    // Invalid names change nothing.
    let e = c
        .err(Op::SetEnv {
            set: vars(&[("OK", "1"), ("A=B", "2")]),
            unset: vec!["BURROW_T".into()],
        })
        .await;
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.contains("A=B"), "{}", e.message);
    assert_eq!(c.exec(echo()).await.stdout, b"one");
    let e = c
        .err(Op::SetEnv {
            set: BTreeMap::new(),
            unset: vec!["".into()],
        })
        .await;
    assert_eq!(e.kind, ErrorKind::InvalidArgument);

    let unset = Op::SetEnv {
        set: BTreeMap::new(),
        unset: vec!["BURROW_T".into()],
    };
    assert_eq!(c.ok(unset).await, Reply::Done);
    assert_eq!(c.exec(echo()).await.stdout, b"unset");
}

#[tokio::test]
async fn jobs_start_poll_kill() {
    let agent = AgentProcess::start();
    let mut c = agent.client().await;

    let first = c
        .start_job(JobStart {
            argv: sh("echo start; sleep 30").argv,
            ..Default::default()
        })
        .await;
    assert_eq!(first, 1);
    let st = c.poll_until(first, |s| s.stdout == b"start\n").await;
    assert!(st.running);
    assert_eq!((st.exit_code, st.signal), (None, None));
    assert_eq!(st.argv, sh("echo start; sleep 30").argv);
    assert_eq!(
        c.ok(Op::JobKill {
            job: first.to_string(),
            signal: 15
        })
        .await,
        Reply::Done
    );
    let st = c.poll_until(first, |s| !s.running).await;
    assert_eq!((st.exit_code, st.signal), (Some(143), Some(15)));
    assert_eq!(st.stdout, b"start\n");
    // A finished job keeps its status; killing it again is harmless.
    assert_eq!(
        c.ok(Op::JobKill {
            job: first.to_string(),
            signal: 9
        })
        .await,
        Reply::Done
    );
    assert_eq!(c.poll(first).await.exit_code, Some(143));

    let second = c
        .start_job(JobStart {
            argv: sh("echo done; exit 4").argv,
            max_output_bytes: Some(2),
            ..Default::default()
        })
        .await;
    assert_eq!(second, 2);
    let st = c.poll_until(second, |s| !s.running).await;
    assert_eq!((st.exit_code, st.signal), (Some(4), None));
    // A job keeps the tail: twice its cap (4 bytes) of both streams together.
    assert_eq!(
        (st.stdout.as_slice(), st.stdout_truncated),
        (&b"one\n"[..], true)
    );
    assert_eq!(
        (st.stderr.as_slice(), st.stderr_truncated),
        (&b""[..], false)
    );

    let missing = c
        .start_job(JobStart {
            argv: vec!["burrow-no-such-command".into()],
            ..Default::default()
        })
        .await;
    let st = c.poll(missing).await;
    assert!(!st.running);
    assert_eq!(st.exit_code, Some(127));
    assert_eq!(st.stderr, b"burrow-no-such-command: command not found\n");

    let e = c.err(Op::JobPoll { job: "99".into() }).await;
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("99"), "{}", e.message);
    let e = c
        .err(Op::JobKill {
            job: "99".into(),
            signal: 15,
        })
        .await;
    assert_eq!(e.kind, ErrorKind::NotFound);
    for bad in [0, -1, 1000] {
        let e = c
            .err(Op::JobKill {
                job: second.to_string(),
                signal: bad,
            })
            .await;
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("signal"), "{}", e.message);
    }
    let e = c.err(Op::JobStart(JobStart::default())).await;
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
}

#[tokio::test]
async fn files_read_write_edit_list() {
    let agent = AgentProcess::start();
    let mut c = agent.client().await;
    let dir = agent.scratch();
    let file = dir.join("a/b/c.txt");

    // Write creates the parents and applies the mode.
    let reply = c
        .ok(write_op(&file, b"hello world\n", Some(0o600), false))
        .await;
    assert_eq!(reply, Reply::Written { bytes: 12 });
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o7777,
        0o600
    );

    let d = c.read(&file, 0, None).await;
    assert_eq!(
        (d.data.as_slice(), d.size, d.eof),
        (&b"hello world\n"[..], 12, true)
    );
    let d = c.read(&file, 6, Some(3)).await;
    assert_eq!((d.data.as_slice(), d.size, d.eof), (&b"wor"[..], 12, false));
    let d = c.read(&file, 100, None).await;
    assert_eq!((d.data.len(), d.eof), (0, true));

    c.ok(write_op(&file, b"more\n", None, true)).await;
    assert_eq!(c.read(&file, 0, None).await.data, b"hello world\nmore\n");

    // Edit: once, atomically, keeping the mode.
    assert_eq!(
        c.ok(edit_op(&file, "world", "there", false)).await,
        Reply::Edited { replacements: 1 }
    );
    assert_eq!(fs::read(&file).unwrap(), b"hello there\nmore\n");
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o7777,
        0o600
    );
    let e = c.err(edit_op(&file, "absent", "x", false)).await;
    assert_eq!(e.kind, ErrorKind::NoMatch);
    assert_eq!(
        e.message,
        format!("{}: old string not found", file.display())
    );
    let e = c.err(edit_op(&file, "", "x", false)).await;
    assert_eq!(e.kind, ErrorKind::InvalidArgument);

    let xs = dir.join("xs.txt");
    c.ok(write_op(&xs, b"x x x", None, false)).await;
    let e = c.err(edit_op(&xs, "x", "y", false)).await;
    assert_eq!(e.kind, ErrorKind::NoMatch);
    assert!(e.message.contains('3'), "{}", e.message);
    assert_eq!(fs::read(&xs).unwrap(), b"x x x");
    assert_eq!(
        c.ok(edit_op(&xs, "x", "yy", true)).await,
        Reply::Edited { replacements: 3 }
    );
    assert_eq!(fs::read(&xs).unwrap(), b"yy yy yy");

    // List: sorted, with kinds, sizes and modes.
    let b = dir.join("a/b");
    fs::create_dir(b.join("d")).unwrap();
    std::os::unix::fs::symlink("c.txt", b.join("l")).unwrap();
    let entries = match c.ok(Op::FileList { path: s(&b) }).await {
        Reply::Entries { entries } => entries,
        other => panic!("unexpected {other:?}"),
    };
    let names: Vec<_> = entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    assert_eq!(
        names,
        [
            ("c.txt", FileKind::File),
            ("d", FileKind::Dir),
            ("l", FileKind::Symlink)
        ]
    );
    let DirEntry {
        size,
        mode,
        modified,
        ..
    } = entries[0];
    assert_eq!((size, mode), (17, 0o600));
    assert!(modified > 1_600_000_000);

    // Errors name the path.
    let missing = dir.join("missing.txt");
    let e = c
        .err(Op::FileRead(FileRead {
            path: s(&missing),
            offset: 0,
            limit: None,
        }))
        .await;
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains(&s(&missing)), "{}", e.message);
    let e = c
        .err(Op::FileRead(FileRead {
            path: s(&dir),
            offset: 0,
            limit: None,
        }))
        .await;
    assert_eq!(e.kind, ErrorKind::IsADirectory);
    let e = c.err(write_op(&b, b"x", None, false)).await;
    assert_eq!(e.kind, ErrorKind::IsADirectory);
    assert!(e.message.contains(&s(&b)), "{}", e.message);
    let e = c.err(Op::FileList { path: s(&file) }).await;
    assert_eq!(e.kind, ErrorKind::NotADirectory);
    let e = c.err(edit_op(&missing, "a", "b", false)).await;
    assert_eq!(e.kind, ErrorKind::NotFound);
    for op in [
        Op::FileRead(FileRead {
            path: "rel/x".into(),
            offset: 0,
            limit: None,
        }),
        write_op(Path::new("rel/x"), b"", None, false),
        edit_op(Path::new("rel/x"), "a", "b", false),
        Op::FileList { path: "rel".into() },
    ] {
        let e = c.err(op).await;
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.starts_with("path:"), "{}", e.message);
    }
}

async fn read_resp(stream: &mut UnixStream) -> Response {
    read_message(stream).await.expect("response")
}

#[tokio::test]
async fn bad_frames_are_answered_and_the_stream_stays_in_step() {
    let agent = AgentProcess::start();
    let mut c = agent.client().await;

    // Oversized: drained, answered with id 0.
    let len = MAX_FRAME + 1;
    let mut frame = (len as u32).to_be_bytes().to_vec();
    frame.resize(4 + len, b' ');
    c.stream.write_all(&frame).await.unwrap();
    let r = read_resp(&mut c.stream).await;
    assert_eq!(r.id, 0);
    let e: AgentError = Result::<Reply, AgentError>::from(r.outcome).unwrap_err();
    assert_eq!(e.kind, ErrorKind::TooLarge);

    // Not JSON: id 0.
    let mut frame = 5u32.to_be_bytes().to_vec();
    frame.extend_from_slice(b"{nope");
    c.stream.write_all(&frame).await.unwrap();
    let r = read_resp(&mut c.stream).await;
    assert_eq!(r.id, 0);
    let e = Result::<Reply, AgentError>::from(r.outcome).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Malformed);

    // JSON with an id but an unknown op: answered under that id.
    let body = br#"{"id":41,"op":"launch"}"#;
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    c.stream.write_all(&frame).await.unwrap();
    let r = read_resp(&mut c.stream).await;
    assert_eq!(r.id, 41);
    let e = Result::<Reply, AgentError>::from(r.outcome).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Malformed);

    // And the connection still serves good requests.
    assert!(matches!(c.ok(Op::Ping).await, Reply::Pong { .. }));
}

#[tokio::test]
async fn shutdown_in_dev_mode_stops_jobs_and_exits() {
    let mut agent = AgentProcess::start();
    let mut c = agent.client().await;
    let job = c
        .start_job(JobStart {
            argv: sh("echo $$; exec sleep 30").argv,
            ..Default::default()
        })
        .await;
    let st = c.poll_until(job, |s| s.stdout.ends_with(b"\n")).await;
    let pid: i32 = String::from_utf8_lossy(&st.stdout).trim().parse().unwrap();

    assert_eq!(c.ok(Op::Shutdown).await, Reply::Done);
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
    // The job is gone (or a zombie waiting for the host's init to reap it).
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .trim_start()
        .chars()
        .next();
    assert!(
        matches!(state, None | Some('Z') | Some('X')),
        "job still alive: {stat}"
    );
}
