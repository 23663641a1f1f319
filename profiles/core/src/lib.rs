//! Shared building blocks for muxd's sans-IO protocol profiles and pool.
//!
//! * [`backoff`]: the reconnect policy ([`Backoff`]): base delay, growth factor, cap,
//!   multiplicative jitter, a bounded number of attempts, server retry-after hints.
//! * [`lag`]: a per-server ring of round-trip samples ([`LagHistory`]) with min / percentiles /
//!   mean / jitter summaries.
//!
//! What this crate does **not** do: no IO, no timers, no clock reads and no randomness of its
//! own. Time comes in as arguments (`Instant`s recorded by the caller) and randomness through a
//! caller-supplied [`rand_core::RngCore`], so a seeded RNG and a virtual clock replay exactly.
//! It also does not decide *when* to reset a backoff or *what* a sample measured; the pool
//! does.

pub mod backoff;
pub mod lag;

pub use backoff::{Backoff, BackoffConfig, BackoffConfigError, Jitter};
pub use lag::{LagHistory, LagSample, LagSource, LagSummary};
