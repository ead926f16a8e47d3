//! The daemon's runtime: one mio loop that owns the UDP socket and drives the sans-IO cores.

pub mod backoff;
pub mod peers;
pub mod signals;
pub mod udp;
