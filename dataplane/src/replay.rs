//! The sliding anti-replay window for 64-bit E2E counters.
//!
//! RFC 6479 ("IPsec Anti-Replay Algorithm without Bit Shifting") as WireGuard uses it: a ring of
//! [`RING_BLOCKS`] u64 blocks (4096 bits). Advancing the window clears whole blocks instead of
//! shifting a bitmap; because the block holding the highest counter may be partly filled, the
//! guaranteed window is one block less than the ring: [`WINDOW_SIZE`] = 4032 counters (DESIGN.md asks
//! for ≥ 2048). Counters older than that are rejected, each counter in the window is accepted once.
//!
//! The check is split in two so that forged packets cannot move the window:
//! [`ReplayWindow::check`] (read-only) before decryption, [`ReplayWindow::accept`] (which marks the
//! counter and may slide the window) only after the AEAD tag verified. `accept` re-checks, so two
//! copies of one packet in the same batch cannot both be delivered.
//!
//! Counters at or above [`REJECT_AFTER_MESSAGES`] are always rejected (WireGuard's limit; a session
//! must have been replaced long before).

/// Bits per ring block.
const BLOCK_BITS: u64 = 64;
/// Blocks in the ring (a power of two).
pub const RING_BLOCKS: usize = 64;
/// Counters behind the highest accepted one that are still accepted (once each).
pub const WINDOW_SIZE: u64 = (RING_BLOCKS as u64 - 1) * BLOCK_BITS;
/// No counter at or above this is ever valid: 2^64 − 2^13 − 1 (WireGuard's REJECT_AFTER_MESSAGES).
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);

const _: () = assert!(RING_BLOCKS.is_power_of_two());
const _: () = assert!(WINDOW_SIZE >= 2048);

/// Why a counter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The counter is further behind the highest accepted counter than the window reaches.
    #[error("counter too old for the replay window")]
    TooOld,
    /// The counter was already accepted.
    #[error("duplicate counter")]
    Duplicate,
    /// The counter is at or above REJECT_AFTER_MESSAGES.
    #[error("counter beyond the session's message limit")]
    Exhausted,
}

/// The receive-side replay state of one session. Not synchronised: the session table wraps it (see
/// `session::Session`).
#[derive(Clone)]
pub struct ReplayWindow {
    /// One more than the highest accepted counter; 0 before anything was accepted. Bit positions
    /// in `ring` are counted in the same shifted space (`n = counter + 1`), as in WireGuard.
    last: u64,
    ring: [u64; RING_BLOCKS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ReplayWindow")
            .field("highest", &self.highest())
            .finish_non_exhaustive()
    }
}

impl ReplayWindow {
    /// A window that has accepted nothing.
    pub const fn new() -> Self {
        ReplayWindow {
            last: 0,
            ring: [0; RING_BLOCKS],
        }
    }

    /// A window that treats every counter below `base` as already received: for a receive key
    /// re-installed after a dataplane restart, whose lower counters may have been delivered before.
    pub fn starting_at(base: u64) -> Self {
        let mut w = ReplayWindow::new();
        if base == 0 {
            return w;
        }
        // Counters 0..base are n = 1..=base in the shifted space: mark them, and nothing above.
        w.last = base;
        let (top_block, top_bit) = Self::slot(base);
        for (i, block) in w.ring.iter_mut().enumerate() {
            *block = if i == top_block {
                // Bits 0..=top_bit of the current block (bit 0 of block 0 is n = 0, never used).
                top_bit | (top_bit - 1)
            } else {
                u64::MAX
            };
        }
        w
    }

    /// The highest accepted counter, if any.
    pub fn highest(&self) -> Option<u64> {
        self.last.checked_sub(1)
    }

    #[inline]
    fn slot(n: u64) -> (usize, u64) {
        // The mask keeps the index below RING_BLOCKS.
        let block = ((n / BLOCK_BITS) as usize) & (RING_BLOCKS - 1);
        (block, 1u64 << (n % BLOCK_BITS))
    }

    /// Whether `counter` may be accepted: call before decrypting. Does not change the window.
    #[inline]
    pub fn check(&self, counter: u64) -> Result<(), ReplayError> {
        if counter >= REJECT_AFTER_MESSAGES {
            return Err(ReplayError::Exhausted);
        }
        let n = counter + 1;
        if n > self.last {
            return Ok(());
        }
        if n + WINDOW_SIZE < self.last {
            return Err(ReplayError::TooOld);
        }
        let (block, bit) = Self::slot(n);
        match self.ring.get(block) {
            Some(b) if b & bit == 0 => Ok(()),
            _ => Err(ReplayError::Duplicate),
        }
    }

