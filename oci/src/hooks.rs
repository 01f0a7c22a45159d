//! The spec's hooks: host commands the runtime runs at points of a container's
//! life, with the container's State on their stdin.
//!
//! Hooks that run in the runtime's namespaces run here, on the host, with the
//! holder as the State's `pid`: its network namespace is the one the VM's
//! interface is taken from (docker's `libnetwork-setkey` moves the container's
//! veth into `/proc/<pid>/ns/net`). `createContainer` and `startContainer` run
//! in the container's namespaces, which are inside the VM, where a host
//! program cannot run: a spec that has them is refused.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::error::{Error, Result};

/// A hook with no timeout of its own is killed after this long.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// What of a failed hook's output goes into the error.
const OUTPUT_CAP: u64 = 4096;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hook {
    pub path: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub timeout: Option<u64>,
}

/// The hooks of a spec that run on the host, checked.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Hooks {
    #[serde(default, rename = "prestart")]
    pub prestart: Vec<Hook>,
    #[serde(default, rename = "createRuntime")]
    pub create_runtime: Vec<Hook>,
    #[serde(default, rename = "poststart")]
    pub poststart: Vec<Hook>,
    #[serde(default, rename = "poststop")]
    pub poststop: Vec<Hook>,
}

impl Hooks {
    /// Reads `hooks` of a spec; every field is checked and named in errors.
    pub fn from_spec(spec: &Value) -> Result<Hooks> {
        let hooks = match spec.get("hooks") {
            None | Some(Value::Null) => return Ok(Hooks::default()),
            Some(Value::Object(h)) => h,
            Some(_) => return Err(Error::invalid("hooks", "not an object")),
        };
        let mut out = Hooks::default();
        for (kind, list) in hooks {
            let slot = match kind.as_str() {
                "prestart" => &mut out.prestart,
                "createRuntime" => &mut out.create_runtime,
                "poststart" => &mut out.poststart,
                "poststop" => &mut out.poststop,
                "createContainer" | "startContainer" => {
                    if list.as_array().is_some_and(|l| l.is_empty()) || list.is_null() {
                        continue;
                    }
                    return Err(Error::invalid(
                        format!("hooks.{kind}"),
                        "not supported: these hooks run in the container's namespaces, \
                         which are inside its VM, where host programs do not exist",
                    ));
                }
                _ => {
                    return Err(Error::invalid(
                        format!("hooks.{kind}"),
                        "unknown hook (prestart, createRuntime, createContainer, \
                         startContainer, poststart, poststop)",
                    ))
                }
            };
            let list = match list {
                Value::Null => continue,
                Value::Array(l) => l,
                _ => return Err(Error::invalid(format!("hooks.{kind}"), "not a list")),
            };
            for (i, h) in list.iter().enumerate() {
                slot.push(check(&format!("hooks.{kind}[{i}]"), h)?);
            }
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.prestart.is_empty()
            && self.create_runtime.is_empty()
            && self.poststart.is_empty()
            && self.poststop.is_empty()
    }
}

fn check(field: &str, h: &Value) -> Result<Hook> {
    let strings = |name: &str| -> Result<Vec<String>> {
        match h.get(name) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| Error::invalid(format!("{field}.{name}"), "not all strings"))
                })
                .collect(),
            Some(_) => Err(Error::invalid(format!("{field}.{name}"), "not a list")),
        }
    };
    let path = match h.get("path") {
        Some(Value::String(p)) if p.starts_with('/') => PathBuf::from(p),
        Some(Value::String(p)) => {
            return Err(Error::invalid(
                format!("{field}.path"),
                format!("{p:?} is not an absolute path"),
            ))
        }
        _ => {
            return Err(Error::invalid(
                format!("{field}.path"),
                "missing or not a string",
            ))
        }
    };
    let env = strings("env")?;
    if let Some(e) = env.iter().find(|e| !e.contains('=')) {
        return Err(Error::invalid(
            format!("{field}.env"),
            format!("{e:?} is not KEY=VALUE"),
        ));
    }
    let timeout = match h.get("timeout") {
        None | Some(Value::Null) => None,
        Some(t) => match t.as_u64() {
            Some(n) if n > 0 => Some(n),
            _ => {
                return Err(Error::invalid(
                    format!("{field}.timeout"),
                    "must be a whole number of seconds above 0",
                ))
            }
        },
    };
    Ok(Hook {
        path,
        args: strings("args")?,
        env,
        timeout,
    })
}

