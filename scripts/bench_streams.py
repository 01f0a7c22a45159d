#!/usr/bin/env python3
"""burrow's streams benchmark, medians in one invocation, one workspace:

  (a) floor: a raw vsock stream out of the VM, as socat would make it: in the
      guest, `head -c N /dev/zero` into a pipe that Python copies to a host vsock
      port (the hybrid-vsock listener socket this script binds next to the VM's
      own), read here to its end. Same process, pipe and vsock as (b), without
      agent, burrowd and CLI
  (b) `burrow exec ws -- head -c N /dev/zero`, streamed through agent, burrowd and
      the CLI, read here from the CLI's stdout to its end; alternating with (a),
      target >= 0.8 x floor
  (c) the peer: `docker exec c head -c N /dev/zero` on runc (when Docker answers)
  (d) first byte of a streamed `exec -- echo x` against the answer of the buffered
      exec (`--max-output`), alternating; target <= 1.1 x
  (e) keystroke echo in a terminal session (the image's login shell): a key written
      to `burrow terminal attach` on a local pty until its echo comes back; target
      <= 10 ms under TCG
  (f) burrowd and agent memory growth during the streamed transfers (burrowd's
      VmRSS sampled, the agent's VmHWM before and after); target <= 64 MiB

Usage: bench_streams.py BIN_DIR [--runs N] [--mib N] [--smoke]
  --smoke: one 16 MiB transfer of each kind, a few keys, docker skipped, no target judged
"""

import argparse
import json
import os
import pty
import pwd
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from bench import Burrow, docker_container, med, ms, run

VSOCK_PORT = 5999

SENDER = """
import os, socket, sys
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.connect((2, int(sys.argv[1])))
# splice: pipe to socket in the kernel, so the floor is the path, not Python.
while os.splice(0, s.fileno(), 1 << 20):
    pass
s.close()
"""


def read_all(f):
    """Reads a file object to its end; returns (bytes, seconds from the first byte)."""
    first, total = None, 0
    while True:
        b = f.read(1 << 20)
        if not b:
            break
        if first is None:
            first = time.monotonic()
        total += len(b)
    return total, time.monotonic() - (first or time.monotonic())


def vsock_floor(b, ws, run_dir, mib):
    """Guest Python → host vsock listener; MiB/s from the first byte to the end."""
    path = os.path.join(run_dir, "vsock", f"vsock.uds_{VSOCK_PORT}")
    if os.path.exists(path):
        os.remove(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    try:
        # vhost-device-vsock runs as the VMM user and connects here for the guest.
        try:
            os.chown(path, pwd.getpwnam("burrow-vmm").pw_uid, -1)
        except KeyError:
            pass
        os.chmod(path, 0o600)
        b("job", "start", ws, "--", "sh", "-c", f'head -c {mib << 20} /dev/zero | python3 -c "$0" {VSOCK_PORT}', SENDER)
        srv.settimeout(120)
        conn, _ = srv.accept()
        with conn, conn.makefile("rb") as f:
            total, secs = read_all(f)
        assert total == mib << 20, (total, mib)
        return mib / secs
    finally:
        srv.close()
        os.remove(path)


def streamed_exec(b, ws, mib):
    p = subprocess.Popen([b.bin, "--state-dir", b.state, "exec", ws, "--", "head", "-c", str(mib << 20), "/dev/zero"],
                         env=b.env, stdout=subprocess.PIPE)
    total, secs = read_all(p.stdout)
    assert p.wait() == 0 and total == mib << 20, (total, mib)
    return mib / secs


def docker_stream(env, name, mib):
    p = subprocess.Popen(["docker", "exec", name, "head", "-c", str(mib << 20), "/dev/zero"], env=env,
                         stdout=subprocess.PIPE)
    total, secs = read_all(p.stdout)
    assert p.wait() == 0 and total == mib << 20, (total, mib)
    return mib / secs


def first_byte(argv, env):
    t0 = time.monotonic()
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE)
    p.stdout.read(1)
    elapsed = ms(t0)
    p.stdout.read()
    p.wait()
    return elapsed


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class RssSampler:
    """Samples a process's VmRSS while it runs; keeps the peak."""

    def __init__(self, pid):
        self.pid, self.stop = pid, threading.Event()
        self.base = self.peak = rss_kib(pid)
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, rss_kib(self.pid))

    def growth_mib(self):
        """Stops sampling; the peak's growth over the first sample."""
        self.stop.set()
        self.thread.join()
        return max(0, self.peak - self.base) / 1024


def agent_hwm_kib(b, ws):
    out = b("exec", ws, "--", "grep", "VmHWM", "/proc/1/status")
    return int(out.split()[1])


