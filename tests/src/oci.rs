//! OCI helpers: busybox root file systems, bundles, `burrow-runtime` driven as
//! containerd's runc shim and BuildKit drive it, and a private dockerd.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::{text, Burrow};

/// Applets linked to busybox in the test root file systems.
const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "uname", "id", "pwd", "sleep", "true", "false", "ls", "nproc", "env",
    "hostname", "stty", "ps", "kill", "touch", "mkdir", "head", "wc", "tr", "cp", "rm", "grep",
    "httpd", "wget", "ip",
];

/// A root file system holding only a static busybox and its applets.
pub fn busybox_rootfs(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("rootfs/bin");
    for d in ["proc", "sys", "dev", "tmp", "etc", "data", "conf"] {
        std::fs::create_dir_all(dir.join(d)).expect("rootfs dir");
    }
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("copy busybox (apt-get install busybox-static)");
    for a in APPLETS {
        let link = bin.join(a);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link).expect("applet link");
        }
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").expect("passwd");
    std::fs::write(dir.join("etc/group"), "root:x:0:\n").expect("group");
}

/// A runtime-spec config running `args`, as containerd writes one for a
/// `--network none` container (no network namespace path).
pub fn spec(args: &[&str], terminal: bool) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_KILL", "CAP_SETUID", "CAP_SETGID"],
                "effective": ["CAP_KILL", "CAP_SETUID", "CAP_SETGID"],
                "permitted": ["CAP_KILL", "CAP_SETUID", "CAP_SETGID"]
            }
        },
        "root": {"path": "rootfs"},
        "hostname": "oci",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]
        }
    })
}

/// A bundle directory: `config.json` from `spec` and a busybox `rootfs/`.
pub fn bundle(dir: &Path, spec: &Value) -> PathBuf {
    std::fs::create_dir_all(dir).expect("bundle dir");
    busybox_rootfs(&dir.join("rootfs"));
    std::fs::write(dir.join("config.json"), spec.to_string()).expect("config.json");
    dir.to_path_buf()
}

/// `burrow-runtime` with its own `--root` and `--log`, pointed at a [`Burrow`].
pub struct Runtime {
    pub root: PathBuf,
    pub log: PathBuf,
    env: Vec<(String, String)>,
    bin: PathBuf,
}

impl Runtime {
    pub fn new(b: &Burrow, dir: &Path) -> Runtime {
        Runtime {
            root: dir.join("root"),
            log: dir.join("log.json"),
            env: b.daemon_env(),
            bin: b.bin().join("burrow-runtime"),
        }
    }

    pub fn binary(&self) -> &Path {
        &self.bin
    }

    /// The command with the global flags containerd's shim passes.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(&self.log)
            .arg("--log-format")
            .arg("json")
            .args(args);
        c.env_remove("BURROW_STATE_DIR");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs a call to its exit. Its output goes to files, not pipes read to
    /// their end: a `create` leaves its stdout and stderr with the holder.
    pub fn run(&self, args: &[&str]) -> Output {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (o, e) = (tmp.path().join("out"), tmp.path().join("err"));
        let status = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&o).expect("out"))
            .stderr(std::fs::File::create(&e).expect("err"))
            .status()
            .expect("run burrow-runtime");
        Output {
            status,
            stdout: std::fs::read(&o).unwrap_or_default(),
            stderr: std::fs::read(&e).unwrap_or_default(),
        }
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "burrow-runtime {args:?} failed ({}): {}",
            out.status,
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// The call fails as runc does: exit 1, one line on stderr holding `want`,
    /// and that message as the last `"level":"error"` line of the JSON log.
    pub fn refused(&self, args: &[&str], want: &str) {
        let out = self.run(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: not one line: {err:?}"
        );
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err:?}");
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let last: Value = log
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("{args:?}: no JSON line in the log: {log:?}"));
        assert_eq!(last["level"], "error", "{last}");
        assert!(last["time"].is_string(), "{last}");
        let msg = last["msg"].as_str().unwrap_or_default();
        assert!(msg.contains(want), "{args:?}: log says {msg:?}");
    }

    pub fn state(&self, id: &str) -> Value {
        let s = self.ok(&["state", id]);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("state {id}: not JSON ({e}): {s}"))
    }

    /// What `--root` holds: no entry once every container is deleted.
    pub fn root_entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }
}

/// Makes this test process a subreaper, as containerd's shim is: holders whose
/// `create` exited become its children, and their exit statuses its to read.
pub fn become_subreaper() {
    // SAFETY: prctl with an integer argument.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0, "PR_SET_CHILD_SUBREAPER");
}

