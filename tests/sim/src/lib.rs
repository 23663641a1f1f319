//! Deterministic simulation of the muxd pool (issue 5).
//!
//! * [`server`]: a scripted SMP server built from the profile's own codecs.
//! * [`harness`]: one pool, one server, no latency: the harness of muxd-core's tests.
//! * [`sim`]: many servers behind a simulated network with latency, loss, flapping and
//!   blackholed links, on a virtual clock, with apps that read and acknowledge what arrives.
//!
//! Nothing here reads a clock or the OS RNG: every run with the same seed replays exactly.

// Test support: a failed unwrap here is a failed test, reported where it happens.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod harness;
pub mod server;
pub mod sim;
