//! The OCI helper: `burrow-agent oci <command>`, a short single-threaded process
//! that makes and drives containers with youki's libcontainer.
//!
//! libcontainer forks (clone) to build a container. Forking a multi-threaded
//! process is unsafe: the child may inherit a lock (the allocator's, tokio's)
//! that some other thread held at that moment and deadlock on it (youki#3011,
//! runwasi#357). So the agent never calls libcontainer on its own threads: it
//! runs `/proc/self/exe oci ...`, whose `main` dispatches here before any
//! runtime or thread exists.
//!
//! The helper reports on its stdout, one JSON object a line, so the agent parses
//! and never guesses:
//! - `{"ok": VALUE}`: the command succeeded (`create`/`exec`: `{"pid": N}`).
//! - `{"error": {"kind": "not_found", "message": "..."}}` (an `ErrorKind` of the
//!   protocol and one line naming the field): the command failed, nothing changed.
//! - `create` and `exec` then stay, as the container process's parent, until it
//!   ends, and write `{"exit": {"exit_code": N, "signal": S}}` (see
//!   `docs/agent.md` for why the helper, not the agent, reaps it).

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use burrow_proto::{validate_container_id, ErrorKind};
use libcgroups::common::{CgroupConfig, CgroupManager, ControllerOpt};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::error::LibcontainerError;
use libcontainer::oci_spec::runtime::LinuxResources;
use libcontainer::oci_spec::runtime::Spec;
use libcontainer::signal::Signal;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use serde_json::{json, Value};

/// The file descriptors a container's standard I/O arrives on when the agent
/// passes pipes (`--stdio`): 3, 4 and 5 (0–2 are the helper's own).
pub const STDIO_FDS: [i32; 3] = [3, 4, 5];

/// A failure: a protocol error kind and a one-line message.
#[derive(Debug)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

impl Failure {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

type Result<T> = std::result::Result<T, Failure>;

/// The helper's command line (after `oci`).
#[derive(Debug, PartialEq)]
struct Command {
    root: PathBuf,
    id: String,
    action: Action,
}

#[derive(Debug, PartialEq)]
enum Action {
    Create {
        bundle: PathBuf,
        console_socket: Option<PathBuf>,
        stdio: bool,
    },
    Exec {
        process: PathBuf,
        console_socket: Option<PathBuf>,
        stdio: bool,
    },
    Start,
    Kill {
        signal: i32,
        all: bool,
    },
    Pause,
    Resume,
    Ps,
    Stats,
    /// Resources are read from the helper's stdin (a runtime-spec object).
    Update,
    Delete {
        force: bool,
    },
}

/// Runs the helper with `args` (what follows `oci`). Never returns an error: a
/// failure is reported on stdout and the exit status is 1.
pub fn main(args: &[String]) -> ExitCode {
    // libcontainer reads the current directory (and would panic on a deleted
    // one): make it one that always exists.
    let _ = std::env::set_current_dir("/");
    if std::env::var_os("BURROW_OCI_TRACE").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_max_level(tracing::Level::DEBUG)
            .try_init();
    }
    let result = parse(args).and_then(run);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            report(&json!({"error": {"kind": f.kind, "message": f.message}}));
            ExitCode::FAILURE
        }
    }
}

fn report(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}").and_then(|_| out.flush());
}

fn parse(args: &[String]) -> Result<Command> {
    let bad = |m: String| Failure::new(ErrorKind::InvalidArgument, m);
    let (verb, rest) = args
        .split_first()
        .ok_or_else(|| bad("oci: a command is needed".into()))?;
    let mut root = None;
    let mut id = None;
    let mut bundle = None;
    let mut process = None;
    let mut console_socket = None;
    let mut stdio = false;
    let mut all = false;
    let mut force = false;
    let mut signal = None;
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| bad(format!("{name}: a value is needed")))
        };
        match a.as_str() {
            "--root" => root = Some(PathBuf::from(value("--root")?)),
            "--id" => id = Some(value("--id")?),
            "--bundle" => bundle = Some(PathBuf::from(value("--bundle")?)),
            "--process" => process = Some(PathBuf::from(value("--process")?)),
            "--console-socket" => console_socket = Some(PathBuf::from(value("--console-socket")?)),
            "--signal" => {
                let v = value("--signal")?;
                signal = Some(
                    v.parse::<i32>()
                        .map_err(|_| bad(format!("signal: {v:?} is not a number")))?,
                );
            }
            "--stdio" => stdio = true,
            "--all" => all = true,
            "--force" => force = true,
            other => return Err(bad(format!("oci: unknown argument {other:?}"))),
        }
    }
    let root = root.ok_or_else(|| bad("--root: missing".into()))?;
    let id = id.ok_or_else(|| bad("--id: missing".into()))?;
    validate_container_id(&id).map_err(bad)?;
    let action = match verb.as_str() {
        "create" => Action::Create {
            bundle: bundle.ok_or_else(|| bad("--bundle: missing".into()))?,
            console_socket,
            stdio,
        },
        "exec" => Action::Exec {
            process: process.ok_or_else(|| bad("--process: missing".into()))?,
            console_socket,
            stdio,
        },
        "start" => Action::Start,
        "kill" => Action::Kill {
            signal: signal.ok_or_else(|| bad("--signal: missing".into()))?,
            all,
        },
        "pause" => Action::Pause,
        "resume" => Action::Resume,
        "ps" => Action::Ps,
        "stats" => Action::Stats,
        "update" => Action::Update,
        "delete" => Action::Delete { force },
        other => return Err(bad(format!("oci: unknown command {other:?}"))),
    };
    Ok(Command { root, id, action })
}

