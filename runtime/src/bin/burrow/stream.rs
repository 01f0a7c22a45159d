//! Commands that stream: `exec` (live output, `-i` input, `-t` terminal), `job
//! logs`, `terminal attach`, `logs -f`.

use std::io::Read;

use burrow::api::client::Client;
use burrow::api::stream::{ClientStream, ServerEvent, StreamMessage};
use burrow_proto::{ExitInfo, Spawn, StreamControl, StreamOpen};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::commands::{fail, Failure};
use crate::tty::{self, RawMode};

/// Exit code when the stream broke (daemon or VM gone), as ssh uses.
pub const EXIT_STREAM_LOST: i32 = 255;
/// Exit code of a command killed by its timeout, as timeout(1) uses.
pub const EXIT_TIMEOUT: i32 = 124;

/// Ctrl-] then `d`: detaches from a terminal session.
const DETACH_PREFIX: u8 = 0x1d;
const DETACH_KEY: u8 = b'd';

/// How a stream ended for the CLI.
enum Ended {
    Exit(ExitInfo),
    CaughtUp,
    Detached,
    /// The daemon, the VM or the session dropped the stream: the line to print.
    Lost(String),
    /// The CLI was told to stop (SIGHUP, or SIGTERM on a terminal).
    Stopped(i32),
}

/// What the pump does with local input and signals.
struct Pump {
    /// Send standard input to the stream.
    stdin: bool,
    /// Standard input is a terminal in raw mode: scan for the detach keys, follow
    /// window size changes.
    tty: bool,
    /// Ctrl-] d detaches (terminal sessions).
    detach: bool,
    /// The first SIGINT or SIGTERM goes to the remote process instead of ending
    /// the CLI; a second one ends the CLI (and so the exec), as when the remote
    /// process ignores it or the stream is stuck.
    forward_signals: bool,
}

pub struct ExecStream {
    pub workspace: String,
    pub spawn: Spawn,
    pub tty: bool,
    pub timeout_secs: Option<f64>,
}

/// `burrow exec` streaming: exits with the command's code.
pub async fn exec(c: &Client, mut e: ExecStream) -> Result<i32, Failure> {
    if e.tty {
        if !tty::stdin_is_terminal() {
            return fail("-t needs a terminal on standard input (it is not one); drop -t or run from a terminal");
        }
        e.spawn.tty =
            Some(tty::window_size().unwrap_or(burrow_proto::WinSize { rows: 24, cols: 80 }));
        if !e.spawn.env.contains_key("TERM") {
            let term = std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into());
            e.spawn.env.insert("TERM".into(), term);
        }
    }
    let stdin = e.spawn.stdin;
    let stream = c
        .open_stream(&e.workspace, &StreamOpen::Exec(e.spawn))
        .await?;
    // Keys go to the guest raw only when they go at all (-it); with -t alone, as
    // with Docker, the local terminal stays as it is and Ctrl-C is a local SIGINT,
    // forwarded.
    let raw_keys = e.tty && stdin;
    let raw = if raw_keys { Some(raw_mode()?) } else { None };
    let ended = pump(
        stream,
        Pump {
            stdin,
            tty: e.tty,
            detach: false,
            forward_signals: !raw_keys,
        },
    )
    .await;
    drop(raw);
    match ended {
        Ended::Exit(x) if x.timed_out => Err(Failure(
            format!(
                "exec timed out after {} s; the command was killed",
                e.timeout_secs.unwrap_or_default()
            ),
            EXIT_TIMEOUT,
        )),
        Ended::Exit(x) => Ok(x.exit_code),
        other => lost(other),
    }
}

/// `burrow job logs [-f]`.
pub async fn job_logs(c: &Client, ws: &str, job: &str, follow: bool) -> Result<i32, Failure> {
    let open = StreamOpen::JobOutput {
        job: job.to_string(),
        follow,
    };
    let stream = c.open_stream(ws, &open).await?;
    let pump_cfg = Pump {
        stdin: false,
        tty: false,
        detach: false,
        forward_signals: false,
    };
    match pump(stream, pump_cfg).await {
        Ended::Exit(_) | Ended::CaughtUp => Ok(0),
        other => lost(other),
    }
}

