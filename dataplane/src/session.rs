//! End-to-end sessions: in-place AEAD with counter nonces, replay protection, rekey limits, and the
//! table that finds a packet's keys in one lookup.
//!
//! Keys come from the control plane's Noise IK handshake (DESIGN.md, "Links and sessions") over shm;
//! this module only uses them. Each TRANSPORT packet is sealed under the sender's key with
//! - nonce = 4 zero bytes ‖ the 64-bit counter, big-endian (the counter travels in the header);
//! - AAD = the 48-byte data header with the hop-limit byte zeroed
//!   (`hypha_proto::wire::data::Packet::aad`), since transit nodes change the hop limit.
//!
//! The cipher is ChaCha20-Poly1305 or AES-256-GCM ([`Cipher`]); [`Cipher::preferred`] picks AES-GCM
//! when the CPU has AES and carry-less multiply instructions (ring uses them, and AES-GCM is then
//! about 3.5× faster here), ChaCha otherwise. Both ends must agree: the handshake decides, this
//! module obeys.
//!
//! Lifetimes follow WireGuard (whitepaper §6.1–6.2): [`REKEY_AFTER_TIME`], [`REJECT_AFTER_TIME`],
//! [`REKEY_AFTER_MESSAGES`], [`REJECT_AFTER_MESSAGES`]. A session past a REJECT limit neither
//! seals nor opens; [`Session::needs_rekey`] tells the caller to ask the control plane for a new one
//! before that.
//!
//! Sharing across workers: a [`Session`] is read by every worker through `Arc`. The send counter is
//! an `AtomicU64` (workers reserve counters with a CAS, so a nonce is never used twice and never
//! wraps); the replay window is a [`SharedReplayWindow`], locked for a few nanoseconds around
//! `check` and `accept`, never across the decryption itself. The [`SessionTable`] is an immutable
//! snapshot published with `arc-swap`, like the FIB.

use std::collections::HashMap;
use std::ops::Range;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use hypha_proto::time::Instant;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};

use crate::fib::FibHasherBuilder;
use crate::replay::{ReplayError, ReplayWindow, SharedReplayWindow};

pub use crate::replay::REJECT_AFTER_MESSAGES;

/// The initiator starts a new handshake once a session is this old (WireGuard: 120 s).
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
/// A session this old is no longer used in either direction (WireGuard: 180 s).
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// A new handshake starts after this many messages sent (WireGuard: 2^60).
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 60;

/// Symmetric key length of both ciphers.
pub const KEY_LEN: usize = 32;
/// Authentication tag length of both ciphers.
pub const TAG_LEN: usize = 16;
/// Length of the additional data: the whole data header.
pub const AAD_LEN: usize = hypha_proto::wire::data::HEADER_LEN;

/// The AEAD of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cipher {
    /// ChaCha20-Poly1305 (RFC 8439): fast everywhere in software.
    ChaCha20Poly1305,
    /// AES-256-GCM: faster with AES-NI + PCLMULQDQ (or VAES).
    Aes256Gcm,
}

/// A cipher name that isn't one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown cipher {0:?} (expected chacha20-poly1305 or aes-256-gcm)")]
pub struct UnknownCipher(pub String);

impl Cipher {
    /// The faster cipher on this CPU: AES-256-GCM when the CPU has AES and carry-less multiply
    /// instructions (x86_64: `aes` + `pclmulqdq`; aarch64: `aes` + `pmull`), else ChaCha20-Poly1305.
    pub fn preferred() -> Cipher {
        if Self::cpu_has_aes() {
            Cipher::Aes256Gcm
        } else {
            Cipher::ChaCha20Poly1305
        }
    }

    /// [`Cipher::preferred`] unless the operator chose one (the `--cipher` flag).
    pub fn choose(flag: Option<Cipher>) -> Cipher {
        flag.unwrap_or_else(Self::preferred)
    }

    #[cfg(target_arch = "x86_64")]
    fn cpu_has_aes() -> bool {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }

    #[cfg(target_arch = "aarch64")]
    fn cpu_has_aes() -> bool {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fn cpu_has_aes() -> bool {
        false
    }

    /// The name used on the command line and in logs.
    pub const fn name(self) -> &'static str {
        match self {
            Cipher::ChaCha20Poly1305 => "chacha20-poly1305",
            Cipher::Aes256Gcm => "aes-256-gcm",
        }
    }

    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Cipher::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
            Cipher::Aes256Gcm => &aead::AES_256_GCM,
        }
    }
}

