//! burrow-netd in a network namespace the test creates: the bridge, a TAP per
//! attached workspace (gone with its last descriptor), stable addresses, the
//! nftables table, and bad input.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use burrow_netd::{NetClient, NetError};

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        Netns::new_named(&format!("bn{}", std::process::id()))
    }
    fn new_named(name: &str) -> Netns {
        let name = name.to_string();
        assert!(Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success());
        Netns(name)
    }
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Netd(Child);

impl Drop for Netd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(ns: &Netns, dir: &std::path::Path) -> Netd {
    let mut child = Command::new(env!("CARGO_BIN_EXE_burrow-netd"))
        .arg("--state")
        .arg(dir.join("state"))
        .arg("--socket")
        .arg(dir.join("netd.sock"))
        .args(["--netns", &ns.0])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    Netd(child)
}

#[test]
fn taps_addresses_and_the_table() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: network namespaces need root");
        return;
    }
    let ns = Netns::new();
    let t = tempfile::tempdir().unwrap();
    let netd = start(&ns, t.path());
    let client = NetClient::new(t.path().join("netd.sock"));

    assert!(ns
        .run(&["ip", "-4", "addr", "show", "burrow0"])
        .contains("10.213.0.1/16"));
    let table = ns.run(&["nft", "list", "table", "inet", "burrow0"]);
    assert!(table.contains("hook forward"), "{table}");
    assert!(table.contains("iifname \"burrow0\""), "{table}");

    let (a, fd_a) = client.attach("wsa").unwrap();
    let (b, fd_b) = client.attach("wsb").unwrap();
    assert_eq!(a.ip.to_string(), "10.213.0.2");
    assert_eq!(b.ip.to_string(), "10.213.0.3");
    assert_eq!(a.gateway.to_string(), "10.213.0.1");
    let link = ns.run(&["ip", "-d", "link", "show", "bwwsa"]);
    assert!(link.contains("master burrow0"), "{link}");
    assert!(link.contains("isolated on"), "{link}");
    // Its identity is checked on the TAP's ingress.
    let guard = ns.run(&["nft", "list", "chain", "netdev", "burrow0", "port_bwwsa"]);
    assert!(guard.contains("device \"bwwsa\""), "{guard}");
    assert!(guard.contains("comment \"spoofed ip\""), "{guard}");
    // One VM per workspace on the network.
    assert!(client.attach("wsa").is_err());
    // The TAP goes with its last descriptor (QEMU exiting); the address stays.
    drop(fd_a);
    assert!(!ns.run(&["ip", "link"]).contains("bwwsa"));
    let (again, fd_a) = client.attach("wsa").unwrap();
    assert_eq!(again.ip, a.ip);

    // A restarted daemon keeps the addresses and rebuilds the table exactly.
    drop(netd);
    ns.run(&[
        "nft", "add", "rule", "inet", "burrow0", "forward", "counter", "accept",
    ]);
    let _netd = start(&ns, t.path());
    assert_eq!(ns.run(&["nft", "list", "table", "inet", "burrow0"]), table);
    let leases = client.leases().unwrap();
    assert_eq!(leases.len(), 2);
    client.sync(vec!["wsb".into()], Default::default()).unwrap();
    assert_eq!(client.leases().unwrap().len(), 1);
    client.release("wsb").unwrap();
    assert!(client.leases().unwrap().is_empty());

    // Bad input: named, nothing changed.
    for bad in ["", "a/b", "waytoolongworkspace"] {
        match client.attach(bad) {
            Err(NetError::Refused { field, .. }) => assert_eq!(field, "workspace"),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    drop((fd_a, fd_b));
}

/// A second state dir in the same namespace gets a network of its own (bridge,
/// tables, subnet) and never touches the first's; each keeps its network across
/// restarts.
#[test]
fn two_state_dirs_in_one_namespace_keep_their_own_networks() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: network namespaces need root");
        return;
    }
    let ns = Netns::new_named(&format!("bn2{}", std::process::id()));
    let (t1, t2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let _first = start(&ns, t1.path());
    let c1 = NetClient::new(t1.path().join("netd.sock"));
    let (a, _fd_a) = c1.attach("wsa").unwrap();
    assert_eq!(a.ip.to_string(), "10.213.0.2");
    let change = burrow_netd::protocol::PolicyChange {
        allow_internet: Some(true),
        ..Default::default()
    };
    c1.set_policy("wsa", change).unwrap();
    let table = ns.run(&["nft", "list", "table", "inet", "burrow0"]);
    assert!(table.contains("10.213.0.2"), "{table}");

    let second = start(&ns, t2.path());
    let c2 = NetClient::new(t2.path().join("netd.sock"));
    let (b, _fd_b) = c2.attach("wsb").unwrap();
    assert_eq!(b.ip.to_string(), "10.214.0.2");
    assert_eq!(b.gateway.to_string(), "10.214.0.1");
    assert!(ns
        .run(&["ip", "-4", "addr", "show", "burrow1"])
        .contains("10.214.0.1/16"));
    assert!(ns
        .run(&["ip", "-d", "link", "show", "bwwsb"])
        .contains("master burrow1"));
    assert_eq!(
        ns.run(&["nft", "list", "table", "inet", "burrow0"]),
        table,
        "the second state dir rewrote the first's rules"
    );
    // The second stops (and removes what it made); the first's rules stay.
    drop(_fd_b);
    c2.shutdown().unwrap();
    drop(second);
    assert_eq!(ns.run(&["nft", "list", "table", "inet", "burrow0"]), table);
    assert!(!ns.run(&["ip", "link"]).contains("burrow1"));
    // Restarted, it takes the same network again, even with the first running.
    let _second = start(&ns, t2.path());
    let (b2, _fd_b) = c2.attach("wsb").unwrap();
    assert_eq!(b2.ip, b.ip);
    assert_eq!(ns.run(&["nft", "list", "table", "inet", "burrow0"]), table);

    // A configured subnet that overlaps the first's is refused, in one line.
    let t3 = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_burrow-netd"))
        .arg("--state")
        .arg(t3.path().join("state"))
        .arg("--socket")
        .arg(t3.path().join("netd.sock"))
        .args(["--netns", &ns.0, "--subnet", "10.213.128.1/17"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        said.starts_with("failed: subnet 10.213.128.0/17 overlaps"),
        "{said}"
    );
    assert_eq!(said.trim().lines().count(), 1, "{said}");
}

/// netd's socket is 0600 whatever the umask of whoever started it, and netd
/// answers root only, even on a socket someone made reachable.
#[test]
fn the_control_socket_is_root_only() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: network namespaces need root");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let ns = Netns::new_named(&format!("bn3{}", std::process::id()));
    let t = tempfile::Builder::new().tempdir_in("/tmp").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_burrow-netd"));
    cmd.arg("--state")
        .arg(t.path().join("state"))
        .arg("--socket")
        .arg(t.path().join("netd.sock"))
        .args(["--netns", &ns.0])
        .stdout(Stdio::piped());
    // SAFETY: umask is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        })
    };
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _netd = Netd(child);
    assert_eq!(line.trim(), "ready");
    let sock = t.path().join("netd.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o} under umask 000");
    // Made reachable on purpose: the peer's uid is still checked.
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
        ])
        .arg(format!(
            "import socket; s=socket.socket(socket.AF_UNIX); s.connect('{}'); \
             s.sendall(b'{{\"op\":\"leases\"}}\\n'); print(s.recv(4096).decode())",
            sock.display()
        ))
        .output()
        .unwrap();
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(
        reply.contains("root only"),
        "{reply} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!reply.contains("leases"), "{reply}");
}
