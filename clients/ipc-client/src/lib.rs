//! muxd IPC client.