fn run(cmd: Command) -> Result<()> {
    let Command { root, id, action } = cmd;
    match action {
        Action::Create {
            bundle,
            console_socket,
            stdio,
        } => create(&root, &id, &bundle, console_socket, stdio),
        Action::Exec {
            process,
            console_socket,
            stdio,
        } => exec(&root, &id, &process, console_socket, stdio),
        Action::Start => {
            load(&root, &id)?.start().map_err(|e| lc_error(&id, e))?;
            ok(Value::Null)
        }
        Action::Kill { signal, all } => {
            let sig = Signal::try_from(signal).map_err(|_| {
                Failure::new(
                    ErrorKind::InvalidArgument,
                    format!("signal: {signal} is not a signal"),
                )
            })?;
            load(&root, &id)?
                .kill(sig, all)
                .map_err(|e| lc_error(&id, e))?;
            ok(Value::Null)
        }
        Action::Pause => {
            load(&root, &id)?.pause().map_err(|e| lc_error(&id, e))?;
            ok(Value::Null)
        }
        Action::Resume => {
            load(&root, &id)?.resume().map_err(|e| lc_error(&id, e))?;
            ok(Value::Null)
        }
        Action::Ps => {
            let pids = cgroup(&load(&root, &id)?, &id)?
                .get_all_pids()
                .map_err(|e| Failure::new(ErrorKind::Io, format!("cgroup: {e}")))?;
            ok(json!(pids.iter().map(|p| p.as_raw()).collect::<Vec<_>>()))
        }
        Action::Stats => {
            let stats = cgroup(&load(&root, &id)?, &id)?
                .stats()
                .map_err(|e| Failure::new(ErrorKind::Io, format!("cgroup: {e}")))?;
            ok(serde_json::to_value(stats)
                .map_err(|e| Failure::new(ErrorKind::Io, e.to_string()))?)
        }
        Action::Update => {
            let resources: LinuxResources = serde_json::from_reader(std::io::stdin().lock())
                .map_err(|e| Failure::new(ErrorKind::InvalidArgument, format!("resources: {e}")))?;
            let opt = ControllerOpt {
                resources: &resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            };
            cgroup(&load(&root, &id)?, &id)?
                .apply(&opt)
                .map_err(|e| Failure::new(ErrorKind::InvalidArgument, format!("resources: {e}")))?;
            ok(Value::Null)
        }
        Action::Delete { force } => {
            load(&root, &id)?
                .delete(force)
                .map_err(|e| lc_error(&id, e))?;
            ok(Value::Null)
        }
    }
}

fn ok(v: Value) -> Result<()> {
    report(&json!({ "ok": v }));
    Ok(())
}

fn load(root: &Path, id: &str) -> Result<Container> {
    let dir = root.join(id);
    if !dir.is_dir() {
        return Err(Failure::new(
            ErrorKind::NotFound,
            format!("id: no container {id:?}"),
        ));
    }
    Container::load(dir).map_err(|e| lc_error(id, e))
}

fn cgroup(c: &Container, id: &str) -> Result<libcgroups::common::AnyCgroupManager> {
    let config = c.spec().map_err(|e| lc_error(id, e))?;
    libcgroups::common::create_cgroup_manager(CgroupConfig {
        cgroup_path: config.cgroup_path,
        systemd_cgroup: false,
        container_name: id.to_string(),
    })
    .map_err(|e| Failure::new(ErrorKind::Io, format!("cgroup: {e}")))
}

