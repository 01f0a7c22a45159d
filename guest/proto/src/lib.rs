//! The host–guest protocol of burrow.
//!
//! `burrowd` (the host) and `burrow-agent` (PID 1 inside the guest) talk over a
//! vsock stream. Both import this crate, so neither side builds a message by hand.
//!
//! A connection starts with a handshake ([`Hello`] → [`HelloReply`]), then carries
//! [`Request`]s, each answered by one [`Response`] with the same id. Every message
//! is one frame: a 4-byte big-endian length followed by that many bytes of JSON
//! (see [`frame`]). A connection may instead become a stream of one process's live
//! I/O or of a terminal ([`stream`]). Frames are capped at [`MAX_FRAME`]: a reader that meets a larger
//! one drains it and reports [`FrameError::TooLarge`], so the stream stays in step.

pub mod container;
pub mod frame;
mod messages;
pub mod stream;

pub use container::{
    validate_container_id, ContainerAttach, ContainerCreate, ContainerExec, ContainerOp,
    ContainerStatus, ContainerStatusKind, CONTAINERS_DIR, CONTAINERS_TAG,
};
pub use frame::{read_frame, read_message, write_message, FrameError, MAX_FRAME};
pub use messages::*;
pub use stream::{
    ExitInfo, GuestFrame, HostFrame, Spawn, StreamControl, StreamEvent, StreamOpen, WinSize,
    MAX_STREAM_CHUNK,
};

/// Version of this protocol. The agent refuses a handshake with any other version.
pub const PROTOCOL_VERSION: u32 = 2;

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;

/// The host vsock port the agent connects to once it serves [`AGENT_PORT`], sending
/// one [`HelloReply`]: the host's readiness signal, so it never polls a booting guest.
pub const READY_PORT: u32 = 1025;

/// Largest chunk of file data carried by one request or reply. Leaves room for the
/// base64 expansion (4/3) and the envelope inside [`MAX_FRAME`].
pub const MAX_FILE_CHUNK: usize = 4 << 20;

/// Default cap on the bytes of each output stream an exec or a job keeps.
pub const DEFAULT_MAX_OUTPUT: u64 = 1 << 20;

/// Hard cap on the bytes of each output stream an exec or a job keeps, whatever the
/// request asks: the reply must fit in one frame.
pub const MAX_OUTPUT: u64 = 2 << 20;
