#!/usr/bin/env python3
"""burrow's containerd shim benchmark: `ctr` driving containerd-shim-burrow-v2 (runtime
io.containerd.burrow.v2, each task in a microVM of its own) against containerd's own
io.containerd.runc.v2, in one run, on one private containerd (own root, state, sockets
and config in a temp dir, inside a network namespace made here; the runc containers'
state and cgroups under that dir too), the busybox image imported from an OCI archive
built here (no registry).

  (a) floor: raw qemu-system-x86_64 boot of a task VM's kernel + initramfs to /init
  (b) `ctr run --rm img id true` on runc             (b') the same on burrow
      target: (b') <= (a) + (b) + 300 ms
  (c) host memory of one running task beside its guest's RAM: the burrow shim, QEMU
      (its RSS less the guest RAM's mapping), virtiofsd, vhost-device-vsock and the
      console writer; against runc's containerd-shim-runc-v2 for a runc task
      targets: shim <= 8 MiB, the whole <= 40 MiB
  (d) 10 burrow tasks started at once (`ctr run -d` x 10, each back once RUNNING):
      the wall time against 10 x the median single `ctr run -d`
  (e) CRI pod start, as the kubelet starts a pod: RunPodSandbox, CreateContainer and
      StartContainer of one container (burrow-cri-bench, on a second private
      containerd with its CRI plugin on), runtime handler runc against burrow; no
      target: burrow - (floor + runc) is what a pod pays for its VM beyond the boot

Usage: bench_shim.py BIN_DIR [--runs N] [--parallel N] [--smoke]
  --smoke: one iteration of each, 2 tasks in parallel, no target judged
"""

import argparse
import contextlib
import hashlib
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import floor_boot, ms, run  # noqa: E402
from bench_oci import med, rss_kib, rss_without_guest_ram, smaps_split, stop_daemon  # noqa: E402

NAMESPACE = "burrow-bench"
IMAGE = "docker.io/library/burrow-bench-shim:latest"
# The namespace CRI keeps its pods, containers and images in.
CRI_NAMESPACE = "k8s.io"
# The image CRI makes pod sandboxes of (its `sandbox_image`): busybox sleeping for
# ever, as Kubernetes' pause image does; imported, never pulled.
SANDBOX_IMAGE = "docker.io/library/burrow-pause:latest"
RUNTIME = "io.containerd.burrow.v2"
SHIM = "containerd-shim-burrow-v2"
RUNC_SHIM = "containerd-shim-runc-v2"
# containerd 1.6 has its shims' ttrpc sockets here, whatever its state dir.
SHIM_SOCKET_DIR = "/run/containerd/s"
# linux/capability.h
CAP_SYS_RESOURCE = 24
# Every ctr call is bounded: a wedged shim must not hang the benchmark.
CTR_TIMEOUT = 300


def config_toml(d, address, ttrpc, cri=False):
    """Only what the benchmark uses: no snapshotter that probes the host, no opt
    plugin (which would make /opt/containerd): nothing outside `d`. CRI only when
    `cri`, configured as tests/src/containerd.rs does: runtime handler `burrow` is
    io.containerd.burrow.v2, runc's state under `d`, no CNI, the streaming server on
    127.0.0.1 of containerd's network namespace."""
    disabled = "" if cri else '\n  "io.containerd.grpc.v1.cri",'
    return f"""version = 2
root = "{d}/root"
state = "{d}/state"
# CRI unless asked for; snapshotters that probe the host or want a dedicated device;
# opt, which would make /opt/containerd and put it on the shims' PATH. (Not the
# legacy runtime io.containerd.runtime.v1.linux: 1.6's tasks service, and so CRI,
# fail to load without it.)
disabled_plugins = [{disabled}
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.native",
  "io.containerd.internal.v1.opt",
]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{ttrpc}"
""" + (cri_toml(d) if cri else "")


