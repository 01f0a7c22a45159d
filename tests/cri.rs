//! burrow's containerd shim driven through containerd's CRI plugin, as the
//! kubelet drives it: runtime handler `burrow`, a pod of two containers in one
//! microVM, exec, stats, stop and removal, over CRI's gRPC API on containerd's
//! socket.

use std::time::Duration;

use burrow_tests::containerd::{Containerd, CNI_GATEWAY, CRI_NAMESPACE};
use burrow_tests::cri::{self, container_config, pod_config};
use burrow_tests::{text, wait_until, wait_until_explained, Burrow};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerState, ContainerStatsRequest, ContainerStatusRequest,
    CreateContainerRequest, ExecSyncRequest, ExecSyncResponse, ImageSpec, ImageStatusRequest,
    ListContainersRequest, ListPodSandboxRequest, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StatusRequest, StopContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::Channel;

/// CRI's runtime handler for burrow (`io.containerd.burrow.v2` in the
/// harness's containerd config).
const HANDLER: &str = "burrow";
const LONG: Duration = Duration::from_secs(120);

/// A CRI client on a private containerd's socket; its calls block (the
/// harness around it is synchronous).
struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl Cri {
    fn connect(c: &Containerd) -> Cri {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let channel = rt
            .block_on(cri::connect(&c.address))
            .unwrap_or_else(|e| panic!("connect to CRI on {}: {e}", c.address.display()));
        Cri {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        }
    }
}

/// Runs one CRI call on `cri`'s runtime, giving its result.
macro_rules! call {
    ($cri:expr, $svc:ident . $method:ident ($req:expr)) => {{
        let mut svc = $cri.$svc.clone();
        $cri.rt
            .block_on(svc.$method($req))
            .map(tonic::Response::into_inner)
    }};
}

/// `cmd` run in container `id` by ExecSync, which must succeed as a call.
fn exec(cri: &Cri, c: &Containerd, id: &str, cmd: &[&str]) -> ExecSyncResponse {
    call!(
        cri,
        runtime.exec_sync(ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: LONG.as_secs() as i64,
        })
    )
    .unwrap_or_else(|e| {
        panic!(
            "ExecSync {cmd:?} in {id} failed: {e}\ncontainerd's log:\n{}",
            c.log_tail(30)
        )
    })
}

/// RunPodSandbox of `config` on burrow; the pod's id.
fn run_pod(cri: &Cri, c: &Containerd, config: &PodSandboxConfig) -> String {
    let pod = call!(
        cri,
        runtime.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: HANDLER.into(),
        })
    )
    .unwrap_or_else(|e| {
        panic!(
            "RunPodSandbox failed: {e}\ncontainerd's log:\n{}",
            c.log_tail(40)
        )
    })
    .pod_sandbox_id;
    assert!(!pod.is_empty(), "RunPodSandbox gave an empty pod id");
    pod
}

/// CreateContainer and StartContainer of `container` in `pod`; its id.
fn start_container(
    cri: &Cri,
    c: &Containerd,
    pod: &str,
    config: &PodSandboxConfig,
    container: ContainerConfig,
) -> String {
    let name = container
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let id = call!(
        cri,
        runtime.create_container(CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(container),
            sandbox_config: Some(config.clone()),
        })
    )
    .unwrap_or_else(|e| {
        panic!(
            "CreateContainer {name} failed: {e}\ncontainerd's log:\n{}",
            c.log_tail(40)
        )
    })
    .container_id;
    call!(
        cri,
        runtime.start_container(StartContainerRequest {
            container_id: id.clone(),
        })
    )
    .unwrap_or_else(|e| {
        panic!(
            "StartContainer {name} ({id}) failed: {e}\ncontainerd's log:\n{}",
            c.log_tail(40)
        )
    });
    id
}

/// StopPodSandbox and RemovePodSandbox of `pod`; then no VM or shim is left.
fn remove_pod(cri: &Cri, c: &Containerd, b: &Burrow, pod: &str) {
    call!(
        cri,
        runtime.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
    )
    .unwrap_or_else(|e| {
        panic!(
            "StopPodSandbox failed: {e}\ncontainerd's log:\n{}",
            c.log_tail(40)
        )
    });
    call!(
        cri,
        runtime.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
    )
    .unwrap_or_else(|e| {
        panic!(
            "RemovePodSandbox failed: {e}\ncontainerd's log:\n{}",
            c.log_tail(40)
        )
    });
    b.wait_no_vms(LONG);
    wait_until("the burrow shim to exit", LONG, || {
        c.shim_processes().is_empty()
    });
}

