//! An OCI bundle read from the host: its config.json checked field by field
//! before any VM exists, so that a bad bundle changes nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::hooks::Hooks;

/// What the runtime needs of a bundle; the spec itself goes to burrowd as read.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub spec: Value,
    pub rootfs: PathBuf,
    pub terminal: bool,
    pub annotations: BTreeMap<String, String>,
    /// The hooks that run on the host.
    pub hooks: Hooks,
    /// The network namespace the holder makes or joins, so that hooks can set
    /// it up (with the holder's pid) before the VM takes its interface over.
    pub netns: Netns,
}

impl Bundle {
    /// Reads and checks `<dir>/config.json`.
    pub fn load(dir: &Path) -> Result<Bundle> {
        let dir = std::path::absolute(dir).map_err(Error::io(dir))?;
        if !dir.is_dir() {
            return Err(Error::invalid(
                "--bundle",
                format!("{} is not a directory", dir.display()),
            ));
        }
        let path = dir.join("config.json");
        let bytes = std::fs::read(&path).map_err(|e| {
            Error::invalid(
                "config.json",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let spec: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::invalid("config.json", format!("not valid JSON: {e}")))?;
        Bundle::check(dir, spec)
    }

    /// Checks `spec` as the config.json of bundle `dir` (a caller that adjusted
    /// what it read, e.g. namespace paths that name another container's).
    pub fn from_spec(dir: &Path, spec: Value) -> Result<Bundle> {
        let dir = std::path::absolute(dir).map_err(Error::io(dir))?;
        Bundle::check(dir, spec)
    }

    fn check(dir: PathBuf, spec: Value) -> Result<Bundle> {
        if !spec.is_object() {
            return Err(Error::invalid("config.json", "must be a JSON object"));
        }
        match spec.get("ociVersion") {
            Some(Value::String(v)) if v.starts_with("1.") => {}
            Some(Value::String(v)) => {
                return Err(Error::invalid(
                    "ociVersion",
                    format!("{v:?} is not a 1.x version"),
                ))
            }
            _ => return Err(Error::invalid("ociVersion", "missing or not a string")),
        }
        let root = spec
            .pointer("/root/path")
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| Error::invalid("root.path", "missing or not a string"))?;
        let rootfs = dir.join(root);
        if !rootfs.is_dir() {
            return Err(Error::invalid(
                "root.path",
                format!("{} is not a directory", rootfs.display()),
            ));
        }
        let process = spec
            .get("process")
            .filter(|p| p.is_object())
            .ok_or_else(|| Error::invalid("process", "missing or not an object"))?;
        check_process(process, "process")?;
        let terminal = process
            .get("terminal")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if let Some(mounts) = spec.get("mounts") {
            let mounts = mounts
                .as_array()
                .ok_or_else(|| Error::invalid("mounts", "not a list"))?;
            for (i, m) in mounts.iter().enumerate() {
                check_mount(&dir, i, m)?;
            }
        }
        let mut annotations = BTreeMap::new();
        if let Some(a) = spec.get("annotations") {
            let a = a
                .as_object()
                .ok_or_else(|| Error::invalid("annotations", "not an object"))?;
            for (k, v) in a {
                let v = v
                    .as_str()
                    .ok_or_else(|| Error::invalid(format!("annotations.{k}"), "not a string"))?;
                annotations.insert(k.clone(), v.to_string());
            }
        }
        let hooks = Hooks::from_spec(&spec)?;
        let netns = namespaces(&spec)?;
        Ok(Bundle {
            dir,
            spec,
            rootfs,
            terminal,
            annotations,
            hooks,
            netns,
        })
    }
}

/// The container's network namespace, as `linux.namespaces` asks for it.
#[derive(Debug, Clone, PartialEq)]
pub enum Netns {
    /// None named: the VM's own, with no interface.
    None,
    /// A new one: the holder makes it.
    New,
    /// An existing one by path (BuildKit's, CNI's): the holder joins it.
    Join(PathBuf),
}

/// Reads `linux.namespaces`. A path is allowed for the network namespace only:
/// the others are the guest kernel's, and a host namespace cannot be shared
/// with a process inside a VM.
fn namespaces(spec: &Value) -> Result<Netns> {
    let list = match spec.pointer("/linux/namespaces") {
        None | Some(Value::Null) => return Ok(Netns::None),
        Some(Value::Array(l)) => l,
        Some(_) => return Err(Error::invalid("linux.namespaces", "not a list")),
    };
    let mut net = Netns::None;
    for (i, n) in list.iter().enumerate() {
        let field = |f: &str| format!("linux.namespaces[{i}].{f}");
        let kind = n
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::invalid(field("type"), "missing or not a string"))?;
        let path = match n.get("path") {
            None | Some(Value::Null) => None,
            Some(Value::String(p)) if p.is_empty() => None,
            Some(Value::String(p)) => Some(PathBuf::from(p)),
            Some(_) => return Err(Error::invalid(field("path"), "not a string")),
        };
        match (kind, path) {
            ("network", None) => net = Netns::New,
            ("network", Some(p)) => {
                if !p.is_absolute() || std::fs::metadata(&p).is_err() {
                    return Err(Error::invalid(
                        field("path"),
                        format!("network namespace {} does not exist", p.display()),
                    ));
                }
                net = Netns::Join(p);
            }
            (_, None) => {}
            (kind, Some(p)) => {
                return Err(Error::invalid(
                    field("path"),
                    format!(
                        "cannot join the {kind} namespace {}: the container runs in its own VM, \
                         which has its own kernel (only a network namespace can be taken over)",
                        p.display()
                    ),
                ))
            }
        }
    }
    Ok(net)
}

