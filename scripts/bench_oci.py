#!/usr/bin/env python3
"""burrow's OCI runtime benchmark: docker driving burrow-runtime against docker on runc,
in one run, on two private dockerds (own data root, exec root and socket, no network
set-up): A registers burrow-runtime as the `burrow` runtime; B has burrow-runtime as the
`runc` on its PATH, which is how BuildKit (and the Dagger engine) find their runtime.

  (a) floor: raw qemu-system-x86_64 boot of the container VM's kernel + initramfs to /init
  (b) `docker run --rm img true` on runc            (b') the same with --runtime burrow
      target: (b') <= (a) + (b) + 300 ms
  (c) `docker exec c true` on runc                  (c') on burrow       target: <= 1.5 x
  (d) a 5-step RUN Dockerfile built with BuildKit on runc (A) and through burrow-runtime (B)
  (e) host memory of one running container beside its guest's RAM: burrow-runtime's holder,
      QEMU (its RSS less the guest RAM's mapping), virtiofsd, vhost-device-vsock and the
      console writer; against runc's containerd-shim-runc-v2      target: <= 40 MiB

Usage: bench_oci.py BIN_DIR [--runs N] [--exec-runs N] [--smoke]
  --smoke: one iteration of each, no target judged
"""

import argparse
import contextlib
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import floor_boot, ms, run  # noqa: E402

DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else "docker"
IMAGE = "burrow-bench-oci:busybox"


def med(xs):
    return statistics.median(xs)


