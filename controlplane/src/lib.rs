//! # hypha-controlplane
//!
//! The control plane: sans-IO protocol cores (Babel, link handshakes) and the runtime that drives them.
#![warn(missing_docs)]

pub mod lab;
