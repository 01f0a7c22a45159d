//! Starting one VM: the two vhost-user back ends, then QEMU.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::jail::{find_program, Jail, JailBuilder, NoCapabilities};
use super::{Accel, BootMode, VmPaths, VmSpec, WorkspaceCgroup};
use crate::db::{ProcId, VmPids};
use crate::process::pass_fd;

/// virtio-fs tag of the root file system; the initramfs mounts it (`burrow.root=`).
pub const ROOT_TAG: &str = "rootfs";
/// Fd number the pre-bound listening sockets are handed over on.
const PASSED_FD: i32 = 3;
/// Where QEMU finds the guest's TAP device.
const TAP_FD: i32 = 4;
const SIDECAR_READY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("start {what}: {source}")]
    Spawn {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{what} did not start: {reason}; see {log}")]
    Sidecar {
        what: &'static str,
        reason: String,
        log: String,
    },
    #[error("{0}")]
    Jail(String),
    #[error("prepare {path}: {source}")]
    Prepare {
        path: String,
        source: std::io::Error,
    },
}

fn prepare(path: &Path, e: std::io::Error) -> LaunchError {
    LaunchError::Prepare {
        path: path.display().to_string(),
        source: e,
    }
}

/// Kills what was started if the launch does not get to the end.
struct Started(Vec<ProcId>);

impl Drop for Started {
    fn drop(&mut self) {
        for p in &self.0 {
            p.signal(libc::SIGKILL);
            p.reap();
        }
    }
}