    /// Mark `counter` as received, sliding the window forward if it is the newest: call only after
    /// the packet authenticated. Fails (and changes nothing) if `check` would fail now.
    #[inline]
    pub fn accept(&mut self, counter: u64) -> Result<(), ReplayError> {
        self.check(counter)?;
        let n = counter + 1;
        if n > self.last {
            // Clear the blocks between the old top block (exclusive) and the new one (inclusive),
            // at most the whole ring.
            let current = self.last / BLOCK_BITS;
            let target = n / BLOCK_BITS;
            let steps = (target - current).min(RING_BLOCKS as u64);
            for i in 1..=steps {
                let (block, _) = Self::slot((current + i) * BLOCK_BITS);
                if let Some(b) = self.ring.get_mut(block) {
                    *b = 0;
                }
            }
            self.last = n;
        }
        let (block, bit) = Self::slot(n);
        if let Some(b) = self.ring.get_mut(block) {
            *b |= bit;
        }
        Ok(())
    }
}

/// A [`ReplayWindow`] shared by every worker that may receive a session's packets.
///
/// Synchronisation: a `std::sync::Mutex`, held only inside [`SharedReplayWindow::check`] and
/// [`SharedReplayWindow::accept`] (a few bit operations; never across the decryption). SO_REUSEPORT
/// spreads one session's packets over workers by underlay 4-tuple, so the same session can be
/// received on two workers at once, and both must see one window for replay protection to hold.
/// The lock is uncontended in the common case (one CAS to take, one to release).
#[derive(Debug, Default)]
pub struct SharedReplayWindow {
    inner: std::sync::Mutex<ReplayWindow>,
}

