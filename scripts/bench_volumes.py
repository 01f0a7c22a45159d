#!/usr/bin/env python3
"""burrow's volume benchmark (snapshots, restore, forks), medians in one invocation:

  - snapshot create of a running workspace holding 20 MB and 200 MB in 5 000 files
    (the size must not matter: copy-on-write);
  - restore (includes the VM's restart on the restored disk);
  - fork x1 and x5 (wall, including boot of every fork);
  - extra disk used by 5 forks that each changed 1 MB (from the store's file system).

The disk part alone (no CLI, no guest, no boot) is printed by the store_bench
example (`make bench` runs both).

Usage: bench_volumes.py BIN_DIR [--runs N] [--store auto|btrfs|fuse|copy] [--smoke]

--smoke: one run on a tenth of the data and two forks instead of five, to show
the script still works (figures not meaningful, no targets).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

FILL = """
import os, sys
total, files = int(sys.argv[1]), 5000
size = total // files
os.makedirs('/work/data', exist_ok=True)
block = b'x' * size
for i in range(files):
    with open(f'/work/data/f{i:05d}', 'wb') as f:
        f.write(block)
"""


def ms(t0):
    return (time.monotonic() - t0) * 1000.0


class Burrow:
    def __init__(self, bin_dir, state, store):
        self.bin = os.path.join(bin_dir, "burrow")
        self.state = state
        self.env = dict(os.environ, BURROWD=os.path.join(bin_dir, "burrowd"), BURROW_STORE=store,
                        # the static agent (Makefile: agent)
                        BURROW_AGENT=os.path.join(os.path.dirname(bin_dir), "x86_64-unknown-linux-gnu", os.path.basename(bin_dir), "burrow-agent"))

    def __call__(self, *args, stdin=None):
        p = subprocess.run([self.bin, "--state-dir", self.state, *args], env=self.env, input=stdin,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            raise SystemExit(f"burrow {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    def timed(self, *args):
        t0 = time.monotonic()
        self(*args)
        return ms(t0)


def used_bytes(path):
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def allocated(root):
    seen, total = set(), 0
    for d, dirs, files in os.walk(root):
        for f in files:
            st = os.lstat(os.path.join(d, f))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin_dir")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--store", default="auto")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.runs = 1
    sizes = (2, 20) if args.smoke else (20, 200)
    big = sizes[1]
    forks = 2 if args.smoke else 5
    restore_runs = 1 if args.smoke else 3
    state = tempfile.mkdtemp(prefix="burrow-benchv-", dir="/tmp")
    b = Burrow(os.path.abspath(args.bin_dir), state, args.store)
    try:
        b("image", "build", "debian")
        b("daemon", "start")
        store = json.loads(b("daemon", "status", "--json"))["store"]
        b("create", "--name", "src")
        b("file", "write", "src", "/work/fill.py", stdin=FILL)
        snaps = {}
        for mb in sizes:
            b("exec", "src", "--", "rm", "-rf", "/work/data")
            b("exec", "src", "--timeout", "600", "--", "python3", "/work/fill.py", str(mb * 1000 * 1000))
            times = []
            for i in range(args.runs):
                times.append(b.timed("snapshot", "create", "src", f"s{mb}-{i}"))
            snaps[mb] = times
            for i in range(1, args.runs):
                b("snapshot", "delete", "src", f"s{mb}-{i}")
        restores = [b.timed("snapshot", "restore", "src", f"s{big}-0") for _ in range(restore_runs)]

        fork1 = []
        for i in range(restore_runs):
            fork1.append(b.timed("fork", "src", f"s{big}-0", "--name", f"one-{i}"))
            b("destroy", f"one-{i}")
        root = os.path.join(state, "btrfs") if store == "btrfs" else state
        # On the FUSE store what forks add is in their layers: count those
        # (the disk under them is shared with the rest of the machine).
        layers = os.path.join(state, "fuse", "layers")
        measure = (lambda: allocated(layers)) if store == "fuse" else (lambda: used_bytes(root))
        before = measure()
        fork5 = b.timed("fork", "src", f"s{big}-0", "--count", str(forks), "--name-prefix", "five")
        for i in range(1, forks + 1):
            b("exec", f"five-{i}", "--", "sh", "-c", "head -c 1000000 /dev/urandom > /work/changed; sync")
        # syncfs commits the Btrfs transaction, so the usage read next is current.
        subprocess.run(["sync", "-f", root], check=True)
        extra = measure() - before

        med = statistics.median
        if args.smoke:
            print(f"burrow volume benchmark ({store} store), smoke run: figures not meaningful")
        else:
            print(f"burrow volume benchmark ({store} store, medians)")
        for mb, t in snaps.items():
            print(f"  snapshot create, {mb:3d} MB in 5000 files   {med(t):8.0f} ms   (runs: {', '.join(f'{x:.0f}' for x in t)})")
        print(f"  restore (with VM restart)              {med(restores):8.0f} ms")
        print(f"  fork x1 (with boot)                    {med(fork1):8.0f} ms")
        print(f"  fork x{forks} (with boots, in parallel)      {fork5:8.0f} ms   = {fork5 / med(fork1):.2f} x fork x1 (target <= 2)")
        print(f"  extra disk, {forks} forks that changed 1 MB  {extra / 1e6:8.1f} MB   (target < 10 MB)")
        small = sizes[0]
        print("JSON " + json.dumps({"store": store, "smoke": args.smoke,
                                   f"snapshot_{small}mb_ms": med(snaps[small]), f"snapshot_{big}mb_ms": med(snaps[big]),
                                   "restore_ms": med(restores), "fork1_ms": med(fork1), "fork5_ms": fork5,
                                   "five_forks_extra_bytes": extra}))
    finally:
        try:
            for w in json.loads(b("ls", "--json")):
                b("destroy", w["id"])
        except SystemExit as e:
            print(f"clean-up: {e}")
        subprocess.run([b.bin, "--state-dir", state, "daemon", "stop"], env=b.env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
