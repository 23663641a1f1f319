//! SMP client profile (sans-IO).
