//! # hypha-controlplane
//!
//! The control plane: sans-IO protocol cores (Babel, link handshakes) and the runtime that drives them.
#![warn(missing_docs)]

pub mod babel;
pub mod lab;
pub mod sim;
