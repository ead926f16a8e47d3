//! A link session: the two transport keys from one handshake, the send counter and the replay window.
//!
//! Frames travel over UDP, so they may be lost or reordered. Every LINK_DATA frame therefore carries
//! its own 64-bit counter, which is the AEAD nonce (Noise §5.1: 32 zero bits, then the counter in
//! little-endian), and the receiver keeps a sliding bitmap of the counters it has accepted (RFC 6479).
//! The envelope is the AEAD's associated data, so its fields cannot be altered in flight.
//!
//! snow's `StatelessTransportState` takes an explicit nonce but no associated data, so the keys are
//! taken from the handshake's Split() (Noise §5.2) and used with ring's ChaCha20-Poly1305 directly;
//! the construction is the same as Noise's ChaChaPoly cipher with `ad` = the envelope.

use core::time::Duration;

use hypha_proto::time::Instant;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

/// AEAD tag length.
pub(crate) const TAG_LEN: usize = 16;

/// Start a new handshake once a session has sent this many frames (WireGuard's REKEY_AFTER_MESSAGES).
pub(crate) const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
/// Never send or accept a counter at or beyond this (WireGuard's REJECT_AFTER_MESSAGES).
pub(crate) const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);
/// Start a new handshake when the session is this old (WireGuard's REKEY_AFTER_TIME).
pub(crate) const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
/// Neither send nor accept frames under a session this old (WireGuard's REJECT_AFTER_TIME).
pub(crate) const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);

/// Why a received counter was refused by the replay window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReplayError {
    /// The counter was accepted before.
    Duplicate,
    /// The counter is behind the window: it can no longer be told from a replay.
    TooOld,
    /// The counter is at or beyond [`REJECT_AFTER_MESSAGES`].
    Exhausted,
}

const BLOCK_BITS: u64 = 64;
const BLOCKS: usize = 64;
/// Counters this far behind the highest accepted one are still judged individually.
pub(crate) const WINDOW: u64 = (BLOCKS as u64 - 1) * BLOCK_BITS;
const _: () = assert!(WINDOW >= 2048, "DESIGN.md: replay window of at least 2048");

/// RFC 6479 sliding window: a ring of 64-bit blocks. One block is kept spare so that sliding forward
/// only clears whole blocks; the usable width is [`WINDOW`] = 4032 counters.
#[derive(Clone, Debug)]
pub(crate) struct ReplayWindow {
    /// Highest counter accepted so far (0 before any; counter 0 is still accepted once).
    top: u64,
    bitmap: [u64; BLOCKS],
}

impl ReplayWindow {
    pub(crate) fn new() -> Self {
        ReplayWindow {
            top: 0,
            bitmap: [0; BLOCKS],
        }
    }

    fn slot(counter: u64) -> (usize, u64) {
        let block = ((counter / BLOCK_BITS) % BLOCKS as u64) as usize;
        (block, 1u64 << (counter % BLOCK_BITS))
    }

    /// Would `counter` be accepted? Does not change the window: call [`Self::update`] only after the
    /// frame has authenticated, so forged frames cannot move it.
    pub(crate) fn check(&self, counter: u64) -> Result<(), ReplayError> {
        if counter >= REJECT_AFTER_MESSAGES {
            return Err(ReplayError::Exhausted);
        }
        if counter > self.top {
            return Ok(());
        }
        if self.top - counter >= WINDOW {
            return Err(ReplayError::TooOld);
        }
        let (block, bit) = Self::slot(counter);
        match self.bitmap.get(block) {
            Some(word) if word & bit == 0 => Ok(()),
            _ => Err(ReplayError::Duplicate),
        }
    }

    /// Checks `counter` and records it as seen.
    pub(crate) fn update(&mut self, counter: u64) -> Result<(), ReplayError> {
        self.check(counter)?;
        if counter > self.top {
            let current = self.top / BLOCK_BITS;
            let target = counter / BLOCK_BITS;
            let clear = (target - current).min(BLOCKS as u64);
            for i in 1..=clear {
                let block = ((current + i) % BLOCKS as u64) as usize;
                if let Some(word) = self.bitmap.get_mut(block) {
                    *word = 0;
                }
            }
            self.top = counter;
        }
        let (block, bit) = Self::slot(counter);
        if let Some(word) = self.bitmap.get_mut(block) {
            *word |= bit;
        }
        Ok(())
    }
}

