//! docker's bridge network on burrow: a private dockerd with its default bridge
//! (docker0 and its userland proxy, inside the test's network namespace, no
//! iptables rules). docker's `libnetwork-setkey` prestart hook moves each
//! container's veth into the holder's network namespace; the container's VM
//! takes that interface over. So a container gets docker's address, `-p`
//! reaches it from the namespace, containers reach each other, and so do a
//! build's RUN steps (BuildKit names a namespace it made by path).

use std::time::Duration;

use burrow_tests::oci::Dockerd;
use burrow_tests::{require_root, text, Burrow};

#[test]
fn docker_bridge_network_and_published_ports_reach_container_vms() {
    require_root!();
    let b = Burrow::new();
    b.ok(&["ls"]);
    let ns = b.netns.as_ref().expect("the test's network namespace");
    let d = Dockerd::start_bridged(&b);
    d.import_busybox("bb");

    let web = d
        .ok(&[
            "run",
            "-d",
            "--name",
            "web",
            "--runtime",
            "burrow",
            "-p",
            "8080:80",
            "bb",
            "sh",
            "-c",
            "mkdir -p /www && echo hello-from-vm > /www/index.html && exec httpd -f -p 80 -h /www",
        ])
        .trim()
        .to_string();
    assert!(!web.is_empty());
    let ip = d
        .ok(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", "web"])
        .trim()
        .to_string();
    assert!(
        ip.starts_with("172."),
        "docker's bridge address, got {ip:?}"
    );

    // The VM's interface has the address docker gave the container.
    let addrs = d.ok(&["exec", "web", "ip", "-4", "addr", "show"]);
    assert!(addrs.contains(&format!("inet {ip}/")), "{addrs}");

    // A published port, from the namespace through docker's proxy.
    let url = "http://127.0.0.1:8080/";
    let last = std::cell::RefCell::new(String::new());
    burrow_tests::wait_until_explained(
        "the published port to answer",
        Duration::from_secs(60),
        || {
            let out = ns.exec(&["curl", "-s", "--max-time", "5", url]);
            *last.borrow_mut() = format!("{} {}", text(&out.stdout), text(&out.stderr));
            text(&out.stdout) == "hello-from-vm\n"
        },
        || last.borrow().clone(),
    );

    // Another container on the bridge reaches it by its address.
    let got = d.ok(&[
        "run",
        "--rm",
        "--runtime",
        "burrow",
        "bb",
        "wget",
        "-qO-",
        &format!("http://{ip}/"),
    ]);
    assert_eq!(got, "hello-from-vm\n");

    // A build's RUN step on the default network: BuildKit hands burrow-runtime
    // (dockerd's `runc`) a namespace it made on the bridge, by path.
    let ctx = d.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("context");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM bb\nRUN wget -qO- http://{ip}/ > /fetched\n"),
    )
    .expect("Dockerfile");
    let out = d
        .docker(&[
            "build",
            "--progress",
            "plain",
            "-t",
            "built",
            &ctx.to_string_lossy(),
        ])
        .env("DOCKER_BUILDKIT", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("docker build");
    assert!(
        out.status.success(),
        "docker build failed: {}\n{}",
        text(&out.stderr),
        burrow_tests::tail_of(&d.dir.path().join("dockerd.err"), 20)
    );
    let fetched = d.ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "built",
        "cat",
        "/fetched",
    ]);
    assert_eq!(fetched, "hello-from-vm\n");

    // `--network none`: only loopback, no route out.
    let none = d.ok(&[
        "run",
        "--rm",
        "--runtime",
        "burrow",
        "--network",
        "none",
        "bb",
        "ip",
        "-o",
        "link",
    ]);
    let links: Vec<&str> = none.lines().collect();
    assert_eq!(links.len(), 1, "{none}");
    assert!(links[0].contains(": lo:"), "{none}");

    d.ok(&["rm", "-f", "web"]);
    // Nothing left in burrow once docker removed them all.
    b.wait_no_vms(Duration::from_secs(60));
}