impl FromStr for Cipher {
    type Err = UnknownCipher;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "chacha20-poly1305" | "chachapoly" | "chacha20poly1305" => Ok(Cipher::ChaCha20Poly1305),
            "aes-256-gcm" | "aesgcm" | "aes256gcm" => Ok(Cipher::Aes256Gcm),
            _ => Err(UnknownCipher(s.to_owned())),
        }
    }
}

impl core::fmt::Display for Cipher {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a packet could not be sealed or opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The tag did not verify (tampered ciphertext, tag or header, or the wrong key).
    #[error("authentication failed")]
    Auth,
    /// The ciphertext is shorter than a tag, or the buffer has no tailroom for the tag.
    #[error("buffer too short")]
    Short,
    /// The counter was refused by the replay window.
    #[error("replay: {0}")]
    Replay(#[from] ReplayError),
    /// The session is older than REJECT_AFTER_TIME.
    #[error("session expired")]
    Expired,
    /// The send counter reached REJECT_AFTER_MESSAGES.
    #[error("session message limit reached")]
    CounterExhausted,
    /// The key material was rejected by ring (wrong length).
    #[error("invalid key")]
    InvalidKey,
}

#[inline]
fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// The sending half of a session's keys.
pub struct SealingKey {
    key: LessSafeKey,
    cipher: Cipher,
}

/// The receiving half of a session's keys.
pub struct OpeningKey {
    key: LessSafeKey,
    cipher: Cipher,
}

impl core::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SealingKey")
            .field("cipher", &self.cipher)
            .finish_non_exhaustive()
    }
}

impl core::fmt::Debug for OpeningKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("OpeningKey")
            .field("cipher", &self.cipher)
            .finish_non_exhaustive()
    }
}

fn less_safe_key(cipher: Cipher, key: &[u8; KEY_LEN]) -> Result<LessSafeKey, SessionError> {
    UnboundKey::new(cipher.algorithm(), key)
        .map(LessSafeKey::new)
        .map_err(|_| SessionError::InvalidKey)
}

impl SealingKey {
    /// A sealing key for `cipher`.
    pub fn new(cipher: Cipher, key: &[u8; KEY_LEN]) -> Result<Self, SessionError> {
        Ok(SealingKey {
            key: less_safe_key(cipher, key)?,
            cipher,
        })
    }

    /// The cipher.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// Encrypts `in_out` in place under nonce `counter` and returns the tag. The caller must never
    /// use a counter twice with one key ([`Session::reserve_counters`] guarantees that).
    #[inline]
    pub fn seal_in_place(
        &self,
        counter: u64,
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], SessionError> {
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(counter), Aad::from(aad), in_out)
            .map_err(|_| SessionError::Short)?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Encrypts `buf[..len]` in place and writes the tag into the tailroom `buf[len..len + 16]`;
    /// returns the sealed length `len + 16`.
    #[inline]
    pub fn seal_in_place_append(
        &self,
        counter: u64,
        aad: &[u8],
        buf: &mut [u8],
        len: usize,
    ) -> Result<usize, SessionError> {
        let sealed_len = len.checked_add(TAG_LEN).ok_or(SessionError::Short)?;
        if buf.len() < sealed_len {
            return Err(SessionError::Short);
        }
        let (plain, tail) = buf.split_at_mut(len);
        let tag = self.seal_in_place(counter, aad, plain)?;
        tail.get_mut(..TAG_LEN)
            .ok_or(SessionError::Short)?
            .copy_from_slice(&tag);
        Ok(sealed_len)
    }
}

impl OpeningKey {
    /// An opening key for `cipher`.
    pub fn new(cipher: Cipher, key: &[u8; KEY_LEN]) -> Result<Self, SessionError> {
        Ok(OpeningKey {
            key: less_safe_key(cipher, key)?,
            cipher,
        })
    }

