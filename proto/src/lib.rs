//! # hypha-proto — the contracts
//!
//! Everything that crosses a process boundary or a wire is defined once, here, and nothing here does
//! I/O policy: identity and overlay addresses ([`addr`], [`key`]), the wire formats of the underlay
//! ([`wire`]), the Babel TLV codec ([`babel`]), the shared-memory ABI between control plane and
//! dataplane ([`shm`]) and the core's notion of time ([`time`]).
//!
//! Parsers in this crate follow smoltcp's checking contract: every view over outside bytes is built
//! with `new_checked`, after which no accessor can panic; malformed input is an error value.
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod addr;
pub mod babel;
pub mod key;
pub mod shm;
pub mod time;
pub mod wire;

pub use addr::{OverlayAddr, Subnet};
pub use key::{PublicKey, SecretKey};
