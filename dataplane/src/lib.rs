//! # hypha-dataplane
//!
//! The packet-moving half of Hypha (see DESIGN.md, "Dataplane").
//!
//! The modules here are the dataplane's pure parts, usable without any I/O: the FIB ([`fib`]), the
//! replay window ([`replay`]), the E2E session crypto and session table ([`session`]) and the packet
//! buffer pool ([`pool`]), the TUN device ([`tun`], the one module with `unsafe`: its ioctls) and the segmentation of its
//! offloaded super-packets ([`vnet`]).
#![warn(missing_docs)]
#![deny(unsafe_code)]

pub mod fib;
pub mod pool;
pub mod replay;
pub mod session;
pub mod tun;
pub mod vnet;