/// The State a hook reads on its stdin.
pub struct State<'a> {
    pub id: &'a str,
    pub status: &'a str,
    pub pid: Option<i32>,
    pub bundle: &'a std::path::Path,
    pub annotations: &'a BTreeMap<String, String>,
}

impl State<'_> {
    fn json(&self) -> Vec<u8> {
        let mut s = serde_json::json!({
            "ociVersion": "1.0.2",
            "id": self.id,
            "status": self.status,
            "bundle": self.bundle,
            "annotations": self.annotations,
        });
        if let Some(pid) = self.pid {
            s["pid"] = Value::from(pid);
        }
        s.to_string().into_bytes()
    }
}

/// Runs `hooks` one after another; the first that fails ends the run, its
/// error naming it (`hooks.<kind>[i]`, as the spec has it).
pub async fn run(kind: &str, hooks: &[Hook], state: &State<'_>) -> Result<()> {
    let input = state.json();
    for (i, h) in hooks.iter().enumerate() {
        run_named(kind, i, h, &input).await?;
    }
    Ok(())
}

/// Runs every one of `hooks`, whatever the others did (poststart, poststop:
/// the runtime spec has a failure logged and the rest run); each failure is
/// passed to `warn`.
pub async fn run_all(kind: &str, hooks: &[Hook], state: &State<'_>, warn: impl Fn(&Error)) {
    let input = state.json();
    for (i, h) in hooks.iter().enumerate() {
        if let Err(e) = run_named(kind, i, h, &input).await {
            warn(&e);
        }
    }
}

async fn run_named(kind: &str, i: usize, h: &Hook, input: &[u8]) -> Result<()> {
    run_one(h, input)
        .await
        .map_err(|m| Error::Hook(format!("hooks.{kind}[{i}]: {m}")))
}

async fn run_one(h: &Hook, input: &[u8]) -> std::result::Result<(), String> {
    let mut cmd = Command::new(&h.path);
    if let Some((arg0, rest)) = h.args.split_first() {
        cmd.arg0(arg0).args(rest);
    }
    cmd.env_clear()
        .envs(h.env.iter().filter_map(|e| e.split_once('=')))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", h.path.display()))?;
    // Fed by a task, so that a hook that never reads a state larger than the
    // pipe holds (annotations have no bound) meets its timeout instead of
    // stalling the call. A hook may exit without reading its state: a closed
    // pipe is not its failure.
    let feed = child.stdin.take().map(|mut stdin| {
        let input = input.to_vec();
        tokio::spawn(async move {
            let _ = stdin.write_all(&input).await;
        })
    });
    let out = tokio::spawn(drain(child.stdout.take()));
    let err = tokio::spawn(drain(child.stderr.take()));
    let limit = h
        .timeout
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT);
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(s) => s.map_err(|e| format!("wait for {}: {e}", h.path.display()))?,
        Err(_) => {
            if let Some(f) = feed {
                f.abort();
            }
            let _ = child.kill().await;
            return Err(format!(
                "{} did not finish within {} s",
                h.path.display(),
                limit.as_secs()
            ));
        }
    };
    let out = out.await.unwrap_or_default();
    let err = err.await.unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(if err.is_empty() { &out } else { &err });
    let said = said.trim().replace('\n', " ");
    let how = match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (_, Some(s)) => format!("signal {s}"),
        _ => "failed".into(),
    };
    Err(format!("{} failed ({how}): {said}", h.path.display()))
}

