//! The local IPC server: socket setup, the accept loop, and per-client sessions.

pub(crate) mod client;
pub(crate) mod server;
pub(crate) mod session;
pub(crate) mod socket;
