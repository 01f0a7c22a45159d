#!/usr/bin/env python3
"""burrow's spine benchmark. Prints medians over repeated runs, in one invocation:

  (a) floor: raw qemu-system-x86_64 boot of the same kernel + initramfs to /init
      (same machine type, memory and accelerator as a workspace; the initramfs's
      `burrow.floor=1` hook reboots as soon as /init runs, and -no-reboot makes QEMU exit)
  (b) `burrow create` until the agent is ready (the CLI returns only then)
  (b'') the same on a daemon started with BURROW_UNCONFINED=1 (no jail, no seccomp
      sandbox, no cgroups: VMMs as root), alternating with (b): the cost of the
      VMM's confinement (target <= 1.05 x)
  (c) `burrow exec ws -- true` round trip
  (d) `docker exec` of `true` on runc, when a Docker engine answers

Each daemon works in a network namespace of its own, made and removed here.

Usage: bench.py BIN_DIR [--runs N] [--exec-runs N] [--smoke]
  --smoke: one iteration of everything, docker skipped, no target judged
"""

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def ms(t0):
    return (time.monotonic() - t0) * 1000.0


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


class Burrow:
    def __init__(self, bin_dir, state, netns, **env):
        self.bin = os.path.join(bin_dir, "burrow")
        self.state = state
        self.env = dict(os.environ, BURROWD=os.path.join(bin_dir, "burrowd"),
                        # the static agent (Makefile: agent)
                        BURROW_AGENT=os.path.join(os.path.dirname(bin_dir), "x86_64-unknown-linux-gnu", os.path.basename(bin_dir), "burrow-agent"),
                        BURROW_NETNS=netns)
        self.env.pop("BURROW_UNCONFINED", None)
        self.env.update(env)

    def __call__(self, *args):
        return run([self.bin, "--state-dir", self.state, *args], env=self.env).stdout

    def spare_ready(self):
        vols = os.path.join(self.state, "volumes")
        return any(n.startswith(".spare-") for n in os.listdir(vols)) if os.path.isdir(vols) else False

    def wait_spare(self, timeout=120):
        deadline = time.monotonic() + timeout
        while not self.spare_ready():
            if time.monotonic() > deadline:
                raise SystemExit("the store's spare volume did not appear")
            time.sleep(0.1)


def floor_boot(qemu_argv, runs):
    """Boots QEMU with the workspace's own kernel, initramfs, machine and memory but
    no devices beyond the console, to /init and straight out again."""
    out = []
    for _ in range(runs):
        d = tempfile.mkdtemp(prefix="burrow-floor-")
        console = os.path.join(d, "console.log")
        argv, i = [qemu_argv[0]], 1
        while i < len(qemu_argv):
            a = qemu_argv[i]
            v = qemu_argv[i + 1] if i + 1 < len(qemu_argv) else ""
            if a in ("-chardev", "-device", "-mon", "-name", "-netdev", "-sandbox"):
                # Devices (the TAP's too: there is none here), control sockets and
                # the seccomp sandbox go; the console stays, in a file of ours
                # (the workspace's goes to its console writer's pipe).
                if a == "-chardev" and v.split(",", 1)[-1].startswith("id=console"):
                    argv += [a, f"file,id=console,path={console}"]
                i += 2
            elif a == "-append":
                argv += [a, v + " burrow.floor=1"]
                i += 2
            else:
                argv.append(a)
                i += 1
        t0 = time.monotonic()
        p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
        elapsed = ms(t0)
        text = open(console, errors="replace").read() if os.path.exists(console) else ""
        shutil.rmtree(d, ignore_errors=True)
        if "BURROW-FLOOR" not in text:
            raise SystemExit(f"floor boot did not reach /init (rc={p.returncode}): {p.stderr.decode()[-300:]} {text[-300:]}")
        out.append(elapsed)
    return out


