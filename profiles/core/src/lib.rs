//! Shared building blocks for muxd's sans-IO protocol profiles.
//!
//! Nothing here does IO, reads a clock or draws randomness by itself: time comes in as
//! arguments, randomness through a caller-supplied RNG.
