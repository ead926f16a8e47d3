//! Sequence numbers (RFC 8966 §3.2.1): 16 bits, compared modulo 2^16, so that a seqno "newer" than
//! another is one at most 2^15 − 1 steps ahead. This is not a total order, which is why `SeqNo` has
//! no `PartialOrd`: use [`SeqNo::is_newer_than`] (babeld's `seqno_compare`).

use core::fmt;

/// A Babel seqno.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SeqNo(pub u16);

impl SeqNo {
    /// `self + n` modulo 2^16 (babeld's `seqno_plus`).
    pub fn plus(self, n: u16) -> SeqNo {
        SeqNo(self.0.wrapping_add(n))
    }

    /// True if `self` is strictly newer than `other` (§3.2.1).
    pub fn is_newer_than(self, other: SeqNo) -> bool {
        let d = self.0.wrapping_sub(other.0);
        d != 0 && d < 0x8000
    }

    /// True if `self` is `other` or newer.
    pub fn is_at_least(self, other: SeqNo) -> bool {
        self == other || self.is_newer_than(other)
    }
}

impl fmt::Debug for SeqNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for SeqNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_modulo_2_16() {
        assert!(SeqNo(2).is_newer_than(SeqNo(1)));
        assert!(!SeqNo(1).is_newer_than(SeqNo(2)));
        assert!(!SeqNo(1).is_newer_than(SeqNo(1)));
        assert!(SeqNo(1).is_at_least(SeqNo(1)));
        assert!(SeqNo(3).is_newer_than(SeqNo(0xfffe)));
        assert!(!SeqNo(0xfffe).is_newer_than(SeqNo(3)));
        assert!(SeqNo(0x7fff).is_newer_than(SeqNo(0)));
        assert!(!SeqNo(0x8000).is_newer_than(SeqNo(0)));
        assert_eq!(SeqNo(0xffff).plus(2), SeqNo(1));
    }
}