/// Why sealing or opening a frame failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CryptoError {
    /// The send counter is exhausted; the session must not be used any more.
    Exhausted,
    /// Authentication failed (or the buffer was too short to hold a tag).
    Auth,
}

/// One direction-pair of transport keys plus their counters.
pub(crate) struct Session {
    /// Our index: the receiver index the peer puts on LINK_DATA for this session.
    pub(crate) local_index: u32,
    /// The peer's index for this session: what we put on LINK_DATA we send.
    pub(crate) remote_index: u32,
    /// Did we send message 1 of the handshake that made this session?
    pub(crate) we_initiated: bool,
    /// When the handshake finished.
    pub(crate) created: Instant,
    /// When this node sent or received message 1 of that handshake.
    pub(crate) handshake_started: Instant,
    send_key: LessSafeKey,
    recv_key: LessSafeKey,
    send_counter: u64,
    replay: ReplayWindow,
}

impl core::fmt::Debug for Session {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Session")
            .field("local_index", &self.local_index)
            .field("remote_index", &self.remote_index)
            .field("we_initiated", &self.we_initiated)
            .field("created", &self.created)
            .field("send_counter", &self.send_counter)
            .finish_non_exhaustive()
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

impl Session {
    /// A session from Split()'s two keys: `k_i2r` protects initiator→responder, `k_r2i` the reverse.
    pub(crate) fn new(
        local_index: u32,
        remote_index: u32,
        we_initiated: bool,
        k_i2r: &[u8; 32],
        k_r2i: &[u8; 32],
        now: Instant,
    ) -> Option<Self> {
        let (send, recv) = if we_initiated {
            (k_i2r, k_r2i)
        } else {
            (k_r2i, k_i2r)
        };
        Some(Session {
            local_index,
            remote_index,
            we_initiated,
            created: now,
            handshake_started: now,
            send_key: LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, send).ok()?),
            recv_key: LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, recv).ok()?),
            send_counter: 0,
            replay: ReplayWindow::new(),
        })
    }

    /// May this session still send or accept frames at `now`?
    pub(crate) fn usable(&self, now: Instant) -> bool {
        now - self.created < REJECT_AFTER_TIME && self.send_counter < REJECT_AFTER_MESSAGES
    }

    /// Has this session sent enough frames that a new handshake should start? (The time limit is
    /// a timer of the link layer.)
    pub(crate) fn wants_rekey_by_count(&self) -> bool {
        self.send_counter >= REKEY_AFTER_MESSAGES
    }

    /// Jumps the send counter (tests of the count limits).
    #[cfg(test)]
    pub(crate) fn set_send_counter(&mut self, counter: u64) {
        self.send_counter = counter;
    }

    /// The counter the next sealed frame will carry.
    pub(crate) fn next_counter(&self) -> u64 {
        self.send_counter
    }

    /// Encrypts `in_out` in place under the next counter with `aad`, returns that counter and the
    /// tag. The caller must have written the same counter into `aad` (use [`Self::next_counter`]).
    pub(crate) fn seal(
        &mut self,
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<(u64, [u8; TAG_LEN]), CryptoError> {
        let counter = self.send_counter;
        if counter >= REJECT_AFTER_MESSAGES {
            return Err(CryptoError::Exhausted);
        }
        let tag = self
            .send_key
            .seal_in_place_separate_tag(nonce(counter), Aad::from(aad), in_out)
            .map_err(|_| CryptoError::Auth)?;
        self.send_counter = counter + 1;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok((counter, out))
    }

    /// Checks the replay window, then authenticates and decrypts `in_out` (ciphertext followed by the
    /// tag) in place; on success records the counter and returns the plaintext length.
    pub(crate) fn open(
        &mut self,
        counter: u64,
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<usize, OpenError> {
        self.replay.check(counter).map_err(OpenError::Replay)?;
        let len = self
            .recv_key
            .open_in_place(nonce(counter), Aad::from(aad), in_out)
            .map_err(|_| OpenError::Auth)?
            .len();
        self.replay.update(counter).map_err(OpenError::Replay)?;
        Ok(len)
    }
}

/// Why [`Session::open`] refused a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpenError {
    /// Refused by the replay window (before any crypto).
    Replay(ReplayError),
    /// The tag did not verify.
    Auth,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_accepts_each_counter_once() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.update(0), Ok(()));
        assert_eq!(w.update(0), Err(ReplayError::Duplicate));
        assert_eq!(w.update(5), Ok(()));
        assert_eq!(w.update(3), Ok(()));
        assert_eq!(w.update(3), Err(ReplayError::Duplicate));
        assert_eq!(w.update(4), Ok(()));
        assert_eq!(w.update(5), Err(ReplayError::Duplicate));
    }

    #[test]
    fn window_reorder_within_width_and_too_old_beyond() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.update(10_000), Ok(()));
        // Anything within the window but unseen is fine, in any order.
        for c in (10_000 - WINDOW + 1..10_000).rev().step_by(7) {
            assert_eq!(w.update(c), Ok(()), "counter {c}");
        }
        assert_eq!(w.check(10_000 - WINDOW), Err(ReplayError::TooOld));
        assert_eq!(w.check(0), Err(ReplayError::TooOld));
    }

    #[test]
    fn window_slides_and_clears_old_bits() {
        let mut w = ReplayWindow::new();
        for c in 0..200 {
            assert_eq!(w.update(c), Ok(()));
        }
        // Jump far ahead: every block is recycled, old bits must not make new counters look seen.
        assert_eq!(w.update(1_000_000), Ok(()));
        for c in 1_000_000 - 3000..1_000_000 {
            assert_eq!(w.check(c), Ok(()), "counter {c}");
        }
        assert_eq!(w.check(1_000_000), Err(ReplayError::Duplicate));
        // Jump by exactly one block: the block of the new counter is cleared.
        assert_eq!(w.update(1_000_064), Ok(()));
        assert_eq!(w.check(1_000_064 - 64 * 64), Err(ReplayError::TooOld));
        assert_eq!(w.check(1_000_001), Ok(()));
    }

    #[test]
    fn window_rejects_exhausted_counters() {
        let w = ReplayWindow::new();
        assert_eq!(w.check(REJECT_AFTER_MESSAGES), Err(ReplayError::Exhausted));
        assert_eq!(w.check(u64::MAX), Err(ReplayError::Exhausted));
    }

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let k1 = [1u8; 32];
        let k2 = [2u8; 32];
        let now = Instant::ZERO;
        let mut a = Session::new(1, 2, true, &k1, &k2, now).expect("session");
        let mut b = Session::new(2, 1, false, &k1, &k2, now).expect("session");
        let aad = [9u8; 20];
        let mut buf = b"hello".to_vec();
        let (ctr, tag) = a.seal(&aad, &mut buf).expect("seal");
        assert_eq!(ctr, 0);
        buf.extend_from_slice(&tag);
        let mut copy = buf.clone();
        assert_eq!(b.open(ctr, &aad, &mut copy), Ok(5));
        assert_eq!(&copy[..5], b"hello");
        // Replay.
        let mut copy = buf.clone();
        assert_eq!(
            b.open(ctr, &aad, &mut copy),
            Err(OpenError::Replay(ReplayError::Duplicate))
        );
        // Tampered AAD under a fresh counter.
        let mut buf = b"again".to_vec();
        let (ctr, tag) = a.seal(&aad, &mut buf).expect("seal");
        buf.extend_from_slice(&tag);
        let mut bad = [9u8; 20];
        bad[3] ^= 1;
        let mut copy = buf.clone();
        assert_eq!(b.open(ctr, &bad, &mut copy), Err(OpenError::Auth));
        // A failed open does not consume the counter.
        assert_eq!(b.open(ctr, &aad, &mut buf), Ok(5));
        // The direction keys differ: b cannot open its own frames.
        let mut own = b"x".to_vec();
        let (ctr, tag) = b.seal(&aad, &mut own).expect("seal");
        own.extend_from_slice(&tag);
        let mut copy = own.clone();
        let mut b2 = Session::new(2, 1, false, &k1, &k2, now).expect("session");
        assert_eq!(b2.open(ctr, &aad, &mut copy), Err(OpenError::Auth));
        assert_eq!(a.open(ctr, &aad, &mut own), Ok(1));
    }
}