@contextlib.contextmanager
def private_dockerd(tag, bin_dir, env_extra, runc_on_path):
    d = tempfile.mkdtemp(prefix=f"bo{tag}-", dir="/tmp")
    sock = os.path.join(d, "docker.sock")
    with open(os.path.join(d, "daemon.json"), "w") as f:
        json.dump({"runtimes": {"burrow": {"path": os.path.join(bin_dir, "burrow-runtime")}}}, f)
    env = dict(os.environ, **env_extra)
    if runc_on_path:
        shim = os.path.join(d, "bin")
        os.makedirs(shim)
        os.symlink(os.path.join(bin_dir, "burrow-runtime"), os.path.join(shim, "runc"))
        env["PATH"] = shim + ":" + env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    log = open(os.path.join(d, "dockerd.log"), "w")
    daemon = subprocess.Popen(
        ["dockerd", "--config-file", os.path.join(d, "daemon.json"), "--data-root", os.path.join(d, "data"),
         "--exec-root", os.path.join(d, "exec"), "-H", f"unix://{sock}", "--pidfile", os.path.join(d, "docker.pid"),
         "--iptables=false", "--ip-masq=false", "--bridge=none"], stdout=log, stderr=log, env=env)
    client = dict(os.environ, DOCKER_HOST=f"unix://{sock}", DOCKER_BUILDKIT="1")
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([DOCKER, "info"], env=client, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL).returncode != 0:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"private dockerd {tag} did not start (see {log.name})")
            time.sleep(0.2)
        yield client
    finally:
        for c in subprocess.run([DOCKER, "ps", "-aq"], env=client, capture_output=True, text=True).stdout.split():
            subprocess.run([DOCKER, "rm", "-f", c], env=client, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        daemon.terminate()
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        shutil.rmtree(d, ignore_errors=True)


def import_image(env):
    root = tempfile.mkdtemp(prefix="bbi-", dir="/tmp")
    try:
        os.makedirs(os.path.join(root, "bin"))
        os.makedirs(os.path.join(root, "tmp"))
        shutil.copy("/bin/busybox", os.path.join(root, "bin", "busybox"))
        for applet in ("sh", "true", "sleep", "echo", "cat", "nproc", "uname"):
            os.symlink("busybox", os.path.join(root, "bin", applet))
        tar = root + ".tar"
        run(["tar", "-C", root, "-cf", tar, "."])
        run([DOCKER, "import", "-c", "ENV PATH=/bin", tar, IMAGE], env=env)
        os.remove(tar)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def timed(cmd, env):
    t0 = time.monotonic()
    run(cmd, env=env)
    return ms(t0)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def rss_without_guest_ram(pid, guest_mib):
    """QEMU's RSS less its largest mapping of at least the guest's RAM size (the RAM)."""
    total, ram, size = 0, 0, 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "Size:":
                size = int(parts[1])
            elif len(parts) >= 2 and parts[0] == "Rss:":
                rss = int(parts[1])
                total += rss
                if size >= guest_mib * 1024 and rss > ram:
                    ram = rss
    return total - ram


def smaps_split(pid, guest_mib=None):
    """A process's memory as smaps shows it, in KiB: the guest's RAM (its largest
    mapping of at least the guest's size), QEMU's TCG translation buffer (its
    anonymous rwx mappings), file-backed pages (the binary, libraries, the
    initramfs: page cache every VM shares), the rest, and the anonymous pages
    (what one more such process adds; page cache is counted once per host)."""
    out = {"ram": 0, "tcg": 0, "files": 0, "anon": 0, "unique": 0}
    maps, cur = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:
                cur = {"perm": parts[1], "path": parts[5] if len(parts) > 5 else "", "Size": 0, "Rss": 0,
                       "Anonymous": 0}
                maps.append(cur)
            elif cur is not None and len(parts) >= 2 and parts[0][:-1] in cur:
                cur[parts[0][:-1]] = int(parts[1])
    ram = None
    if guest_mib:
        big = [m for m in maps if m["Size"] >= guest_mib * 1024]
        ram = max(big, key=lambda m: m["Rss"], default=None)
    for m in maps:
        if m is ram:
            out["ram"] += m["Rss"]
            continue
        out["unique"] += m["Anonymous"]
        if m["perm"] == "rwxp" and not m["path"]:
            out["tcg"] += m["Rss"]
        elif m["path"].startswith("/") and not m["path"].startswith("/memfd"):
            out["files"] += m["Rss"]
        else:
            out["anon"] += m["Rss"]
    return out


def build(env, context, runs):
    out = []
    for _ in range(runs):
        out.append(timed([DOCKER, "build", "--network", "none", "--no-cache", "-q", "-t", "burrow-bench-build", context], env))
    return out


def stop_daemon(burrow, env, state):
    """Stops burrowd and removes its state dir once it has exited (a state dir
    left behind keeps its network's claim)."""
    status = subprocess.run([*burrow, "daemon", "status", "--json"], env=env, capture_output=True, text=True)
    pidfd = None
    if status.returncode == 0:
        with contextlib.suppress(ValueError, KeyError, ProcessLookupError):
            pidfd = os.pidfd_open(int(json.loads(status.stdout)["pid"]))
    subprocess.run([*burrow, "daemon", "stop"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if pidfd is not None:
        # Readable once burrowd has exited.
        select.select([pidfd], [], [], 60)
        os.close(pidfd)
    shutil.rmtree(state, ignore_errors=True)
    if os.path.exists(state):
        print(f"clean-up: {state} could not be removed", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin_dir")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--exec-runs", type=int, default=20)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.runs, args.exec_runs = 1, 1
    if shutil.which("dockerd") is None:
        print("OCI benchmark: skipped, dockerd is not installed")
        return
    bin_dir = os.path.abspath(args.bin_dir)
    state = tempfile.mkdtemp(prefix="burrow-bench-oci-", dir="/tmp")
    netns = f"bboci{os.getpid()}"
    run(["ip", "netns", "add", netns])
    burrow_env = {"BURROW_STATE_DIR": state, "BURROW_NETNS": netns,
                  "BURROWD": os.path.join(bin_dir, "burrowd")}
    burrow = [os.path.join(bin_dir, "burrow"), "--state-dir", state]
    context = tempfile.mkdtemp(prefix="bbctx-", dir="/tmp")
    with open(os.path.join(context, "Dockerfile"), "w") as f:
        f.write(f"FROM {IMAGE}\n" + "".join(f"RUN echo step {i} > /tmp/step{i}\n" for i in range(5)))
    try:
        with private_dockerd("a", bin_dir, burrow_env, False) as a, \
                private_dockerd("b", bin_dir, burrow_env, True) as b:
            for env in (a, b):
                import_image(env)
            # Warm-up: the first container VM builds the initramfs and probes the accelerator.
            run([DOCKER, "run", "--rm", "--network", "none", "--runtime", "burrow", IMAGE, "true"], env=a)
            runc_runs, burrow_runs = [], []
            for _ in range(args.runs):
                runc_runs.append(timed([DOCKER, "run", "--rm", "--network", "none", IMAGE, "true"], a))
                burrow_runs.append(timed([DOCKER, "run", "--rm", "--network", "none", "--runtime", "burrow",
                                          IMAGE, "true"], a))

            run([DOCKER, "run", "-d", "--network", "none", "--name", "on-runc", IMAGE, "sleep", "3600"], env=a)
            run([DOCKER, "run", "-d", "--network", "none", "--name", "on-burrow", "--runtime", "burrow", IMAGE,
                 "sleep", "3600"], env=a)
            execs_runc, execs_burrow = [], []
            for _ in range(args.exec_runs):
                execs_runc.append(timed([DOCKER, "exec", "on-runc", "true"], a))
                execs_burrow.append(timed([DOCKER, "exec", "on-burrow", "true"], a))

            # Memory of the running burrow container, beside its guest's RAM.
            vms = json.loads(run([*burrow, "ls", "--json"], env=dict(os.environ, **burrow_env)).stdout)
            vm = next(w for w in vms if w.get("kind") == "container" and w["state"] == "running")
            pids = vm["pids"]
            holder = int(run([DOCKER, "inspect", "-f", "{{.State.Pid}}", "on-burrow"], env=a).stdout)
            parts = {
                "holder": rss_kib(holder),
                "qemu (less guest RAM)": rss_without_guest_ram(pids["qemu"], vm["memory_mib"]),
                "virtiofsd": rss_kib(pids["virtiofsd"]),
                "vhost-device-vsock": rss_kib(pids["vsock"]),
                "console writer": rss_kib(pids["console"]) if pids.get("console") else 0,
            }
            burrow_mib = sum(parts.values()) / 1024
            qemu_split = smaps_split(pids["qemu"], vm["memory_mib"])
            unique_mib = (qemu_split["unique"] + sum(
                smaps_split(p)["unique"] for p in
                (holder, pids["virtiofsd"], pids["vsock"], pids.get("console")) if p)) / 1024
            runc_pid = int(run([DOCKER, "inspect", "-f", "{{.State.Pid}}", "on-runc"], env=a).stdout)
            shim_pid = int(open(f"/proc/{runc_pid}/stat").read().rsplit(")", 1)[1].split()[1])
            shim_mib = rss_kib(shim_pid) / 1024
            qemu_argv = [x.decode() for x in
                         open(f"/proc/{pids['qemu']}/cmdline", "rb").read().rstrip(b"\0").split(b"\0")]
            for c in ("on-runc", "on-burrow"):
                run([DOCKER, "rm", "-f", c], env=a)

            floors = floor_boot(qemu_argv, args.runs)
            builds_runc = build(a, context, max(1, args.runs // 2))
            builds_burrow = build(b, context, max(1, args.runs // 2))

        target_run = med(floors) + med(runc_runs) + 300
        results = {
            "floor_boot_ms": med(floors),
            "docker_run_runc_ms": med(runc_runs),
            "docker_run_burrow_ms": med(burrow_runs),
            "docker_run_target_ms": target_run,
            "docker_exec_runc_ms": med(execs_runc),
            "docker_exec_burrow_ms": med(execs_burrow),
            "build_runc_ms": med(builds_runc),
            "build_burrow_ms": med(builds_burrow),
            "memory_burrow_mib": burrow_mib,
            "memory_runc_shim_mib": shim_mib,
            "memory_burrow_unique_mib": unique_mib,
            "qemu_tcg_buffer_mib": qemu_split["tcg"] / 1024,
            "qemu_file_pages_mib": qemu_split["files"] / 1024,
        }
        print(f"burrow OCI benchmark ({os.cpu_count()} host CPUs, medians)")
        print(f"  (a) floor: qemu boot to /init                 {med(floors):8.0f} ms")
        print(f"  (b) docker run --rm img true (runc)           {med(runc_runs):8.0f} ms")
        print(f"  (b') docker run --rm --runtime burrow         {med(burrow_runs):8.0f} ms   "
              f"target <= floor + runc + 300 = {target_run:.0f} ms")
        print(f"  (c) docker exec c true (runc)                 {med(execs_runc):8.0f} ms")
        print(f"  (c') docker exec c true (burrow)              {med(execs_burrow):8.0f} ms   "
              f"= {med(execs_burrow) / med(execs_runc):.2f} x runc (target <= 1.5)")
        print(f"  (d) 5-step RUN build, BuildKit on runc        {med(builds_runc):8.0f} ms")
        print(f"  (d') the same through burrow-runtime          {med(builds_burrow):8.0f} ms   "
              f"= {med(builds_burrow) / med(builds_runc):.2f} x runc")
        print(f"  (e) host memory per container, beside guest RAM {burrow_mib:6.1f} MiB   "
              f"(target <= 40; runc's shim {shim_mib:.1f} MiB)")
        for k, v in parts.items():
            print(f"        {k:24} {v / 1024:6.1f} MiB")
        print(f"        qemu: TCG translation buffer {qemu_split['tcg'] / 1024:.1f}, file pages shared by every VM "
              f"(binary, libraries, initramfs) {qemu_split['files'] / 1024:.1f}, other {qemu_split['anon'] / 1024:.1f} MiB")
        print(f"      anonymous memory of all five (what one more container adds) {unique_mib:6.1f} MiB")
        print("JSON " + json.dumps(results))
        if not args.smoke:
            failed = []
            if med(burrow_runs) > target_run:
                failed.append("docker run")
            if med(execs_burrow) > 1.5 * med(execs_runc):
                failed.append("docker exec")
            if burrow_mib > 40:
                failed.append("memory")
            if failed:
                print(f"targets missed: {', '.join(failed)}")
    finally:
        stop_daemon(burrow, dict(os.environ, **burrow_env), state)
        shutil.rmtree(context, ignore_errors=True)
        subprocess.run(["ip", "netns", "delete", netns], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