def cri_toml(d):
    # CRI gives a pod's sandbox oom_score_adj -998, which runc cannot set without
    # CAP_SYS_RESOURCE (runc's pods then fail to start): lacking it, CRI's own knob
    # keeps every score at containerd's, for both handlers alike.
    restrict_oom = "" if has_capability(CAP_SYS_RESOURCE) else "\n  restrict_oom_score_adj = true"
    return f"""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"{restrict_oom}
  # Pods' network namespace files under state (unmounted with it), not /var/run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{d}/runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.burrow]
      runtime_type = "{RUNTIME}"
  # Empty: no CNI (not the host's /etc/cni), so pods get no network from CRI.
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/net.d"
  # No mirrors or credentials of the host's.
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"
"""


def has_capability(bit):
    """Whether this process has capability number `bit` in its effective set."""
    with open("/proc/self/status") as f:
        eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return bool(eff >> bit & 1)


class Containerd:
    """A private containerd in network namespace `netns`, its shims finding
    containerd-shim-burrow-v2 first on their PATH (BIN_DIR) and pointed at the
    benchmark's burrowd by `env_extra`; its CRI plugin on when `cri`."""

    def __init__(self, bin_dir, netns, env_extra, cri=False):
        # Short: Unix socket paths are limited to 108 bytes.
        self.dir = tempfile.mkdtemp(prefix="bsc", dir="/tmp")
        self.address = os.path.join(self.dir, "containerd.sock")
        self.cgroup = "burrow-" + os.path.basename(self.dir)
        self.pid = None
        self.proc = None
        config = os.path.join(self.dir, "config.toml")
        with open(config, "w") as f:
            f.write(config_toml(self.dir, self.address, os.path.join(self.dir, "containerd.ttrpc.sock"), cri))
        env = dict(os.environ, **env_extra)
        env["PATH"] = bin_dir + ":" + env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        self.log = os.path.join(self.dir, "containerd.log")
        with open(self.log, "w") as log:
            # nsenter joins the namespace and execs containerd (same pid); unlike
            # `ip netns exec` it mounts no fresh /sys, which would hide the cgroups.
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{netns}", "containerd", "--config", config, "--log-level", "info"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 60
        while not (os.path.exists(self.address) and self.ctr("version", check=False).returncode == 0):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"private containerd did not start:\n{self.log_tail()}")
            time.sleep(0.1)
        # containerd serves even when a plugin failed to load (a config key it
        # refused).
        if cri and not any(f[1:2] == ["cri"] and f[-1] == "ok" for f in
                           map(str.split, self.ctr("plugins", "ls").stdout.splitlines())):
            raise SystemExit(f"containerd's CRI plugin did not load:\n{self.log_tail()}")

    def log_tail(self, n=20):
        with contextlib.suppress(OSError):
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        return ""

    def argv(self, *args, ns=NAMESPACE):
        return ["ctr", "--address", self.address, "--connect-timeout", "10s", "--namespace", ns, *args]

    def ctr(self, *args, check=True, timeout=CTR_TIMEOUT, ns=NAMESPACE):
        p = subprocess.run(self.argv(*args, ns=ns), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise SystemExit(f"ctr -n {ns} {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}\n"
                             f"containerd's log:\n{self.log_tail()}")
        return p

    def timed(self, *args):
        t0 = time.monotonic()
        self.ctr(*args)
        return ms(t0)

    def runc_args(self, cid):
        """runc's state under our dir and its cgroup under our own parent: ctr's
        defaults are shared by every containerd of the host."""
        return ["--runc-root", os.path.join(self.dir, "runc"), "--cgroup", f"/{self.cgroup}/{cid}"]

    def task_status(self, cid):
        for line in self.ctr("task", "ls", check=False).stdout.splitlines():
            f = line.split()
            if f and f[0] == cid:
                return f[2] if len(f) > 2 else ""
        return None

    def shim_pids(self, binary, cid=None):
        """Live shims of this containerd named `binary` (their `-address` is our
        socket), of task `cid` when given (`-id cid`)."""
        out = []
        for e in os.listdir("/proc"):
            if not e.isdigit():
                continue
            try:
                with open(f"/proc/{e}/cmdline", "rb") as f:
                    argv = [a.decode(errors="replace") for a in f.read().split(b"\0")]
                with open(f"/proc/{e}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        continue
            except (OSError, IndexError):
                continue
            pairs = list(zip(argv, argv[1:]))
            if (os.path.basename(argv[0]) == binary and ("-address", self.address) in pairs
                    and (cid is None or ("-id", cid) in pairs)):
                out.append(int(e))
        return sorted(out)

    def delete(self, cid):
        """Kills and deletes task `cid` and removes its container."""
        self.ctr("task", "delete", "-f", cid, check=False)
        self.ctr("container", "rm", cid, check=False)

    def close(self):
        """Everything of this containerd goes: its tasks and containers of every
        namespace (through it, so that each shim cleans up after itself), containerd
        itself, what still names our dir (shims it could not make exit), runc state,
        shim sockets, mounts, cgroups, the dir."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                for ns in self.ctr("namespaces", "ls", "-q", check=False, timeout=60).stdout.split():
                    ids = self.ctr("container", "ls", "-q", check=False, timeout=60, ns=ns).stdout.split()
                    for cid in ids:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            self.ctr("task", "delete", "-f", cid, check=False, timeout=60, ns=ns)
                            self.ctr("container", "rm", cid, check=False, timeout=60, ns=ns)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        left = [p for p in pids_naming(self.dir) if p != os.getpid()]
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        for p in left:
            wait_gone(p, 10)
        runc_root = os.path.join(self.dir, "runc")
        if os.path.isdir(runc_root):
            for ns in os.listdir(runc_root):
                for c in os.listdir(os.path.join(runc_root, ns)):
                    subprocess.run(["runc", "--root", os.path.join(runc_root, ns), "delete", "-f", c],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Sockets of shims that did not remove theirs: named by the hash of
        # "<address>/<namespace>/<id>" (containerd 1.6's shim.SocketAddress).
        bundles = os.path.join(self.dir, "state", "io.containerd.runtime.v2.task")
        if os.path.isdir(bundles):
            for ns in os.listdir(bundles):
                for task in os.listdir(os.path.join(bundles, ns)):
                    key = os.path.join(self.address, ns, task).encode()
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(SHIM_SOCKET_DIR, hashlib.sha256(key).hexdigest()))
        for m in mounts_under(self.dir):
            subprocess.run(["umount", "-l", m], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for cg in cgroup_dirs(self.cgroup):
            remove_cgroup(cg)
        shutil.rmtree(self.dir, ignore_errors=True)
        if os.path.exists(self.dir):
            print(f"clean-up: {self.dir} could not be removed", file=sys.stderr)


def pids_naming(d):
    needle = d.encode()
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{e}/cmdline", "rb") as f:
                    if needle in f.read():
                        out.append(int(e))
    return out


def wait_gone(pid, timeout):
    """Until `pid` has exited (its pidfd turns readable), at most `timeout` s."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [], max(0.0, timeout))
    finally:
        os.close(fd)


def mounts_under(d):
    """Mount points under `d`, deepest first."""
    prefix = d.rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split(" ")[4] for line in f if line.split(" ")[4].startswith(prefix)]
    return sorted(mounts, key=len, reverse=True)


def cgroup_dirs(name):
    """`name` at the top of every cgroup hierarchy (v2's and each v1 controller's)."""
    top = "/sys/fs/cgroup"
    dirs = [os.path.join(top, name)]
    with contextlib.suppress(OSError):
        dirs += [os.path.join(top, e, name) for e in os.listdir(top) if os.path.isdir(os.path.join(top, e))]
    return dirs


def remove_cgroup(d):
    """An empty cgroup and its empty children, deepest first."""
    if not os.path.isdir(d):
        return
    for e in os.listdir(d):
        if os.path.isdir(os.path.join(d, e)):
            remove_cgroup(os.path.join(d, e))
    with contextlib.suppress(OSError):
        os.rmdir(d)


# --- The image: an OCI image layout of one busybox layer, as a tar archive ----

def _tar(entries):
    """A ustar archive of (name, kind, mode, data|link) entries, owned by root,
    mtime 0: the same tree always gives the same digest."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, kind, mode, payload in entries:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime, info.uid, info.gid = mode, 0, 0, 0
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            elif kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, payload
                t.addfile(info)
            else:
                info.size = len(payload)
                t.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def busybox_layer(applets=("sh", "true", "sleep", "cat", "echo")):
    entries = [(d + "/", "dir", 0o755, None) for d in ("bin", "dev", "etc", "proc", "sys", "tmp")]
    with open("/bin/busybox", "rb") as f:
        entries.append(("bin/busybox", "file", 0o755, f.read()))
    entries += [(f"bin/{a}", "link", 0o777, "busybox") for a in applets]
    entries.append(("etc/group", "file", 0o644, b"root:x:0:\n"))
    entries.append(("etc/passwd", "file", 0o644, b"root:x:0:0:root:/:/bin/sh\n"))
    return _tar(sorted(entries))


def oci_archive(name, layer, cmd):
    def digest(blob):
        return "sha256:" + hashlib.sha256(blob).hexdigest()

    def descriptor(media_type, blob):
        return {"mediaType": media_type, "digest": digest(blob), "size": len(blob)}

    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    config = json.dumps({
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/bin:/usr/bin"], "Cmd": cmd},
        # Uncompressed: the layer's digest is its diff id.
        "rootfs": {"type": "layers", "diff_ids": [digest(layer)]},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", layer)],
    }).encode()
    entry = descriptor("application/vnd.oci.image.manifest.v1+json", manifest)
    entry["platform"] = {"architecture": arch, "os": "linux"}
    # ctr image import names the image after this annotation.
    entry["annotations"] = {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]}
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [entry]}).encode()
    entries = [("oci-layout", "file", 0o644, b'{"imageLayoutVersion":"1.0.0"}'),
               ("index.json", "file", 0o644, index),
               ("blobs/", "dir", 0o755, None), ("blobs/sha256/", "dir", 0o755, None)]
    entries += [(f"blobs/sha256/{digest(b)[7:]}", "file", 0o644, b) for b in (layer, config, manifest)]
    return _tar(entries)


def import_image(c, name=IMAGE, cmd=("sh",), ns=NAMESPACE):
    archive = os.path.join(c.dir, "image.tar")
    with open(archive, "wb") as f:
        f.write(oci_archive(name, busybox_layer(), list(cmd)))
    c.ctr("image", "import", archive, ns=ns)
    os.remove(archive)


# --- The measures ------------------------------------------------------------

def start_detached(c, cid, runc=False):
    """`ctr run -d` of a sleeping task: back once it runs. Returns the ms taken."""
    flags = c.runc_args(cid) if runc else ["--runtime", RUNTIME]
    t = c.timed("run", "-d", *flags, IMAGE, cid, "sleep", "3600")
    status = c.task_status(cid)
    if status != "RUNNING":
        raise SystemExit(f"task {cid} is {status} after ctr run -d")
    return t


def parallel_starts(c, ids):
    """`ctr run -d` of every id at once; the wall time until the last is back."""
    t0 = time.monotonic()
    procs = [(cid, subprocess.Popen(c.argv("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "3600"),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)) for cid in ids]
    failed = []
    for cid, p in procs:
        try:
            _, err = p.communicate(timeout=CTR_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode != 0:
            failed.append(f"{cid}: {err.strip()}")
    wall = ms(t0)
    if failed:
        raise SystemExit("parallel ctr run -d failed: " + "; ".join(failed))
    not_running = [cid for cid in ids if c.task_status(cid) != "RUNNING"]
    if not_running:
        raise SystemExit(f"not RUNNING after ctr run -d: {not_running}")
    return wall


def vm_of_task(burrow, env, c, cid):
    """The burrow VM of task `cid` of our containerd (its container's root is
    "<containerd's address>/<namespace>", as the shim scopes ids)."""
    root = f"{c.address}/{NAMESPACE}"
    for w in json.loads(run([*burrow, "ls", "--json"], env=env).stdout):
        ctn = w.get("container") or {}
        if ctn.get("id") == cid and ctn.get("root") == root and w.get("state") == "running":
            return w
    raise SystemExit(f"no running burrow VM for task {cid}")


def wait_no_shims(c, timeout=60):
    """Until no shim of `c` is left: a pod's shim (and a burrow pod's VM) goes away
    after RemovePodSandbox returns, and must not weigh on the next pod's start."""
    deadline = time.monotonic() + timeout
    for pid in c.shim_pids(SHIM) + c.shim_pids(RUNC_SHIM):
        wait_gone(pid, deadline - time.monotonic())
    left = c.shim_pids(SHIM) + c.shim_pids(RUNC_SHIM)
    if left:
        raise SystemExit(f"shims of removed pods still run after {timeout} s: {left}")


