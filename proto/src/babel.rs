//! Babel (RFC 8966) wire codec.
