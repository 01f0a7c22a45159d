//! Output kept for late readers: a bounded ring of chunks with absolute offsets.
//!
//! A job or a terminal session appends its output here and never waits for anyone.
//! Readers hold a [`Cursor`] of their own and copy what is new; a reader whose
//! cursor fell behind the oldest byte kept is told how many bytes it missed (a gap).
//! The ring holds at most `cap` bytes of data and [`MAX_ENTRIES`] entries, whichever
//! is reached first: the oldest bytes go first (a chunk may lose its head).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use burrow_proto::{ExitInfo, WinSize};
use tokio::sync::watch;

use crate::process::lock;

/// Entries a ring keeps at most, so tiny chunks (keystroke echoes) cannot make the
/// bookkeeping outgrow the data.
pub const MAX_ENTRIES: usize = 16 * 1024;

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Data(Tag, Vec<u8>),
    /// The terminal took this size here.
    Resize(WinSize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Sequence number: consecutive over the ring's life.
    pub seq: u64,
    /// Offset of the first byte (of a data entry) in all of the output.
    pub offset: u64,
    /// Microseconds after the output started.
    pub t_us: u64,
    pub item: Item,
}

impl Entry {
    fn len(&self) -> u64 {
        match &self.item {
            Item::Data(_, d) => d.len() as u64,
            Item::Resize(_) => 0,
        }
    }
}

/// Where one reader is: the next entry it has not seen and the next byte.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    seq: u64,
    offset: u64,
}

impl Cursor {
    /// At byte `offset` of the output (0: the beginning).
    pub fn at(offset: u64) -> Self {
        Cursor { seq: 0, offset }
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }
}

/// What a read returns, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// This many bytes were no longer kept.
    Gap(u64),
    Entry(Entry),
}

#[derive(Debug)]
pub struct Ring {
    entries: VecDeque<Entry>,
    cap: usize,
    held: usize,
    next_seq: u64,
    end: u64,
    dropped: [u64; 2],
}

impl Ring {
    pub fn new(cap: usize) -> Self {
        Ring {
            entries: VecDeque::new(),
            cap,
            held: 0,
            next_seq: 0,
            end: 0,
            dropped: [0, 0],
        }
    }

    /// Bytes written over the ring's life.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Bytes of `tag` dropped so far.
    pub fn dropped(&self, tag: Tag) -> u64 {
        self.dropped[tag as usize]
    }

    pub fn push_data(&mut self, tag: Tag, data: &[u8], t_us: u64) {
        if data.is_empty() {
            return;
        }
        self.push(Item::Data(tag, data.to_vec()), data.len(), t_us);
    }

    pub fn push_resize(&mut self, size: WinSize, t_us: u64) {
        self.push(Item::Resize(size), 0, t_us);
    }

    fn push(&mut self, item: Item, len: usize, t_us: u64) {
        self.entries.push_back(Entry {
            seq: self.next_seq,
            offset: self.end,
            t_us,
            item,
        });
        self.next_seq += 1;
        self.end += len as u64;
        self.held += len;
        self.trim();
    }

    fn trim(&mut self) {
        while self.held > self.cap || self.entries.len() > MAX_ENTRIES {
            let excess = self.held.saturating_sub(self.cap);
            let Some(front) = self.entries.front_mut() else {
                break;
            };
            let whole = match &mut front.item {
                Item::Resize(_) => true,
                Item::Data(tag, d) => {
                    if d.len() <= excess || self.held <= self.cap {
                        self.dropped[*tag as usize] += d.len() as u64;
                        self.held -= d.len();
                        true
                    } else {
                        d.drain(..excess);
                        self.dropped[*tag as usize] += excess as u64;
                        self.held -= excess;
                        front.offset += excess as u64;
                        false
                    }
                }
            };
            if whole {
                self.entries.pop_front();
            }
        }
    }

    /// A cursor at the last chunk boundary with at most `max` bytes after it (the
    /// last chunk if it alone is larger).
    pub fn tail(&self, max: u64) -> Cursor {
        let mut at = Cursor {
            seq: self.next_seq,
            offset: self.end,
        };
        for e in self.entries.iter().rev() {
            if matches!(e.item, Item::Data(..)) {
                if self.end - e.offset > max && at.offset != self.end {
                    break;
                }
                at = Cursor {
                    seq: e.seq,
                    offset: e.offset,
                };
                if self.end - e.offset >= max {
                    break;
                }
            }
        }
        at
    }