def keystroke_echo(b, ws, keys):
    """Echo latency of single keys typed into `terminal attach` on a local pty."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(b.bin, [b.bin, "--state-dir", b.state, "terminal", "attach", ws, "bench"], b.env)
    try:
        def read_until(marker, timeout=60):
            buf, deadline = b"", time.monotonic() + timeout
            while marker not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"terminal: {marker!r} did not appear; saw {buf[-200:]!r}")
                r, _, _ = select.select([fd], [], [], left)
                if r:
                    buf += os.read(fd, 65536)
            return buf

        def drain():
            while select.select([fd], [], [], 0.2)[0]:
                os.read(fd, 65536)

        # A prompt of our own, so that we know the shell reads keys.
        os.write(fd, b"PS1='ready> '\r")
        read_until(b"ready> ")
        drain()
        times = []
        for i in range(keys):
            key = b"0123456789"[i % 10:i % 10 + 1]
            t0 = time.monotonic()
            os.write(fd, key)
            read_until(key)
            times.append(ms(t0))
        os.write(fd, b"\x15")  # Ctrl-U: the typed line goes
        os.write(fd, b"\x1dd")  # detach
        return times
    finally:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        os.close(fd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin_dir")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--latency-runs", type=int, default=20)
    ap.add_argument("--keys", type=int, default=40)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.runs, args.mib, args.latency_runs, args.keys = 1, 16, 1, 3
    bin_dir = os.path.abspath(args.bin_dir)
    state = tempfile.mkdtemp(prefix="burrow-bs-", dir="/tmp")
    netns = f"bbs{os.getpid()}"
    run(["ip", "netns", "add", netns])
    b = Burrow(bin_dir, state, netns)
    try:
        b("image", "build", "debian")
        b("create", "--name", "s")
        info = json.loads(b("info", "s", "--json"))
        run_dir = os.path.join(state, "run", info["id"])
        daemon_pid = int(open(os.path.join(state, "burrowd.pid")).read().split()[0])
        # Warm-up: the guest's python and head, the daemon's stream path.
        vsock_floor(b, "s", run_dir, 1)
        streamed_exec(b, "s", 1)

        hwm_before = agent_hwm_kib(b, "s")
        sampler = RssSampler(daemon_pid)
        floors, streams = [], []
        for i in range(args.runs):
            # Alternating, and each goes first in turn, so drift hits both.
            pair = [("floor", lambda: vsock_floor(b, "s", run_dir, args.mib)),
                    ("stream", lambda: streamed_exec(b, "s", args.mib))]
            for kind, f in (pair if i % 2 == 0 else pair[::-1]):
                (floors if kind == "floor" else streams).append(f())
        daemon_growth = sampler.growth_mib()
        agent_growth = max(0, agent_hwm_kib(b, "s") - hwm_before) / 1024

        streamed_fb, buffered_fb = [], []
        for _ in range(args.latency_runs):
            streamed_fb.append(first_byte([b.bin, "--state-dir", state, "exec", "s", "--", "echo", "x"], b.env))
            buffered_fb.append(first_byte([b.bin, "--state-dir", state, "exec", "s", "--max-output", "100", "--",
                                           "echo", "x"], b.env))

        b("terminal", "new", "s", "--name", "bench")
        echoes = keystroke_echo(b, "s", args.keys)

        docker, docker_note = None, "smoke run"
        if not args.smoke:
            with docker_container(("head", "cat")) as (env, name):
                if env is None:
                    docker_note = name
                else:
                    docker_stream(env, name, 16)  # warm-up
                    docker = [docker_stream(env, name, args.mib) for _ in range(args.runs)]

        results = {
            "accel": info["accel"],
            "mib": args.mib,
            "vsock_floor_mib_s": med(floors),
            "exec_stream_mib_s": med(streams),
            "stream_ratio": med(streams) / med(floors),
            "docker_exec_stream_mib_s": med(docker) if docker else None,
            "first_byte_streamed_ms": med(streamed_fb),
            "first_byte_buffered_ms": med(buffered_fb),
            "first_byte_ratio": med(streamed_fb) / med(buffered_fb),
            "keystroke_echo_ms": med(echoes),
            "burrowd_rss_growth_mib": daemon_growth,
            "agent_rss_growth_mib": agent_growth,
        }
        print(f"burrow streams benchmark ({info['accel']}, {os.cpu_count()} host CPUs, {args.mib} MiB, medians)")
        print(f"  (a) floor: raw vsock out of the VM      {med(floors):8.1f} MiB/s  (runs: {', '.join(f'{x:.0f}' for x in floors)})")
        print(f"  (b) burrow exec ws -- head (streamed)   {med(streams):8.1f} MiB/s  = {med(streams) / med(floors):.2f} x floor (target >= 0.80)")
        if docker:
            print(f"  (c) docker exec c head (runc)           {med(docker):8.1f} MiB/s  (peer)")
        else:
            print(f"  (c) docker exec: skipped, {docker_note}")
        print(f"  (d) first byte: streamed exec           {med(streamed_fb):8.1f} ms     vs buffered {med(buffered_fb):.1f} ms = {med(streamed_fb) / med(buffered_fb):.2f} x (target <= 1.10)")
        print(f"  (e) keystroke echo in a terminal        {med(echoes):8.1f} ms     (target <= 10)")
        print(f"  (f) memory growth during the streams    burrowd {daemon_growth:.1f} MiB + agent {agent_growth:.1f} MiB"
              f" = {daemon_growth + agent_growth:.1f} MiB (target <= 64)")
        print("JSON " + json.dumps(results))
    finally:
        try:
            for w in json.loads(b("ls", "--json")):
                b("destroy", w["id"])
        except Exception as e:  # noqa: BLE001 - best effort clean-up, report and go on
            print(f"clean-up: {e}", file=sys.stderr)
        subprocess.run([b.bin, "--state-dir", state, "daemon", "stop"], env=b.env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(state, ignore_errors=True)
        subprocess.run(["ip", "netns", "delete", netns], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
