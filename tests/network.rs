//! The workspaces' network with real VMs, inside a network namespace this test
//! creates (burrow-netd joins it): every workspace has an address and reaches its
//! gateway (the host), the host reaches it, and no workspace reaches another.
//! Destroying releases the addresses; a clean stop removes bridge, table and netd.

use std::process::Command;
use std::time::Duration;

use burrow_tests::{require_root, wait_until, Burrow};

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

    // b listens; it is up once it can reach itself.
    b.ok(&[
        "job", "start", "b", "--", "python3", "-c",
        "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('0.0.0.0', 8000)); s.listen()\nwhile True: s.accept()[0].close()",
    ]);
    wait_until("b to listen", Duration::from_secs(60), || {
        b.run(&[
            "exec",
            "b",
            "--",
            "python3",
            "-c",
            &connect("127.0.0.1", 8000),
        ])
        .status
        .success()
    });
    // The host (the namespace) reaches b.
    let out = ns.exec(&["python3", "-c", &connect(&ip_b, 8000)]);
    assert!(
        out.status.success(),
        "host -> b: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // a reaches its gateway: a listener on the host side answers.
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

    let table =
        String::from_utf8_lossy(&ns.exec(&["nft", "list", "table", "inet", "burrow"]).stdout)
            .into_owned();
    assert!(table.contains("iifname \"burrow0\""), "{table}");
    let links = String::from_utf8_lossy(&ns.exec(&["ip", "-br", "link"]).stdout).into_owned();
    assert_eq!(links.matches("bw").count(), 2, "{links}");

    // Destroy releases; a clean stop leaves nothing in the namespace.
    b.ok(&["destroy", "a"]);
    b.ok(&["destroy", "b"]);
    b.ok(&["daemon", "stop"]);
    let netd_gone = || !b.state.join("netd.sock").exists();
    wait_until("netd to exit", Duration::from_secs(10), netd_gone);
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
    let b = Burrow::new();
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
             [t.start() for t in ls]\nprint('up', flush=True)\nthreading.Event().wait()",
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
    b.ok(&[
        "job", "start", "c", "--", "python3", "-c",
        "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('0.0.0.0', 8000)); s.listen()\nwhile True: s.accept()[0].close()",
    ]);
    wait_until("c to listen", Duration::from_secs(60), || {
        b.run(&[
            "exec",
            "c",
            "--",
            "python3",
            "-c",
            &connect("127.0.0.1", 8000),
        ])
        .status
        .success()
    });
    let reaches = |ws: &str, ip: &str, port: u16| {
        b.run(&["exec", ws, "--", "python3", "-c", &connect(ip, port)])
            .status
            .success()
    };

    assert!(
        !reaches("a", "192.0.2.1", 80),
        "internet reachable by default"
    );
    let out = b.ok(&["network-policy", "a", "--allow-internet", "true"]);
    assert!(out.contains("allow_internet=true"), "{out}");
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
    for (args, want) in [
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
    ] {
        let (_, err) = b.fails(&args);
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
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
