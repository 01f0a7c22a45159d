//! Recordings of terminal sessions, kept on the host as asciicast v2 files.
//!
//! The agent keeps a session's recent output with byte offsets and times; a
//! recorder in the daemon follows it (`TerminalRecord`) and appends events to
//! `logs/<id>/terminals/<name>.cast`, noting the next offset it wants in
//! `<name>.offset`. A daemon that restarts resumes from that offset, so a session
//! that outlived it is recorded whole as long as the agent still kept the bytes (a
//! `gap` marker says what was lost otherwise). The file lives in the workspace's
//! log dir: it outlives the session and the VM and goes with `destroy`.
//!
//! Everything written comes from the guest: names are checked before they name a
//! file, output is JSON-escaped, and a file is bounded (oldest events dropped).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use burrow_proto::{GuestFrame, StreamEvent, StreamOpen, TerminalInfo};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;

use super::Engine;
use crate::db::WorkspaceRecord;
use crate::guest::GuestClient;

/// Default bound of one recording; `BURROW_RECORDING_MAX_BYTES` changes it.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 20;

/// Most sessions recorded per workspace: the agent keeps 64, and a guest that
/// claims more (its agent is the guest's to replace) gets no more files.
const MAX_RECORDED_SESSIONS: usize = 64;

/// Most bytes of a session's command kept in a recording's header (the command
/// comes from the guest).
const MAX_HEADER_COMMAND: usize = 1024;

pub fn cast_path(log_dir: &Path, name: &str) -> PathBuf {
    log_dir.join("terminals").join(format!("{name}.cast"))
}

fn offset_path(log_dir: &Path, name: &str) -> PathBuf {
    log_dir.join("terminals").join(format!("{name}.offset"))
}

fn max_bytes() -> u64 {
    std::env::var("BURROW_RECORDING_MAX_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &u64| n >= 4096)
        .unwrap_or(DEFAULT_MAX_BYTES)
}

/// The recorder task of each session, by workspace id and session name.
#[derive(Default)]
pub struct Recordings {
    tasks: Mutex<HashMap<(String, String), JoinHandle<()>>>,
}

impl Recordings {
    /// Starts recording `info`'s session. `fresh`: a new session, whose recording
    /// replaces any older one of the same name; otherwise a running recorder is
    /// left alone and a stopped one resumes where it stopped.
    pub fn start(&self, engine: &Engine, rec: &WorkspaceRecord, info: &TerminalInfo, fresh: bool) {
        let key = (rec.id.clone(), info.name.clone());
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|_, t| !t.is_finished());
        if let Some(t) = tasks.get(&key) {
            if !fresh {
                return;
            }
            t.abort();
        } else if tasks.keys().filter(|(ws, _)| *ws == rec.id).count() >= MAX_RECORDED_SESSIONS {
            tracing::warn!(workspace = %rec.id, session = %info.name, "too many sessions: not recorded");
            return;
        }
        let recorder = Recorder {
            guest: engine.guest(rec),
            log_dir: engine.state.log_dir(&rec.id),
            info: info.clone(),
            max: max_bytes(),
        };
        tasks.insert(key, tokio::spawn(recorder.run(fresh)));
    }

    /// Stops the recorders of a workspace (it stops or goes away).
    pub fn stop_workspace(&self, id: &str) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|(ws, _), t| {
            if ws == id {
                t.abort();
            }
            ws != id
        });
    }
}

struct Recorder {
    guest: GuestClient,
    log_dir: PathBuf,
    info: TerminalInfo,
    max: u64,
}

/// The first line of an asciicast v2 file.
#[derive(Serialize)]
struct Header<'a> {
    version: u32,
    width: u16,
    height: u16,
    timestamp: i64,
    command: String,
    title: &'a str,
}

impl Recorder {
    async fn run(self, fresh: bool) {
        if let Err(e) = self.record(fresh).await {
            tracing::debug!(session = %self.info.name, "recording ended: {e}");
        }
    }

