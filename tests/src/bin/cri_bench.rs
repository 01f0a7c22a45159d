//! burrow-cri-bench: how long a pod takes to start through CRI, as the kubelet
//! starts one: RunPodSandbox, CreateContainer and StartContainer of one
//! sleeping container, timed from before the first call to the last one's
//! answer; the pod is then stopped and removed, untimed. Prints one JSON line,
//! `{"handler":"burrow","runs_ms":[...]}`, for scripts/bench_shim.py.
//!
//! Usage: burrow-cri-bench --address SOCKET --handler NAME --image REF --logs DIR
//!        [--runs N] [--cgroup-parent PATH]

use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use burrow_tests::cri::{self, container_config, pod_config};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    CreateContainerRequest, ImageSpec, ImageStatusRequest, RemoveContainerRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::Channel;

const USAGE: &str = "usage: burrow-cri-bench --address SOCKET --handler NAME --image REF \
                     --logs DIR [--runs N] [--cgroup-parent PATH]";
/// How long CRI may take to learn of an image imported with `ctr` (it does from
/// containerd's events, a moment after the import).
const IMAGE_WAIT: Duration = Duration::from_secs(60);

/// What the command line asks for.
#[derive(Debug, PartialEq)]
struct Flags {
    /// containerd's gRPC socket.
    address: PathBuf,
    /// CRI's runtime handler (`burrow`, `runc`).
    handler: String,
    /// The container's image, already in CRI's namespace.
    image: String,
    /// The pods' log directory (CRI refuses a container log without one).
    logs: PathBuf,
    runs: usize,
    /// The pods' cgroup parent, as the kubelet always sets one; none leaves
    /// containerd's default (`/k8s.io/ID`), shared by every containerd of the host.
    cgroup_parent: Option<String>,
}

impl Flags {
    /// The flags in `args` (without the program's name); an error names the
    /// flag that is wrong.
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Flags, String> {
        let (mut address, mut handler, mut image, mut logs) = (None, None, None, None);
        let (mut runs, mut cgroup_parent) = (1, None);
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let mut value = || {
                args.next()
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| format!("{flag} needs a value"))
            };
            match flag.as_str() {
                "--address" => address = Some(PathBuf::from(value()?)),
                "--handler" => handler = Some(value()?),
                "--image" => image = Some(value()?),
                "--logs" => logs = Some(PathBuf::from(value()?)),
                "--cgroup-parent" => cgroup_parent = Some(value()?),
                "--runs" => {
                    let v = value()?;
                    runs = usize::from_str(&v)
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| format!("--runs wants a positive number, not {v:?}"))?;
                }
                _ => return Err(format!("unknown flag {flag:?}")),
            }
        }
        let logs: PathBuf = required(logs, "--logs")?;
        // CRI takes the log directory as given: a relative one would be
        // containerd's working directory's.
        if !logs.is_absolute() {
            return Err(format!(
                "--logs wants an absolute path, not {}",
                logs.display()
            ));
        }
        Ok(Flags {
            address: required(address, "--address")?,
            handler: required(handler, "--handler")?,
            image: required(image, "--image")?,
            logs,
            runs,
            cgroup_parent,
        })
    }
}

