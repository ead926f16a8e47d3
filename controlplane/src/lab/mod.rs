//! Lab mode: the Babel core alone, as a standard RFC 8966 router on real interfaces.
//!
//! Overlay and lab mode share one core and differ only in their adapters (as babeld's kernel.h
//! does): here packets leave as UDP to ff02::1:6 on port 6696 ([`socket`]), routes go into the
//! kernel FIB through rtnetlink ([`netlink`]), and RFC 8967 MAC authentication ([`mac`]) can filter
//! packets between the two.

pub mod cli;
pub mod config;
pub mod dump;
pub mod mac;
pub mod netlink;
pub mod redistribute;
pub mod runtime;
pub mod socket;

#[cfg(test)]
mod kernel_tests;
