//! The scripted SMP server and the single-server harness live in `muxd-sim`, which the
//! pool simulation shares.

#![allow(unused_imports)]

pub use muxd_sim::harness::Net;
pub use muxd_sim::server::{FakeServer, HOST, Seen};