/// Starts the sidecars, QEMU and its console writer. Returns once QEMU runs; the
/// caller waits for the agent. The run dir must have been made by
/// [`VmPaths::prepare`]; the log dir must exist.
pub async fn launch(spec: &VmSpec) -> Result<VmPids, LaunchError> {
    let paths = VmPaths::new(spec.run_dir.clone(), spec.log_dir.clone());
    let mut started = Started(Vec::new());
    let cgroup = spec.cgroup.clone().map(Arc::new);

    // vhost-device-vsock. Its group is the VM's id: VMs in one group may reach each
    // other over vsock, and workspaces must not.
    let vsock_dev = paths.vsock_device();
    let vsock_bin = program("vhost-device-vsock")?;
    let mut cmd = Command::new(&vsock_bin);
    cmd.arg("--vm").arg(format!(
        "guest-cid=3,socket={},uds-path={},groups=burrow-{}",
        vsock_dev.display(),
        paths.vsock_uds().display(),
        spec.id
    ));
    let jail = match &spec.confine {
        Some(user) => {
            let mut j = JailBuilder::new(&paths.jail());
            j.system()
                .and_then(|j| j.bind(&vsock_bin, false))
                .and_then(|j| j.bind(&paths.vsock_dir(), true))
                .map_err(jail_error)?;
            Some(j.build(user).map_err(jail_error)?)
        }
        None => None,
    };
    confine(&mut cmd, cgroup.clone(), jail);
    let vsock = spawn(cmd, &paths.vsock_log(), "vhost-device-vsock")?;
    started.0.push(vsock);

    // virtiofsd gets a listening socket we bound ourselves, so it is ready the moment
    // it exists and there is nothing to wait for.
    let fs_sock = paths.virtiofs();
    let fs_listener = UnixListener::bind(&fs_sock).map_err(|e| prepare(&fs_sock, e))?;
    if let Some(user) = &spec.confine {
        // QEMU, as the VMM user, connects to it.
        user.own(&fs_sock, 0o600).map_err(jail_error)?;
    }
    let mut cmd = Command::new(program("virtiofsd")?);
    cmd.arg(format!("--fd={PASSED_FD}"))
        .arg("--shared-dir")
        .arg(&spec.root)
        .arg(match spec.mode {
            // The guest is the only writer of its root while it runs (the host
            // goes through the agent), so the guest may cache entries, attributes
            // and pages for good. With --cache=auto every open() dropped the page
            // cache and every exec re-read libc over FUSE: 65 ms to spawn `true`
            // under TCG; 7 ms now.
            BootMode::Workspace => "--cache=always",
            // A container's bind mounts are host directories the host changes too
            // (`docker run -v`), and the host adds containers' directories after
            // the boot: the guest revalidates what it cached.
            BootMode::Container => "--cache=auto",
        })
        .args([
            // The guest drives this process: keep it in its own namespaces, chrooted
            // into the volume, so a hostile guest cannot walk out of its root.
            "--sandbox=namespace",
            "--xattr",
            "--announce-submounts",
        ]);
    if spec.confine.is_some() {
        // virtiofsd must stay root to serve files of every owner (chown, any
        // uid's permission bits), but it needs neither to make device nodes nor to
        // set file capabilities: a guest gets neither on the host (libvirt drops
        // the same two).
        cmd.arg("--modcaps=-mknod:-setfcap");
    }
    let cg = cgroup.clone();
    // SAFETY: pass_fd only calls dup2; join only open, write and close.
    unsafe {
        cmd.pre_exec(move || {
            pass_fd(&fs_listener, PASSED_FD)?;
            if let Some(cg) = &cg {
                cg.join()?;
            }
            Ok(())
        })
    };
    let virtiofsd = spawn(cmd, &paths.virtiofsd_log(), "virtiofsd")?;
    started.0.push(virtiofsd);

    // vhost-device-vsock binds its own socket; wait for it on inotify.
    super::wait_for_path(&vsock_dev, vsock, SIDECAR_READY)
        .await
        .map_err(|e| LaunchError::Sidecar {
            what: "vhost-device-vsock",
            reason: e.to_string(),
            log: paths.vsock_log().display().to_string(),
        })?;

    let qmp_sock = paths.qmp();
    let qmp_listener = UnixListener::bind(&qmp_sock).map_err(|e| prepare(&qmp_sock, e))?;
    let qemu_bin = program("qemu-system-x86_64")?;
    let mut cmd = Command::new(&qemu_bin);
    cmd.args(qemu_args(spec, &paths));
    let jail = match &spec.confine {
        Some(user) => {
            let mut j = JailBuilder::new(&paths.jail());
            j.system()
                .and_then(|j| j.bind(&qemu_bin, false))
                .and_then(|j| j.bind(&spec.kernel, false))
                .and_then(|j| j.bind(&spec.initramfs, false))
                .and_then(|j| j.bind(&paths.qemu_dir(), false))
                .and_then(|j| j.bind(&paths.vsock_dir(), false))
                .map_err(jail_error)?;
            if spec.accel == Accel::Kvm {
                // The probe that chose KVM ran as root: say so now if the VMM user
                // cannot open the device, rather than fail inside the jail.
                if !user.can_read_write(Path::new("/dev/kvm")) {
                    return Err(LaunchError::Jail(format!(
                        "/dev/kvm is not readable and writable by {} (group kvm, mode 0660: \
                         scripts/install-deps.sh sets it)",
                        user.name
                    )));
                }
                j.bind(Path::new("/dev/kvm"), true).map_err(jail_error)?;
            }
            Some(j.build(user).map_err(jail_error)?)
        }
        None => None,
    };
    // The serial console goes to QEMU's stdout, a pipe read by the console writer,
    // which bounds the log itself.
    let (console_rx, console_tx) = pipe().map_err(|e| prepare(&paths.console(), e))?;
    let tap = spec.net.as_ref().map(|n| n.tap.clone());
    // SAFETY: pass_fd and fcntl are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            // The TAP first moves out of the way of both targets, then each fd
            // lands on its number.
            let tap = match &tap {
                Some(t) => {
                    let moved = libc::fcntl(t.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10);
                    if moved < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Some(moved)
                }
                None => None,
            };
            pass_fd(&qmp_listener, PASSED_FD)?;
            if let Some(t) = tap {
                pass_fd(&RawFdRef(t), TAP_FD)?;
            }
            Ok(())
        })
    };
    confine(&mut cmd, cgroup.clone(), jail);
    let qemu = spawn_with_stdout(
        cmd,
        Stdio::from(console_tx),
        &paths.qemu_log(),
        "qemu-system-x86_64",
    )?;
    started.0.push(qemu);

    // The writer joins QEMU's process group: it is part of the VM.
    let mut cmd = Command::new(&spec.console.writer);
    cmd.arg("--log")
        .arg(paths.console())
        .arg("--max-bytes")
        .arg(spec.console.max_bytes.to_string())
        .arg("--run-dir")
        .arg(&paths.run_dir)
        .stdin(Stdio::from(console_rx))
        .stdout(Stdio::null())
        .process_group(qemu.pid);
    let out = File::options()
        .create(true)
        .append(true)
        .open(paths.console_writer_log())
        .map_err(|e| prepare(&paths.console_writer_log(), e))?;
    cmd.stderr(out);
    // It stays root only to own the log files it writes; it needs no capability.
    let cg = cgroup.clone();
    let nocaps = spec.confine.as_ref().map(|_| NoCapabilities::default());
    // SAFETY: join only calls open, write and close; apply only prctl and capset.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(cg) = &cg {
                cg.join()?;
            }
            if let Some(n) = &nocaps {
                n.apply()?;
            }
            Ok(())
        })
    };
    let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
        what: "burrow-console",
        source,
    })?;
    let console = ProcId::of(child.id() as i32).ok_or_else(|| LaunchError::Spawn {
        what: "burrow-console",
        source: std::io::Error::other("exited immediately"),
    })?;

    std::mem::take(&mut started.0);
    Ok(VmPids {
        qemu,
        virtiofsd,
        vsock,
        console: Some(console),
    })
}