/// Checks the fields of a runtime-spec Process that the guest cannot do without
/// (`what` names it in errors: `process`, or `--process` for an exec).
pub fn check_process(p: &Value, what: &str) -> Result<()> {
    let args = p
        .get("args")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| Error::invalid(format!("{what}.args"), "missing or empty"))?;
    if args.iter().any(|a| !a.is_string()) {
        return Err(Error::invalid(format!("{what}.args"), "not all strings"));
    }
    // Required on Linux by the runtime spec (and by the guest's parser).
    let user_ok = p.get("user").is_some_and(|u| {
        u.get("uid").is_some_and(Value::is_u64) && u.get("gid").is_some_and(Value::is_u64)
    });
    if !user_ok {
        return Err(Error::invalid(
            format!("{what}.user"),
            "missing, or without numeric uid and gid",
        ));
    }
    match p.get("cwd") {
        Some(Value::String(c)) if c.starts_with('/') => {}
        Some(_) => {
            return Err(Error::invalid(
                format!("{what}.cwd"),
                "must be an absolute path",
            ))
        }
        None => {}
    }
    if let Some(env) = p.get("env") {
        let ok = env.as_array().is_some_and(|e| {
            e.iter()
                .all(|v| v.as_str().is_some_and(|s| s.contains('=')))
        });
        if !ok {
            return Err(Error::invalid(
                format!("{what}.env"),
                "must be a list of KEY=VALUE strings",
            ));
        }
    }
    if p.get("terminal").is_some_and(|t| !t.is_boolean()) {
        return Err(Error::invalid(format!("{what}.terminal"), "not a boolean"));
    }
    Ok(())
}

/// A mount: its destination is absolute; a bind mount's source exists on the host
/// (relative sources are relative to the bundle, as runc reads them).
fn check_mount(bundle: &Path, i: usize, m: &Value) -> Result<()> {
    let field = |f: &str| format!("mounts[{i}].{f}");
    let dest = m
        .get("destination")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::invalid(field("destination"), "missing or not a string"))?;
    if !dest.starts_with('/') {
        return Err(Error::invalid(
            field("destination"),
            format!("{dest:?} is not an absolute path"),
        ));
    }
    let is_bind = m.get("type").and_then(Value::as_str) == Some("bind")
        || m.get("options").and_then(Value::as_array).is_some_and(|o| {
            o.iter()
                .any(|o| matches!(o.as_str(), Some("bind" | "rbind")))
        });
    if is_bind {
        let src = m
            .get("source")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::invalid(field("source"), "a bind mount needs a source"))?;
        let path = bundle.join(src);
        if std::fs::symlink_metadata(&path).is_err() {
            return Err(Error::invalid(
                field("source"),
                format!("{} does not exist", path.display()),
            ));
        }
    }
    Ok(())
}

/// runc's `spec`: a config.json for `sh` on a terminal in `rootfs`, with the
/// namespaces, mounts and masked paths runc writes.
pub fn default_spec() -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": true,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "effective": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "permitted": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "ambient": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "runc",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/sys/firmware", "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_with(spec: &Value) -> (tempfile::TempDir, Result<Bundle>) {
        let tmp = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(tmp.path().join("rootfs")).expect("rootfs");
        std::fs::write(tmp.path().join("config.json"), spec.to_string()).expect("write");
        let b = Bundle::load(tmp.path());
        (tmp, b)
    }

    fn refused(spec: Value, field: &str) {
        let (_t, b) = bundle_with(&spec);
        match b {
            Err(Error::Invalid { field: f, .. }) => assert_eq!(f, field, "{spec}"),
            other => panic!("{spec}: expected {field} refused, got {other:?}"),
        }
    }

    #[test]
    fn the_default_spec_is_a_valid_bundle() {
        let (_t, b) = bundle_with(&default_spec());
        let b = b.expect("valid");
        assert!(b.terminal);
        assert!(b.rootfs.ends_with("rootfs"));
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut s = default_spec();
        s["ociVersion"] = json!(2);
        refused(s, "ociVersion");
        let mut s = default_spec();
        s["root"]["path"] = json!("nope");
        refused(s, "root.path");
        let mut s = default_spec();
        s.as_object_mut().expect("obj").remove("process");
        refused(s, "process");
        let mut s = default_spec();
        s["process"]["args"] = json!([]);
        refused(s, "process.args");
        let mut s = default_spec();
        s["process"].as_object_mut().expect("obj").remove("user");
        refused(s, "process.user");
        let mut s = default_spec();
        s["process"]["cwd"] = json!("tmp");
        refused(s, "process.cwd");
        let mut s = default_spec();
        s["process"]["env"] = json!(["NOEQUALS"]);
        refused(s, "process.env");
        let mut s = default_spec();
        s["mounts"] = json!([{"destination": "/data", "type": "bind", "source": "/nonexistent/x", "options": ["rbind"]}]);
        refused(s, "mounts[0].source");
        let mut s = default_spec();
        s["mounts"] = json!([{"destination": "data", "type": "tmpfs"}]);
        refused(s, "mounts[0].destination");
        let mut s = default_spec();
        s["annotations"] = json!({"a": 1});
        refused(s, "annotations.a");
    }

    #[test]
    fn a_missing_or_malformed_config_is_named() {
        let tmp = tempfile::tempdir().expect("tmp");
        match Bundle::load(tmp.path()) {
            Err(Error::Invalid { field, .. }) => assert_eq!(field, "config.json"),
            other => panic!("{other:?}"),
        }
        std::fs::write(tmp.path().join("config.json"), "{").expect("write");
        match Bundle::load(tmp.path()) {
            Err(Error::Invalid { field, message }) => {
                assert_eq!(field, "config.json");
                assert!(message.contains("JSON"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}
