//! 1 GiB through `exec -i dev -- cat`: input and output stream at once and come
//! back the same, with burrowd's memory bounded. One VM.
//!
//! The case that needs an exec's input on a vsock connection of its own:
//! vhost-device-vsock stops a connection whose two directions are both full (the
//! guest has no credit left for input while its output waits for a credit update
//! from the host), so with input and output on one connection this hung after a
//! few MiB.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use burrow_tests::transfer::{
    drain, feed, rss_kib, status_kib, stderr_of, wait_progressing, RssSampler, GIB,
};
use burrow_tests::{require_root, Burrow};

#[test]
fn round_trip_of_1_gib_through_cat() {
    require_root!();
    let b = Burrow::new();
    b.ok(&["create", "--name", "dev"]);
    let daemon = b.daemon_pid().expect("daemon pid");
    let daemon_before = rss_kib(daemon).expect("daemon VmRSS");
    let guest_status = || b.ok(&["exec", "dev", "--", "cat", "/proc/1/status"]);
    let agent_before = status_kib(&guest_status(), "VmRSS:").expect("agent VmRSS");
    let started = std::time::Instant::now();
    let sampler = RssSampler::start(daemon);
    let mut cli = b.spawn(&["exec", "-i", "dev", "--", "cat"]);
    let progress = Arc::new(AtomicU64::new(0));
    let sent = feed(
        cli.stdin.take().expect("stdin"),
        Arc::new(AtomicU64::new(0)),
    );
    let got = drain(cli.stdout.take().expect("stdout"), progress.clone());
    let code = wait_progressing("1 GiB round trip through cat", &mut cli, &progress);
    let (sent, got) = (sent.join().expect("writer"), got.join().expect("reader"));
    let secs = started.elapsed().as_secs_f64();
    let daemon_peak = sampler.peak();
    let growth = daemon_peak.saturating_sub(daemon_before);
    assert_eq!(code, 0, "{}", stderr_of(&mut cli));
    assert_eq!(progress.load(Ordering::SeqCst), GIB);
    assert_eq!(got, sent, "the bytes came back changed");
    let agent_peak = status_kib(&guest_status(), "VmHWM:").expect("agent VmHWM");
    let agent_growth = agent_peak.saturating_sub(agent_before);
    eprintln!(
        "1 GiB round trip: {secs:.1} s ({:.0} MiB/s); burrowd RSS {daemon_before} KiB, peak \
         {daemon_peak} KiB (+{growth} KiB); agent RSS {agent_before} KiB, peak {agent_peak} KiB \
         (+{agent_growth} KiB)",
        1024.0 / secs
    );
    assert!(growth <= 128 * 1024, "burrowd grew by {growth} KiB");
    assert!(
        agent_growth <= 128 * 1024,
        "the agent grew by {agent_growth} KiB"
    );
}