/// How a child ended, as a shim sees it.
#[derive(Debug, PartialEq, Eq)]
pub enum Reaped {
    Exited(i32),
    Signaled(i32),
}

/// Reaps `pid` (a child of this process, or a holder re-parented to it).
pub fn reap(pid: i32) -> Reaped {
    let mut status = 0;
    // SAFETY: waitpid writes the status into our int.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid {pid}: {}", std::io::Error::last_os_error());
    if libc::WIFSIGNALED(status) {
        Reaped::Signaled(libc::WTERMSIG(status))
    } else {
        Reaped::Exited(libc::WEXITSTATUS(status))
    }
}

/// The parent pid of `pid`.
pub fn ppid(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    stat[stat.rfind(')').expect("comm") + 2..]
        .split(' ')
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("ppid")
}

/// A console socket as containerd makes one: receives the pty master that
/// `create --console-socket` sends.
pub struct ConsoleSocket {
    pub path: PathBuf,
    listener: UnixListener,
}

impl ConsoleSocket {
    pub fn new(path: &Path) -> ConsoleSocket {
        ConsoleSocket {
            path: path.to_path_buf(),
            listener: UnixListener::bind(path).expect("console socket"),
        }
    }

    /// The master fd of the one message the runtime sends.
    pub fn receive(&self) -> OwnedFd {
        let (conn, _) = self.listener.accept().expect("accept console");
        let mut data = [0u8; 4096];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: CMSG_SPACE computes a size.
        let space = unsafe { libc::CMSG_SPACE(4) } as usize;
        let mut control = vec![0u8; space];
        // SAFETY: msghdr is plain data; the fields point at live buffers.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: recvmsg fills the buffers above.
        let n = unsafe { libc::recvmsg(conn.as_raw_fd(), &mut msg, 0) };
        assert!(n >= 0, "recvmsg: {}", std::io::Error::last_os_error());
        // SAFETY: the header, if any, lies in `control`.
        let fd = unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            assert!(!cmsg.is_null(), "no fd in the console socket's message");
            assert_eq!((*cmsg).cmsg_type, libc::SCM_RIGHTS);
            std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>())
        };
        // SAFETY: the fd was just received and is ours.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }
}

/// Sets a pty's window size from its master side, as a shim's resize does.
pub fn resize(master: &OwnedFd, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads the struct we own.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(r, 0, "TIOCSWINSZ");
}

/// A private dockerd (own data root, exec root, socket and containerd, inside
/// the [`Burrow`]'s network namespace) with burrow registered as runtime
/// `burrow`. Stopped, and its directories removed, on drop.
pub struct Dockerd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub pid: i32,
    client: PathBuf,
}

impl Dockerd {
    /// `runc_is_burrow`: a `runc` on dockerd's PATH that is burrow-runtime (how
    /// BuildKit inside dockerd finds its runtime).
    pub fn start(b: &Burrow, runc_is_burrow: bool) -> Dockerd {
        Dockerd::launch(b, runc_is_burrow, false)
    }

    /// A private dockerd with its default bridge network (docker0, in the
    /// [`Burrow`]'s network namespace) and its userland proxy for `-p`; no
    /// iptables rules. burrow-runtime is its `runc` too (BuildKit's RUN steps).
    pub fn start_bridged(b: &Burrow) -> Dockerd {
        Dockerd::launch(b, true, true)
    }

