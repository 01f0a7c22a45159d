//! Streaming large amounts through a workspace: deterministic data, hashing as it
//! goes, a stall detector and the daemon's memory sampled meanwhile.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Deterministic bytes (xorshift64*), so that both ends can be hashed as they go.
pub struct Pattern(pub u64);

impl Pattern {
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// burrowd's resident size, sampled while a transfer runs (`done` ends it).
pub struct RssSampler {
    done: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

pub fn rss_kib(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| status_kib(&s, "VmRSS:"))
}

impl RssSampler {
    pub fn start(pid: i32) -> RssSampler {
        let done = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_kib(pid).unwrap_or(0)));
        let thread = {
            let (done, peak) = (done.clone(), peak.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    if let Some(kib) = rss_kib(pid) {
                        peak.fetch_max(kib, Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        RssSampler { done, peak, thread }
    }

    pub fn peak(self) -> u64 {
        self.done.store(true, Ordering::SeqCst);
        self.thread.join().expect("sampler");
        self.peak.load(Ordering::SeqCst)
    }
}

pub const GIB: u64 = 1 << 30;

/// Writes GIB bytes of [`Pattern`] to `w` on a thread, counting them in
/// `progress`; returns their sha256.
pub fn feed(
    mut w: impl Write + Send + 'static,
    progress: Arc<AtomicU64>,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut p = Pattern(0x9e37_79b9_7f4a_7c15);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut sent = 0u64;
        while sent < GIB {
            p.fill(&mut buf);
            h.update(&buf);
            if w.write_all(&buf).is_err() {
                break;
            }
            sent += buf.len() as u64;
            progress.fetch_add(buf.len() as u64, Ordering::SeqCst);
        }
        hex(&h.finalize())
    })
}

/// Reads `r` to its end on a thread, hashing; `progress` counts the bytes so far.
pub fn drain(
    mut r: impl Read + Send + 'static,
    progress: Arc<AtomicU64>,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    h.update(&buf[..k]);
                    progress.fetch_add(k as u64, Ordering::SeqCst);
                }
            }
        }
        hex(&h.finalize())
    })
}

/// Waits for `cli` to exit while `progress` moves; a transfer that makes no
/// progress for a minute has hung: the CLI is killed and the test fails saying
/// where it stopped.
pub fn wait_progressing(what: &str, cli: &mut std::process::Child, progress: &AtomicU64) -> i32 {
    let mut last = (progress.load(Ordering::SeqCst), Instant::now());
    loop {
        // Its exit ends the wait at once; every second, progress is looked at.
        if crate::exits_within(cli.id() as i32, Duration::from_secs(1)) {
            return cli.wait().expect("wait").code().unwrap_or(-1);
        }
        let now = progress.load(Ordering::SeqCst);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(60) {
            let _ = cli.kill();
            let _ = cli.wait();
            panic!("{what}: stalled after {now} bytes (no progress for a minute)");
        }
    }
}

pub fn stderr_of(cli: &mut std::process::Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = cli.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}