/// `value` of `flag`, which must be given.
fn required<T>(value: Option<T>, flag: &str) -> Result<T, String> {
    value.ok_or_else(|| format!("{flag} is missing"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let flags = match Flags::parse(args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("burrow-cri-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let runs = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
        .and_then(|rt| rt.block_on(bench(&flags)));
    match runs {
        Ok(runs) => {
            let line = serde_json::json!({"handler": flags.handler, "runs_ms": runs});
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("burrow-cri-bench: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The pod starts' times in ms, one per run.
async fn bench(flags: &Flags) -> Result<Vec<f64>> {
    let channel = cri::connect(&flags.address)
        .await
        .with_context(|| format!("connect to CRI on {}", flags.address.display()))?;
    wait_for_image(ImageServiceClient::new(channel.clone()), &flags.image).await?;
    let mut runtime = RuntimeServiceClient::new(channel);
    let mut runs = Vec::with_capacity(flags.runs);
    for i in 0..flags.runs {
        let took = pod_start(&mut runtime, flags, i).await?;
        // To 0.1 ms: finer is noise.
        runs.push((took.as_secs_f64() * 10_000.0).round() / 10.0);
    }
    Ok(runs)
}

/// Waits until CRI knows `image`. It learns of images from containerd's
/// events and offers no signal for it: ImageStatus is asked until it answers.
async fn wait_for_image(mut images: ImageServiceClient<Channel>, image: &str) -> Result<()> {
    let deadline = Instant::now() + IMAGE_WAIT;
    loop {
        let status = images
            .image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .map_err(|s| rpc("ImageStatus", &s))?;
        if status.into_inner().image.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "CRI does not know image {image} after {} s (is it in containerd's k8s.io namespace?)",
                IMAGE_WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One pod started, timed, then stopped and removed whether or not it started.
async fn pod_start(
    runtime: &mut RuntimeServiceClient<Channel>,
    flags: &Flags,
    run: usize,
) -> Result<Duration> {
    let name = format!("bench-{}-{run}", std::process::id());
    let mut config = pod_config(&name, &flags.logs);
    if let (Some(parent), Some(linux)) = (&flags.cgroup_parent, config.linux.as_mut()) {
        linux.cgroup_parent = parent.clone();
    }
    let t0 = Instant::now();
    // A RunPodSandbox that fails leaves nothing: CRI undoes it.
    let pod = runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: flags.handler.clone(),
        })
        .await
        .map_err(|s| rpc("RunPodSandbox", &s))?
        .into_inner()
        .pod_sandbox_id;
    let mut container = None;
    let started = async {
        let id = runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config("app", &flags.image)),
                sandbox_config: Some(config),
            })
            .await
            .map_err(|s| rpc("CreateContainer", &s))?
            .into_inner()
            .container_id;
        container = Some(id.clone());
        runtime
            .start_container(StartContainerRequest { container_id: id })
            .await
            .map_err(|s| rpc("StartContainer", &s))?;
        Ok::<_, anyhow::Error>(t0.elapsed())
    }
    .await;
    let removed = remove_pod(runtime, &pod, container).await;
    let took = started.with_context(|| format!("pod {pod} ({} handler)", flags.handler))?;
    removed.with_context(|| format!("removing pod {pod}"))?;
    Ok(took)
}

/// Stops pod `pod` (its container is killed with it) and removes its
/// `container` and then the pod.
async fn remove_pod(
    runtime: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    container: Option<String>,
) -> Result<()> {
    runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await
        .map_err(|s| rpc("StopPodSandbox", &s))?;
    if let Some(id) = container {
        runtime
            .remove_container(RemoveContainerRequest { container_id: id })
            .await
            .map_err(|s| rpc("RemoveContainer", &s))?;
    }
    runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await
        .map_err(|s| rpc("RemovePodSandbox", &s))?;
    Ok(())
}

/// `e` and its causes on one line, each said once: tonic's transport error
/// repeats its source's message as a cause of its own.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain().map(ToString::to_string) {
        if parts.last() != Some(&cause) {
            parts.push(cause);
        }
    }
    parts.join(": ")
}

/// A failed CRI call as one line: the call, the gRPC code, containerd's message.
fn rpc(call: &str, status: &tonic::Status) -> anyhow::Error {
    let message = status.message().split_whitespace().collect::<Vec<_>>();
    anyhow!("{call}: {:?}: {}", status.code(), message.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Flags, String> {
        Flags::parse(args.iter().map(|s| s.to_string()))
    }

    const GOOD: &[&str] = &[
        "--address",
        "/tmp/c.sock",
        "--handler",
        "burrow",
        "--image",
        "img",
        "--logs",
        "/tmp/l",
    ];

    #[test]
    fn flags_are_read_with_their_defaults() {
        let f = parse(GOOD).expect("good flags");
        assert_eq!(
            f,
            Flags {
                address: "/tmp/c.sock".into(),
                handler: "burrow".into(),
                image: "img".into(),
                logs: "/tmp/l".into(),
                runs: 1,
                cgroup_parent: None,
            }
        );
        let f = parse(&[GOOD, &["--runs", "5", "--cgroup-parent", "/bench"]].concat())
            .expect("good flags");
        assert_eq!((f.runs, f.cgroup_parent.as_deref()), (5, Some("/bench")));
    }

    #[test]
    fn a_bad_flag_is_named() {
        for (extra, named) in [
            (&["--runs", "0"][..], "--runs"),
            (&["--runs", "many"], "--runs"),
            (&["--runs"], "--runs"),
            (&["--image", ""], "--image"),
            (&["--frobnicate"], "--frobnicate"),
        ] {
            let err = parse(&[GOOD, extra].concat()).expect_err("a bad flag");
            assert!(err.contains(named), "{extra:?}: {err}");
        }
        let err = parse(&GOOD[2..]).expect_err("no address");
        assert!(err.contains("--address"), "{err}");
        let err = parse(&[&GOOD[..6], &["--logs", "rel"]].concat()).expect_err("relative logs");
        assert!(err.contains("--logs"), "{err}");
    }
}
