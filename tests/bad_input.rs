//! Bad input that needs no running VM: each gives one line naming what was wrong,
//! a non-zero exit, and changes nothing. Plus the daemon commands.

use burrow_tests::{require_root, text, Burrow};

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    require_root!();
    let b = Burrow::new();
    // Started up front so that no case's stderr carries the "started burrowd" line.
    b.ok(&["daemon", "start"]);
    let cases: &[(&[&str], &str)] = &[
        (&["info", "nope"], "workspace \"nope\" not found"),
        (&["exec", "nope", "--", "true"], "not found"),
        (&["stop", "nope"], "not found"),
        (&["start", "nope"], "not found"),
        (&["destroy", "nope"], "not found"),
        (&["logs", "nope"], "not found"),
        (&["file", "read", "nope", "/x"], "not found"),
        (&["job", "poll", "nope", "1"], "not found"),
        (&["env", "set", "nope", "A=1"], "not found"),
        (&["create", "--name", "bad name"], "invalid name"),
        (&["create", "--name", "a/b"], "invalid name"),
        (&["create", "--name", &"x".repeat(65)], "invalid name"),
        (&["create", "--name", ".."], "invalid name"),
        (&["create", "--name", "."], "invalid name"),
        (&["create", "--name", "ok", "--vcpus", "0"], "invalid vcpus"),
        (
            &["create", "--name", "ok", "--vcpus", "999"],
            "invalid vcpus",
        ),
        (
            &["create", "--name", "ok", "--memory", "1"],
            "invalid memory",
        ),
        (&["create", "--name", "ok", "--image", "nosuch"], "image"),
        (
            &["create", "--name", "ok", "--boot-timeout", "0"],
            "boot_timeout",
        ),
        (&["ls", "--state", "sideways"], "invalid state"),
        (&["image", "build", "nosuch"], "invalid image"),
    ];
    b.assert_refused(cases);
    assert_eq!(b.json(&["ls", "--json"]), serde_json::json!([]));
    let vols = b.volumes();
    assert!(vols.is_empty(), "a refused create left a volume: {vols:?}");
}

#[test]
fn daemon_start_status_stop() {
    require_root!();
    let b = Burrow::new();
    let out = b.run(&["daemon", "status"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stdout).contains("not running"));
    assert!(b.ok(&["daemon", "start"]).contains("started"));
    assert!(b.ok(&["daemon", "start"]).contains("already runs"));
    let st = b.json(&["daemon", "status", "--json"]);
    assert_eq!(st["workspaces"], 0);
    assert_eq!(st["store"], "btrfs");
    let pid = st["pid"].as_i64().expect("pid") as i32;
    assert_eq!(b.daemon_pid(), Some(pid));
    // A second daemon on the same state dir is refused (its last line says why)
    // and changes nothing: the first keeps its socket and pid file and serves on.
    let socket = || {
        std::os::unix::fs::MetadataExt::ino(
            &std::fs::metadata(b.state.join("burrowd.sock")).expect("socket"),
        )
    };
    let socket_before = socket();
    let second = std::process::Command::new(burrow_tests::bin_dir().join("burrowd"))
        .arg("--state-dir")
        .arg(&b.state)
        .output()
        .expect("run burrowd");
    assert!(!second.status.success());
    let err = text(&second.stderr);
    let refusal = format!("another burrowd already serves {}", b.state.display());
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(last.contains(&refusal), "{err}");
    assert_eq!(socket(), socket_before);
    assert_eq!(b.daemon_pid(), Some(pid));
    assert_eq!(b.json(&["daemon", "status", "--json"])["pid"], pid);
    assert!(b.ok(&["daemon", "stop"]).contains("stopped"));
    assert!(!burrow_tests::process_exists(pid));
    assert!(!b.state.join("burrowd.sock").exists());
    assert_eq!(b.run(&["daemon", "status"]).status.code(), Some(3));
}

#[test]
fn images_are_listed_and_a_build_of_a_built_image_is_quick() {
    require_root!();
    let b = Burrow::new();
    b.ok(&["daemon", "start"]);
    // `make test` builds the image before the tests: building again only checks.
    let started = std::time::Instant::now();
    b.ok(&["image", "build"]);
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    let list = b.json(&["image", "ls", "--json"]);
    let debian = list
        .as_array()
        .expect("array")
        .iter()
        .find(|i| i["name"] == "debian")
        .expect("debian listed");
    assert!(
        debian["size_bytes"].as_u64().expect("size") > 50 << 20,
        "{debian}"
    );
    assert!(
        debian["packages"].as_u64().expect("packages") > 50,
        "{debian}"
    );
    assert!(std::path::Path::new(debian["path"].as_str().expect("path"))
        .join("usr/bin/git")
        .exists());
    assert!(b.ok(&["image", "ls"]).contains("debian"));
}

/// One HTTP/1.1 request on the daemon's socket; returns (status line, body).
fn http(b: &Burrow, method: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s =
        std::os::unix::net::UnixStream::connect(b.state.join("burrowd.sock")).expect("connect");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: burrowd\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let status = out.lines().next().unwrap_or_default().to_string();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (status, body)
}

#[test]
fn query_and_path_errors_are_the_json_error() {
    require_root!();
    let b = Burrow::new();
    b.ok(&["daemon", "start"]);
    for (method, path, want) in [
        ("GET", "/v1/workspaces/x/logs?lines=many", "lines"),
        ("POST", "/v1/images/debian/build?force=perhaps", "force"),
        (
            "DELETE",
            "/v1/workspaces/x/port-forwards/http",
            "invalid path",
        ),
    ] {
        let (status, body) = http(&b, method, path);
        assert!(status.contains(" 400 "), "{method} {path}: {status}");
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {body:?}"));
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(msg.contains(want), "{method} {path}: {msg}");
        assert_eq!(v["class"], "invalid", "{body}");
    }
}
