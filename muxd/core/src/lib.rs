//! The upstream pool of muxd (sans-IO).
