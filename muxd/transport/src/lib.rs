//! Upstream transports.