    async fn record(&self, fresh: bool) -> std::io::Result<()> {
        let name = &self.info.name;
        let cast = cast_path(&self.log_dir, name);
        let offset_file = offset_path(&self.log_dir, name);
        tokio::fs::create_dir_all(cast.parent().unwrap_or(&self.log_dir)).await?;
        if fresh {
            let _ = tokio::fs::remove_file(&cast).await;
            let _ = tokio::fs::remove_file(&offset_file).await;
        }
        let from: u64 = tokio::fs::read_to_string(&offset_file)
            .await
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if !tokio::fs::try_exists(&cast).await.unwrap_or(false) {
            let header = Header {
                version: 2,
                width: self.info.size.cols,
                height: self.info.size.rows,
                timestamp: self.info.created_at,
                command: truncate_on_char(self.info.argv.join(" "), MAX_HEADER_COMMAND),
                title: name,
            };
            let mut line = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
            line.push(b'\n');
            tokio::fs::write(&cast, line).await?;
        }
        let mut stream = self
            .guest
            .open_stream(StreamOpen::TerminalRecord {
                name: name.clone(),
                from,
            })
            .await
            .map_err(std::io::Error::other)?;
        let mut file = tokio::fs::OpenOptions::new()
            .append(true)
            .open(&cast)
            .await?;
        let mut size = file.metadata().await?.len();
        let mut text = Utf8Stream::default();
        let mut last_t = 0u64;
        loop {
            let frame = stream.reader.next().await.map_err(std::io::Error::other)?;
            let (line, next_offset) = match frame {
                GuestFrame::Record { offset, t_us, data } => {
                    last_t = t_us;
                    let next = offset + data.len() as u64;
                    (event(t_us, "o", &text.push(&data)), Some(next))
                }
                GuestFrame::Event(StreamEvent::Resize { rows, cols, t_us }) => {
                    last_t = t_us;
                    (event(t_us, "r", &format!("{cols}x{rows}")), None)
                }
                GuestFrame::Event(StreamEvent::Gap { bytes }) => (
                    event(
                        last_t,
                        "m",
                        &format!("{bytes} bytes of output were not recorded"),
                    ),
                    None,
                ),
                GuestFrame::Event(_) => break,
                GuestFrame::Stdout(_) | GuestFrame::Stderr(_) => continue,
            };
            file.write_all(line.as_bytes()).await?;
            size += line.len() as u64;
            if let Some(next) = next_offset {
                // tokio's File writes on a blocking thread after write_all has
                // returned: the line must be in the file before the offset says
                // so, or a kill -9 between them loses it for good (the next
                // daemon resumes past it).
                file.flush().await?;
                tokio::fs::write(&offset_file, next.to_string()).await?;
            }
            if size > self.max {
                file.flush().await?;
                drop(file);
                let (path, max) = (cast.clone(), self.max);
                size = tokio::task::spawn_blocking(move || compact(&path, max))
                    .await
                    .map_err(std::io::Error::other)??;
                file = tokio::fs::OpenOptions::new()
                    .append(true)
                    .open(&cast)
                    .await?;
            }
        }
        file.flush().await
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate_on_char(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// One asciicast event line: `[seconds, code, data]`.
fn event(t_us: u64, code: &str, data: &str) -> String {
    let t = t_us as f64 / 1e6;
    let mut line = serde_json::to_string(&(t, code, data)).unwrap_or_default();
    line.push('\n');
    line
}

/// Keeps the header and the newest events that fit in half of `max`; returns the
/// new size.
fn compact(path: &Path, max: u64) -> std::io::Result<u64> {
    let text = std::fs::read(path)?;
    let mut lines = text.split_inclusive(|&b| b == b'\n');
    let header = lines.next().unwrap_or_default().to_vec();
    let events: Vec<&[u8]> = lines.collect();
    let budget = (max / 2) as usize;
    let mut kept = 0usize;
    let mut start = events.len();
    while start > 0 && kept + events[start - 1].len() <= budget {
        start -= 1;
        kept += events[start].len();
    }
    let mut out = header;
    for e in &events[start..] {
        out.extend_from_slice(e);
    }
    let tmp = path.with_extension("cast.tmp");
    std::fs::write(&tmp, &out)?;
    std::fs::rename(&tmp, path)?;
    Ok(out.len() as u64)
}

/// Turns a byte stream into text without splitting a character across chunks;
/// bytes that are not UTF-8 become U+FFFD.
#[derive(Default)]
struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    fn push(&mut self, data: &[u8]) -> String {
        self.pending.extend_from_slice(data);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    // `good` is valid UTF-8: from_utf8 said so.
                    out.push_str(std::str::from_utf8(good).unwrap_or_default());
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{fffd}');
                            rest = &bad[n..];
                        }
                        // An incomplete character at the end: wait for the rest.
                        None => {
                            rest = bad;
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        out
    }
}

impl Engine {
    pub(super) fn stop_recordings(&self, id: &str) {
        self.recordings.stop_workspace(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_is_not_split_across_chunks() {
        let mut s = Utf8Stream::default();
        let euro = "€".as_bytes();
        assert_eq!(s.push(&[b'a', euro[0]]), "a");
        assert_eq!(s.push(&euro[1..]), "€");
        assert_eq!(s.push(&[0xff, b'b']), "\u{fffd}b");
    }

    #[test]
    fn header_commands_are_cut_on_a_character() {
        assert_eq!(truncate_on_char("ab€".into(), 3), "ab");
        assert_eq!(truncate_on_char("abc".into(), 3), "abc");
    }

    #[test]
    fn events_are_json_lines() {
        assert_eq!(
            event(1_500_000, "o", "hi\u{1b}[0m\n"),
            "[1.5,\"o\",\"hi\\u001b[0m\\n\"]\n"
        );
    }

    #[test]
    fn compaction_keeps_the_header_and_the_newest_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.cast");
        let mut text = String::from("{\"version\":2}\n");
        for i in 0..100 {
            text.push_str(&event(i * 1000, "o", &format!("line {i:03}")));
        }
        std::fs::write(&path, &text).expect("write");
        let size = compact(&path, 400).expect("compact");
        let after = std::fs::read_to_string(&path).expect("read");
        assert_eq!(size as usize, after.len());
        assert!(after.starts_with("{\"version\":2}\n"));
        assert!(after.contains("line 099") && !after.contains("line 000"));
        assert!(after.len() <= 200 + 15, "{}", after.len());
    }
}