/// Waits until CRI knows `image` (it learns of imported images from
/// containerd's events).
fn wait_for_image(cri: &Cri, c: &Containerd, image: &str) {
    wait_until_explained(
        "CRI to know the imported image",
        LONG,
        || {
            call!(
                cri,
                images.image_status(ImageStatusRequest {
                    image: Some(ImageSpec {
                        image: image.into(),
                        ..Default::default()
                    }),
                    verbose: false,
                })
            )
            .is_ok_and(|r| r.image.is_some())
        },
        || c.log_tail(20),
    );
}

/// The lines `cmd` prints in container `id`; it must exit 0.
fn exec_lines(cri: &Cri, c: &Containerd, id: &str, cmd: &[&str]) -> Vec<String> {
    let r = exec(cri, c, id, cmd);
    assert_eq!(
        r.exit_code,
        0,
        "{cmd:?} in {id} exited {}; stdout {:?}, stderr {:?}",
        r.exit_code,
        text(&r.stdout),
        text(&r.stderr)
    );
    text(&r.stdout).lines().map(str::to_string).collect()
}

/// A pod of two containers through CRI: one VM, one shim; the containers
/// share the pod's UTS and IPC namespaces and hostname, each with its own pid
/// namespace; ExecSync gives outputs and exit codes; ContainerStats gives the
/// guest's figures; stop and removal of the containers and the pod leave no VM,
/// shim, pod or container; creating a container in a pod that is not there is
/// refused naming it.
#[test]
fn cri_runs_a_pod_in_one_microvm() {
    let b = Burrow::new();
    let Some(c) = Containerd::start(&b) else {
        return;
    };
    c.import_sandbox_image();
    let image = c.import_busybox_in(
        CRI_NAMESPACE,
        "burrow-cri",
        &["readlink", "hostname", "cat"],
    );
    let logs = tempfile::tempdir().expect("log dir");
    let cri = Cri::connect(&c);

    wait_for_image(&cri, &c, &image);

    // 1. The pod: its sandbox container makes the VM.
    let config = pod_config("pod1", logs.path());
    let pod = run_pod(&cri, &c, &config);

    // 2. Two containers in it.
    let ids: Vec<String> = ["app1", "app2"]
        .into_iter()
        .map(|name| start_container(&cri, &c, &pod, &config, container_config(name, &image)))
        .collect();
    let shims = c.shim_processes();
    assert_eq!(shims.len(), 1, "one shim per pod, saw pids {shims:?}");
    let vms = b.json(&["ls", "--json"]);
    assert_eq!(
        vms.as_array().map(Vec::len),
        Some(1),
        "one VM per pod, burrow lists: {vms}"
    );

    // 3. Both containers in the pod's UTS and IPC namespaces, each in its own
    // pid namespace.
    let probe = [
        "sh",
        "-c",
        "hostname; for n in uts ipc pid; do readlink /proc/self/ns/$n; done",
    ];
    let a = exec_lines(&cri, &c, &ids[0], &probe);
    let z = exec_lines(&cri, &c, &ids[1], &probe);
    assert_eq!(a.len(), 4, "hostname and 3 namespaces, app1 printed {a:?}");
    assert_eq!(z.len(), 4, "hostname and 3 namespaces, app2 printed {z:?}");
    assert_eq!(
        a[..3],
        z[..3],
        "hostname, uts and ipc should be the pod's: app1 saw {a:?}, app2 saw {z:?}"
    );
    assert_ne!(
        a[3], z[3],
        "each container should have its own pid namespace: both saw {}",
        a[3]
    );
    let r = exec(&cri, &c, &ids[0], &["sh", "-c", "exit 3"]);
    assert_eq!(
        r.exit_code,
        3,
        "`exit 3` gave exit code {} (stderr {:?})",
        r.exit_code,
        text(&r.stderr)
    );
    let r = exec(
        &cri,
        &c,
        &ids[1],
        &["sh", "-c", "echo to-stdout; echo to-stderr >&2"],
    );
    assert_eq!(
        (
            text(&r.stdout).as_str(),
            text(&r.stderr).as_str(),
            r.exit_code
        ),
        ("to-stdout\n", "to-stderr\n", 0),
        "stdout, stderr and exit code of the echo"
    );

    // 4. Stats: the guest's figures, through the shim's Stats.
    let stats = call!(
        cri,
        runtime.container_stats(ContainerStatsRequest {
            container_id: ids[0].clone(),
        })
    )
    .unwrap_or_else(|e| {
        panic!(
            "ContainerStats failed: {e}\ncontainerd's log:\n{}",
            c.log_tail(40)
        )
    })
    .stats;
    let memory = stats
        .as_ref()
        .and_then(|s| s.memory.as_ref())
        .and_then(|m| m.working_set_bytes.as_ref())
        .map(|v| v.value);
    let cpu = stats
        .as_ref()
        .and_then(|s| s.cpu.as_ref())
        .and_then(|m| m.usage_core_nano_seconds.as_ref())
        .map(|v| v.value);
    assert!(
        memory.is_some_and(|m| m > 0) && cpu.is_some_and(|n| n > 0),
        "memory working set {memory:?} and cpu usage {cpu:?} should be non-zero: {stats:?}"
    );

    // 5. One container stopped (sleep ignores TERM as PID 1: the KILL after
    // the timeout ends it) and removed.
    let state = |id: &str| {
        call!(
            cri,
            runtime.container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
        )
        .unwrap_or_else(|e| panic!("ContainerStatus {id} failed: {e}"))
        .status
        .unwrap_or_else(|| panic!("ContainerStatus {id} gave no status"))
    };
    let s = state(&ids[0]);
    assert_eq!(
        s.state,
        ContainerState::ContainerRunning as i32,
        "app1 should be running, its status: {s:?}"
    );
    call!(
        cri,
        runtime.stop_container(StopContainerRequest {
            container_id: ids[0].clone(),
            timeout: 1,
        })
    )
    .unwrap_or_else(|e| {
        panic!(
            "StopContainer failed: {e}\ncontainerd's log:\n{}",
            c.log_tail(40)
        )
    });
    let s = state(&ids[0]);
    assert!(
        s.state == ContainerState::ContainerExited as i32 && s.exit_code != 0,
        "app1 should have exited with a non-zero code, its status: {s:?}"
    );
    call!(
        cri,
        runtime.remove_container(RemoveContainerRequest {
            container_id: ids[0].clone(),
        })
    )
    .unwrap_or_else(|e| {
        panic!(
            "RemoveContainer failed: {e}\ncontainerd's log:\n{}",
            c.log_tail(40)
        )
    });
    // The pod and its other container live on.
    let s = state(&ids[1]);
    assert_eq!(
        s.state,
        ContainerState::ContainerRunning as i32,
        "app2 should still run after app1's removal, its status: {s:?}"
    );
    let again = exec_lines(&cri, &c, &ids[1], &probe);
    assert_eq!(again, z, "app2's hostname and namespaces after app1 went");

    // 6. The pod stopped (its other container with it) and removed: nothing
    // of it stays.
    remove_pod(&cri, &c, &b, &pod);
    let pods = call!(
        cri,
        runtime.list_pod_sandbox(ListPodSandboxRequest { filter: None })
    )
    .expect("ListPodSandbox")
    .items;
    assert!(pods.is_empty(), "pods left after removal: {pods:?}");
    let containers = call!(
        cri,
        runtime.list_containers(ListContainersRequest { filter: None })
    )
    .expect("ListContainers")
    .containers;
    assert!(
        containers.is_empty(),
        "containers left after removal: {containers:?}"
    );

    // 7. A container in the removed pod, and in one never made: refused,
    // naming the pod.
    for missing in [pod.as_str(), "no-such-pod"] {
        let err = call!(
            cri,
            runtime.create_container(CreateContainerRequest {
                pod_sandbox_id: missing.into(),
                config: Some(container_config("app3", &image)),
                sandbox_config: Some(config.clone()),
            })
        )
        .map(|r| r.container_id)
        .expect_err("CreateContainer in a pod that is not there succeeded");
        assert!(
            err.code() == tonic::Code::NotFound && err.message().contains(missing),
            "the error should be NotFound naming pod {missing}, it is {:?}: {}",
            err.code(),
            err.message()
        );
    }
    let containers = call!(
        cri,
        runtime.list_containers(ListContainersRequest { filter: None })
    )
    .expect("ListContainers")
    .containers;
    assert!(
        containers.is_empty(),
        "refused creations left containers: {containers:?}"
    );
    assert!(
        b.vm_processes().is_empty(),
        "refused creations left VM processes"
    );
}

