//! The daemon's runtime: one mio loop ([`event_loop`]) that drives the [`node`] glue (link layer,
//! Babel router, E2E sessions) over an [`underlay::Underlay`]: its own UDP socket, or the
//! dataplane through shared memory ([`dataplane`]).

pub mod backoff;
pub mod dataplane;
pub mod event_loop;
pub mod node;
pub mod peers;
pub mod signals;
pub mod udp;
pub mod underlay;