    /// What is new after `cur`, up to about `max` bytes (at least one entry), and
    /// advances `cur`. Empty when the reader is up to date.
    pub fn read(&self, cur: &mut Cursor, max: usize) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let first = match self.entries.front() {
            Some(f) if cur.seq > f.seq => (cur.seq - f.seq) as usize,
            _ => 0,
        };
        for e in self.entries.iter().skip(first) {
            if bytes >= max {
                break;
            }
            // Entries wholly before the cursor (a start at `from`).
            if e.offset + e.len() <= cur.offset && (e.len() > 0 || e.offset < cur.offset) {
                cur.seq = e.seq + 1;
                continue;
            }
            if e.offset > cur.offset {
                out.push(Piece::Gap(e.offset - cur.offset));
                cur.offset = e.offset;
            }
            let skip = (cur.offset - e.offset) as usize;
            let mut e = e.clone();
            if let Item::Data(_, d) = &mut e.item {
                d.drain(..skip);
                bytes += d.len();
            }
            e.offset = cur.offset;
            cur.offset += e.len();
            cur.seq = e.seq + 1;
            out.push(Piece::Entry(e));
        }
        if out.is_empty() && cur.offset < self.end {
            // Everything after the cursor is gone (a ring that keeps nothing).
            out.push(Piece::Gap(self.end - cur.offset));
            cur.offset = self.end;
            cur.seq = self.next_seq;
        }
        out
    }
}

/// A ring shared between the one writer and any number of readers, with the end of
/// the output (how the process ended) once it has all been appended.
pub struct Output {
    state: Mutex<OutputState>,
    changed: watch::Sender<()>,
    started: Instant,
}

struct OutputState {
    ring: Ring,
    exit: Option<ExitInfo>,
}

/// What a reader gets next.
pub enum Next {
    Pieces(Vec<Piece>),
    /// Everything has been read and the process ended.
    Ended(ExitInfo),
}

impl Output {
    pub fn new(cap: usize) -> Self {
        Output {
            state: Mutex::new(OutputState {
                ring: Ring::new(cap),
                exit: None,
            }),
            changed: watch::channel(()).0,
            started: Instant::now(),
        }
    }