    /// The cipher.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// Decrypts `in_out` (ciphertext ‖ 16-byte tag) in place under nonce `counter`; returns the
    /// plaintext, which is `in_out` minus the tag. On failure `in_out`'s contents are unspecified.
    #[inline]
    pub fn open_in_place<'a>(
        &self,
        counter: u64,
        aad: &[u8],
        in_out: &'a mut [u8],
    ) -> Result<&'a mut [u8], SessionError> {
        if in_out.len() < TAG_LEN {
            return Err(SessionError::Short);
        }
        self.key
            .open_in_place(nonce(counter), Aad::from(aad), in_out)
            .map_err(|_| SessionError::Auth)
    }
}

/// What the control plane installs for a session (over shm, after the handshake).
#[derive(Clone)]
pub struct SessionParams {
    /// The index we chose: peers put it in packets to us; the [`SessionTable`] key.
    pub local_index: u32,
    /// The index the peer chose: we put it in packets we send.
    pub remote_index: u32,
    /// The upper 64 bits of the peer's overlay /64 (outbound session lookup).
    pub remote_prefix: u64,
    /// The negotiated cipher.
    pub cipher: Cipher,
    /// Our sending key.
    pub send_key: [u8; KEY_LEN],
    /// Our receiving key.
    pub recv_key: [u8; KEY_LEN],
    /// Whether we initiated the handshake (only the initiator rekeys on time, as in WireGuard, so
    /// both ends don't start handshakes at once).
    pub initiator: bool,
    /// The first send counter (0 for a new session; the shm key record's counter when a key is
    /// re-installed after a dataplane restart, so no nonce is used twice).
    pub send_counter: u64,
    /// Receive counters below this are refused as already seen (0 for a new session).
    pub replay_base: u64,
}

impl core::fmt::Debug for SessionParams {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SessionParams")
            .field("local_index", &self.local_index)
            .field("remote_index", &self.remote_index)
            .field(
                "remote_prefix",
                &format_args!("{:#018x}", self.remote_prefix),
            )
            .field("cipher", &self.cipher)
            .field("initiator", &self.initiator)
            .field("send_counter", &self.send_counter)
            .field("replay_base", &self.replay_base)
            .finish_non_exhaustive()
    }
}

/// One E2E session: both directions' keys, the send counter, the replay window and the limits.
#[derive(Debug)]
pub struct Session {
    local_index: u32,
    remote_index: u32,
    remote_prefix: u64,
    initiator: bool,
    created: Instant,
    sealing: SealingKey,
    /// The next counter to send.
    send_counter: AtomicU64,
    opening: OpeningKey,
    replay: SharedReplayWindow,
    /// Packets accepted (authenticated and not replayed).
    received: AtomicU64,
}

impl Session {
    /// A session created at `now`.
    pub fn new(params: &SessionParams, now: Instant) -> Result<Session, SessionError> {
        Ok(Session {
            local_index: params.local_index,
            remote_index: params.remote_index,
            remote_prefix: params.remote_prefix,
            initiator: params.initiator,
            created: now,
            sealing: SealingKey::new(params.cipher, &params.send_key)?,
            send_counter: AtomicU64::new(params.send_counter),
            opening: OpeningKey::new(params.cipher, &params.recv_key)?,
            replay: SharedReplayWindow::new(ReplayWindow::starting_at(params.replay_base)),
            received: AtomicU64::new(0),
        })
    }

    /// Our index (the receiver index in inbound packets).
    pub fn local_index(&self) -> u32 {
        self.local_index
    }

    /// The peer's index (the receiver index we write in outbound packets).
    pub fn remote_index(&self) -> u32 {
        self.remote_index
    }

    /// The upper 64 bits of the peer's /64.
    pub fn remote_prefix(&self) -> u64 {
        self.remote_prefix
    }

    /// The cipher.
    pub fn cipher(&self) -> Cipher {
        self.sealing.cipher
    }

    /// When the session was installed.
    pub fn created(&self) -> Instant {
        self.created
    }

    /// Counters handed out so far (messages sent or about to be).
    pub fn sent(&self) -> u64 {
        self.send_counter.load(Ordering::Relaxed)
    }

    /// The highest counter accepted so far, if any.
    pub fn highest_received(&self) -> Option<u64> {
        self.replay.highest()
    }

    /// Packets received and accepted.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Whether the session is past REJECT_AFTER_TIME at `now`.
    pub fn is_expired(&self, now: Instant) -> bool {
        now - self.created >= REJECT_AFTER_TIME
    }