/// The container's standard I/O from fds 3–5, when the agent passed pipes.
fn stdio_fds() -> [OwnedFd; 3] {
    // SAFETY: with `--stdio` the agent opened exactly these descriptors for this
    // process (dup2 before exec) and nothing else in it owns them.
    STDIO_FDS.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn builder(
    root: &Path,
    id: &str,
    console: Option<PathBuf>,
    stdio: bool,
) -> Result<ContainerBuilder> {
    let mut b = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_root_path(root)
        .map_err(|e| lc_error(id, e))?
        .with_executor(RuncExecutor)
        .with_console_socket(console);
    if stdio {
        let [i, o, e] = stdio_fds();
        b = b.with_stdin(i).with_stdout(o).with_stderr(e);
    }
    Ok(b)
}

fn create(
    root: &Path,
    id: &str,
    bundle: &Path,
    console: Option<PathBuf>,
    stdio: bool,
) -> Result<()> {
    let dir = root.join(id);
    if dir.exists() {
        return Err(Failure::new(
            ErrorKind::AlreadyExists,
            format!("id: container {id:?} already exists"),
        ));
    }
    let built = builder(root, id, console, stdio)?
        .as_init(bundle)
        .with_systemd(false)
        .with_detach(true)
        .build();
    let container = match built {
        Ok(c) => c,
        Err(e) => {
            let failure = lc_error(id, e);
            // Nothing may stay behind a failed create: its process, cgroup and
            // state directory (libcontainer leaves them when a late step fails).
            if dir.exists() {
                if let Ok(mut c) = Container::load(dir.clone()) {
                    let _ = c.delete(true);
                }
                let _ = std::fs::remove_dir_all(&dir);
            }
            return Err(failure);
        }
    };
    let pid = container
        .pid()
        .map(|p| p.as_raw())
        .ok_or_else(|| Failure::new(ErrorKind::Io, "container: no process after create"))?;
    report(&json!({"ok": {"pid": pid}}));
    wait_and_report(pid);
    Ok(())
}

fn exec(
    root: &Path,
    id: &str,
    process: &Path,
    console: Option<PathBuf>,
    stdio: bool,
) -> Result<()> {
    load(root, id)?;
    let pid = builder(root, id, console, stdio)?
        .as_tenant()
        .with_process(Some(process))
        .with_detach(true)
        .build()
        .map_err(|e| lc_error(id, e))?
        .as_raw();
    report(&json!({"ok": {"pid": pid}}));
    wait_and_report(pid);
    Ok(())
}

/// Waits for the container process (this helper's child) and reports how it
/// ended. libcontainer clones it with CLONE_PARENT and no exit signal, which makes
/// it a "clone child" that only `__WALL` waits see.
fn wait_and_report(pid: i32) {
    // Its cgroup, read while it runs: an OOM kill in it meanwhile is told with
    // the exit (containerd's TaskOOM, Kubernetes' OOMKilled).
    let events = memory_events(pid);
    let oom_before = events.as_deref().and_then(oom_kills).unwrap_or(0);
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: waitpid only writes the status, which we own.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if r == pid {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        // Not our child after all (should not happen): say it was killed.
        report(&json!({"exit": {"exit_code": 137, "signal": libc::SIGKILL}}));
        return;
    }
    let oom_killed = events
        .as_deref()
        .and_then(oom_kills)
        .is_some_and(|n| n > oom_before);
    let exit = if libc::WIFSIGNALED(status) {
        let s = libc::WTERMSIG(status);
        json!({"exit_code": 128 + s, "signal": s, "oom_killed": oom_killed})
    } else {
        json!({"exit_code": libc::WEXITSTATUS(status), "signal": null, "oom_killed": oom_killed})
    };
    report(&json!({ "exit": exit }));
}

/// The `memory.events` file of the cgroup (v2) that `pid` is in.
fn memory_events(pid: i32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(
        Path::new("/sys/fs/cgroup")
            .join(path.trim_start_matches('/'))
            .join("memory.events"),
    )
}

/// How many processes the OOM killer killed in that cgroup so far.
fn oom_kills(events: &Path) -> Option<u64> {
    std::fs::read_to_string(events)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

/// Maps a libcontainer error to a protocol kind and one line.
fn lc_error(id: &str, e: LibcontainerError) -> Failure {
    use LibcontainerError as E;
    let (kind, message) = match &e {
        E::Exist => (
            ErrorKind::AlreadyExists,
            format!("id: container {id:?} already exists"),
        ),
        E::NoDirectory => (ErrorKind::NotFound, format!("id: no container {id:?}")),
        E::IncorrectStatus(s) => (
            ErrorKind::InvalidArgument,
            format!("id: container {id:?} is {s}"),
        ),
        E::InvalidID(_) => (ErrorKind::InvalidArgument, format!("id: {}", chain(&e))),
        E::MissingSpec(_) | E::InvalidSpec(_) | E::Spec(_) => (
            ErrorKind::InvalidArgument,
            format!("config.json: {}", chain(&e)),
        ),
        _ => {
            let m = chain(&e);
            match runc_wording(&m) {
                Some(runc) => (ErrorKind::InvalidArgument, format!("{m}: {runc}")),
                None => (ErrorKind::Io, m),
            }
        }
    };
    Failure::new(kind, message)
}

/// libcontainer's executor, except that a program named by a path runs
/// without PATH in the process's environment, as under runc (containerd's `ctr
/// run --rootfs DIR ID /bin/true` gives no environment at all); a bare name
/// still needs PATH to be found.
#[derive(Clone)]
struct RuncExecutor;

impl Executor for RuncExecutor {
    fn exec(&self, spec: &Spec) -> std::result::Result<(), ExecutorError> {
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> std::result::Result<(), ExecutorValidationError> {
        let process = spec.process().as_ref();
        let has_path = process
            .and_then(|p| p.env().as_ref())
            .is_some_and(|env| env.iter().any(|e| e.starts_with("PATH=")));
        let program = process
            .and_then(|p| p.args().as_ref())
            .and_then(|a| a.first())
            .filter(|a| a.contains('/'));
        match program {
            Some(path) if !has_path => {
                use std::os::unix::fs::PermissionsExt;
                match std::fs::metadata(path) {
                    Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
                    Ok(_) => Err(ExecutorValidationError::ArgValidationError(format!(
                        "executable '{path}' at path '{path:?}' does not have correct permissions"
                    ))),
                    Err(_) => Err(ExecutorValidationError::ArgValidationError(format!(
                        "executable '{path}' not found in $PATH"
                    ))),
                }
            }
            _ => DefaultExecutor {}.validate(spec),
        }
    }
}

/// runc's words for a process that cannot be executed, which docker reads to
/// exit 127 ("no such file or directory", "executable file not found") or 126
/// ("permission denied"); libcontainer says it in words of its own
/// ("executable 'X' not found in $PATH", "... does not have correct permissions").
fn runc_wording(m: &str) -> Option<String> {
    let (_, rest) = m.split_once("executable '")?;
    let (name, rest) = rest.split_once('\'')?;
    if rest.starts_with(" not found in $PATH") {
        Some(if name.contains('/') {
            format!("exec: {name:?}: stat {name}: no such file or directory")
        } else {
            format!("exec: {name:?}: executable file not found in $PATH")
        })
    } else if rest.contains("does not have correct permissions") {
        Some(format!("exec: {name:?}: permission denied"))
    } else {
        None
    }
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let m = inner.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = inner.source();
    }
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_commands() {
        let c = parse(&args("create --root /r --id a --bundle /b --stdio")).expect("parse");
        assert_eq!(
            c,
            Command {
                root: "/r".into(),
                id: "a".into(),
                action: Action::Create {
                    bundle: "/b".into(),
                    console_socket: None,
                    stdio: true
                }
            }
        );
        let c = parse(&args("kill --root /r --id a --signal 9 --all")).expect("parse");
        assert_eq!(
            c.action,
            Action::Kill {
                signal: 9,
                all: true
            }
        );
    }

    #[test]
    fn unexecutable_processes_are_said_in_runcs_words() {
        let m = "exec process failed with error error in executing process : \
                 executable '/nonexistent' not found in $PATH";
        assert_eq!(
            runc_wording(m).as_deref(),
            Some("exec: \"/nonexistent\": stat /nonexistent: no such file or directory")
        );
        let m = "executable 'nosuch' not found in $PATH";
        assert_eq!(
            runc_wording(m).as_deref(),
            Some("exec: \"nosuch\": executable file not found in $PATH")
        );
        let m =
            "executable '/etc/passwd' at path '\"/etc/passwd\"' does not have correct permissions";
        assert_eq!(
            runc_wording(m).as_deref(),
            Some("exec: \"/etc/passwd\": permission denied")
        );
        assert_eq!(runc_wording("cgroup: no such file or directory"), None);
    }

    #[test]
    fn refuses_bad_commands() {
        let msg = |s: &str| parse(&args(s)).expect_err(s).message;
        assert_eq!(msg("start --root /r"), "--id: missing");
        assert!(msg("start --root /r --id ../x").starts_with("id: "));
        assert!(msg("frob --root /r --id a").contains("unknown command"));
        assert_eq!(
            msg("kill --root /r --id a --signal x"),
            "signal: \"x\" is not a number"
        );
        assert_eq!(msg("create --root /r --id a"), "--bundle: missing");
    }
}