    fn launch(b: &Burrow, runc_is_burrow: bool, bridge: bool) -> Dockerd {
        let dir = tempfile::Builder::new()
            .prefix("dk")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let d = dir.path();
        let runtime = b.bin().join("burrow-runtime");
        let config = d.join("daemon.json");
        std::fs::write(
            &config,
            json!({"runtimes": {"burrow": {"path": runtime}}}).to_string(),
        )
        .expect("daemon.json");
        let path_dir = d.join("path");
        std::fs::create_dir_all(&path_dir).expect("path dir");
        if runc_is_burrow {
            std::os::unix::fs::symlink(&runtime, path_dir.join("runc")).expect("runc link");
        }
        let path = format!(
            "{}:{}",
            path_dir.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        // dockerd says READY=1 on $NOTIFY_SOCKET once it serves its API.
        let notify_path = d.join("notify");
        let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
        let socket = d.join("docker.sock");
        let mut cmd = Command::new("dockerd");
        // Into the test's network namespace.
        let netns_file = b.netns.as_ref().map(|ns| ns.enter_on_spawn(&mut cmd));
        cmd.arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("--config-file")
            .arg(&config)
            .args(if bridge { None } else { Some("--bridge=none") })
            .args(["--iptables=false", "--ip6tables=false", "--ip-masq=false"])
            .env("PATH", path)
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(d.join("dockerd.log")).expect("log"))
            .stderr(std::fs::File::create(d.join("dockerd.err")).expect("log"));
        for (k, v) in b.daemon_env() {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start dockerd");
        drop(netns_file);
        let pid = child.id() as i32;
        // Reaped by the drop (through wait_exit's pidfd and then waitpid).
        std::mem::forget(child);
        let client = if Path::new("/usr/bin/docker").exists() {
            PathBuf::from("/usr/bin/docker")
        } else {
            PathBuf::from("/usr/local/bin/docker")
        };
        let dockerd = Dockerd {
            dir,
            socket,
            pid,
            client,
        };
        // SAFETY: pidfd_open takes a pid and flags.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
        let mut buf = [0u8; 512];
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: notify.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: pidfd,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two pollfds that live across the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 120_000) };
            let why = if n == 0 {
                "it did not say READY=1 within 120 s"
            } else if fds[1].revents != 0 {
                "it exited"
            } else {
                match notify.recv(&mut buf) {
                    Ok(n) if text(&buf[..n]).contains("READY=1") => break,
                    _ => continue,
                }
            };
            // SAFETY: closes the pidfd we opened.
            unsafe { libc::close(pidfd) };
            panic!(
                "dockerd did not get ready: {why}\n{}",
                crate::tail_of(&dockerd.dir.path().join("dockerd.err"), 20)
            );
        }
        // SAFETY: closes the pidfd we opened.
        unsafe { libc::close(pidfd) };
        dockerd
    }

    /// A fresh [`Burrow`] (its burrowd started by the harness, not by a runtime
    /// call) and a private dockerd on it with image `bb` (busybox) imported.
    pub fn with_busybox(runc_is_burrow: bool) -> (Burrow, Dockerd) {
        let b = Burrow::new();
        b.ok(&["ls"]);
        let d = Dockerd::start(&b, runc_is_burrow);
        d.import_busybox("bb");
        (b, d)
    }

    /// The docker client on this daemon's socket.
    pub fn docker(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.client);
        c.arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .env("DOCKER_CONFIG", self.dir.path().join("client"));
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.docker(args)
            .stdin(Stdio::null())
            .output()
            .expect("docker")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed ({}): {}\n{}",
            out.status,
            text(&out.stderr),
            crate::tail_of(&self.dir.path().join("dockerd.err"), 10)
        );
        text(&out.stdout)
    }

    /// Imports a busybox root file system as image `name`.
    pub fn import_busybox(&self, name: &str) {
        let root = self.dir.path().join("img");
        busybox_rootfs(&root);
        let tar = self.dir.path().join("img.tar");
        let st = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .expect("tar");
        assert!(st.success());
        self.ok(&["import", &tar.to_string_lossy(), name]);
    }

    /// The command line to run `docker ARGS` from a shell (a tmux pane).
    pub fn shell_line(&self, args: &[&str]) -> String {
        let mut w = vec![
            crate::shell_quote(&self.client.to_string_lossy()),
            "-H".into(),
            crate::shell_quote(&format!("unix://{}", self.socket.display())),
        ];
        w.extend(args.iter().map(|a| crate::shell_quote(a)));
        w.join(" ")
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let d = self.dir.path().to_path_buf();
        // Containers first (their shims and holders), then the daemon, which
        // stops its containerd.
        if let Ok(out) = self.docker(&["ps", "-aq"]).output() {
            for id in text(&out.stdout).split_whitespace() {
                let _ = self.docker(&["rm", "-f", id]).output();
            }
        }
        // SAFETY: kill has no memory effects; the pid is the dockerd we started.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        if !crate::exits_within(self.pid, Duration::from_secs(60)) {
            // SAFETY: as above.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        // SAFETY: reaps our child; a null status pointer is allowed.
        unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), 0) };
        // Whatever still names our directories (containerd, shims) is ours.
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if crate::cmdline_mentions(pid, &d) {
                // SAFETY: kill has no memory effects; the process names our dir.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        // Mounts under the data and exec roots (overlays, netns files), deepest first.
        for m in crate::mounts_under(&d) {
            if let Ok(c) = std::ffi::CString::new(m) {
                // SAFETY: umount2 with a NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}
