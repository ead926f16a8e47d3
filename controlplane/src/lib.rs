//! # hypha-controlplane
//!
//! The control plane: sans-IO protocol cores (Babel, link handshakes) and the runtime that drives them.
#![warn(missing_docs)]

pub mod api;
pub mod babel;
pub mod client;
pub mod config;
pub mod daemon;
pub mod e2e;
pub mod fib;
pub mod link;
pub mod runtime;
pub mod sim;