/// `burrow terminal attach`.
pub async fn attach(c: &Client, ws: &str, name: &str, read_only: bool) -> Result<i32, Failure> {
    let is_tty = tty::stdin_is_terminal();
    if !read_only && !is_tty {
        return fail(
            "attach needs a terminal on standard input (it is not one); use --read-only to watch",
        );
    }
    let open = StreamOpen::TerminalAttach {
        name: name.to_string(),
        read_only,
        size: if read_only { None } else { tty::window_size() },
    };
    let stream = c.open_stream(ws, &open).await?;
    if is_tty {
        eprint!(
            "burrow: attached to {name} in {ws}{}; detach with Ctrl-] d\r\n",
            if read_only { " (read-only)" } else { "" }
        );
    }
    let raw = if is_tty { Some(raw_mode()?) } else { None };
    let ended = pump(
        stream,
        Pump {
            stdin: is_tty,
            tty: is_tty,
            detach: is_tty,
            forward_signals: false,
        },
    )
    .await;
    drop(raw);
    match ended {
        Ended::Detached => {
            eprintln!("burrow: detached from {name}; it lives on");
            Ok(0)
        }
        Ended::Exit(x) => {
            match x.signal {
                Some(s) => eprintln!("burrow: terminal {name} ended: killed by signal {s}"),
                None => eprintln!(
                    "burrow: terminal {name} ended with exit code {}",
                    x.exit_code
                ),
            }
            Ok(0)
        }
        other => lost(other),
    }
}

fn raw_mode() -> Result<RawMode, Failure> {
    RawMode::enter().map_err(|e| Failure(format!("cannot put the terminal in raw mode: {e}"), 1))
}

fn lost(e: Ended) -> Result<i32, Failure> {
    match e {
        Ended::Lost(m) => Err(Failure(m, EXIT_STREAM_LOST)),
        Ended::Stopped(sig) => Err(Failure(format!("stopped by signal {sig}"), 128 + sig)),
        Ended::CaughtUp | Ended::Detached => Ok(0),
        Ended::Exit(x) => Ok(x.exit_code),
    }
}

/// Reads standard input on a thread of its own (a blocking read; the thread is
/// left behind when the stream ends, and the process exits soon after).
fn stdin_reader() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

/// Splits keys typed on a terminal into what goes to the guest and whether the
/// detach sequence was typed. `pending` carries a Ctrl-] that ended a chunk.
fn scan_detach(chunk: &[u8], pending: &mut bool) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(chunk.len() + 1);
    for &b in chunk {
        if *pending {
            *pending = false;
            if b == DETACH_KEY {
                return (out, true);
            }
            out.push(DETACH_PREFIX);
            if b == DETACH_PREFIX {
                *pending = true;
                continue;
            }
            out.push(b);
        } else if b == DETACH_PREFIX {
            *pending = true;
        } else {
            out.push(b);
        }
    }
    (out, false)
}

/// Why the sending half stopped on its own.
enum SendEnd {
    Detached,
    Lost(String),
}

async fn pump(stream: ClientStream, cfg: Pump) -> Ended {
    let ClientStream {
        sender,
        mut receiver,
        ..
    } = stream;
    let mut winch = if cfg.tty {
        signal(SignalKind::window_change()).ok()
    } else {
        None
    };
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return Ended::Lost("cannot watch signals".into());
    };
    // Input goes out on a task of its own: a send that waits for the guest to take
    // input must never stop this loop from taking the guest's output, or a `cat`
    // whose output nobody reads would never read its input either.
    let input = if cfg.stdin {
        Some(stdin_reader())
    } else {
        None
    };
    let (control_tx, control_rx) = mpsc::channel::<StreamControl>(16);
    let (end_tx, end_rx) = tokio::sync::oneshot::channel::<SendEnd>();
    let mut end_rx = Some(end_rx);
    let send_task = tokio::spawn(send_loop(
        sender, input, control_rx, cfg.detach, cfg.tty, end_tx,
    ));
    let _abort = AbortOnDrop(send_task);
    // A full control queue (the guest not taking input) drops a resize or a
    // signal rather than stopping the output.
    let control = |c: StreamControl| {
        let _ = control_tx.try_send(c);
    };
    let mut forwarded = false;
    let mut out = tokio::io::stdout();
    let mut err = tokio::io::stderr();
    loop {
        tokio::select! {
            msg = receiver.next() => {
                match msg {
                    Ok(Some(StreamMessage::Stdout(d))) | Ok(Some(StreamMessage::Record { data: d, .. })) => {
                        // A closed stdout (`| head`) is the reader's choice: stop.
                        if out.write_all(&d).await.is_err() || out.flush().await.is_err() {
                            return Ended::Stopped(libc::SIGPIPE);
                        }
                    }
                    Ok(Some(StreamMessage::Stderr(d))) => {
                        let _ = err.write_all(&d).await;
                        let _ = err.flush().await;
                    }
                    Ok(Some(StreamMessage::Event(e))) => match e {
                        ServerEvent::Exit(x) => return Ended::Exit(x),
                        ServerEvent::CaughtUp => return Ended::CaughtUp,
                        ServerEvent::Gap { bytes } => {
                            let _ = err.write_all(format!("burrow: {bytes} bytes of output were no longer kept\r\n").as_bytes()).await;
                        }
                        ServerEvent::Dropped { reason } => return Ended::Lost(reason),
                        ServerEvent::Error { message, .. } => return Ended::Lost(message),
                        ServerEvent::Started { .. } | ServerEvent::Resize { .. } => {}
                    },
                    // The end of a stream this side detached from is the detach.
                    Ok(None) if detached(&mut end_rx) => return Ended::Detached,
                    Err(_) if detached(&mut end_rx) => return Ended::Detached,
                    Ok(None) => return Ended::Lost("burrowd closed the stream before it ended".into()),
                    Err(e) => return Ended::Lost(format!("lost the connection to burrowd: {e}")),
                }
            }
            end = recv_end(&mut end_rx) => match end {
                Ok(SendEnd::Detached) => return Ended::Detached,
                Ok(SendEnd::Lost(m)) => return Ended::Lost(m),
                // The sender ended without a word: its input is done; go on.
                Err(_) => end_rx = None,
            },
            _ = recv_winch(&mut winch) => {
                if let Some(size) = tty::window_size() {
                    control(StreamControl::Resize(size));
                }
            }
            _ = int.recv() => {
                if !cfg.forward_signals || forwarded { return Ended::Stopped(libc::SIGINT); }
                forwarded = true;
                control(StreamControl::Signal { signal: libc::SIGINT });
            }
            _ = term.recv() => {
                if !cfg.forward_signals || forwarded { return Ended::Stopped(libc::SIGTERM); }
                forwarded = true;
                control(StreamControl::Signal { signal: libc::SIGTERM });
            }
            _ = hup.recv() => return Ended::Stopped(libc::SIGHUP),
        }
    }
}

