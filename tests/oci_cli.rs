//! The runc command line of burrow-runtime, driven directly.
