//! The disk part of snapshots and forks, per backend, and the FUSE layer's
//! throughput against the plain directory under it. Medians of one run.
//!
//!   cargo run --release -p burrow-fs --example store_bench -- [--runs N] [--dir D] [--smoke]
//!
//! `--smoke`: one run of everything on a tenth of the data, to show it still
//! works (figures not meaningful, no targets).
//!
//! Needs root (loop-mounted Btrfs, FUSE with allow_other) and `git`.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use burrow_fs::{BtrfsImage, BtrfsStore, FuseStore, ImageSource, Store};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// `total` bytes in 5 000 files under `dir/data`.
fn fill(dir: &Path, total: usize) -> Result<()> {
    let data = dir.join("data");
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data)?;
    let block = vec![b'x'; total / 5000];
    for i in 0..5000 {
        std::fs::write(data.join(format!("f{i:05}")), &block)?;
    }
    Ok(())
}

/// Allocated bytes under `dir` (each inode once).
fn allocated(dir: &Path) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            }
            if seen.insert((m.dev(), m.ino())) {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

fn sync() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

struct Figures {
    snapshot: Vec<(usize, f64)>,
    fork1: f64,
    fork5: f64,
    extra: u64,
}

/// Snapshot at 20 and 200 MB, fork x1 and x5 (in parallel), extra disk of five
/// forks that each wrote 1 MB.
fn store_figures(
    store: &(dyn Store + Sync),
    image: &ImageSource,
    runs: usize,
    measure: &dyn Fn() -> u64,
) -> Result<Figures> {
    let v = store.create("bench", image)?;
    // The snapshot of the larger volume, which the forks start from.
    let big = format!("s{}-0", sizes()[1]);
    let mut snapshot = Vec::new();
    for mb in sizes() {
        fill(&v.path, mb * 1_000_000)?;
        sync();
        let mut t = Vec::new();
        for i in 0..runs {
            let start = Instant::now();
            store.snapshot("bench", &format!("s{mb}-{i}"))?;
            t.push(ms(start));
        }
        snapshot.push((mb, median(t)));
    }
    let mut one = Vec::new();
    for i in 0..runs {
        let start = Instant::now();
        store.clone_snapshot("bench", &big, &format!("one-{i}"))?;
        one.push(ms(start));
        store.delete(&format!("one-{i}"))?;
    }
    sync();
    let before = measure();
    let start = Instant::now();
    std::thread::scope(|s| {
        let forks: Vec<_> = (1..=5)
            .map(|i| {
                let big = &big;
                s.spawn(move || store.clone_snapshot("bench", big, &format!("five-{i}")))
            })
            .collect();
        forks.into_iter().try_for_each(|f| {
            f.join()
                .map_err(|_| "fork panicked")?
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    })?;
    let fork5 = ms(start);
    for i in 1..=5 {
        let p = store.volume_path(&format!("five-{i}"));
        std::fs::write(p.join("changed"), vec![i as u8; 1_000_000])?;
    }
    sync();
    let extra = measure().saturating_sub(before);
    for i in 1..=5 {
        store.delete(&format!("five-{i}"))?;
    }
    for s in store.snapshots("bench")? {
        store.delete_snapshot("bench", &s.name)?;
    }
    store.delete("bench")?;
    Ok(Figures {
        snapshot,
        fork1: median(one),
        fork5,
        extra,
    })
}

fn print(name: &str, f: &Figures, target: f64) {
    println!("  {name} store (disk part only):");
    for (mb, t) in &f.snapshot {
        println!(
            "    snapshot create, {mb:3} MB in 5000 files  {t:8.2} ms   (target <= {target} ms)"
        );
    }
    println!(
        "    fork x1                                {:8.2} ms   (target <= {target} ms)",
        f.fork1
    );
    println!(
        "    fork x5, in parallel                   {:8.2} ms   = {:.2} x fork x1",
        f.fork5,
        f.fork5 / f.fork1
    );
    println!(
        "    extra disk, 5 forks that wrote 1 MB    {:8.1} MB   (target < 10 MB)",
        f.extra as f64 / 1e6
    );
}

/// Drops the page cache of one file, so the next read comes from below.
fn drop_cache(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: fadvise on an open fd.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    Ok(())
}

/// Sequential write then read of 256 MiB in `dir`, in ms; `below` is the file's
/// copy under the FUSE layer, whose cache is dropped too.
/// Smoke mode: one run on a tenth of the data.
static SMOKE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn smoke() -> bool {
    SMOKE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Megabytes of the small and the large volume snapshotted.
fn sizes() -> [usize; 2] {
    if smoke() {
        [2, 20]
    } else {
        [20, 200]
    }
}

/// MiB written and read by the sequential I/O figure.
fn seq_mib() -> usize {
    if smoke() {
        16
    } else {
        256
    }
}

fn seq_io(dir: &Path, below: Option<&dyn Fn() -> PathBuf>) -> Result<(f64, f64)> {
    use std::io::{Read, Write};
    let path = dir.join("seq.bin");
    let block = vec![7u8; 1 << 20];
    let start = Instant::now();
    let mut f = std::fs::File::create(&path)?;
    for _ in 0..seq_mib() {
        f.write_all(&block)?;
    }
    f.sync_all()?;
    drop(f);
    let write = ms(start);
    drop_cache(&path)?;
    if let Some(below) = below {
        drop_cache(&below())?;
    }
    let start = Instant::now();
    let mut f = std::fs::File::open(&path)?;
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf)? > 0 {}
    let read = ms(start);
    std::fs::remove_file(&path)?;
    Ok((write, read))
}

fn git(dir: &Path, args: &[&str]) -> Result<()> {
    let ok = Command::new("git")
        .args([
            "-c",
            "user.name=b",
            "-c",
            "user.email=b@b",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .status()?
        .success();
    if ok {
        Ok(())
    } else {
        Err(format!("git {args:?} failed in {}", dir.display()).into())
    }
}

/// A repository of 2 000 committed files under `dir`.
fn make_repo(dir: &Path) -> Result<PathBuf> {
    let repo = dir.join("repo");
    for i in 0..2000 {
        let d = repo.join(format!("d{}", i % 40));
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(format!("f{i}.txt")), format!("file {i}\n"))?;
    }
    git(&repo, &["init", "-q"])?;
    git(&repo, &["add", "."])?;
    git(&repo, &["commit", "-q", "-m", "one"])?;
    // Settled: a first status refreshes the index, as it would in a workspace.
    git(&repo, &["status", "--porcelain"])?;
    Ok(repo)
}

/// Median `git status` times in the two repositories, run alternately.
fn git_status(a: &Path, b: &Path, runs: usize) -> Result<(f64, f64)> {
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        for (repo, t) in [(a, &mut ta), (b, &mut tb)] {
            let start = Instant::now();
            git(repo, &["status", "--porcelain"])?;
            t.push(ms(start));
        }
    }
    Ok((median(ta), median(tb)))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    SMOKE.store(smoke, std::sync::atomic::Ordering::Relaxed);
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let runs = if smoke { 1 } else { runs };
    let base = args
        .iter()
        .position(|a| a == "--dir")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let cowfs = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("burrow-cowfs"))
        .ok_or("no burrow-cowfs next to the example")?;
    let t = tempfile::Builder::new()
        .prefix("burrow-fsbench")
        .tempdir_in(&base)?;
    let image_root = t.path().join("image");
    std::fs::create_dir_all(image_root.join("etc"))?;
    std::fs::write(image_root.join("etc/hostname"), "bench\n")?;
    let image = ImageSource {
        key: "bench".into(),
        root: image_root,
    };
    if smoke {
        println!("burrow store benchmark, smoke run (one run, a tenth of the data: figures not meaningful)");
    } else {
        println!("burrow store benchmark (medians of {runs})");
    }

    // Btrfs on a loop-mounted image.
    let mnt = t.path().join("btrfs");
    let fs = BtrfsImage::ensure(&t.path().join("btrfs.img"), &mnt, 4 << 30)?;
    let result = (|| -> Result<Figures> {
        let store = BtrfsStore::new(mnt.join("store"))?;
        // What the forks hold that nothing else does (Btrfs shares extents).
        let vols = mnt.join("store/volumes");
        let exclusive = || {
            (1..=5)
                .filter_map(|i| burrow_fs::usage(&vols.join(format!("five-{i}"))).ok())
                .map(|u| u.exclusive_bytes)
                .sum()
        };
        store_figures(&store, &image, runs, &exclusive)
    })();
    let _ = fs.unmount();
    print("btrfs", &result?, 50.0);

    // FUSE layers on whatever the directory is on.
    let store = FuseStore::open(t.path().join("fuse"), &cowfs)?;
    let layers = t.path().join("fuse/layers");
    let result = (|| -> Result<()> {
        let f = store_figures(&store, &image, runs, &|| allocated(&layers))?;
        print("fuse", &f, 200.0);
        let v = store.create("io", &image)?;
        // The same on a volume with a disk limit: the server counts every write.
        let limited = store.create("io-limited", &image)?;
        store.set_disk_limit("io-limited", Some(1 << 40))?;
        let mut lws = Vec::new();
        let plain = t.path().join("plain");
        std::fs::create_dir_all(&plain)?;
        // Alternating, so that drift in the shared disk's speed hits both alike.
        let (mut pws, mut prs, mut fws, mut frs) = (vec![], vec![], vec![], vec![]);
        let upper = || -> PathBuf {
            std::fs::read_dir(&layers)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path().join("seq.bin"))
                .find(|p| p.exists())
                .unwrap_or_default()
        };
        for _ in 0..runs {
            let (w, r) = seq_io(&plain, None)?;
            pws.push(w);
            prs.push(r);
            let (w, r) = seq_io(&v.path, Some(&upper))?;
            fws.push(w);
            frs.push(r);
            let (w, _) = seq_io(&limited.path, Some(&upper))?;
            lws.push(w);
        }
        let lw = median(lws);
        let (pw, pr, fw, fr) = (median(pws), median(prs), median(fws), median(frs));
        let (plain_repo, fuse_repo) = (make_repo(&plain)?, make_repo(&v.path)?);
        let (pg, fg) = git_status(&plain_repo, &fuse_repo, 4 * runs + 1)?;
        println!("  fuse layer throughput against the plain directory under it:");
        let n = seq_mib();
        println!("    sequential write {n:3} MiB   plain {pw:7.0} ms   fuse {fw:7.0} ms   = {:.2} x (target <= 2)", fw / pw);
        println!("    sequential read {n:3} MiB    plain {pr:7.0} ms   fuse {fr:7.0} ms   = {:.2} x (target <= 2)", fr / pr);
        println!(
            "    same write, disk limit set            fuse {lw:7.0} ms   = {:.2} x unlimited",
            lw / fw
        );
        println!("    git status, 2000 files     plain {pg:7.1} ms   fuse {fg:7.1} ms   = {:.2} x (target <= 2)", fg / pg);
        store.delete("io")?;
        store.delete("io-limited")?;
        Ok(())
    })();
    let _ = store.shutdown();
    result
}
