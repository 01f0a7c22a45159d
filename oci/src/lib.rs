//! What burrow's two containerd-facing front doors share: the runc command line
//! (`burrow-runtime`) and the containerd shim (`containerd-shim-burrow-v2`) both
//! read and check an OCI bundle the same way, run its host hooks the same way
//! and name signals the same way.

pub mod bundle;
pub mod error;
pub mod hooks;
pub mod log;
pub mod signal;
