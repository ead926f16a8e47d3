//! The daemon's runtime: one mio loop ([`event_loop`]) that owns the UDP socket and drives the
//! [`node`] glue, which in turn drives the sans-IO link layer and Babel router.

pub mod backoff;
pub mod event_loop;
pub mod node;
pub mod peers;
pub mod signals;
pub mod udp;