@contextlib.contextmanager
def docker_container(applets=("sh", "true", "sleep")):
    """A running container on runc, from a busybox image imported from a local
    tarball (there is no registry), with the given applets; yields (env, name) to
    run `docker exec` with, or (None, why) when no Docker engine can serve. Uses the
    engine that answers, or starts a private dockerd (own data root and socket, no
    network set-up)."""
    if shutil.which("docker") is None:
        yield None, "docker is not installed"
        return
    env = dict(os.environ)
    private = None
    if subprocess.run(["docker", "info"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
        if shutil.which("dockerd") is None:
            yield None, "no Docker engine answers and dockerd is not installed"
            return
        private = tempfile.mkdtemp(prefix="bd-", dir="/tmp")
        sock = os.path.join(private, "docker.sock")
        log = open(os.path.join(private, "dockerd.log"), "w")
        daemon = subprocess.Popen(
            ["dockerd", "--data-root", os.path.join(private, "data"), "--exec-root", os.path.join(private, "exec"),
             "-H", f"unix://{sock}", "--pidfile", os.path.join(private, "docker.pid"),
             "--iptables=false", "--bridge=none"], stdout=log, stderr=log)
        env["DOCKER_HOST"] = f"unix://{sock}"
        deadline = time.monotonic() + 60
        while subprocess.run(["docker", "info"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
            if daemon.poll() is not None or time.monotonic() > deadline:
                yield None, f"private dockerd did not start (see {log.name})"
                return
            time.sleep(0.2)
    name = f"burrow-bench-{os.getpid()}"
    try:
        root = tempfile.mkdtemp(prefix="bb-", dir="/tmp")
        os.makedirs(os.path.join(root, "bin"))
        shutil.copy("/bin/busybox", os.path.join(root, "bin", "busybox"))
        for applet in set(applets) | {"sleep"}:
            os.symlink("busybox", os.path.join(root, "bin", applet))
        tar = root + ".tar"
        run(["tar", "-C", root, "-cf", tar, "."])
        run(["docker", "import", tar, "burrow-bench:busybox"], env=env)
        shutil.rmtree(root, ignore_errors=True)
        os.remove(tar)
        run(["docker", "run", "-d", "--network", "none", "--name", name, "burrow-bench:busybox", "sleep", "3600"], env=env)
        yield env, name
    finally:
        subprocess.run(["docker", "rm", "-f", name], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if private:
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
            shutil.rmtree(private, ignore_errors=True)


def docker_exec(runs):
    """docker exec of `true` in a running container on runc."""
    with docker_container() as (env, name):
        if env is None:
            return None, name
        run(["docker", "exec", name, "true"], env=env)
        times = []
        for _ in range(runs):
            t0 = time.monotonic()
            run(["docker", "exec", name, "true"], env=env)
            times.append(ms(t0))
        return times, "busybox image"


def med(xs):
    return statistics.median(xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin_dir")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--exec-runs", type=int, default=30)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.runs, args.exec_runs = 1, 1
    bin_dir = os.path.abspath(args.bin_dir)
    state = tempfile.mkdtemp(prefix="burrow-bench-", dir="/tmp")
    state_u = tempfile.mkdtemp(prefix="burrow-bench-u-", dir="/tmp")
    nets = [f"bbench{os.getpid()}a", f"bbench{os.getpid()}b"]
    for n in nets:
        run(["ip", "netns", "add", n])
    b = Burrow(bin_dir, state, nets[0])
    # The same daemon with the VMM's confinement off (a benchmarking aid only).
    u = Burrow(bin_dir, state_u, nets[1], BURROW_UNCONFINED="1")
    results = {}
    try:
        b("image", "build", "debian")
        b("daemon", "start")
        u("daemon", "start")
        store = json.loads(b("daemon", "status", "--json"))["store"]
        # The copy store prepares a spare copy in the background; Btrfs needs none.
        wait = b.wait_spare if store == "copy" else (lambda: None)
        # Warm-up create: builds the initramfs for this agent, probes the accelerator,
        # imports the image into the store.
        wait()
        b("create", "--name", "warm")
        # The unconfined daemon's own warm-up: its store imports the image too.
        u("create", "--name", "warm-u")
        u("destroy", "warm-u")
        info = json.loads(b("info", "warm", "--json"))
        qemu_pid = info["pids"]["qemu"]
        qemu_argv = open(f"/proc/{qemu_pid}/cmdline", "rb").read().rstrip(b"\0").split(b"\0")
        qemu_argv = [a.decode() for a in qemu_argv]

        creates, creates_cold, creates_u = [], [], []
        for i in range(args.runs):
            # Confined and unconfined alternate, so drift on the host hits both.
            for d, out in ((b, creates), (u, creates_u)):
                if store == "copy":
                    d.wait_spare()
                t0 = time.monotonic()
                d("create", "--name", f"bench-{i}")
                out.append(ms(t0))
                d("destroy", f"bench-{i}")
        if store == "copy":
            # One create with no spare ready: what back-to-back creates cost here.
            wait()
            b("create", "--name", "take-spare")
            t0 = time.monotonic()
            b("create", "--name", "cold")
            creates_cold.append(ms(t0))
            for n in ("take-spare", "cold"):
                b("destroy", n)

        execs = []
        for _ in range(args.exec_runs):
            t0 = time.monotonic()
            b("exec", "warm", "--", "true")
            execs.append(ms(t0))
        b("destroy", "warm")

        floors = floor_boot(qemu_argv, args.runs)
        if args.smoke:
            docker, docker_note = None, "smoke run"
        else:
            docker, docker_note = docker_exec(args.exec_runs)

        results = {
            "accel": info["accel"],
            "floor_boot_ms": med(floors),
            "create_ms": med(creates),
            "create_unconfined_ms": med(creates_u),
            "confinement_ratio": med(creates) / med(creates_u),
            "store": store,
            "create_without_spare_ms": creates_cold[0] if creates_cold else None,
            "exec_ms": med(execs),
            "docker_exec_ms": med(docker) if docker else None,
        }
        print(f"burrow spine benchmark ({info['accel']}, {store} store, {os.cpu_count()} host CPUs, medians)")
        print(f"  (a) floor: qemu boot to /init         {med(floors):8.0f} ms   (runs: {', '.join(f'{x:.0f}' for x in floors)})")
        print(f"  (b) burrow create to agent-ready      {med(creates):8.0f} ms   = {med(creates) / med(floors):.2f} x floor (target <= 1.30)")
        print(f"  (b'') the same, VMM unconfined        {med(creates_u):8.0f} ms   -> confined = {med(creates) / med(creates_u):.2f} x unconfined (target <= 1.05)")
        if creates_cold:
            print(f"      create with no spare volume ready {creates_cold[0]:8.0f} ms   (plain copy of the image)")
        print(f"  (c) burrow exec ws -- true            {med(execs):8.0f} ms   (min {min(execs):.0f}, max {max(execs):.0f})")
        if docker:
            print(f"  (d) docker exec c true (runc)         {med(docker):8.0f} ms   -> exec = {med(execs) / med(docker):.2f} x docker exec (target <= 1.00)")
        else:
            print(f"  (d) docker exec: skipped, {docker_note}")
        print("JSON " + json.dumps(results))
    finally:
        for d in (b, u):
            try:
                for w in json.loads(d("ls", "--json")):
                    d("destroy", w["id"])
            except Exception as e:  # noqa: BLE001 - best effort clean-up, report and go on
                print(f"clean-up: {e}", file=sys.stderr)
            subprocess.run([d.bin, "--state-dir", d.state, "daemon", "stop"], env=d.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            shutil.rmtree(d.state, ignore_errors=True)
        for n in nets:
            subprocess.run(["ip", "netns", "delete", n], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
