//! The muxd daemon.