    /// Whether the control plane should start a new handshake: REKEY_AFTER_MESSAGES sent, or (as
    /// the initiator) REKEY_AFTER_TIME passed.
    pub fn needs_rekey(&self, now: Instant) -> bool {
        self.sent() >= REKEY_AFTER_MESSAGES
            || (self.initiator && now - self.created >= REKEY_AFTER_TIME)
    }

    /// Reserves `n` consecutive send counters (a worker takes one batch's worth at once). Fails,
    /// reserving nothing, if the session expired or fewer than `n` counters remain below
    /// REJECT_AFTER_MESSAGES.
    pub fn reserve_counters(&self, now: Instant, n: u64) -> Result<Range<u64>, SessionError> {
        if self.is_expired(now) {
            return Err(SessionError::Expired);
        }
        let start = self
            .send_counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                c.checked_add(n).filter(|end| *end <= REJECT_AFTER_MESSAGES)
            })
            .map_err(|_| SessionError::CounterExhausted)?;
        Ok(start..start + n)
    }

    /// Reserves one send counter (see [`Session::reserve_counters`]).
    pub fn next_counter(&self, now: Instant) -> Result<u64, SessionError> {
        self.reserve_counters(now, 1).map(|r| r.start)
    }

    /// Seals `in_out` in place with a counter from [`Session::reserve_counters`] and returns the tag
    /// (to be written into the buffer's tailroom).
    #[inline]
    pub fn seal_in_place(
        &self,
        counter: u64,
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], SessionError> {
        self.sealing.seal_in_place(counter, aad, in_out)
    }

    /// Like [`Session::seal_in_place`], writing the tag at `buf[len..]`; returns `len + 16`.
    #[inline]
    pub fn seal_in_place_append(
        &self,
        counter: u64,
        aad: &[u8],
        buf: &mut [u8],
        len: usize,
    ) -> Result<usize, SessionError> {
        self.sealing.seal_in_place_append(counter, aad, buf, len)
    }

    /// Authenticates and decrypts an inbound packet in place: refuses expired sessions and replayed
    /// or too old counters before decrypting, and marks the counter received only after the tag
    /// verified, so forged packets cannot move the window. Returns the plaintext.
    pub fn open_in_place<'a>(
        &self,
        now: Instant,
        counter: u64,
        aad: &[u8],
        in_out: &'a mut [u8],
    ) -> Result<&'a mut [u8], SessionError> {
        if self.is_expired(now) {
            return Err(SessionError::Expired);
        }
        self.replay.check(counter)?;
        let plain = self.opening.open_in_place(counter, aad, in_out)?;
        self.replay.accept(counter)?;
        self.received.fetch_add(1, Ordering::Relaxed);
        Ok(plain)
    }
}

/// The sessions at one moment: by our receiver index (inbound) and by destination /64 (outbound).
#[derive(Debug, Clone)]
pub struct SessionSet {
    by_index: HashMap<u32, Arc<Session>, FibHasherBuilder>,
    by_dest: HashMap<u64, Arc<Session>, FibHasherBuilder>,
}

impl SessionSet {
    fn new(hasher: FibHasherBuilder) -> Self {
        SessionSet {
            by_index: HashMap::with_hasher(hasher),
            by_dest: HashMap::with_hasher(hasher),
        }
    }

    /// The session an inbound packet's receiver index names.
    #[inline]
    pub fn get(&self, receiver_index: u32) -> Option<&Arc<Session>> {
        self.by_index.get(&receiver_index)
    }

    /// The session to send to the node owning the /64 `dst_upper64`.
    #[inline]
    pub fn for_dest(&self, dst_upper64: u64) -> Option<&Arc<Session>> {
        self.by_dest.get(&dst_upper64)
    }

    /// The number of sessions installed (current and previous ones).
    pub fn len(&self) -> usize {
        self.by_index.len()
    }

    /// Whether no session is installed.
    pub fn is_empty(&self) -> bool {
        self.by_index.is_empty()
    }
}

/// Every worker's view of the sessions, published like the FIB.
///
/// Synchronisation: an `ArcSwap<SessionSet>`. Workers call [`SessionTable::load`] once per batch;
/// the single writer (the shm consumer installing keys) copies the set, changes it and swaps the
/// pointer (`Session`s themselves are shared, so a copy is two small hash maps of `Arc`s).
#[derive(Debug)]
pub struct SessionTable {
    current: ArcSwap<SessionSet>,
}