/// Whether the sending half has said that the user detached.
fn detached(rx: &mut Option<tokio::sync::oneshot::Receiver<SendEnd>>) -> bool {
    matches!(
        rx.as_mut().map(|rx| rx.try_recv()),
        Some(Ok(SendEnd::Detached))
    )
}

async fn recv_end(
    rx: &mut Option<tokio::sync::oneshot::Receiver<SendEnd>>,
) -> Result<SendEnd, tokio::sync::oneshot::error::RecvError> {
    match rx {
        Some(rx) => rx.await,
        None => std::future::pending().await,
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends standard input (scanning for the detach keys) and control messages.
async fn send_loop(
    mut sender: burrow::api::stream::StreamSender,
    mut input: Option<mpsc::Receiver<Vec<u8>>>,
    mut control: mpsc::Receiver<StreamControl>,
    detach: bool,
    tty: bool,
    end: tokio::sync::oneshot::Sender<SendEnd>,
) {
    let mut pending_detach = false;
    loop {
        let sent = tokio::select! {
            chunk = recv_opt(&mut input) => match chunk {
                Some(data) if detach => {
                    let (data, detached) = scan_detach(&data, &mut pending_detach);
                    if detached {
                        // Said first: the daemon's answer to the close (it ends
                        // the socket) must not read as a lost stream.
                        let _ = end.send(SendEnd::Detached);
                        sender.close().await;
                        return;
                    }
                    if data.is_empty() { Ok(()) } else { sender.stdin(data).await }
                }
                Some(data) => sender.stdin(data).await,
                None => {
                    input = None;
                    // On a terminal, end of local input is not the guest's: keys
                    // just stop coming.
                    if tty { Ok(()) } else { sender.control(&StreamControl::CloseStdin).await }
                }
            },
            c = control.recv() => match c {
                Some(c) => sender.control(&c).await,
                None => return,
            },
        };
        if let Err(e) = sent {
            let _ = end.send(SendEnd::Lost(format!("lost the stream: {e}")));
            return;
        }
    }
}

async fn recv_opt(rx: &mut Option<mpsc::Receiver<Vec<u8>>>) -> Option<Vec<u8>> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_winch(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// `burrow logs -f`.
pub async fn follow_logs(
    c: &Client,
    ws: &str,
    kind: burrow::engine::LogKind,
    lines: usize,
) -> Result<i32, Failure> {
    let q = burrow::api::LogsQuery {
        r#type: Some(kind),
        lines: Some(lines),
    };
    c.logs_follow(ws, &q, |l| println!("{l}")).await?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_keys_are_found_across_chunks_and_escaped_otherwise() {
        let mut p = false;
        assert_eq!(scan_detach(b"ab", &mut p), (b"ab".to_vec(), false));
        assert_eq!(scan_detach(b"x\x1d", &mut p), (b"x".to_vec(), false));
        assert!(p);
        assert_eq!(scan_detach(b"d", &mut p), (vec![], true));
        let mut p = false;
        assert_eq!(scan_detach(b"\x1dq", &mut p), (b"\x1dq".to_vec(), false));
        assert_eq!(scan_detach(b"\x1d\x1dd", &mut p), (b"\x1d".to_vec(), true));
    }
}
