//! TODO(skeleton): filled in by the foundations work.
