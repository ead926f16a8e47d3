//! # hypha-dataplane
//!
//! The packet-moving half of Hypha (see DESIGN.md, "Dataplane").
//!
//! Pure parts, usable without any I/O: the FIB ([`fib`]), the replay window ([`replay`]), the E2E
//! session crypto and session table ([`session`]), the packet buffer pool ([`pool`]), ICMPv6
//! errors ([`icmp`]), counters ([`counters`]), the forwarding decisions ([`forward`]), and the
//! segmentation and coalescing of offloaded super-packets ([`vnet`], [`gso`]).
//! I/O: the TUN device ([`tun`]), the UDP sockets ([`udp`]), the io_uring wrapper ([`ring`]) and
//! the workers that drive them ([`worker`]), and the control thread that applies the control
//! plane's shm records or a static configuration ([`control`], [`config`]), and the XDP fast path's
//! loader ([`xdp`]). `unsafe` is allowed
//! only in the modules that make system calls (tun, udp, ring, worker).
#![warn(missing_docs)]
#![deny(unsafe_code)]

pub mod config;
pub mod control;
pub mod counters;
pub mod fib;
pub mod forward;
pub mod gso;
pub mod handoff;
pub mod icmp;
pub mod pool;
pub mod replay;
pub mod ring;
pub mod session;
pub mod state;
pub mod tun;
pub mod udp;
pub mod vnet;
pub mod worker;
pub mod xdp;