/// Adds to `cmd`'s pre_exec: joining the cgroup, then entering the jail (which drops
/// privileges, so it comes last).
fn confine(cmd: &mut Command, cgroup: Option<Arc<WorkspaceCgroup>>, jail: Option<Jail>) {
    if cgroup.is_none() && jail.is_none() {
        return;
    }
    // SAFETY: join uses open, write and close; enter only raw syscalls on data
    // built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(cg) = &cgroup {
                cg.join()?;
            }
            if let Some(j) = &jail {
                j.enter()?;
            }
            Ok(())
        })
    };
}

fn jail_error(e: super::jail::JailError) -> LaunchError {
    LaunchError::Jail(e.to_string())
}

/// The absolute path of a VM binary: a jail binds it at that path.
fn program(name: &'static str) -> Result<PathBuf, LaunchError> {
    find_program(name).ok_or_else(|| LaunchError::Spawn {
        what: name,
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "not found on PATH"),
    })
}

/// A pipe: (read end, write end), both close-on-exec.
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A raw fd number in the child, for pass_fd.
struct RawFdRef(i32);

impl std::os::fd::AsRawFd for RawFdRef {
    fn as_raw_fd(&self) -> i32 {
        self.0
    }
}

fn qemu_args(spec: &VmSpec, paths: &VmPaths) -> Vec<String> {
    let mem = format!("{}M", spec.memory_mib);
    let tag = match spec.mode {
        BootMode::Workspace => ROOT_TAG,
        BootMode::Container => burrow_proto::CONTAINERS_TAG,
    };
    let mut cmdline = format!(
        "console=ttyS0 quiet panic=-1 reboot=t burrow.root={tag} burrow.hostname={}",
        spec.hostname
    );
    if spec.mode == BootMode::Container {
        cmdline.push_str(" burrow.mode=container");
    }
    let (accel, cpu) = match spec.accel {
        Accel::Kvm => ("kvm", "host"),
        // MTTCG: one host thread per vCPU. QEMU's default CPU model: with `max` the
        // guest kernel cannot calibrate its TSC against the PIT and hangs.
        // A container VM's translation buffer is bounded: TCG maps 1 GiB for it
        // by default, and what it fills (~200 MiB over a container's life) is
        // host memory the container pays for. A container VM's boot, agent and
        // libcontainer fill ~80 MiB; below that TCG retranslates: measured in
        // one bench_oci run each, docker exec took 1320 ms with 16 MiB, 196 ms
        // with 64 and 217 with 256 (80 used), docker run 9.1 s, 6.7 s, 6.4 s.
        // 64 MiB is the knee. A workspace keeps the default for its builds and
        // tools.
        Accel::Tcg if spec.mode == BootMode::Container => ("tcg,thread=multi,tb-size=64", "qemu64"),
        Accel::Tcg => ("tcg,thread=multi", "qemu64"),
    };
    if spec.accel == Accel::Tcg {
        // Under TCG the guest reads the host's TSC. PIT calibration of it fails when
        // the host is busy (the guest then hangs with "Marking TSC unstable"), so
        // tell the guest its frequency.
        if let Some(khz) = host_tsc_khz() {
            cmdline.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    if let Some(net) = &spec.net {
        // Configured by the initramfs before the agent starts.
        cmdline.push_str(&format!(" burrow.ip={}/{}", net.ip, net.prefix));
        // A container's namespace may have no default route.
        if !net.gateway.is_unspecified() {
            cmdline.push_str(&format!(" burrow.gw={}", net.gateway));
        }
    }
    let mut args: Vec<String> = vec![
        "-name".into(),
        // Only the guest name: the process keeps its own name, so that tools that
        // look for qemu-system-x86 by name still see it.
        format!("burrow-{}", spec.id),
        // microvm: no PCI, no firmware, virtio-mmio only; the fastest QEMU machine to
        // boot. isa-serial stays on for the console. Both vhost-user devices need the
        // guest RAM shared with their back ends, hence the memfd backend.
        "-M".into(),
        "microvm,isa-serial=on,rtc=on,memory-backend=mem".into(),
        "-accel".into(),
        accel.into(),
        "-cpu".into(),
        cpu.into(),
        "-smp".into(),
        spec.vcpus.to_string(),
        "-m".into(),
        mem.clone(),
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        "-no-user-config".into(),
        "-nodefaults".into(),
        "-display".into(),
        "none".into(),
        // The agent powers the guest off by resetting it; -no-reboot turns a reset
        // into QEMU's exit, and panic=-1 does the same for a kernel panic.
        "-no-reboot".into(),
        // The console is QEMU's stdout (a pipe to the console writer); signal=off
        // keeps ^C in guest output from reaching QEMU as a signal.
        "-chardev".into(),
        "stdio,id=console,signal=off".into(),
        "-serial".into(),
        "chardev:console".into(),
        "-kernel".into(),
        spec.kernel.display().to_string(),
        "-initrd".into(),
        spec.initramfs.display().to_string(),
        "-append".into(),
        cmdline,
        "-chardev".into(),
        format!("socket,id=vsock,path={}", paths.vsock_device().display()),
        "-device".into(),
        "vhost-user-vsock-device,chardev=vsock".into(),
        "-chardev".into(),
        format!("socket,id=rootfs,path={}", paths.virtiofs().display()),
        "-device".into(),
        format!("vhost-user-fs-device,chardev=rootfs,tag={tag}"),
        // QMP on the listening socket bound by the engine (fd 3): connectable from the
        // moment QEMU is spawned, no waiting for QEMU to create it.
        "-chardev".into(),
        format!("socket,id=qmp,fd={PASSED_FD},server=on,wait=off"),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
    ];
    if spec.confine.is_some() {
        // QEMU's own seccomp filter, installed once it is set up: no obsolete
        // system calls, no setuid and friends, no fork or exec, no changing of
        // priorities, affinities or limits.
        args.extend([
            "-sandbox".into(),
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        ]);
    }
    if let Some(net) = &spec.net {
        args.extend([
            "-netdev".into(),
            format!("tap,id=net0,fd={TAP_FD}"),
            "-device".into(),
            format!("virtio-net-device,netdev=net0,mac={}", net.mac),
        ]);
    }
    args
}

/// The host CPU's clock in kHz, from /proc/cpuinfo.
fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find_map(|l| l.strip_prefix("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then_some((mhz * 1000.0) as u64)
}

/// Spawns a VM process in its own process group with its output in `log`.
fn spawn(cmd: Command, log: &Path, what: &'static str) -> Result<ProcId, LaunchError> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| prepare(log, e))?;
    spawn_with_stdout(cmd, Stdio::from(out), log, what)
}

/// Spawns a VM process in its own process group: stdout as given, stderr to `log`.
fn spawn_with_stdout(
    mut cmd: Command,
    stdout: Stdio,
    log: &Path,
    what: &'static str,
) -> Result<ProcId, LaunchError> {
    let err = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| prepare(log, e))?;
    cmd.stdin(Stdio::null())
        .stdout(stdout)
        .stderr(err)
        .process_group(0);
    let child = cmd
        .spawn()
        .map_err(|source| LaunchError::Spawn { what, source })?;
    let pid = child.id() as i32;
    // The Child handle is dropped: the VM outlives it, and exits are observed (and
    // reaped) through ProcId. The start time is read at once, while the pid is
    // certainly ours.
    ProcId::of(pid).ok_or_else(|| LaunchError::Spawn {
        what,
        source: std::io::Error::other("exited immediately"),
    })
}