impl Default for SessionTable {
    fn default() -> Self {
        Self::new()
    }
}

impl SessionTable {
    /// An empty table with a random hash seed.
    pub fn new() -> Self {
        SessionTable {
            current: ArcSwap::from_pointee(SessionSet::new(FibHasherBuilder::random())),
        }
    }

    /// The current sessions; hold the guard for one batch.
    #[inline]
    pub fn load(&self) -> Guard<Arc<SessionSet>> {
        self.current.load()
    }

    /// Installs `session` for receiving, replacing any session with the same local index; with
    /// `current`, it also becomes the one used to send to its peer. The previous sending session
    /// stays installed for receiving until [`SessionTable::remove`]d ("keep the previous session
    /// until the new one has carried traffic").
    pub fn insert(&self, session: Arc<Session>, current: bool) {
        self.update(|set| {
            let index = session.local_index;
            if let Some(old) = set.by_index.insert(index, session.clone()) {
                // A replaced session must not stay the sending one.
                let prefix = old.remote_prefix;
                if set.by_dest.get(&prefix).map(|s| s.local_index) == Some(index) {
                    set.by_dest.remove(&prefix);
                }
            }
            if current {
                set.by_dest.insert(session.remote_prefix, session.clone());
            }
        });
    }

    /// Makes the installed session `local_index` the sending one for its peer; false if unknown.
    pub fn promote(&self, local_index: u32) -> bool {
        let Some(session) = self.load().get(local_index).cloned() else {
            return false;
        };
        self.update(|set| {
            set.by_dest.insert(session.remote_prefix, session.clone());
        });
        true
    }

    /// Removes a session; returns it if it was installed.
    pub fn remove(&self, local_index: u32) -> Option<Arc<Session>> {
        let removed = self.load().get(local_index).cloned()?;
        self.update(|set| {
            set.by_index.remove(&local_index);
            let prefix = removed.remote_prefix;
            if set.by_dest.get(&prefix).map(|s| s.local_index) == Some(local_index) {
                set.by_dest.remove(&prefix);
            }
        });
        Some(removed)
    }

    /// Removes every session expired at `now`; returns how many.
    pub fn remove_expired(&self, now: Instant) -> usize {
        let expired: Vec<u32> = self
            .load()
            .by_index
            .values()
            .filter(|s| s.is_expired(now))
            .map(|s| s.local_index)
            .collect();
        if expired.is_empty() {
            return 0;
        }
        self.update(|set| {
            set.by_index.retain(|_, s| !s.is_expired(now));
            set.by_dest.retain(|_, s| !s.is_expired(now));
        });
        expired.len()
    }

    fn update(&self, f: impl Fn(&mut SessionSet)) {
        self.current.rcu(|set| {
            let mut next = SessionSet::clone(set);
            f(&mut next);
            next
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypha_proto::wire::data::{Kind, Packet, Repr, HEADER_LEN};

    const CIPHERS: [Cipher; 2] = [Cipher::ChaCha20Poly1305, Cipher::Aes256Gcm];

    fn params(cipher: Cipher, local: u32, remote: u32) -> SessionParams {
        SessionParams {
            local_index: local,
            remote_index: remote,
            remote_prefix: 0x0400_0000_0000_0000 | u64::from(remote),
            cipher,
            send_key: [0x11; KEY_LEN],
            recv_key: [0x22; KEY_LEN],
            initiator: true,
            send_counter: 0,
            replay_base: 0,
        }
    }

    /// A pair of sessions whose keys mirror each other: `a` sends to `b`'s index and vice versa.
    fn pair(cipher: Cipher, now: Instant) -> (Session, Session) {
        let a = params(cipher, 1, 2);
        let mut b = params(cipher, 2, 1);
        b.send_key = a.recv_key;
        b.recv_key = a.send_key;
        b.initiator = false;
        (
            Session::new(&a, now).unwrap(),
            Session::new(&b, now).unwrap(),
        )
    }

    /// Builds a TRANSPORT packet for `to` in `buf` with `payload`, sealed by `from`; returns its
    /// length.
    fn build(from: &Session, now: Instant, hop_limit: u8, payload: &[u8], buf: &mut [u8]) -> usize {
        let counter = from.next_counter(now).unwrap();
        let repr = Repr {
            hop_limit,
            kind: Kind::Transport,
            receiver_index: from.remote_index(),
            counter,
            src: "400::1".parse().unwrap(),
            dst: "400::2".parse().unwrap(),
        };
        let mut packet = Packet::new_unchecked(&mut buf[..]);
        repr.emit(&mut packet);
        let mut aad = [0u8; HEADER_LEN];
        packet.aad(&mut aad);
        buf[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
        let sealed = from
            .seal_in_place_append(counter, &aad, &mut buf[HEADER_LEN..], payload.len())
            .unwrap();
        HEADER_LEN + sealed
    }

    /// The receive path: parse, AAD, open.
    fn receive<'a>(
        to: &Session,
        now: Instant,
        buf: &'a mut [u8],
    ) -> Result<&'a mut [u8], SessionError> {
        assert!(Packet::new_checked(&buf[..]).is_ok());
        receive_unparsed(to, now, buf)
    }

    /// The receive path without the parser's checks, so that tampered type or kind bytes reach the
    /// AEAD (the AAD must cover them too).
    fn receive_unparsed<'a>(
        to: &Session,
        now: Instant,
        buf: &'a mut [u8],
    ) -> Result<&'a mut [u8], SessionError> {
        let packet = Packet::new_unchecked(&buf[..]);
        let counter = packet.counter();
        let mut aad = [0u8; HEADER_LEN];
        packet.aad(&mut aad);
        to.open_in_place(now, counter, &aad, &mut buf[HEADER_LEN..])
    }