def cri_pod_starts(bin_dir, netns, burrow_env, runs):
    """(e): pods started through CRI by burrow-cri-bench, on a containerd of their
    own with CRI on; runc and burrow alternating, after one warm-up pod of each.
    Returns the ms of each handler's runs, {"runc": [...], "burrow": [...]}."""
    bench = os.path.join(bin_dir, "burrow-cri-bench")
    if not os.path.exists(bench):
        raise SystemExit(f"{bench} missing: build the binaries first (cargo build --workspace --bins)")
    c = Containerd(bin_dir, netns, burrow_env, cri=True)
    try:
        import_image(c, SANDBOX_IMAGE, ("sleep", "infinity"), CRI_NAMESPACE)
        import_image(c, IMAGE, ("sh",), CRI_NAMESPACE)
        logs = os.path.join(c.dir, "pod-logs")
        os.mkdir(logs)
        # The kubelet always gives a cgroup parent: ours keeps runc's pods apart from
        # other containerds' (CRI's default is /k8s.io/ID).
        argv = [bench, "--address", c.address, "--image", IMAGE, "--logs", logs,
                "--cgroup-parent", f"/{c.cgroup}", "--runs", "1"]

        def pod_start(handler):
            p = subprocess.run([*argv, "--handler", handler], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, timeout=CTR_TIMEOUT)
            if p.returncode != 0:
                raise SystemExit(f"burrow-cri-bench --handler {handler} failed ({p.returncode}): "
                                 f"{p.stderr.strip()}\ncontainerd's log:\n{c.log_tail()}")
            wait_no_shims(c)
            return json.loads(p.stdout)["runs_ms"]

        # Warm-up: CRI's first pod of each handler pages in the pause image's
        # snapshot and the runtimes' binaries.
        pod_start("runc")
        pod_start("burrow")
        out = {"runc": [], "burrow": []}
        for _ in range(runs):
            # Alternating, so that drift on the host hits both.
            for handler in ("runc", "burrow"):
                out[handler] += pod_start(handler)
        return out
    finally:
        c.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin_dir")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--parallel", type=int, default=10)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.runs, args.parallel = 1, 2
    # A TERM (make interrupted, a CI timeout) cleans up as a failure does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if os.geteuid() != 0:
        print("containerd shim benchmark: skipped, a private containerd needs root")
        return
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        print("containerd shim benchmark: skipped, containerd is not installed")
        return
    bin_dir = os.path.abspath(args.bin_dir)
    state = tempfile.mkdtemp(prefix="burrow-bench-shim-", dir="/tmp")
    netns = f"bbshim{os.getpid()}"
    run(["ip", "netns", "add", netns])
    run(["ip", "-n", netns, "link", "set", "lo", "up"])
    burrow_env = {"BURROW_STATE_DIR": state, "BURROW_NETNS": netns,
                  "BURROWD": os.path.join(bin_dir, "burrowd"),
                  # the static agent (Makefile: agent)
                  "BURROW_AGENT": os.path.join(os.path.dirname(bin_dir), "x86_64-unknown-linux-gnu",
                                               os.path.basename(bin_dir), "burrow-agent")}
    env = dict(os.environ, **burrow_env)
    burrow = [os.path.join(bin_dir, "burrow"), "--state-dir", state]
    c = None
    try:
        c = Containerd(bin_dir, netns, burrow_env)
        import_image(c)
        # Warm-up: starts burrowd, builds the initramfs for this agent, probes the
        # accelerator; runc's first run pages its binaries in.
        c.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, "warm", "true")
        c.ctr("run", "--rm", *c.runc_args("warm-r"), IMAGE, "warm-r", "true")

        runc_runs, burrow_runs = [], []
        for i in range(args.runs):
            # Alternating, so that drift on the host hits both.
            runc_runs.append(c.timed("run", "--rm", *c.runc_args(f"r{i}"), IMAGE, f"r{i}", "true"))
            burrow_runs.append(c.timed("run", "--rm", "--runtime", RUNTIME, IMAGE, f"b{i}", "true"))

        # Single detached starts; the first task stays for the memory measure.
        starts = [start_detached(c, "on-burrow")]
        for i in range(1, args.runs):
            starts.append(start_detached(c, f"s{i}"))
            c.delete(f"s{i}")
        start_detached(c, "on-runc", runc=True)

        # Memory of the running burrow task, beside its guest's RAM.
        vm = vm_of_task(burrow, env, c, "on-burrow")
        pids = vm["pids"]
        shims = c.shim_pids(SHIM, "on-burrow")
        if len(shims) != 1:
            raise SystemExit(f"expected one burrow shim for on-burrow, found {shims}")
        shim_kib = rss_kib(shims[0])
        parts = {
            "shim": shim_kib,
            "qemu (less guest RAM)": rss_without_guest_ram(pids["qemu"], vm["memory_mib"]),
            "virtiofsd": rss_kib(pids["virtiofsd"]),
            "vhost-device-vsock": rss_kib(pids["vsock"]),
            "console writer": rss_kib(pids["console"]) if pids.get("console") else 0,
        }
        burrow_mib = sum(parts.values()) / 1024
        qemu_split = smaps_split(pids["qemu"], vm["memory_mib"])
        unique_mib = (qemu_split["unique"] + sum(
            smaps_split(p)["unique"] for p in
            (shims[0], pids["virtiofsd"], pids["vsock"], pids.get("console")) if p)) / 1024
        runc_shims = c.shim_pids(RUNC_SHIM, "on-runc")
        if len(runc_shims) != 1:
            raise SystemExit(f"expected one runc shim for on-runc, found {runc_shims}")
        runc_shim_mib = rss_kib(runc_shims[0]) / 1024
        qemu_argv = [x.decode() for x in
                     open(f"/proc/{pids['qemu']}/cmdline", "rb").read().rstrip(b"\0").split(b"\0")]
        for cid in ("on-burrow", "on-runc"):
            c.delete(cid)

        # Many at once.
        ids = [f"p{i}" for i in range(args.parallel)]
        parallel_ms = parallel_starts(c, ids)
        t0 = time.monotonic()
        for cid in ids:
            c.delete(cid)
        teardown_ms = ms(t0)

        floors = floor_boot(qemu_argv, args.runs)

        pods = cri_pod_starts(bin_dir, netns, burrow_env, args.runs)
        pod_runc, pod_burrow = med(pods["runc"]), med(pods["burrow"])
        pod_excess = pod_burrow - (med(floors) + pod_runc)

        target_run = med(floors) + med(runc_runs) + 300
        serial_ms = args.parallel * med(starts)
        results = {
            "floor_boot_ms": med(floors),
            "ctr_run_runc_ms": med(runc_runs),
            "ctr_run_burrow_ms": med(burrow_runs),
            "ctr_run_target_ms": target_run,
            "ctr_run_detached_burrow_ms": med(starts),
            "memory_shim_mib": shim_kib / 1024,
            "memory_burrow_mib": burrow_mib,
            "memory_burrow_unique_mib": unique_mib,
            "memory_runc_shim_mib": runc_shim_mib,
            "qemu_tcg_buffer_mib": qemu_split["tcg"] / 1024,
            "qemu_file_pages_mib": qemu_split["files"] / 1024,
            "parallel_tasks": args.parallel,
            "parallel_start_ms": parallel_ms,
            "serial_start_ms": serial_ms,
            "parallel_ratio": parallel_ms / serial_ms,
            "parallel_teardown_ms": teardown_ms,
            "cri_pod_start_runc_ms": pod_runc,
            "cri_pod_start_burrow_ms": pod_burrow,
            "cri_pod_start_burrow_over_runc": pod_burrow / pod_runc,
            "cri_pod_start_excess_ms": pod_excess,
        }
        print(f"burrow containerd shim benchmark ({os.cpu_count()} host CPUs, medians of {args.runs})")
        print(f"  (a) floor: qemu boot to /init                  {med(floors):8.0f} ms")
        print(f"  (b) ctr run --rm img id true (runc)            {med(runc_runs):8.0f} ms")
        print(f"  (b') the same, --runtime {RUNTIME} {med(burrow_runs):5.0f} ms   "
              f"target <= floor + runc + 300 = {target_run:.0f} ms")
        print(f"  (c) host memory per task, beside guest RAM     {burrow_mib:8.1f} MiB   "
              f"(target <= 40; runc's shim {runc_shim_mib:.1f} MiB)")
        for k, v in parts.items():
            print(f"        {k:24} {v / 1024:6.1f} MiB{'   (target <= 8)' if k == 'shim' else ''}")
        print(f"        qemu: TCG translation buffer {qemu_split['tcg'] / 1024:.1f}, file pages shared by every VM "
              f"(binary, libraries, initramfs) {qemu_split['files'] / 1024:.1f}, other {qemu_split['anon'] / 1024:.1f} MiB")
        print(f"      anonymous memory of all five (what one more task adds) {unique_mib:6.1f} MiB")
        print(f"  (d) {args.parallel} x ctr run -d at once (burrow)         {parallel_ms:8.0f} ms   "
              f"= {parallel_ms / serial_ms:.2f} x {args.parallel} x one ctr run -d ({med(starts):.0f} ms); "
              f"all killed and deleted in {teardown_ms:.0f} ms")
        print("  (e) CRI pod start, RunPodSandbox to StartContainer of one container")
        print(f"        runtime handler runc                     {pod_runc:8.0f} ms   "
              f"(runs: {', '.join(f'{x:.0f}' for x in pods['runc'])})")
        print(f"        runtime handler burrow                   {pod_burrow:8.0f} ms   "
              f"(runs: {', '.join(f'{x:.0f}' for x in pods['burrow'])})")
        print(f"        burrow = {pod_burrow / pod_runc:.1f} x runc; burrow - (floor + runc) = {pod_excess:+.0f} ms "
              f"(floor {med(floors):.0f} ms)")
        print("JSON " + json.dumps(results))
        if args.smoke:
            print("targets not judged (smoke run)")
        else:
            for name, met in (("ctr run (b') <= floor + runc + 300 ms", med(burrow_runs) <= target_run),
                              ("shim RSS <= 8 MiB", shim_kib / 1024 <= 8),
                              ("memory per task <= 40 MiB", burrow_mib <= 40)):
                print(f"target {'met' if met else 'missed'}: {name}")
    finally:
        if c is not None:
            c.close()
        # VMs the shims did not destroy, then burrowd, then its state dir.
        with contextlib.suppress(Exception):
            ls = subprocess.run([*burrow, "ls", "--json"], env=env, capture_output=True, text=True, timeout=60)
            if ls.returncode == 0:
                for w in json.loads(ls.stdout):
                    subprocess.run([*burrow, "destroy", w["id"]], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, timeout=120)
        stop_daemon(burrow, env, state)
        subprocess.run(["ip", "netns", "delete", netns], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
