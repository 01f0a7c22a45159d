#!/usr/bin/env python3
"""burrow's network throughput benchmark, medians in one invocation:

  - TCP guest -> guest (both workspaces allow inter-VM traffic: routed by the host
    through the nftables forward chain), with the per-port identity checks (the
    `netdev burrow0` table on every TAP's ingress) and without them: the table is
    deleted with `nft` in the bench's namespace for the "without" transfer, then
    restored by restarting burrow-netd (which rebuilds it for the running VMs);
    which of the two goes first alternates, so warm-up and drift hit both alike;
  - TCP guest -> host (its gateway; the workspace's policy opens the port);
  - the floor: the same transfer between two plain network namespaces on a veth pair.

The same Python sender and receiver run everywhere (the guests have no iperf3).
Everything happens inside network namespaces this script creates and removes.

Usage: bench_network.py BIN_DIR [--runs N] [--mb M] [--smoke]
  --smoke: one 5 MB transfer of each kind, no target checked (for `make test`).
"""

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import tempfile
import time

RECEIVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen()
print('up', flush=True)
while True:
    c, _ = s.accept(); n = 0
    while True:
        b = c.recv(1 << 20)
        if not b: break
        n += len(b)
    c.sendall(str(n).encode()); c.close()
"""

SENDER = """
import socket, sys, time
total = int(sys.argv[3]) << 20; block = b'\\0' * (1 << 16)
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
t = time.monotonic(); sent = 0
while sent < total:
    c.sendall(block); sent += len(block)
c.shutdown(socket.SHUT_WR)
got = int(c.recv(64)); dt = time.monotonic() - t
assert got == sent, (got, sent)
print(sent / dt / 1e6)
"""


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw).stdout


class Burrow:
    def __init__(self, bin_dir, state, netns):
        self.bin = os.path.join(bin_dir, "burrow")
        self.state = state
        self.env = dict(os.environ, BURROWD=os.path.join(bin_dir, "burrowd"),
                        # the static agent (Makefile: agent)
                        BURROW_AGENT=os.path.join(os.path.dirname(bin_dir), "x86_64-unknown-linux-gnu", os.path.basename(bin_dir), "burrow-agent"), BURROW_NETNS=netns)

    def __call__(self, *args, stdin=None):
        p = subprocess.run([self.bin, "--state-dir", self.state, *args], env=self.env, input=stdin,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            raise SystemExit(f"burrow {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout


def netdev_table(ns):
    p = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "netdev", "burrow0"],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return p.stdout if p.returncode == 0 else ""


def restart_netd(b, state, ns):
    """Ends this bench's burrow-netd (by its recorded pid) and has burrowd start
    it again; it rebuilds its tables, the identity checks of running VMs included."""
    with open(os.path.join(state, "netd.pid")) as f:
        pid = int(f.read().strip())
    os.kill(pid, 9)
    try:
        fd = os.pidfd_open(pid)
        select.select([fd], [], [], 10)
        os.close(fd)
    except ProcessLookupError:
        pass
    b("network-policy", "g1", "--json")  # the next request starts netd again
    if "port_bw" not in netdev_table(ns):
        raise SystemExit("the identity checks did not come back with burrow-netd")


def listener(prefix, ip, port):
    p = subprocess.Popen(prefix + ["python3", "-c", RECEIVER, ip, str(port)], stdout=subprocess.PIPE, text=True)
    p.stdout.readline()
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin_dir")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.runs, args.mb = 1, 5
    tag = f"bnb{os.getpid()}"
    host, fa, fb = tag + "h", tag + "a", tag + "b"
    state = tempfile.mkdtemp(prefix="burrow-benchn-", dir="/tmp")
    procs = []
    for ns in (host, fa, fb):
        run(["ip", "netns", "add", ns])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
    b = Burrow(os.path.abspath(args.bin_dir), state, host)
    try:
        # The floor: two namespaces, one veth pair.
        run(["ip", "-n", fa, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", fb])
        run(["ip", "-n", fa, "addr", "add", "198.18.0.1/24", "dev", "va"])
        run(["ip", "-n", fb, "addr", "add", "198.18.0.2/24", "dev", "vb"])
        run(["ip", "-n", fa, "link", "set", "va", "up"])
        run(["ip", "-n", fb, "link", "set", "vb", "up"])
        procs.append(listener(["ip", "netns", "exec", fb], "198.18.0.2", 5001))
        floor = [float(run(["ip", "netns", "exec", fa, "python3", "-c", SENDER, "198.18.0.2", "5001", str(args.mb)]))
                 for _ in range(args.runs)]

        b("create", "--name", "g1")
        b("create", "--name", "g2")
        for w in ("g1", "g2"):
            b("network-policy", w, "--allow-inter-vm", "true")
            b("file", "write", w, "/root/recv.py", stdin=RECEIVER)
            b("file", "write", w, "/root/send.py", stdin=SENDER)
        ip2 = json.loads(b("info", "g2", "--json"))["ip"]
        job = b("job", "start", "g2", "--", "python3", "/root/recv.py", "0.0.0.0", "5001").strip()
        # The receiver prints `up` once it listens.
        deadline = time.monotonic() + 60
        while "up" not in json.loads(b("job", "poll", "g2", job, "--json"))["stdout"]:
            if time.monotonic() > deadline:
                raise SystemExit("the receiver in g2 did not come up")
            time.sleep(0.2)
        send = lambda ip, port: float(b("exec", "g1", "--timeout", "600", "--", "python3", "/root/send.py",
                                        ip, str(port), str(args.mb)))
        if "port_bw" not in netdev_table(host):
            raise SystemExit("no identity checks on the workspaces' ports")
        g2g, bare = [], []
        for i in range(args.runs):
            # Alternate which goes first, so that warm-up and drift hit both alike.
            if i % 2 == 0:
                g2g.append(send(ip2, 5001))
            run(["ip", "netns", "exec", host, "nft", "delete", "table", "netdev", "burrow0"])
            bare.append(send(ip2, 5001))
            restart_netd(b, state, host)
            if i % 2 == 1:
                g2g.append(send(ip2, 5001))
        b("network-policy", "g1", "--allow-host-ports", "5002")
        procs.append(listener(["ip", "netns", "exec", host], "10.213.0.1", 5002))
        g2h = [float(b("exec", "g1", "--timeout", "600", "--", "python3", "/root/send.py", "10.213.0.1", "5002", str(args.mb)))
               for _ in range(args.runs)]

        med = statistics.median
        print(f"burrow network throughput ({args.mb} MB per transfer, medians of {args.runs}, MB/s)")
        print(f"  floor: veth between two namespaces   {med(floor):8.0f}")
        ratio = med(g2g) / med(bare)
        print(f"  guest -> guest (routed, filtered)    {med(g2g):8.0f}   = {med(g2g) / med(floor):.2f} x floor")
        print(f"  the same without identity checks     {med(bare):8.0f}   -> with / without = {ratio:.2f} x"
              + ("" if args.smoke else f" (target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})"))
        print(f"  guest -> host                        {med(g2h):8.0f}   = {med(g2h) / med(floor):.2f} x floor")
        if args.smoke:
            print("  (smoke run: one transfer each, no target checked)")
    finally:
        for p in procs:
            p.kill()
        try:
            for w in ("g1", "g2"):
                subprocess.run([b.bin, "--state-dir", state, "destroy", w], env=b.env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            subprocess.run([b.bin, "--state-dir", state, "daemon", "stop"], env=b.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            for ns in (host, fa, fb):
                subprocess.run(["ip", "netns", "del", ns])
            shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