    fn t_us(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    pub fn push(&self, tag: Tag, data: &[u8]) {
        let t = self.t_us();
        lock(&self.state).ring.push_data(tag, data, t);
        self.changed.send_replace(());
    }

    pub fn push_resize(&self, size: WinSize) {
        let t = self.t_us();
        lock(&self.state).ring.push_resize(size, t);
        self.changed.send_replace(());
    }

    /// Marks the output complete. Only the first call counts.
    pub fn finish(&self, exit: ExitInfo) {
        let mut s = lock(&self.state);
        if s.exit.is_none() {
            s.exit = Some(exit);
        }
        drop(s);
        self.changed.send_replace(());
    }

    pub fn exit(&self) -> Option<ExitInfo> {
        lock(&self.state).exit
    }

    /// Bytes written so far, and the bytes of each stream dropped.
    pub fn counts(&self) -> (u64, u64, u64) {
        let s = lock(&self.state);
        (
            s.ring.end(),
            s.ring.dropped(Tag::Stdout),
            s.ring.dropped(Tag::Stderr),
        )
    }

    pub fn tail(&self, max: u64) -> Cursor {
        lock(&self.state).ring.tail(max)
    }

    /// What is new after `cur` without waiting.
    pub fn read_now(&self, cur: &mut Cursor, max: usize) -> Vec<Piece> {
        lock(&self.state).ring.read(cur, max)
    }

    /// Every byte kept of `tag`, oldest first.
    pub fn kept(&self, tag: Tag) -> Vec<u8> {
        let s = lock(&self.state);
        let mut out = Vec::new();
        for e in &s.ring.entries {
            if let Item::Data(t, d) = &e.item {
                if *t == tag {
                    out.extend_from_slice(d);
                }
            }
        }
        out
    }

    /// Waits for what comes after `cur`, or for the end.
    pub async fn next(&self, cur: &mut Cursor, max: usize) -> Next {
        let mut rx = self.changed.subscribe();
        loop {
            rx.borrow_and_update();
            {
                let s = lock(&self.state);
                let pieces = s.ring.read(cur, max);
                if !pieces.is_empty() {
                    return Next::Pieces(pieces);
                }
                if let Some(exit) = s.exit {
                    return Next::Ended(exit);
                }
            }
            if rx.changed().await.is_err() {
                // The sender lives in `self`: not reached.
                return Next::Ended(ExitInfo {
                    exit_code: 128 + libc::SIGKILL,
                    signal: Some(libc::SIGKILL),
                    timed_out: false,
                    oom_killed: false,
                });
            }
        }
    }

    /// Waits until the output is complete.
    pub async fn ended(&self) -> ExitInfo {
        let mut rx = self.changed.subscribe();
        loop {
            rx.borrow_and_update();
            if let Some(exit) = self.exit() {
                return exit;
            }
            if rx.changed().await.is_err() {
                return ExitInfo {
                    exit_code: 128 + libc::SIGKILL,
                    signal: Some(libc::SIGKILL),
                    timed_out: false,
                    oom_killed: false,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(p: &Piece) -> (u64, &[u8]) {
        match p {
            Piece::Entry(Entry {
                offset,
                item: Item::Data(_, d),
                ..
            }) => (*offset, d.as_slice()),
            other => panic!("not data: {other:?}"),
        }
    }

    #[test]
    fn reads_in_order_and_trims_the_oldest_bytes() {
        let mut r = Ring::new(6);
        let mut cur = Cursor::default();
        r.push_data(Tag::Stdout, b"abc", 0);
        let p = r.read(&mut cur, 100);
        assert_eq!(p.len(), 1);
        assert_eq!(data(&p[0]), (0, &b"abc"[..]));
        assert!(r.read(&mut cur, 100).is_empty());
        r.push_data(Tag::Stderr, b"defgh", 1);
        // 8 bytes written, 6 kept: "ab" dropped from the head.
        assert_eq!(r.dropped(Tag::Stdout), 2);
        assert_eq!(r.dropped(Tag::Stderr), 0);
        let p = r.read(&mut cur, 100);
        assert_eq!(data(&p[0]), (3, &b"defgh"[..]));
        // A new reader from the start sees the gap first.
        let mut fresh = Cursor::default();
        let p = r.read(&mut fresh, 100);
        assert_eq!(p[0], Piece::Gap(2));
        assert_eq!(data(&p[1]), (2, &b"c"[..]));
        assert_eq!(data(&p[2]), (3, &b"defgh"[..]));
        assert_eq!(fresh.offset(), 8);
    }

    #[test]
    fn slow_reader_gets_the_gap_it_missed() {
        let mut r = Ring::new(4);
        let mut cur = Cursor::default();
        r.push_data(Tag::Stdout, b"12", 0);
        let _ = r.read(&mut cur, 100);
        for _ in 0..5 {
            r.push_data(Tag::Stdout, b"xy", 0);
        }
        let p = r.read(&mut cur, 100);
        assert_eq!(p[0], Piece::Gap(6));
        assert_eq!(cur.offset(), 12);
    }

    #[test]
    fn zero_cap_keeps_nothing_and_reports_it() {
        let mut r = Ring::new(0);
        r.push_data(Tag::Stdout, b"hello", 0);
        let mut cur = Cursor::default();
        assert_eq!(r.read(&mut cur, 100), vec![Piece::Gap(5)]);
        assert!(r.read(&mut cur, 100).is_empty());
    }

    #[test]
    fn resize_marks_keep_their_place() {
        let mut r = Ring::new(100);
        r.push_data(Tag::Stdout, b"ab", 1);
        r.push_resize(WinSize { rows: 5, cols: 6 }, 2);
        r.push_data(Tag::Stdout, b"cd", 3);
        let mut cur = Cursor::default();
        let p = r.read(&mut cur, 100);
        assert_eq!(p.len(), 3);
        assert!(
            matches!(&p[1], Piece::Entry(Entry { offset: 2, item: Item::Resize(s), .. }) if s.rows == 5)
        );
        // From byte 2: the resize at 2 and the data after it.
        let mut cur = Cursor::at(2);
        let p = r.read(&mut cur, 100);
        assert_eq!(p.len(), 2);
        assert_eq!(data(&p[1]), (2, &b"cd"[..]));
        // From byte 3: the middle of a chunk.
        let mut cur = Cursor::at(3);
        let p = r.read(&mut cur, 100);
        assert_eq!(p.len(), 1);
        assert_eq!(data(&p[0]), (3, &b"d"[..]));
    }

    #[test]
    fn tail_starts_at_a_chunk_boundary() {
        let mut r = Ring::new(100);
        for c in [&b"aaaa"[..], b"bbb", b"cc", b"d"] {
            r.push_data(Tag::Stdout, c, 0);
        }
        let mut cur = r.tail(4);
        let p = r.read(&mut cur, 100);
        assert_eq!(data(&p[0]), (7, &b"cc"[..]));
        assert_eq!(data(&p[1]), (9, &b"d"[..]));
        // A last chunk larger than the tail is still shown.
        let mut cur = r.tail(0);
        assert_eq!(data(&r.read(&mut cur, 100)[0]), (9, &b"d"[..]));
        let empty = Ring::new(10);
        let mut cur = empty.tail(5);
        assert!(empty.read(&mut cur, 10).is_empty());
    }

    #[test]
    fn reads_are_bounded_and_entries_capped() {
        let mut r = Ring::new(1 << 20);
        for _ in 0..MAX_ENTRIES + 10 {
            r.push_data(Tag::Stdout, b"k", 0);
        }
        assert_eq!(r.entries.len(), MAX_ENTRIES);
        let mut cur = r.tail(u64::MAX);
        assert_eq!(r.read(&mut cur, 3).len(), 3);
    }
}
