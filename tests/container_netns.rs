//! A container VM's network, below the VM: the TAP burrow puts in a container's
//! network namespace takes every frame that reaches the namespace's veth, and
//! what the VM sends leaves through that veth. Driven with real frames between two
//! namespaces the test makes (a "bridge side" and a docker-like container side),
//! no packet leaves them.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use burrow::vmm::netns;
use burrow_tests::{require_root, Netns};

fn ip(ns: &str, args: &[&str]) {
    let out = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip -n {ns} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn in_ns(ns: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("run ip netns exec")
}

/// Reads one frame from `tap`, or None after `timeout`.
fn read_frame(tap: &std::fs::File, timeout: Duration) -> Option<Vec<u8>> {
    let mut p = libc::pollfd {
        fd: tap.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd that lives across the call.
    let ready = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
    if ready <= 0 {
        return None;
    }
    let mut buf = vec![0u8; 2048];
    let n = (&*tap).read(&mut buf).expect("read the TAP");
    buf.truncate(n);
    Some(buf)
}

fn mac_bytes(mac: &str) -> Vec<u8> {
    mac.split(':')
        .map(|h| u8::from_str_radix(h, 16).expect("mac"))
        .collect()
}

#[test]
fn a_container_namespace_is_bridged_to_its_vm_through_a_tap() {
    require_root!();
    let pid = std::process::id();
    let outer = Netns::new(&format!("bto{pid}")).expect("outer netns");
    let ctr = Netns::new(&format!("btc{pid}")).expect("container netns");
    // The bridge side holds 172.30.9.1; the container side the veth with .2, as
    // dockerd would set it up.
    ip(
        outer.0.as_str(),
        &[
            "link",
            "add",
            "vo",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ctr.0.as_str(),
        ],
    );
    ip(
        outer.0.as_str(),
        &["addr", "add", "172.30.9.1/24", "dev", "vo"],
    );
    ip(outer.0.as_str(), &["link", "set", "vo", "up"]);
    ip(
        ctr.0.as_str(),
        &["addr", "add", "172.30.9.2/24", "dev", "eth0"],
    );
    ip(
        ctr.0.as_str(),
        &["link", "set", "eth0", "address", "02:42:ac:1e:09:02", "up"],
    );
    ip(
        ctr.0.as_str(),
        &["route", "add", "default", "via", "172.30.9.1"],
    );

    let path = Path::new("/run/netns").join(ctr.0.as_str());
    let link = netns::attach(&path)
        .expect("attach")
        .expect("a link to take over");
    assert_eq!(link.veth, "eth0");
    assert_eq!(link.mac, "02:42:ac:1e:09:02");
    assert_eq!(link.ip.to_string(), "172.30.9.2");
    assert_eq!(link.prefix, 24);
    assert_eq!(
        link.gateway.map(|g| g.to_string()).as_deref(),
        Some("172.30.9.1")
    );
    let tap = std::fs::File::from(link.tap);

    // The bridge side sends .2 a datagram: its ARP question reaches the TAP (the
    // VM), not the namespace's stack, which would answer it itself.
    let sender = std::thread::spawn({
        let outer = outer.0.clone();
        move || in_ns(&outer, &["bash", "-c", "echo hello >/dev/udp/172.30.9.2/9"])
    });
    let mut saw_arp = false;
    let mut saw_udp = false;
    while let Some(frame) = read_frame(&tap, Duration::from_secs(10)) {
        // EtherType 0x0806, target protocol address .2.
        if frame.len() >= 42 && frame[12..14] == [0x08, 0x06] && frame[38..42] == [172, 30, 9, 2] {
            saw_arp = true;
            // Answer as the VM would: the reply leaves through the veth.
            let mut reply = Vec::new();
            reply.extend_from_slice(&frame[6..12]); // to the asker
            reply.extend_from_slice(&mac_bytes(&link.mac));
            reply.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
            reply.extend_from_slice(&mac_bytes(&link.mac));
            reply.extend_from_slice(&[172, 30, 9, 2]);
            reply.extend_from_slice(&frame[22..28]); // asker's MAC
            reply.extend_from_slice(&frame[28..32]); // asker's address
            (&tap).write_all(&reply).expect("write the TAP");
        }
        // IPv4 (0x0800), UDP (17) to .2: the datagram the answer let through.
        if frame.len() >= 34
            && frame[12..14] == [0x08, 0x00]
            && frame[23] == 17
            && frame[30..34] == [172, 30, 9, 2]
        {
            saw_udp = true;
            break;
        }
    }
    assert!(saw_arp, "no ARP request for 172.30.9.2 came out of the TAP");
    assert!(saw_udp, "no datagram for 172.30.9.2 came out of the TAP");
    sender.join().expect("sender thread");
    // The bridge side learnt the answer written to the TAP.
    let neigh = in_ns(&outer.0, &["ip", "neigh", "show", "172.30.9.2"]);
    let neigh = String::from_utf8_lossy(&neigh.stdout).to_lowercase();
    assert!(neigh.contains("02:42:ac:1e:09:02"), "{neigh}");

    // Detach removes the redirect; the TAP goes with its descriptor.
    netns::detach(&path, &link.veth);
    drop(tap);
    let filters = in_ns(ctr.0.as_str(), &["tc", "qdisc", "show", "dev", "eth0"]);
    assert!(
        !String::from_utf8_lossy(&filters.stdout).contains("ingress"),
        "{}",
        String::from_utf8_lossy(&filters.stdout)
    );
    let links = in_ns(ctr.0.as_str(), &["ip", "link", "show", netns::TAP_NAME]);
    assert!(!links.status.success(), "the TAP outlived its descriptor");
}

#[test]
fn a_namespace_with_only_loopback_has_nothing_to_take_over() {
    require_root!();
    let ns = Netns::new(&format!("btl{}", std::process::id())).expect("netns");
    let path = Path::new("/run/netns").join(ns.0.as_str());
    assert!(netns::attach(&path).expect("attach").is_none());
    let err = netns::attach(Path::new("/run/netns/no-such-namespace-burrow")).expect_err("missing");
    assert!(err.contains("no-such-namespace-burrow"), "{err}");
}
