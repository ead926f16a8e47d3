//! # hypha-dataplane
//!
//! The packet-moving half of Hypha (see DESIGN.md, "Dataplane").
#![warn(missing_docs)]
