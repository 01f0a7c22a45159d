//! burrow-console: writes a VM's serial console (QEMU's stdout, on a pipe) to
//! console.log and keeps it bounded itself, whether or not burrowd runs.
//!
//! `burrow-console --log LOG --max-bytes N --run-dir RUN`: copies standard input to
//! LOG; when LOG would pass N bytes it becomes LOG.1 (replacing the previous one) and
//! a new LOG starts, so the two files together never hold more than 2 × N bytes and
//! the newest output is always in LOG. It exits when the pipe closes (QEMU exited).
//! `--run-dir` is not used: it names the VM's run dir on the command line, which is
//! how a restarted daemon recognises this process as part of the VM.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

struct Args {
    log: PathBuf,
    max: u64,
}

fn parse() -> Result<Args, String> {
    let mut log = None;
    let mut max = None;
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        let value = it.next().ok_or_else(|| format!("{a:?} needs a value"))?;
        match a.to_str() {
            Some("--log") => log = Some(PathBuf::from(value)),
            Some("--max-bytes") => {
                let n: u64 = value
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .filter(|n| *n >= 1024)
                    .ok_or("--max-bytes: a number of bytes, at least 1024")?;
                max = Some(n);
            }
            Some("--run-dir") => {}
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    Ok(Args {
        log: log.ok_or("--log is required")?,
        max: max.ok_or("--max-bytes is required")?,
    })
}

fn open(log: &Path) -> std::io::Result<File> {
    // Append: burrowd adds its own marker lines (boot, unexpected exit) to the file.
    OpenOptions::new().create(true).append(true).open(log)
}

fn rotated(log: &Path) -> PathBuf {
    let mut s = log.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

fn run(args: Args) -> std::io::Result<()> {
    let mut file = open(&args.log)?;
    let mut stdin = std::io::stdin().lock();
    let mut buf = vec![0u8; 64 * 1024];
    let mut failing = false;
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // A write that fails (a full disk) drops this chunk but not the pipe: QEMU
        // must never block on a console nobody reads.
        match write(&args, &mut file, &buf[..n]) {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                eprintln!("burrow-console: {}: {e}", args.log.display());
                failing = true;
            }
            Err(_) => {}
        }
    }
}

fn write(args: &Args, file: &mut File, mut chunk: &[u8]) -> std::io::Result<()> {
    while !chunk.is_empty() {
        // The size is read from the file each time: burrowd's own lines count.
        let size = file.metadata()?.len();
        let room = args.max.saturating_sub(size);
        if room == 0 {
            std::fs::rename(&args.log, rotated(&args.log))?;
            *file = open(&args.log)?;
            continue;
        }
        let take = chunk.len().min(room as usize);
        file.write_all(&chunk[..take])?;
        chunk = &chunk[take..];
    }
    Ok(())
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("burrow-console: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args) {
        eprintln!("burrow-console: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// However the guest's output is cut into reads, and whatever burrowd appends,
    /// neither file passes the bound and the newest bytes are in the log.
    #[test]
    fn rotation_keeps_both_parts_bounded_and_the_tail_in_the_log() {
        let t = std::env::temp_dir().join(format!("burrow-console-test-{}", std::process::id()));
        std::fs::create_dir_all(&t).unwrap();
        let args = Args {
            log: t.join("console.log"),
            max: 1024,
        };
        std::fs::write(&args.log, "--- burrow: boot ---\n").unwrap();
        let mut file = open(&args.log).unwrap();
        let mut all = Vec::new();
        for i in 0..500 {
            let line = format!("line-{i}\n");
            all.extend_from_slice(line.as_bytes());
            write(&args, &mut file, line.as_bytes()).unwrap();
            if i % 97 == 0 {
                // burrowd's own marker lines land in the same file.
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&args.log)
                    .unwrap()
                    .write_all(b"--- burrow: marker ---\n")
                    .unwrap();
            }
        }
        write(&args, &mut file, &[b'x'; 5000]).unwrap();
        let log = std::fs::read(&args.log).unwrap();
        let old = std::fs::read(rotated(&args.log)).unwrap();
        assert!(log.len() as u64 <= args.max, "{}", log.len());
        assert!(old.len() as u64 <= args.max + 64, "{}", old.len());
        assert!(log.ends_with(&[b'x'; 100]));
        std::fs::remove_dir_all(&t).unwrap();
    }
}
