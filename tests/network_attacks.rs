//! The network as a root guest would attack it, with real VMs inside network
//! namespaces the tests create: taking another workspace's IP, MAC or ARP
//! identity (and its internet access and DNS answers with them), reaching host
//! services, the metadata address and private ranges, reaching another
//! workspace through a port forward, and a second state dir in the same
//! namespace rewriting the first's rules.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use burrow_tests::{guest_tcp_server, require_root, wait_until, Burrow, Netns};

/// Starts a Python program in namespace `ns` and waits for the `up` it prints.
/// Killed by the returned guard.
struct Process(Child);

impl Process {
    fn start(ns: &str, script: &str, args: &[&str]) -> Process {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", script])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut up = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut up)
            .expect("up");
        assert_eq!(up.trim(), "up", "{script}");
        Process(child)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sh(script: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(script)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "{script}");
}

/// The test's "internet": a namespace one veth away from the host's (192.0.2.1,
/// the host's side 192.0.2.2), which also holds the metadata address
/// 169.254.169.254 and private addresses 10.99.0.1 and 192.168.77.1 (routed
/// there by the host), a TCP server on port 8080 of each, a UDP logger on
/// 192.0.2.1:7777 and a DNS server on 192.0.2.1:53 that log what they receive.
struct Internet {
    // Dropped in this order: the servers, then their namespace.
    _servers: Process,
    _ns: Netns,
}

const INTERNET: &str = r#"
import socket, sys, threading
udp_log, dns_log = sys.argv[1], sys.argv[2]
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('0.0.0.0', 8080)); s.listen()
    while True:
        c = s.accept()[0]; c.sendall(b'internet'); c.close()
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('192.0.2.1', 7777))
    while True:
        d, a = u.recvfrom(2048)
        with open(udp_log, 'a') as f: f.write(d.decode(errors='replace') + '\n')
def dns():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('192.0.2.1', 53))
    while True:
        q, a = u.recvfrom(512); end = 12; labels = []
        while q[end]:
            labels.append(q[end + 1:end + 1 + q[end]].decode(errors='replace')); end += q[end] + 1
        end += 5
        with open(dns_log, 'a') as f: f.write('.'.join(labels) + '\n')
        u.sendto(q[:2] + b'\x81\x80' + q[4:6] + b'\x00\x01\x00\x00\x00\x00' + q[12:end]
                 + b'\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04' + bytes([192, 0, 2, 1]), a)
for f in (tcp, udp, dns):
    threading.Thread(target=f, daemon=True).start()
print('up', flush=True)
threading.Event().wait()
"#;

impl Internet {
    fn new(host: &Netns, logs: &Path) -> Internet {
        let ns = Netns::new(&format!("{}i", host.0)).expect("internet namespace");
        sh(&format!(
            "ip -n {h} link add uplink type veth peer name wan netns {i} && \
             ip -n {h} addr add 192.0.2.2/24 dev uplink && ip -n {h} link set uplink up && \
             ip -n {i} addr add 192.0.2.1/24 dev wan && ip -n {i} link set wan up && \
             ip -n {i} addr add 169.254.169.254/32 dev lo && ip -n {i} addr add 10.99.0.1/32 dev lo && \
             ip -n {i} addr add 192.168.77.1/32 dev lo && \
             ip -n {h} route add 169.254.169.254/32 via 192.0.2.1 && \
             ip -n {h} route add 10.99.0.0/24 via 192.0.2.1 && \
             ip -n {h} route add 192.168.77.0/24 via 192.0.2.1",
            h = host.0,
            i = ns.0
        ));
        let udp = logs.join("udp.log");
        let dns = logs.join("dns.log");
        let servers = Process::start(
            &ns.0,
            INTERNET,
            &[&udp.to_string_lossy(), &dns.to_string_lossy()],
        );
        Internet {
            _servers: servers,
            _ns: ns,
        }
    }
}

/// Run in a guest with `ip:port` arguments: a TCP connection to each, in
/// parallel; prints {"ip:port": connected} as JSON.
const PROBE: &str = r#"
import json, socket, sys, threading
out = {}
def probe(t):
    ip, port = t.rsplit(':', 1)
    try:
        socket.create_connection((ip, int(port)), timeout=3).close(); out[t] = True
    except OSError:
        out[t] = False
ts = [threading.Thread(target=probe, args=(t,)) for t in sys.argv[1:]]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps(out))
"#;

