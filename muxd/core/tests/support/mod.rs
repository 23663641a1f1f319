//! The scripted SMP server and the single-server harness live in `muxd-sim`, which the
//! pool simulation shares.

pub(crate) use muxd_sim::harness::Net;
