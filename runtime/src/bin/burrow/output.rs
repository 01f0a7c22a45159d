//! Human-readable output.

use std::io::Write;
use std::path::Path;

use burrow::api::{Diff, DirEntry, FileKind, ImageInfo, JobStatus, Policy, WorkspaceInfo};
use serde::Serialize;

/// `daemon status --json` when no daemon serves the state dir.
#[derive(Serialize)]
pub struct NotRunning<'a> {
    pub running: bool,
    pub state_dir: &'a Path,
}

/// `job poll --json`: the job's status with its output as text (the API's
/// base64 is for programs; this is for people and scripts reading text).
#[derive(Serialize)]
struct JobText<'a> {
    job: u32,
    name: Option<&'a str>,
    argv: &'a [String],
    running: bool,
    exit_code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
    stdout_truncated: bool,
    stderr_truncated: bool,
    duration_ms: u64,
}

pub fn unix_time(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

/// A guest-made path for a terminal: printable UTF-8 as it is; control
/// characters, bidirectional overrides, bytes that are not UTF-8 and
/// backslashes as escapes (`\n`, `\xNN`, `\u{NN}`, `\\`), so a name cannot
/// move the cursor, retitle the terminal or pass itself off as another.
pub fn quote_path(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                c if c.is_control() || is_bidi_control(c) => {
                    out.push_str(&format!("\\u{{{:x}}}", c as u32))
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

pub fn print_list(list: &[WorkspaceInfo]) {
    println!(
        "{:<12}  {:<20} {:<9} {:<9} {:>5} {:>7} {:<5} {:<8} CREATED",
        "ID", "NAME", "KIND", "STATE", "VCPUS", "MEMORY", "ACCEL", "IMAGE"
    );
    for w in list {
        println!(
            "{:<12}  {:<20} {:<9} {:<9} {:>5} {:>6}M {:<5} {:<8} {}",
            w.id,
            w.name,
            w.kind.as_str(),
            w.state.as_str(),
            w.vcpus,
            w.memory_mib,
            w.accel.as_deref().unwrap_or("-"),
            if w.image.is_empty() { "-" } else { &w.image },
            w.created_at
        );
    }
}

pub fn print_info(w: &WorkspaceInfo) {
    println!("id:         {}", w.id);
    println!("name:       {}", w.name);
    println!("kind:       {}", w.kind.as_str());
    if let Some(c) = &w.container {
        println!("container:  {:?} (root {:?})", c.id, c.root);
        println!("bundle:     {:?}", c.bundle);
    }
    println!("state:      {}", w.state);
    println!("vcpus:      {}", w.vcpus);
    println!("memory:     {} MiB", w.memory_mib);
    println!("accel:      {}", w.accel.as_deref().unwrap_or("-"));
    println!(
        "image:      {}",
        if w.image.is_empty() { "-" } else { &w.image }
    );
    println!("created_at: {}", w.created_at);
    println!("store:      {}", w.store);
    println!("volume:     {}", w.volume.display());
    println!("ip:         {}", w.ip.as_deref().unwrap_or("-"));
    let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
    match (w.disk_used_bytes, w.disk_limit_bytes) {
        (Some(u), Some(l)) => println!("disk:       {} used of {}", gib(u), gib(l)),
        (Some(u), None) => println!("disk:       {} used, no limit", gib(u)),
        (None, Some(l)) => println!("disk:       limit {}", gib(l)),
        (None, None) => println!("disk:       -"),
    }
    if let Some(l) = &w.limits {
        println!(
            "limits:     cpu {:.2} CPUs, memory {} MiB, {} tasks",
            l.cpu_quota_us as f64 / l.cpu_period_us.max(1) as f64,
            l.memory_bytes >> 20,
            l.pids
        );
    }
    match &w.pids {
        Some(p) => println!(
            "pids:       qemu={} virtiofsd={} vsock={}",
            p.qemu, p.virtiofsd, p.vsock
        ),
        None => println!("pids:       -"),
    }
    if let Some(f) = &w.forked_from {
        println!("forked_from: {} @ {}", f.workspace, f.snapshot);
    }
}

pub fn print_job(s: &JobStatus, as_json: bool) {
    if as_json {
        let v = JobText {
            job: s.job,
            name: s.name.as_deref(),
            argv: &s.argv,
            running: s.running,
            exit_code: s.exit_code,
            signal: s.signal,
            stdout: String::from_utf8_lossy(&s.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&s.stderr).into_owned(),
            stdout_truncated: s.stdout_truncated,
            stderr_truncated: s.stderr_truncated,
            duration_ms: s.duration_ms,
        };
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    let state = match (s.running, s.exit_code) {
        (true, _) => "running".to_string(),
        (false, Some(c)) => format!("exited {c}"),
        (false, None) => "exited".to_string(),
    };
    match &s.name {
        Some(n) => println!("job {} ({n}): {state}", s.job),
        None => println!("job {}: {state}", s.job),
    }
    let _ = std::io::stdout().write_all(&s.stdout);
    let _ = std::io::stderr().write_all(&s.stderr);
}

pub fn print_entries(entries: &[DirEntry]) {
    for e in entries {
        let kind = match e.kind {
            FileKind::Dir => 'd',
            FileKind::Symlink => 'l',
            FileKind::File => '-',
            FileKind::Other => '?',
        };
        let name = if e.kind == FileKind::Dir {
            format!("{}/", e.name)
        } else {
            e.name.clone()
        };
        println!(
            "{kind}{:04o} {:>10} {} {name}",
            e.mode,
            e.size,
            unix_time(e.modified)
        );
    }
}

pub fn print_images(list: &[ImageInfo]) {
    println!("{:<10} {:>10} {:>8}  BUILT", "NAME", "SIZE", "PACKAGES");
    for i in list {
        println!(
            "{:<10} {:>9}M {:>8}  {}",
            i.name,
            i.size_bytes >> 20,
            i.packages,
            unix_time(i.built_at)
        );
    }
}

/// `A`, `M` or `D` and the path, quoted for a terminal.
pub fn print_diff(d: &Diff) {
    for (mark, paths) in [("A", &d.added), ("M", &d.modified), ("D", &d.deleted)] {
        for p in paths {
            println!("{mark} {}", quote_path(&p.bytes()));
        }
    }
}

pub fn print_policy(workspace: &str, p: &Policy) {
    let ports = p
        .allowed_ports
        .as_ref()
        .map(|v| v.iter().map(u16::to_string).collect::<Vec<_>>().join(","))
        .unwrap_or_else(|| "any".into());
    let host_ports = p
        .allow_host_ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let cidrs = p
        .allow_cidr
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    println!(
        "{workspace}: allow_internet={} allow_inter_vm={} allowed_ports={ports} allow_host_ports={} allow_cidr={}",
        p.allow_internet,
        p.allow_inter_vm,
        if host_ports.is_empty() { "none" } else { &host_ports },
        if cidrs.is_empty() { "none" } else { &cidrs },
    );
}

pub fn print_jobs(jobs: &[burrow_proto::JobInfo]) {
    println!("{:<5} {:<16} {:<10} COMMAND", "JOB", "NAME", "STATE");
    for j in jobs {
        let state = match (j.running, j.exit_code) {
            (true, _) => "running".to_string(),
            (false, Some(c)) => format!("exited {c}"),
            (false, None) => "exited".to_string(),
        };
        println!(
            "{:<5} {:<16} {:<10} {}",
            j.job,
            j.name.as_deref().unwrap_or("-"),
            state,
            j.argv.join(" ")
        );
    }
}

pub fn print_terminals(list: &[burrow_proto::TerminalInfo]) {
    println!(
        "{:<16} {:<20} {:<20} {:>7} {:<6} EXIT",
        "NAME", "COMMAND", "CREATED", "VIEWERS", "ALIVE"
    );
    for t in list {
        let exit = t
            .exit_code
            .map_or_else(|| "-".to_string(), |c| c.to_string());
        println!(
            "{:<16} {:<20} {:<20} {:>7} {:<6} {exit}",
            t.name,
            t.argv.join(" "),
            unix_time(t.created_at),
            t.viewers,
            if t.alive { "yes" } else { "no" },
        );
    }
}