    #[test]
    fn cipher_names_and_choice() {
        for c in CIPHERS {
            assert_eq!(c.name().parse::<Cipher>(), Ok(c));
        }
        assert!("rot13".parse::<Cipher>().is_err());
        assert_eq!(
            Cipher::choose(Some(Cipher::ChaCha20Poly1305)),
            Cipher::ChaCha20Poly1305
        );
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            Cipher::preferred() == Cipher::Aes256Gcm,
            std::arch::is_x86_feature_detected!("aes")
                && std::arch::is_x86_feature_detected!("pclmulqdq")
        );
    }

    #[test]
    fn round_trip_both_ciphers_ignoring_hop_limit() {
        let now = Instant::from_secs(1);
        for c in CIPHERS {
            let (a, b) = pair(c, now);
            for len in [1usize, 64, 1400, 65_000] {
                let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let mut buf = vec![0xa5u8; HEADER_LEN + len + TAG_LEN];
                let n = build(&a, now, 64, &payload, &mut buf);
                assert_eq!(n, buf.len());
                assert_ne!(
                    &buf[HEADER_LEN..HEADER_LEN + len],
                    &payload[..],
                    "not encrypted"
                );
                // A transit node decrements the hop limit: still authentic.
                buf[1] = 3;
                let plain = receive(&b, now, &mut buf).unwrap();
                assert_eq!(plain, &payload[..]);
            }
            assert_eq!(a.sent(), 4);
            assert_eq!(b.received(), 4);
            // And the other direction.
            let mut buf = vec![0u8; HEADER_LEN + 5 + TAG_LEN];
            build(&b, now, 64, b"hello", &mut buf);
            assert_eq!(receive(&a, now, &mut buf).unwrap(), b"hello");
        }
    }

    #[test]
    fn ciphers_are_not_interchangeable() {
        let now = Instant::ZERO;
        let (a, _) = pair(Cipher::Aes256Gcm, now);
        let (_, b) = pair(Cipher::ChaCha20Poly1305, now);
        let mut buf = vec![0u8; HEADER_LEN + 10 + TAG_LEN];
        build(&a, now, 64, b"0123456789", &mut buf);
        assert_eq!(receive(&b, now, &mut buf), Err(SessionError::Auth));
    }

    #[test]
    fn tampering_is_detected_and_does_not_advance_the_window() {
        let now = Instant::ZERO;
        for c in CIPHERS {
            let (a, b) = pair(c, now);
            let mut orig = vec![0u8; HEADER_LEN + 100 + TAG_LEN];
            build(&a, now, 64, &[7u8; 100], &mut orig);
            // Every authenticated header byte, a ciphertext byte and a tag byte.
            let mut positions: Vec<usize> = (0..HEADER_LEN).filter(|i| *i != 1).collect();
            positions.extend([
                HEADER_LEN,
                HEADER_LEN + 99,
                HEADER_LEN + 100,
                orig.len() - 1,
            ]);
            for pos in positions {
                let mut buf = orig.clone();
                buf[pos] ^= 0x01;
                let r = receive_unparsed(&b, now, &mut buf);
                // Flipping counter bits may instead land on another (unseen) counter: still Auth.
                assert_eq!(r, Err(SessionError::Auth), "{c} byte {pos}");
            }
            assert_eq!(b.received(), 0);
            // The genuine packet still gets through after all the forgeries.
            let mut buf = orig.clone();
            assert!(receive(&b, now, &mut buf).is_ok());
            // Too short to hold a tag.
            let mut short = [0u8; TAG_LEN - 1];
            assert_eq!(
                b.open_in_place(now, 1000, &[], &mut short),
                Err(SessionError::Short)
            );
        }
    }

    #[test]
    fn replayed_counter_is_rejected() {
        let now = Instant::ZERO;
        let (a, b) = pair(Cipher::ChaCha20Poly1305, now);
        let mut orig = vec![0u8; HEADER_LEN + 20 + TAG_LEN];
        build(&a, now, 64, &[1u8; 20], &mut orig);
        let mut buf = orig.clone();
        assert!(receive(&b, now, &mut buf).is_ok());
        let mut buf = orig.clone();
        assert_eq!(
            receive(&b, now, &mut buf),
            Err(SessionError::Replay(ReplayError::Duplicate))
        );
        // Far newer traffic pushes the first packet out of the window.
        for _ in 0..5000 {
            let mut buf = vec![0u8; HEADER_LEN + 1 + TAG_LEN];
            build(&a, now, 64, &[0], &mut buf);
            receive(&b, now, &mut buf).unwrap();
        }
        let mut buf = orig.clone();
        assert_eq!(
            receive(&b, now, &mut buf),
            Err(SessionError::Replay(ReplayError::TooOld))
        );
    }

    #[test]
    fn counter_limits_are_enforced() {
        let now = Instant::ZERO;
        let (a, b) = pair(Cipher::Aes256Gcm, now);
        assert!(!a.needs_rekey(now));
        a.send_counter
            .store(REKEY_AFTER_MESSAGES, Ordering::Relaxed);
        assert!(a.needs_rekey(now));
        a.send_counter
            .store(REJECT_AFTER_MESSAGES - 3, Ordering::Relaxed);
        assert_eq!(
            a.reserve_counters(now, 4),
            Err(SessionError::CounterExhausted)
        );
        assert_eq!(
            a.reserve_counters(now, 3),
            Ok(REJECT_AFTER_MESSAGES - 3..REJECT_AFTER_MESSAGES)
        );
        assert_eq!(a.next_counter(now), Err(SessionError::CounterExhausted));
        assert_eq!(a.sent(), REJECT_AFTER_MESSAGES, "never wraps");
        // The receiver refuses a counter at the limit even with a valid tag.
        let mut buf = [0u8; TAG_LEN];
        let tag = a
            .seal_in_place(REJECT_AFTER_MESSAGES, &[], &mut buf[..0])
            .unwrap();
        buf.copy_from_slice(&tag);
        assert_eq!(
            b.open_in_place(now, REJECT_AFTER_MESSAGES, &[], &mut buf),
            Err(SessionError::Replay(ReplayError::Exhausted))
        );
    }

    #[test]
    fn reinstalled_keys_continue_counters() {
        let now = Instant::ZERO;
        let (a, _) = pair(Cipher::Aes256Gcm, now);
        let mut first = vec![0u8; HEADER_LEN + 1 + TAG_LEN];
        build(&a, now, 64, &[0], &mut first);
        let mut second = vec![0u8; HEADER_LEN + 1 + TAG_LEN];
        build(&a, now, 64, &[0], &mut second);
        // The dataplane restarts; the control plane re-installs both ends' keys with the counters
        // it last saw: the sender continues at 2, the receiver refuses what it may have delivered.
        let mut pa = params(Cipher::Aes256Gcm, 1, 2);
        pa.send_counter = a.sent();
        let mut pb = params(Cipher::Aes256Gcm, 2, 1);
        pb.send_key = pa.recv_key;
        pb.recv_key = pa.send_key;
        pb.replay_base = 1;
        let a2 = Session::new(&pa, now).unwrap();
        let b2 = Session::new(&pb, now).unwrap();
        assert_eq!(a2.next_counter(now), Ok(2));
        assert_eq!(
            receive(&b2, now, &mut first),
            Err(SessionError::Replay(ReplayError::Duplicate))
        );
        assert!(receive(&b2, now, &mut second).is_ok());
    }

    #[test]
    fn time_limits_are_enforced() {
        let t0 = Instant::from_secs(10);
        let (a, b) = pair(Cipher::ChaCha20Poly1305, t0);
        let just_before = t0 + REKEY_AFTER_TIME - Duration::from_micros(1);
        assert!(!a.needs_rekey(just_before));
        assert!(a.needs_rekey(t0 + REKEY_AFTER_TIME));
        // Only the initiator rekeys on time.
        assert!(!b.needs_rekey(t0 + REKEY_AFTER_TIME));
        let late = t0 + REJECT_AFTER_TIME;
        let mut buf = vec![0u8; HEADER_LEN + 1 + TAG_LEN];
        build(&a, t0, 64, &[0], &mut buf);
        assert_eq!(a.next_counter(late), Err(SessionError::Expired));
        assert_eq!(receive(&b, late, &mut buf), Err(SessionError::Expired));
        assert!(receive(&b, late - Duration::from_micros(1), &mut buf).is_ok());
    }

    #[test]
    fn seal_append_needs_tailroom() {
        let key = SealingKey::new(Cipher::Aes256Gcm, &[3; KEY_LEN]).unwrap();
        let mut buf = [0u8; 20];
        assert_eq!(
            key.seal_in_place_append(0, &[], &mut buf, 5),
            Err(SessionError::Short)
        );
        assert_eq!(key.seal_in_place_append(0, &[], &mut buf, 4), Ok(20));
        let open = OpeningKey::new(Cipher::Aes256Gcm, &[3; KEY_LEN]).unwrap();
        assert_eq!(open.open_in_place(0, &[], &mut buf).map(|p| p.len()), Ok(4));
    }

    #[test]
    fn table_finds_sessions_by_index_and_destination() {
        let now = Instant::ZERO;
        let table = SessionTable::new();
        let old = Arc::new(Session::new(&params(Cipher::Aes256Gcm, 10, 7), now).unwrap());
        table.insert(old.clone(), true);
        let snapshot = table.load();
        let new = Arc::new(Session::new(&params(Cipher::Aes256Gcm, 11, 7), now).unwrap());
        assert_eq!(new.remote_prefix(), old.remote_prefix());
        table.insert(new.clone(), false);
        // The worker's snapshot is unchanged.
        assert_eq!(snapshot.len(), 1);
        let set = table.load();
        assert_eq!(set.len(), 2);
        assert_eq!(set.get(11).map(|s| s.local_index()), Some(11));
        assert_eq!(
            set.for_dest(old.remote_prefix()).map(|s| s.local_index()),
            Some(10)
        );
        assert!(table.promote(11));
        assert!(!table.promote(99));
        let set = table.load();
        assert_eq!(
            set.for_dest(old.remote_prefix()).map(|s| s.local_index()),
            Some(11)
        );
        assert_eq!(table.remove(10).map(|s| s.local_index()), Some(10));
        assert!(table.remove(10).is_none());
        let set = table.load();
        assert!(set.get(10).is_none());
        assert_eq!(
            set.for_dest(old.remote_prefix()).map(|s| s.local_index()),
            Some(11)
        );
        // Removing the sending session leaves no sending session.
        table.remove(11);
        assert!(table.load().for_dest(old.remote_prefix()).is_none());
        assert!(table.load().is_empty());
    }

    #[test]
    fn expired_sessions_are_swept() {
        let table = SessionTable::new();
        let t0 = Instant::from_secs(100);
        table.insert(
            Arc::new(Session::new(&params(Cipher::Aes256Gcm, 1, 5), Instant::ZERO).unwrap()),
            true,
        );
        table.insert(
            Arc::new(Session::new(&params(Cipher::Aes256Gcm, 2, 6), t0).unwrap()),
            true,
        );
        assert_eq!(table.remove_expired(Instant::ZERO + REJECT_AFTER_TIME), 1);
        let set = table.load();
        assert!(set.get(1).is_none());
        assert!(set.for_dest(0x0400_0000_0000_0005).is_none());
        assert!(set.get(2).is_some());
    }
}