impl SharedReplayWindow {
    /// Shares `window`.
    pub fn new(window: ReplayWindow) -> Self {
        SharedReplayWindow {
            inner: std::sync::Mutex::new(window),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReplayWindow> {
        // check and accept can't panic, so a poisoned lock still guards a consistent window.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// [`ReplayWindow::check`] under the lock.
    #[inline]
    pub fn check(&self, counter: u64) -> Result<(), ReplayError> {
        self.lock().check(counter)
    }

    /// [`ReplayWindow::accept`] under the lock.
    #[inline]
    pub fn accept(&self, counter: u64) -> Result<(), ReplayError> {
        self.lock().accept(counter)
    }

    /// The highest accepted counter, if any.
    pub fn highest(&self) -> Option<u64> {
        self.lock().highest()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// The reference: remember every accepted counter.
    #[derive(Default)]
    struct Model {
        seen: BTreeSet<u64>,
        max: Option<u64>,
    }

    impl Model {
        fn with_base(base: u64) -> Model {
            Model {
                seen: (0..base).collect(),
                max: base.checked_sub(1),
            }
        }

        fn accept(&mut self, c: u64) -> Result<(), ReplayError> {
            if c >= REJECT_AFTER_MESSAGES {
                return Err(ReplayError::Exhausted);
            }
            if let Some(m) = self.max {
                if c + WINDOW_SIZE < m {
                    return Err(ReplayError::TooOld);
                }
            }
            if !self.seen.insert(c) {
                return Err(ReplayError::Duplicate);
            }
            self.max = Some(self.max.map_or(c, |m| m.max(c)));
            Ok(())
        }
    }

    #[test]
    fn in_order_duplicates_and_reordering() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.highest(), None);
        for c in 0..10_000 {
            assert_eq!(w.check(c), Ok(()));
            assert_eq!(w.accept(c), Ok(()));
            assert_eq!(w.accept(c), Err(ReplayError::Duplicate));
        }
        assert_eq!(w.highest(), Some(9_999));
        assert_eq!(w.check(9_999 - WINDOW_SIZE), Err(ReplayError::Duplicate));
        assert_eq!(w.check(9_998 - WINDOW_SIZE), Err(ReplayError::TooOld));
        // Reordered: skip ahead, then fill the gap.
        assert_eq!(w.accept(12_000), Ok(()));
        assert_eq!(w.accept(11_000), Ok(()));
        assert_eq!(w.accept(11_000), Err(ReplayError::Duplicate));
        assert_eq!(w.accept(12_000 - WINDOW_SIZE), Err(ReplayError::Duplicate));
        assert_eq!(w.accept(11_999 - WINDOW_SIZE), Err(ReplayError::TooOld));
        // The edge of the window is accepted once when it was never seen.
        assert_eq!(w.accept(20_000), Ok(()));
        assert_eq!(w.accept(20_000 - WINDOW_SIZE), Ok(()));
        assert_eq!(w.accept(19_999 - WINDOW_SIZE), Err(ReplayError::TooOld));
    }

    #[test]
    fn check_does_not_move_the_window() {
        let mut w = ReplayWindow::new();
        w.accept(5).unwrap();
        // A forged packet with a huge counter passes check but is never accepted.
        assert_eq!(w.check(1 << 40), Ok(()));
        assert_eq!(w.accept(4), Ok(()));
        assert_eq!(w.highest(), Some(5));
    }

    #[test]
    fn big_jumps_clear_the_whole_ring() {
        let mut w = ReplayWindow::new();
        for c in 0..4096 {
            w.accept(c).unwrap();
        }
        w.accept(1_000_000).unwrap();
        for c in (1_000_000 - WINDOW_SIZE)..1_000_000 {
            assert_eq!(w.check(c), Ok(()), "counter {c}");
        }
    }

    #[test]
    fn starting_at_a_base_rejects_everything_below_it() {
        for base in [1u64, 63, 64, 65, 4095, 4096, 1_000_000] {
            let mut w = ReplayWindow::starting_at(base);
            assert_eq!(w.highest(), Some(base - 1));
            assert!(w.check(base - 1).is_err());
            assert!(w.check(base.saturating_sub(WINDOW_SIZE)).is_err());
            assert_eq!(w.check(base), Ok(()));
            // Reordering just above the base still works.
            assert_eq!(w.accept(base + 5), Ok(()));
            assert_eq!(w.accept(base + 1), Ok(()));
            assert_eq!(w.accept(base), Ok(()));
            assert_eq!(w.accept(base + 1), Err(ReplayError::Duplicate));
            assert!(w.accept(base - 1).is_err());
        }
    }

    #[test]
    fn shared_window_accepts_each_counter_once_across_threads() {
        let w = std::sync::Arc::new(SharedReplayWindow::default());
        let accepted: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let w = w.clone();
                    s.spawn(move || (0..2000u64).filter(|c| w.accept(*c).is_ok()).count())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(accepted, 2000);
        assert_eq!(w.highest(), Some(1999));
    }

    #[test]
    fn limits() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.accept(REJECT_AFTER_MESSAGES), Err(ReplayError::Exhausted));
        assert_eq!(w.accept(u64::MAX), Err(ReplayError::Exhausted));
        assert_eq!(w.accept(REJECT_AFTER_MESSAGES - 1), Ok(()));
        assert_eq!(
            w.accept(REJECT_AFTER_MESSAGES - 1),
            Err(ReplayError::Duplicate)
        );
        assert_eq!(w.accept(0), Err(ReplayError::TooOld));
    }

    fn arb_counters() -> impl Strategy<Value = Vec<u64>> {
        // Mostly nearby counters (reordering inside and just outside the window), some jumps.
        prop::collection::vec(
            prop_oneof![
                8 => 0u64..6000,
                1 => 0u64..100_000,
                1 => (REJECT_AFTER_MESSAGES - 5000)..=u64::MAX,
            ],
            1..600,
        )
    }

    proptest! {
        #[test]
        fn matches_reference_set(
            counters in arb_counters(),
            forged in arb_counters(),
            base in prop_oneof![Just(0u64), 0u64..5000],
        ) {
            let mut w = ReplayWindow::starting_at(base);
            let mut m = Model::with_base(base);
            for (i, c) in counters.iter().enumerate() {
                // Interleave forged counters that are only checked, never accepted.
                if let Some(f) = forged.get(i) {
                    let _ = w.check(*f);
                }
                let checked = w.check(*c);
                let expected = m.accept(*c);
                prop_assert_eq!(checked, expected);
                prop_assert_eq!(w.accept(*c), expected);
                prop_assert_eq!(w.highest(), m.max);
            }
        }
    }
}
