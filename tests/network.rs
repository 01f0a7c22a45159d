//! The workspaces' network with real VMs, inside a network namespace this test
//! creates (burrow-netd joins it): every workspace has an address and reaches its
//! gateway (the host), the host reaches it, and no workspace reaches another.
//! Destroying releases the addresses; a clean stop removes bridge, table and netd.

use std::process::Command;
use std::time::Duration;

use burrow_tests::{guest_tcp_server, require_root, Burrow};

/// A Python one-liner that exits 0 if a TCP connection to ip:port succeeds.
fn connect(ip: &str, port: u16) -> String {
    format!("import socket; socket.create_connection(('{ip}', {port}), timeout=3).close()")
}

#[test]
fn workspaces_reach_the_host_and_not_each_other() {
    require_root!();
    let b = Burrow::new();
    let ns = b.netns.as_ref().expect("a network namespace");
    b.ok(&["create", "--name", "a"]);
    b.ok(&["create", "--name", "b"]);
    let ip_a = b.info("a")["ip"].as_str().expect("ip of a").to_string();
    let ip_b = b.info("b")["ip"].as_str().expect("ip of b").to_string();
    assert_eq!((ip_a.as_str(), ip_b.as_str()), ("10.213.0.2", "10.213.0.3"));

    b.start_guest_server("b", &guest_tcp_server("hello from b"));
    // The host (the namespace) reaches b.
    let out = ns.exec(&["python3", "-c", &connect(&ip_b, 8000)]);
    assert!(
        out.status.success(),
        "host -> b: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // a reaches its gateway where the host serves it: a listener on the host
    // side answers once a's policy opens its port.
    b.ok(&["network-policy", "a", "--allow-host-ports", "8111"]);
    let mut listener = Command::new("ip")
        .args(["netns", "exec", &ns.0, "python3", "-c"])
        .arg("import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('10.213.0.1', 8111)); s.listen(); print('up', flush=True)\nwhile True: s.accept()[0].close()")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("listener");
    let mut up = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(listener.stdout.take().expect("stdout")),
        &mut up,
    )
    .expect("listener up");
    let to_gateway = b.run(&[
        "exec",
        "a",
        "--",
        "python3",
        "-c",
        &connect("10.213.0.1", 8111),
    ]);
    let _ = listener.kill();
    let _ = listener.wait();
    assert!(to_gateway.status.success(), "a -> gateway");
    // a does not reach b.
    let out = b.run(&["exec", "a", "--", "python3", "-c", &connect(&ip_b, 8000)]);
    assert!(!out.status.success(), "a reached b");

    // Port forwards: a host port relays to b's port, from the host itself too.
    let read_from = |port: &str| {
        let script = format!(
            "import socket; s=socket.create_connection(('127.0.0.1', {port}), timeout=5); print(s.recv(100).decode())"
        );
        let out = ns.exec(&["python3", "-c", &script]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let auto = b
        .ok(&["port-forward", "add", "b", "8000"])
        .trim()
        .to_string();
    assert!(auto.parse::<u16>().is_ok_and(|p| p >= 1024), "{auto}");
    assert_eq!(read_from(&auto), "hello from b");
    b.ok(&["port-forward", "rm", "b", "8000"]);
    let fixed = b.json(&[
        "port-forward",
        "add",
        "b",
        "8000",
        "--host-port",
        "9090",
        "--json",
    ]);
    assert_eq!(fixed["host_port"], 9090);
    assert_eq!(read_from("9090"), "hello from b");
    let list = b.json(&["port-forward", "ls", "b", "--json"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    b.assert_refused(&[
        (
            vec!["port-forward", "add", "b", "22", "--host-port", "80"],
            "host-port",
        ),
        (
            vec!["port-forward", "add", "b", "22", "--host-port", "9090"],
            "taken",
        ),
        (
            vec!["port-forward", "add", "b", "8000"],
            "already forwarded",
        ),
        (vec!["port-forward", "add", "b", "70000"], "70000"),
        (vec!["port-forward", "add", "b", "0"], "guest-port"),
        (vec!["port-forward", "rm", "b", "22"], "not forwarded"),
        (vec!["port-forward", "add", "nope", "22"], "not found"),
    ]);
    assert_eq!(
        b.json(&["port-forward", "ls", "b", "--json"]),
        list,
        "bad input changed the forwards"
    );

    let table =
        String::from_utf8_lossy(&ns.exec(&["nft", "list", "table", "inet", "burrow0"]).stdout)
            .into_owned();
    assert!(table.contains("iifname \"burrow0\""), "{table}");
    let links = String::from_utf8_lossy(&ns.exec(&["ip", "-br", "link"]).stdout).into_owned();
    assert_eq!(links.matches("bw").count(), 2, "{links}");

    // Destroy releases; a clean stop leaves nothing in the namespace.
    b.ok(&["destroy", "a"]);
    b.ok(&["destroy", "b"]);
    assert!(
        read_from("9090").is_empty(),
        "the forward outlived its workspace"
    );
    let netd: i32 = std::fs::read_to_string(b.state.join("netd.pid"))
        .expect("netd.pid")
        .trim()
        .parse()
        .expect("pid");
    b.ok(&["daemon", "stop"]);
    burrow_tests::wait_exit("netd", netd, Duration::from_secs(10));
    let links = String::from_utf8_lossy(&ns.exec(&["ip", "-br", "link"]).stdout).into_owned();
    assert!(
        !links.contains("burrow0") && !links.contains("bw"),
        "{links}"
    );
    let rules = ns.exec(&["nft", "list", "ruleset"]);
    assert!(
        String::from_utf8_lossy(&rules.stdout).trim().is_empty(),
        "table left behind"
    );
}

/// Policy with real VMs and packets: an "internet" host in a namespace of its own
/// behind the host's namespace, unreachable by default, reachable after
/// --allow-internet, only on allowed ports with --allowed-ports; inter-VM traffic
/// only between workspaces that both allow it; every change takes effect on
/// running workspaces at once.
#[test]
fn network_policy_takes_effect_on_running_workspaces() {
    require_root!();
    // The internet's resolver: netd forwards allowed guests' queries there.
    let b = Burrow::new().with_env("BURROW_UPSTREAM_DNS", "192.0.2.1");
    let ns = b.netns.as_ref().expect("a network namespace");
    let inet = burrow_tests::Netns::new(&format!("{}i", ns.0)).expect("internet namespace");
    // The internet: 192.0.2.1, one veth away from the host's namespace.
    let sh = |script: &str| {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(script)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "{script}");
    };
    sh(&format!(
        "ip -n {h} link add uplink type veth peer name wan netns {i} && \
         ip -n {h} addr add 192.0.2.2/24 dev uplink && ip -n {h} link set uplink up && \
         ip -n {i} addr add 192.0.2.1/24 dev wan && ip -n {i} link set wan up && ip -n {i} link set lo up",
        h = ns.0,
        i = inet.0
    ));
    let mut server = Command::new("ip")
        .args(["netns", "exec", &inet.0, "python3", "-c"])
        .arg(
            "import socket, threading\n\
             def serve(p):\n  s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('192.0.2.1', p)); s.listen()\n  while True: s.accept()[0].close()\n\
             ls=[threading.Thread(target=serve, args=(p,), daemon=True) for p in (22, 80, 443)]\n\
             [t.start() for t in ls]\n\
             def dns():\n  u=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('192.0.2.1', 53))\n  while True:\n    q,a=u.recvfrom(512); end=12\n    while q[end]: end+=q[end]+1\n    end+=5\n    u.sendto(q[:2]+b'\\x81\\x80'+q[4:6]+b'\\x00\\x01\\x00\\x00\\x00\\x00'+q[12:end]+b'\\xc0\\x0c\\x00\\x01\\x00\\x01\\x00\\x00\\x00\\x3c\\x00\\x04'+bytes([192,0,2,1]), a)\n\
             threading.Thread(target=dns, daemon=True).start()\nprint('up', flush=True)\nthreading.Event().wait()",
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("internet server");
    let mut up = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().expect("stdout")),
        &mut up,
    )
    .expect("server up");

    b.ok(&["create", "--name", "a"]);
    b.ok(&["create", "--name", "c"]);
    let ip_c = b.info("c")["ip"].as_str().expect("ip of c").to_string();
    b.start_guest_server("c", &guest_tcp_server(""));
    let reaches = |ws: &str, ip: &str, port: u16| {
        b.run(&["exec", ws, "--", "python3", "-c", &connect(ip, port)])
            .status
            .success()
    };

    assert!(
        !reaches("a", "192.0.2.1", 80),
        "internet reachable by default"
    );
    let resolve = |ws: &str| {
        let out = b.run(&[
            "exec",
            ws,
            "--",
            "python3",
            "-c",
            "import socket; print(socket.gethostbyname('example.test'))",
        ]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(
        resolve("a"),
        "",
        "DNS answered a workspace that may not go out"
    );
    let out = b.ok(&["network-policy", "a", "--allow-internet", "true"]);
    assert!(out.contains("allow_internet=true"), "{out}");
    assert_eq!(
        resolve("a"),
        "192.0.2.1",
        "DNS does not work once allowed out"
    );
    assert!(reaches("a", "192.0.2.1", 80));
    assert!(reaches("a", "192.0.2.1", 22));
    assert!(!reaches("c", "192.0.2.1", 80), "c got a's policy");
    let p = b.json(&["network-policy", "a", "--allowed-ports", "443,80", "--json"]);
    assert_eq!(p["allowed_ports"], serde_json::json!([80, 443]));
    assert!(reaches("a", "192.0.2.1", 443));
    assert!(
        !reaches("a", "192.0.2.1", 22),
        "a port outside the allowed ones"
    );

    // Inter-VM: only when both ends allow it.
    assert!(!reaches("a", &ip_c, 8000));
    b.ok(&["network-policy", "a", "--allow-inter-vm", "true"]);
    assert!(
        !reaches("a", &ip_c, 8000),
        "c does not allow inter-VM traffic"
    );
    b.ok(&["network-policy", "c", "--allow-inter-vm", "true"]);
    assert!(reaches("a", &ip_c, 8000));
    b.ok(&["network-policy", "c", "--allow-inter-vm", "false"]);
    assert!(!reaches("a", &ip_c, 8000));

    // Bad input: one line naming the field, nothing changed.
    b.assert_refused(&[
        (
            vec!["network-policy", "a", "--allowed-ports", "80,x"],
            "allowed-ports",
        ),
        (
            vec!["network-policy", "a", "--allowed-ports", "0"],
            "allowed-ports",
        ),
        (
            vec!["network-policy", "a", "--allow-internet", "maybe"],
            "allow-internet",
        ),
        (
            vec!["network-policy", "nope", "--allow-internet", "true"],
            "not found",
        ),
    ]);
    let p = b.json(&["network-policy", "a", "--json"]);
    assert_eq!(
        p["allowed_ports"],
        serde_json::json!([80, 443]),
        "a bad input changed the policy"
    );
    assert_eq!(p["allow_internet"], true);

    let _ = server.kill();
    let _ = server.wait();
}

/// Run in a guest with the addresses to probe: TCP connect to port 8000 and an
/// ICMP echo to each, in parallel; prints {ip: [tcp, ping]} as JSON.
const PROBE: &str = r#"
import json, os, socket, struct, sys, threading, time
def tcp(ip):
    try:
        socket.create_connection((ip, 8000), timeout=2).close()
        return True
    except OSError:
        return False
def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF
def ping(ip):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(2)
    ident = (os.getpid() + threading.get_ident()) & 0xFFFF
    body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"burrow"
    s.sendto(struct.pack("!BBHHH", 8, 0, checksum(body), ident, 1) + b"burrow", (ip, 0))
    end = time.time() + 2
    while time.time() < end:
        try:
            data, addr = s.recvfrom(1024)
        except socket.timeout:
            return False
        if addr[0] == ip and data[20] == 0 and struct.unpack("!H", data[24:26])[0] == ident:
            return True
    return False
out = {}
def probe(ip):
    out[ip] = [tcp(ip), ping(ip)]
threads = [threading.Thread(target=probe, args=(ip,)) for ip in sys.argv[1:]]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(out))
"#;

/// Two teams of two and a loner: every pair, both ways, by TCP and ping, reaches
/// the other exactly when both are in one team. Then the team commands' bad input
/// and a team destroy that takes its members and its rules with it.
#[test]
fn teams_reach_their_members_and_nobody_else() {
    require_root!();
    let b = Burrow::new();
    let ns = b.netns.as_ref().expect("a network namespace");
    b.ok(&["team", "create", "red", "--member", "r1", "--member", "r2"]);
    b.ok(&["team", "create", "blue", "--member", "b1", "--member", "b2"]);
    b.ok(&["create", "--name", "loner"]);
    let mut team_of = std::collections::HashMap::new();
    let mut ips = Vec::new();
    for team in ["red", "blue"] {
        let status = b.json(&["team", "status", team, "--json"]);
        let members = status.as_array().expect("members");
        assert_eq!(members.len(), 2, "{status}");
        for m in members {
            assert_eq!(m["state"], "running", "{m}");
            assert!(m["workspace_id"].is_string(), "{m}");
            let name = m["name"].as_str().expect("name").to_string();
            let ip = m["ip"].as_str().expect("ip").to_string();
            team_of.insert(name.clone(), team);
            ips.push((name, ip));
        }
    }
    ips.push((
        "loner".into(),
        b.info("loner")["ip"].as_str().expect("ip").to_string(),
    ));
    let listener = guest_tcp_server("");
    for (name, _) in &ips {
        b.start_guest_server(name, &listener);
        b.run_with_stdin(&["file", "write", name, "/root/probe.py"], PROBE.as_bytes());
    }
    for (from, _) in &ips {
        let targets: Vec<&str> = ips
            .iter()
            .filter(|(n, _)| n != from)
            .map(|(_, ip)| ip.as_str())
            .collect();
        let mut args = vec!["exec", from, "--", "python3", "/root/probe.py"];
        args.extend(targets.iter().copied());
        let seen: serde_json::Value =
            serde_json::from_str(b.ok(&args).trim()).expect("probe output");
        for (to, ip) in ips.iter().filter(|(n, _)| n != from) {
            let allowed = team_of.contains_key(from) && team_of.get(from) == team_of.get(to);
            let want = serde_json::json!([allowed, allowed]);
            assert_eq!(seen[ip], want, "{from} -> {to} ({ip}): [tcp, ping]");
        }
    }

    // Bad input: one line naming what was wrong, nothing made.
    let cases: &[(&[&str], &str)] = &[
        (
            &["team", "create", "red", "--member", "x1"],
            "already exists",
        ),
        (
            &["team", "create", "dup", "--member", "d1", "--member", "d1"],
            "given twice",
        ),
        (&["team", "create", "taken", "--member", "loner"], "taken"),
        (
            &["team", "create", "bad/name", "--member", "z1"],
            "invalid team",
        ),
        (&["team", "status", "nope"], "not found"),
        (&["team", "destroy", "nope"], "not found"),
    ];
    for (args, want) in cases {
        let (_, err) = b.fails(args);
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert_eq!(b.json(&["ls", "--json"]).as_array().map(Vec::len), Some(5));

    // Destroying a team takes its members and its rules.
    b.ok(&["team", "destroy", "red"]);
    let names: Vec<String> = b
        .json(&["ls", "--json"])
        .as_array()
        .expect("list")
        .iter()
        .map(|w| w["name"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with('r')), "{names:?}");
    let table =
        String::from_utf8_lossy(&ns.exec(&["nft", "list", "table", "inet", "burrow0"]).stdout)
            .into_owned();
    assert!(!table.contains("team_red"), "{table}");
    assert!(table.contains("team_blue"), "{table}");
}

/// kill -9 of burrow-netd, then of burrowd: after each restart the table and the
/// links in the namespace are exactly what they were, and the network works.
#[test]
fn kill9_of_netd_and_burrowd_leaves_the_network_exact() {
    require_root!();
    let b = Burrow::new();
    let ns = b.netns.as_ref().expect("a network namespace");
    b.ok(&["create", "--name", "k"]);
    b.ok(&[
        "network-policy",
        "k",
        "--allow-internet",
        "true",
        "--allowed-ports",
        "443",
    ]);
    let snapshot = || {
        // Stateless (the rebuilt tables' counters start again from zero), and
        // table by table (a rebuilt table is listed last).
        let table = ["inet", "netdev"]
            .map(|family| {
                let out = ns.exec(&["nft", "-s", "list", "table", family, "burrow0"]);
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
            .concat();
        let mut links: Vec<String> =
            String::from_utf8_lossy(&ns.exec(&["ip", "-br", "link"]).stdout)
                .lines()
                .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
                .collect();
        links.sort();
        (table, links)
    };
    let before = snapshot();
    assert!(before.0.contains("10.213.0.2"), "{}", before.0);
    assert_eq!(before.1.len(), 3, "{:?}", before.1);

    let netd: i32 = std::fs::read_to_string(b.state.join("netd.pid"))
        .expect("netd.pid")
        .trim()
        .parse()
        .expect("pid");
    burrow_tests::kill9(netd);
    burrow_tests::wait_exit("netd", netd, Duration::from_secs(10));
    // The next request starts netd again, which rebuilds the table from its records.
    let p = b.json(&["network-policy", "k", "--json"]);
    assert_eq!(p["allowed_ports"], serde_json::json!([443]));
    assert_eq!(snapshot(), before, "not exact after netd's restart");

    let daemon = b.daemon_pid().expect("daemon pid");
    burrow_tests::kill9(daemon);
    burrow_tests::wait_exit("daemon", daemon, Duration::from_secs(10));
    assert_eq!(b.info("k")["state"], "running");
    assert_eq!(snapshot(), before, "not exact after burrowd's restart");
    let out = ns.exec(&[
        "python3",
        "-c",
        "import socket; socket.create_connection(('10.213.0.2', 22), timeout=3)",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refused"),
        "the guest is not reachable: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