/// Reads a hook's output to its end (a hook must never block on a full pipe),
/// keeping the first [`OUTPUT_CAP`] bytes.
async fn drain<R: AsyncRead + Unpin>(p: Option<R>) -> Vec<u8> {
    let mut kept = Vec::new();
    let Some(mut p) = p else { return kept };
    let mut buf = [0u8; 8192];
    loop {
        match p.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                let room = (OUTPUT_CAP as usize).saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hooks_are_checked_field_by_field() {
        let bad = |h: Value, want: &str| {
            let e = Hooks::from_spec(&json!({ "hooks": h })).expect_err("refused");
            assert!(e.to_string().starts_with(want), "{e}");
        };
        bad(json!([]), "hooks: not an object");
        bad(
            json!({"prestart": [{"path": "rel"}]}),
            "hooks.prestart[0].path",
        );
        bad(json!({"poststop": [{}]}), "hooks.poststop[0].path");
        bad(
            json!({"createRuntime": [{"path": "/bin/true", "timeout": 0}]}),
            "hooks.createRuntime[0].timeout",
        );
        bad(
            json!({"poststart": [{"path": "/bin/true", "env": ["X"]}]}),
            "hooks.poststart[0].env",
        );
        bad(
            json!({"createContainer": [{"path": "/bin/true"}]}),
            "hooks.createContainer",
        );
        bad(json!({"later": []}), "hooks.later");
        let h = Hooks::from_spec(&json!({"hooks": {"prestart": [
            {"path": "/bin/sh", "args": ["sh", "-c", "exit 0"], "timeout": 5}
        ], "startContainer": []}}))
        .expect("good hooks");
        assert_eq!(h.prestart.len(), 1);
    }

    #[tokio::test]
    async fn a_hook_reads_the_state_and_its_failure_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("state");
        let ann = BTreeMap::new();
        let state = State {
            id: "c1",
            status: "creating",
            pid: Some(42),
            bundle: dir.path(),
            annotations: &ann,
        };
        let ok = Hook {
            path: "/bin/sh".into(),
            args: vec![
                "sh".into(),
                "-c".into(),
                format!("cat > {0}; echo >> {0}; echo $X >> {0}", out.display()),
            ],
            env: vec!["X=y".into()],
            timeout: None,
        };
        run("prestart", &[ok], &state).await.expect("hook runs");
        let got = std::fs::read_to_string(&out).expect("state written");
        let (json, x) = got.split_once('\n').expect("two lines");
        let v: Value = serde_json::from_str(json).expect("state json");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["status"], "creating");
        assert_eq!(x.trim(), "y");

        let failing = Hook {
            path: "/bin/sh".into(),
            args: vec!["sh".into(), "-c".into(), "echo nope >&2; exit 3".into()],
            env: vec![],
            timeout: None,
        };
        let e = run("createRuntime", &[failing], &state)
            .await
            .expect_err("fails");
        assert_eq!(
            e.to_string(),
            "hooks.createRuntime[0]: /bin/sh failed (exit status 3): nope"
        );
        let slow = Hook {
            path: "/bin/sleep".into(),
            args: vec!["sleep".into(), "30".into()],
            env: vec![],
            timeout: Some(1),
        };
        let e = run("poststart", std::slice::from_ref(&slow), &state)
            .await
            .expect_err("times out");
        assert!(e.to_string().contains("within 1 s"), "{e}");
        // A hook that never reads a state larger than a pipe holds still meets
        // its timeout.
        let big: BTreeMap<String, String> = [("a".to_string(), "x".repeat(1 << 20))].into();
        let state = State {
            annotations: &big,
            ..state
        };
        let e = run("poststart", &[slow], &state)
            .await
            .expect_err("times out");
        assert!(e.to_string().contains("within 1 s"), "{e}");
    }
}
