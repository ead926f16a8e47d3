//! Unit tests of the router through its public API, two or three routers wired by hand.
