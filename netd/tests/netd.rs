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
        let name = format!("bn{}", std::process::id());
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
    let table = ns.run(&["nft", "list", "table", "inet", "burrow"]);
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
        "nft", "add", "rule", "inet", "burrow", "forward", "counter", "accept",
    ]);
    let _netd = start(&ns, t.path());
    assert_eq!(ns.run(&["nft", "list", "table", "inet", "burrow"]), table);
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