/// Which of `targets` (ip:port) workspace `ws` connects to.
fn reaches(b: &Burrow, ws: &str, targets: &[&str]) -> Vec<(String, bool)> {
    let mut args = vec!["exec", ws, "--", "python3", "/root/probe.py"];
    args.extend(targets);
    let out: serde_json::Value = serde_json::from_str(b.ok(&args).trim()).expect("probe output");
    targets
        .iter()
        .map(|t| (t.to_string(), out[*t] == true))
        .collect()
}

fn all(targets: &[&str], v: bool) -> Vec<(String, bool)> {
    targets.iter().map(|t| (t.to_string(), v)).collect()
}

/// Frames a root guest crafts on eth0 with an AF_PACKET socket.
const SPOOF: &str = r#"
import socket, struct, sys, time
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
mac = lambda s: bytes.fromhex(s.replace(':', ''))
ip = socket.inet_aton
def udp(src, dst, sport, dport, payload):
    u = struct.pack('!HHHH', sport, dport, 8 + len(payload), 0) + payload
    h = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(u), 1, 0, 64, 17, 0, ip(src), ip(dst))
    return h[:10] + struct.pack('!H', csum(h)) + h[12:] + u
def arp(op, sha, spa, tha, tpa):
    return struct.pack('!HHBBH6s4s6s4s', 1, 0x0800, 6, 4, op, mac(sha), ip(spa), mac(tha), ip(tpa))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(('eth0', 0))
send = lambda dst, src, etype, body: s.send(mac(dst) + mac(src) + struct.pack('!H', etype) + body)
cmd, a = sys.argv[1], sys.argv[2:]
if cmd == 'udp':      # dst_mac src_mac src_ip dst_ip dport text
    send(a[0], a[1], 0x0800, udp(a[2], a[3], 40000, int(a[4]), a[5].encode()))
elif cmd == 'dns':    # dst_mac src_mac src_ip dst_ip name
    q = struct.pack('!HHHHHH', 0x4242, 0x0100, 1, 0, 0, 0)
    q += b''.join(bytes([len(l)]) + l.encode() for l in a[4].split('.')) + b'\0' + struct.pack('!HH', 1, 1)
    send(a[0], a[1], 0x0800, udp(a[2], a[3], 40001, 53, q))
elif cmd == 'arp':    # gw_mac my_mac victim_ip gw_ip: "victim_ip is at my_mac", to the gateway and to all
    # Repeated for 3 s: Linux ignores a changed answer within 1 s of the last.
    for _ in range(30):
        send(a[0], a[1], 0x0806, arp(2, a[1], a[2], a[0], a[3]))
        send('ff:ff:ff:ff:ff:ff', a[1], 0x0806, arp(1, a[1], a[2], '00:00:00:00:00:00', a[2]))
        time.sleep(0.1)
print('sent')
"#;

