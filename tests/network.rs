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
