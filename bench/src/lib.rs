//! Shared helpers for the benchmarks, and the system benchmark behind `hypha-bench system`
//! ([`system`]).
pub mod system;