/// burrow's MAC for a workspace address: 02:62 and the address's four bytes.
fn mac_of(ip: &str) -> String {
    let o: Vec<u8> = ip.split('.').map(|x| x.parse().expect("octet")).collect();
    format!("02:62:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// The packet counts of the commented drop rules of a workspace port's chain
/// (none if it has no such chain).
fn drops(ns: &Netns, table: &str, workspace_id: &str) -> std::collections::HashMap<String, u64> {
    let chain = format!("port_bw{workspace_id}");
    let out = ns.exec(&["nft", "list", "chain", "netdev", table, &chain]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .filter_map(|l| {
            let comment = l.split("comment \"").nth(1)?.trim_end_matches('"');
            let packets = l
                .split("packets ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()?;
            Some((comment.to_string(), packets))
        })
        .collect()
}

/// Guest B claims guest A's IP, MAC and ARP identity, and sends a DNS query in
/// A's name: A is allowed out and B is not, so each spoof would give B A's
/// internet access or A's answers, and the ARP one would take A's traffic. All
/// are dropped on B's port and counted; A keeps its connectivity. Then a port
/// forward of A's server: on 127.0.0.1 by default, and even bound to every
/// address with B allowed to reach that host port, B never gets through it.
#[test]
fn a_guest_cannot_take_another_workspaces_identity() {
    require_root!();
    let b = Burrow::new().with_env("BURROW_UPSTREAM_DNS", "192.0.2.1");
    let ns = b.netns.as_ref().expect("a network namespace");
    let logs = tempfile::tempdir().expect("logs");
    let _internet = Internet::new(ns, logs.path());
    b.ok(&["create", "--name", "a"]);
    b.ok(&["create", "--name", "b"]);
    b.ok(&["network-policy", "a", "--allow-internet", "true"]);
    let ip_a = b.info("a")["ip"].as_str().expect("ip of a").to_string();
    let ip_b = b.info("b")["ip"].as_str().expect("ip of b").to_string();
    let id_b = b.info("b")["id"].as_str().expect("id of b").to_string();
    let (mac_a, mac_b) = (mac_of(&ip_a), mac_of(&ip_b));
    assert_eq!(
        b.ok(&["exec", "b", "--", "cat", "/sys/class/net/eth0/address"])
            .trim(),
        mac_b
    );
    let gw = "10.213.0.1";
    let gw_mac =
        String::from_utf8_lossy(&ns.exec(&["cat", "/sys/class/net/burrow0/address"]).stdout)
            .trim()
            .to_string();
    b.start_guest_server("a", &guest_tcp_server("hello from a"));
    let host_reads_a = || {
        let script = format!(
            "import socket; s=socket.create_connection(('{ip_a}', 8000), timeout=5); print(s.recv(100).decode())"
        );
        String::from_utf8_lossy(&ns.exec(&["python3", "-c", &script]).stdout)
            .trim()
            .to_string()
    };
    assert_eq!(host_reads_a(), "hello from a");
    b.run_with_stdin(&["file", "write", "b", "/root/spoof.py"], SPOOF.as_bytes());
    let before = drops(ns, "burrow0", &id_b);

    let spoof = |args: &[&str]| {
        let mut all = vec!["exec", "b", "--", "python3", "/root/spoof.py"];
        all.extend(args);
        assert_eq!(b.ok(&all).trim(), "sent", "{args:?}");
    };
    // IP spoof: A's address from B's MAC, out to the internet A may reach.
    spoof(&[
        "udp",
        &gw_mac,
        &mac_b,
        &ip_a,
        "192.0.2.1",
        "7777",
        "ip-spoof",
    ]);
    // MAC spoof: A's MAC and address both.
    spoof(&[
        "udp",
        &gw_mac,
        &mac_a,
        &ip_a,
        "192.0.2.1",
        "7777",
        "mac-spoof",
    ]);
    // DNS in A's name: the gateway's forwarder answers A, not B.
    spoof(&["dns", &gw_mac, &mac_b, &ip_a, gw, "spoofed.test"]);

    // A's own datagram and query take the same path after the spoofed ones:
    // once they are in, the spoofed ones would have been too.
    b.ok(&[
        "exec",
        "a",
        "--",
        "python3",
        "-c",
        "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'marker', ('192.0.2.1', 7777)); socket.gethostbyname('marker.test')",
    ]);
    let read = |name: &str| std::fs::read_to_string(logs.path().join(name)).unwrap_or_default();
    wait_until(
        "a's own datagram and query",
        Duration::from_secs(30),
        || read("udp.log").contains("marker") && read("dns.log").contains("marker.test"),
    );
    let (udp, dns) = (read("udp.log"), read("dns.log"));
    assert!(!udp.contains("ip-spoof"), "B got out as A: {udp}");
    assert!(!udp.contains("mac-spoof"), "B got out with A's MAC: {udp}");
    assert!(
        !dns.contains("spoofed"),
        "the forwarder answered B's query as A's: {dns}"
    );
    // ARP, last as it would cut A off: "A's address is at B's MAC", to the
    // gateway and gratuitously.
    spoof(&["arp", &gw_mac, &mac_b, &ip_a, gw]);
    let neigh =
        String::from_utf8_lossy(&ns.exec(&["ip", "neigh", "show", &ip_a]).stdout).into_owned();
    assert!(
        !neigh.contains(&mac_b),
        "the host believes B's ARP: {neigh}"
    );
    assert_eq!(host_reads_a(), "hello from a", "A lost its connectivity");
    let after = drops(ns, "burrow0", &id_b);
    for (rule, at_least) in [("spoofed ip", 2), ("spoofed mac", 1), ("spoofed arp", 30)] {
        let was = before.get(rule).copied().unwrap_or(0);
        let now = after.get(rule).copied().unwrap_or(0);
        assert!(now >= was + at_least, "{rule}: {was} -> {now}");
    }

    // Port forwards: on 127.0.0.1 unless told otherwise.
    b.ok(&["port-forward", "add", "a", "8000", "--host-port", "9191"]);
    let list = b.json(&["port-forward", "ls", "a", "--json"]);
    assert_eq!(list[0]["bind"], "127.0.0.1", "{list}");
    b.ok(&["port-forward", "rm", "a", "8000"]);
    // Bound everywhere, with B allowed to reach that host port: still no path
    // from B to A, while the host itself is served.
    b.ok(&[
        "port-forward",
        "add",
        "a",
        "8000",
        "--host-port",
        "9191",
        "--bind",
        "0.0.0.0",
    ]);
    b.ok(&["network-policy", "b", "--allow-host-ports", "9191"]);
    let read_forward = |from_b: bool, ip: &str| {
        let script = format!(
            "import socket\ntry:\n  s=socket.create_connection(('{ip}', 9191), timeout=5); print(s.recv(100).decode())\nexcept OSError as e: print('error', e)"
        );
        let out = if from_b {
            b.run(&["exec", "b", "--", "python3", "-c", &script]).stdout
        } else {
            ns.exec(&["python3", "-c", &script]).stdout
        };
        String::from_utf8_lossy(&out).trim().to_string()
    };
    assert_eq!(read_forward(false, "127.0.0.1"), "hello from a");
    let got = read_forward(true, gw);
    assert!(
        !got.contains("hello from a"),
        "B reached A through the forward: {got}"
    );
    let (_, err) = b.fails(&["port-forward", "add", "a", "22", "--bind", "192.0.2.99"]);
    assert!(err.contains("bind"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// A default workspace reaches nothing on the host but DNS: not a listener on
/// the gateway, on another host address, or on a second interface, until
/// --allow-host-ports opens that port. Allowed out, it still reaches neither the
/// metadata address nor private ranges, until --allow-cidr names them.
#[test]
fn a_guest_reaches_only_what_the_host_serves_it() {
    require_root!();
    let b = Burrow::new();
    let ns = b.netns.as_ref().expect("a network namespace");
    let logs = tempfile::tempdir().expect("logs");
    let _internet = Internet::new(ns, logs.path());
    // Another address of the host, on an interface of its own (a veth pair:
    // this kernel has no dummy interfaces).
    sh(&format!(
        "ip -n {h} link add extra0 type veth peer name extra1 && \
         ip -n {h} addr add 10.77.0.1/24 dev extra0 && \
         ip -n {h} link set extra0 up && ip -n {h} link set extra1 up",
        h = ns.0
    ));
    let _host_service = Process::start(
        &ns.0,
        "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', 8111)); s.listen(); print('up', flush=True)\n\
         while True: s.accept()[0].close()",
        &[],
    );
    b.ok(&["create", "--name", "h"]);
    b.run_with_stdin(&["file", "write", "h", "/root/probe.py"], PROBE.as_bytes());
    let host = ["10.213.0.1:8111", "10.77.0.1:8111", "192.0.2.2:8111"];
    assert_eq!(reaches(&b, "h", &host), all(&host, false), "host services");
    let p = b.json(&[
        "network-policy",
        "h",
        "--allow-host-ports",
        "8111",
        "--json",
    ]);
    assert_eq!(p["allow_host_ports"], serde_json::json!([8111]));
    assert_eq!(
        reaches(&b, "h", &host),
        all(&host, true),
        "opened host port"
    );
    b.ok(&["network-policy", "h", "--allow-host-ports", ""]);
    assert_eq!(
        reaches(&b, "h", &host),
        all(&host, false),
        "cleared host ports"
    );

    let internet = ["192.0.2.1:8080"];
    let private = [
        "169.254.169.254:8080",
        "10.99.0.1:8080",
        "192.168.77.1:8080",
    ];
    assert_eq!(reaches(&b, "h", &internet), all(&internet, false));
    b.ok(&["network-policy", "h", "--allow-internet", "true"]);
    assert_eq!(reaches(&b, "h", &internet), all(&internet, true));
    assert_eq!(
        reaches(&b, "h", &private),
        all(&private, false),
        "private ranges"
    );
    let p = b.json(&[
        "network-policy",
        "h",
        "--allow-cidr",
        "10.99.0.0/24,169.254.169.254/32",
        "--json",
    ]);
    assert_eq!(
        p["allow_cidr"],
        serde_json::json!(["10.99.0.0/24", "169.254.169.254/32"])
    );
    let named = reaches(&b, "h", &private);
    assert_eq!(
        named,
        vec![
            (private[0].to_string(), true),
            (private[1].to_string(), true),
            (private[2].to_string(), false),
        ],
        "named ranges only"
    );

    // Bad input: one line naming the field, nothing changed.
    b.assert_refused(&[
        (
            vec!["network-policy", "h", "--allow-cidr", "10.99.0.1/24"],
            "allow_cidr",
        ),
        (
            vec!["network-policy", "h", "--allow-cidr", "fd00::/8"],
            "allow_cidr",
        ),
        (
            vec!["network-policy", "h", "--allow-host-ports", "0"],
            "allow-host-ports",
        ),
        (
            vec!["network-policy", "h", "--allow-host-ports", "80,x"],
            "allow-host-ports",
        ),
    ]);
    assert_eq!(
        b.json(&["network-policy", "h", "--json"]),
        p,
        "bad input changed the policy"
    );
    b.ok(&["network-policy", "h", "--allow-cidr", ""]);
    assert_eq!(
        reaches(&b, "h", &private),
        all(&private, false),
        "cleared ranges"
    );
}

/// Two state dirs in one namespace: both get networked workspaces, on networks
/// of their own, and the first's rules stay intact (and keep working) while the
/// second starts, runs and stops.
#[test]
fn two_state_dirs_in_one_namespace_keep_their_own_networks() {
    require_root!();
    let first = Burrow::new();
    let ns = first.netns.as_ref().expect("a network namespace");
    let second = Burrow::new().with_env("BURROW_NETNS", &ns.0);
    let _listener = Process::start(
        &ns.0,
        "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', 8111)); s.listen(); print('up', flush=True)\n\
         while True: s.accept()[0].close()",
        &[],
    );
    first.ok(&["create", "--name", "x"]);
    first.ok(&[
        "network-policy",
        "x",
        "--allow-internet",
        "true",
        "--allowed-ports",
        "443",
    ]);
    // The first state dir's tables, without counters; whatever their names.
    let rules = || {
        let all = String::from_utf8_lossy(&ns.exec(&["nft", "-s", "list", "ruleset"]).stdout)
            .into_owned();
        all.split("\ntable ")
            .map(|t| t.trim_start_matches("table ").trim_end())
            .filter(|t| {
                ["inet burrow0 ", "netdev burrow0 ", "inet burrow "]
                    .iter()
                    .any(|name| t.starts_with(name))
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let before = rules();
    assert!(before.contains("10.213.0.2"), "{before}");

    second.ok(&["create", "--name", "y"]);
    assert_eq!(
        rules(),
        before,
        "the second state dir rewrote the first's rules"
    );
    let ip_y = second.info("y")["ip"].as_str().map(str::to_string);
    assert_eq!(
        ip_y.as_deref(),
        Some("10.214.0.2"),
        "the second state dir's workspace"
    );
    // The host reaches y (a refused connection is an answer from its kernel).
    let out = ns.exec(&[
        "python3",
        "-c",
        "import socket; socket.create_connection(('10.214.0.2', 22), timeout=3)",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refused"),
        "y is not on the network: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A policy change of the first still works beside the second.
    first.ok(&["network-policy", "x", "--allow-host-ports", "8111"]);
    first.run_with_stdin(&["file", "write", "x", "/root/probe.py"], PROBE.as_bytes());
    let gateway = ["10.213.0.1:8111"];
    assert_eq!(reaches(&first, "x", &gateway), all(&gateway, true));
    let before = rules();

    second.ok(&["destroy", "y"]);
    second.ok(&["daemon", "stop"]);
    let links = String::from_utf8_lossy(&ns.exec(&["ip", "-br", "link"]).stdout).into_owned();
    assert!(!links.contains("burrow1"), "{links}");
    assert_eq!(
        rules(),
        before,
        "the second state dir's stop took the first's rules"
    );
    assert_eq!(reaches(&first, "x", &gateway), all(&gateway, true));

    // A third given a subnet that overlaps the first's gets no network, and
    // says so: create refuses in one line, nothing of the first is touched.
    let third = Burrow::new()
        .with_env("BURROW_NETNS", &ns.0)
        .with_env("BURROW_SUBNET", "10.213.128.1/17");
    third.ok(&["daemon", "start"]);
    let (_, err) = third.fails(&["create", "--name", "z"]);
    assert!(err.contains("overlaps"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(rules(), before);
}
