//! containerd-shim-burrow-v2: burrow's containerd shim v2. containerd starts
//! one per task (per pod, with CRI's sandbox id); each task runs in a microVM
//! made by burrowd, and the shim relays its stdio and reports its exit. See
//! docs/kubernetes.md.

mod io;
mod metrics;
mod rootfs;
mod task;

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::{run, spawn, ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{api, Config, Error, Flags, StartOpts};

use crate::task::{RUNTIME_ID, SANDBOX_ID};

struct Burrow {
    namespace: String,
    address: String,
    id: String,
    bundle: String,
    exit: Arc<ExitSignal>,
}

#[async_trait]
impl Shim for Burrow {
    type T = task::Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Burrow {
            namespace: args.namespace.clone(),
            address: args.address.clone(),
            id: args.id.clone(),
            bundle: args.bundle.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        start_server(opts).await
    }

    /// What containerd runs after a shim died (killed, crashed): destroys the
    /// task's VM and unmounts its rootfs; the task ended as if killed.
    async fn delete_shim(&mut self) -> Result<api::DeleteResponse, Error> {
        let root = task::root_of(&self.address, &self.namespace);
        let bundle = if self.bundle.is_empty() {
            std::env::current_dir().map_err(|e| Error::Other(format!("current dir: {e}")))?
        } else {
            self.bundle.clone().into()
        };
        match task::connect().await {
            Ok(client) => {
                if let Ok(Some(vm)) = client.container_vm(&root, &self.id).await {
                    if let Err(e) = client.destroy(&vm).await {
                        log::error!("delete {}: destroy VM {vm}: {e}", self.id);
                    }
                }
            }
            Err(e) => log::error!("delete {}: burrowd: {e}", self.id),
        }
        rootfs::unmount(&bundle).await;
        // The dead shim's socket, unless a shim still serves it (a pod's).
        let grouping = sandbox_of(&bundle.join("config.json").to_string_lossy())
            .unwrap_or_else(|| self.id.clone());
        let socket = containerd_shim::socket_address(&self.address, &self.namespace, &grouping);
        let socket = socket
            .strip_prefix("unix://")
            .unwrap_or(&socket)
            .to_string();
        if std::os::unix::net::UnixStream::connect(&socket).is_err() {
            let _ = std::fs::remove_file(&socket);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(api::DeleteResponse {
            pid: 0,
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: containerd_shim::protos::protobuf::MessageField::some(
                containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp {
                    seconds: now.as_secs() as i64,
                    nanos: now.subsec_nanos() as i32,
                    ..Default::default()
                },
            ),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        task::Service::new(&self.namespace, &self.address, publisher, self.exit.clone())
    }
}

/// The CRI sandbox a bundle's container belongs to, from its annotations.
fn sandbox_of(config: &str) -> Option<String> {
    let bytes = std::fs::read(config).ok()?;
    let spec: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    spec.pointer(&format!("/annotations/{}", SANDBOX_ID.replace('/', "~1")))?
        .as_str()
        .filter(|s| burrow_proto::validate_container_id(s).is_ok())
        .map(str::to_string)
}

/// Starts the shim's server (or finds the one already serving the task's
/// pod) and returns its address. One shim per pod: containers of one CRI
/// sandbox share the sandbox's shim; any other container has one of its own.
async fn start_server(opts: StartOpts) -> Result<String, Error> {
    let grouping = sandbox_of("config.json").unwrap_or_else(|| opts.id.clone());
    let address = spawn(opts, &grouping, Vec::new()).await?;
    containerd_shim::asynchronous::util::write_str_to_file("address", &address).await?;
    Ok(address)
}

#[tokio::main]
async fn main() {
    let config = Config {
        // The shim starts no host process of a container's: nothing to reap,
        // and a reaper would take the exits tokio's process handles wait for.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    run::<Burrow>(RUNTIME_ID, Some(config)).await;
}
