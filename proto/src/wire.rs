//! Underlay wire formats.
