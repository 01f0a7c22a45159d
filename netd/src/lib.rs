//! `burrow-netd`: the network of burrow's workspaces, and the client `burrowd`
//! uses to reach it.
//!
//! The daemon owns one bridge (`burrow<N>`, N claimed per state dir) with the workspaces' gateway address,
//! one TAP device per running workspace (created here, handed to QEMU as an open
//! file descriptor, gone when QEMU exits), the address of every workspace
//! (persisted; an address is never reused while its workspace exists), and one
//! pair of nftables tables, `netdev burrow<N>` (port identity) and
//! `inet burrow<N>` (policy), written through nftnl in atomic batches.
//!
//! One bridge for all workspaces, every port isolated: at layer 2 no workspace
//! reaches another, so every packet between workspaces (once teams allow any) is
//! routed through the host, where the nftables forward chain decides. A bridge per
//! team would isolate teams by topology, but moving a workspace between teams, or
//! letting two teams talk, would then mean re-plumbing links instead of changing a
//! set element.
//!
//! It can run inside a network namespace (`--netns`), so that tests build their
//! whole network in namespaces they created.

pub mod claim;
pub mod client;
pub mod daemon;
mod dns;
mod fdpass;
mod forwards;
mod identity;
mod links;
pub mod protocol;
mod rules;
mod state;

pub use client::{NetClient, NetError};
pub use fdpass::send_with_fd;
pub use links::open_tap;
pub use protocol::{Lease, Reply, Request};