/// A pod whose network CNI makes (the bridge plugin, in the test's network
/// namespace): the VM takes the pod's interface over, so the pod has the address
/// CNI gave it, reaches the bridge's gateway, and serves on that address.
#[test]
fn a_cni_pod_is_reached_at_its_address() {
    let b = Burrow::new();
    let Some(c) = Containerd::start(&b) else {
        return;
    };
    let Some(netns) = b.netns.as_ref() else {
        eprintln!("SKIPPED: no network namespace of the test's own");
        return;
    };
    if c.enable_cni().is_none() {
        return;
    }
    c.import_sandbox_image();
    let image = c.import_busybox_in(
        CRI_NAMESPACE,
        "burrow-cri",
        &["ip", "ping", "httpd", "mkdir"],
    );
    let logs = tempfile::tempdir().expect("log dir");
    let cri = Cri::connect(&c);
    wait_for_image(&cri, &c, &image);
    wait_until_explained(
        "CRI to load the CNI configuration (NetworkReady)",
        LONG,
        || {
            call!(cri, runtime.status(StatusRequest { verbose: false }))
                .ok()
                .and_then(|r| r.status)
                .is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.r#type == "NetworkReady" && c.status)
                })
        },
        || c.log_tail(20),
    );

    let pod_network = |mut ns: NamespaceOption| {
        ns.network = NamespaceMode::Pod as i32;
        Some(ns)
    };
    let mut config = pod_config("cni1", logs.path());
    if let Some(ctx) = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
    {
        ctx.namespace_options = pod_network(cri::namespaces());
    }
    let pod = run_pod(&cri, &c, &config);
    let ip = call!(
        cri,
        runtime.pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
    )
    .expect("PodSandboxStatus")
    .status
    .and_then(|s| s.network)
    .map(|n| n.ip)
    .unwrap_or_default();
    assert!(
        ip.starts_with("10.77.0."),
        "the pod's address from CNI: {ip:?}"
    );

    let mut web = container_config("web", &image);
    web.command = [
        "sh",
        "-c",
        "mkdir -p /www && echo pod-page > /www/index.html && exec httpd -f -p 8080 -h /www",
    ]
    .map(String::from)
    .to_vec();
    if let Some(ctx) = web.linux.as_mut().and_then(|l| l.security_context.as_mut()) {
        ctx.namespace_options = pod_network(cri::namespaces());
    }
    let id = start_container(&cri, &c, &pod, &config, web);

    // The VM has the pod's address, and reaches the bridge's gateway.
    let addrs = exec_lines(&cri, &c, &id, &["ip", "-4", "-o", "addr"]).join("\n");
    assert!(addrs.contains(&format!("{ip}/")), "{addrs}");
    exec_lines(&cri, &c, &id, &["ping", "-c", "1", "-W", "10", CNI_GATEWAY]);
    // The test's namespace (the node) reaches the pod at its address.
    let url = format!("http://{ip}:8080/");
    let mut page = String::new();
    wait_until_explained(
        "the pod's web server to answer at its CNI address",
        LONG,
        || {
            let out = netns.exec(&["curl", "-s", "--max-time", "5", &url]);
            page = text(&out.stdout);
            out.status.success()
        },
        || c.log_tail(20),
    );
    assert_eq!(page, "pod-page\n");

    remove_pod(&cri, &c, &b, &pod);
    let leases = std::fs::read_dir(c.dir.path().join("cni/ipam/burrow-test"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("10."))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(leases, 0, "CNI's address of the removed pod is still held");
}
