//! SMP client profile (sans-IO).
//!
//! This crate speaks the client side of the SimpleX Messaging Protocol as pure state
//! machines and codecs. It does **no** IO, reads **no** clock and draws **no** randomness by
//! itself: the driver passes in received blocks, the current `Instant` (and unix time where
//! certificates need it) and an RNG, and collects blocks to send, events and the next deadline.

pub mod address;
pub mod block;
pub mod cert;
pub mod command;
pub mod connection;
pub mod crypto;
pub mod e2e;
pub mod encoding;
pub mod error;
pub mod handshake;
pub mod keys;
pub mod proxy;
pub mod transmission;
pub mod version;
