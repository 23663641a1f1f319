//! End-to-end tests with the real binaries, in one test binary split into modules.

// Test helpers outside `#[test]` functions may panic freely too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod alive;
mod daemon;
mod grp;
mod grp_renew;
mod grp_wire;
mod hostile;
mod muxctl;
mod python;
mod smp;
mod store;
