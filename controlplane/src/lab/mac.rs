//! MAC authentication for Babel (RFC 8967), HMAC-SHA256 only.
//!
//! It sits between the socket and the router as a filter on whole packets, so the Babel core never
//! sees a packet that failed it: on the way out [`MacState::sign`] appends a Packet Counter (PC) TLV
//! to the body and one MAC TLV per key to the packet trailer; on the way in
//! [`MacState::verify`] checks the MACs, answers challenge requests, runs the challenge exchange
//! for neighbours whose Index it does not know yet and rejects replayed Packet Counters (§4.3).
//! Challenge packets it has to send are drained with [`MacState::poll_transmit`]. It is a sans-IO
//! state machine like the router: time comes in as `now`, and randomness from a seeded RNG.
//!
//! The MAC covers a pseudo-header (§4.1: source address and port, destination address and port)
//! followed by the packet header and body; the trailer is not covered. babeld computes the same
//! thing (and pads HMAC-SHA256 keys to the 64-byte block with zeros, which HMAC does anyway), so
//! keys interoperate byte for byte.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv6Addr;
use std::time::Duration;

use hypha_proto::time::Instant;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ring::hmac;

use hypha_proto::babel::BABEL_PORT;

use hypha_proto::babel::{
    BABEL_MAGIC as MAGIC, BABEL_VERSION as VERSION, HEADER_LEN, MESSAGE_CHALLENGE_REPLY,
    MESSAGE_CHALLENGE_REQUEST, MESSAGE_MAC, MESSAGE_PAD1, MESSAGE_PC,
};
/// Length of our Index (RFC 8967 §6.1 allows 0..=32 octets).
const INDEX_LEN: usize = 8;
/// Length of our challenge nonces (RFC 8967 §6.2 allows up to 192 octets).
const NONCE_LEN: usize = 16;
/// How long a challenge we sent stays answerable (RFC 8967 §4.3: 30 s is recommended).
const CHALLENGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Minimum interval between two challenge requests or two replies to one neighbour (§4.3 asks for a
/// rate limit; babeld uses 300 ms).
const CHALLENGE_RATE: Duration = Duration::from_millis(300);
/// Upper bound on queued challenge packets, so a flood of forged-but-valid requests can't grow it.
const MAX_PENDING: usize = 64;
/// Upper bound on remembered neighbours per interface.
const MAX_NEIGHBOURS: usize = 1024;

/// A key or configuration problem.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum MacError {
    /// HMAC-SHA256 keys are 1 to 64 bytes (longer ones are hashed by HMAC, which babeld does not
    /// do, so we refuse them to stay interoperable).
    #[error("HMAC-SHA256 key must be 1..=64 bytes, got {0}")]
    KeyLength(usize),
    /// The key is not valid hexadecimal.
    #[error("key is not hexadecimal: {0}")]
    KeyHex(String),
    /// The packet handed to `sign` is not a Babel packet we built.
    #[error("not a well-formed Babel packet")]
    NotBabel,
    /// Adding the PC TLV would overflow the body length field.
    #[error("packet too long to sign")]
    TooLong,
}

/// Why [`MacState::verify`] dropped a packet. Each reason is a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Not a Babel packet, or the body length runs past the datagram.
    Malformed,
    /// No MAC TLV in the trailer.
    NoMac,
    /// No MAC TLV matched any key.
    BadMac,
    /// Authentic, but without a PC TLV.
    NoPc,
    /// Authentic, from a neighbour whose Index we don't know yet: we sent (or rate-limited) a
    /// challenge request instead.
    Challenged,
    /// Authentic, but the Packet Counter did not increase (a replay).
    Replay,
}

/// What to do with a received packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Pass `packet[..len]` (header and body, without the trailer) to the router.
    Accept {
        /// Length of header plus body.
        len: usize,
    },
    /// Drop it, for this reason.
    Drop(Drop),
}

/// Per-reason counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MacCounters {
    /// Packets accepted.
    pub accepted: u64,
    /// See [`Drop::Malformed`].
    pub malformed: u64,
    /// See [`Drop::NoMac`].
    pub no_mac: u64,
    /// See [`Drop::BadMac`].
    pub bad_mac: u64,
    /// See [`Drop::NoPc`].
    pub no_pc: u64,
    /// See [`Drop::Challenged`].
    pub challenged: u64,
    /// See [`Drop::Replay`].
    pub replay: u64,
    /// Challenge requests sent.
    pub challenge_requests_sent: u64,
    /// Challenge replies sent.
    pub challenge_replies_sent: u64,
}

/// Parses a hexadecimal HMAC-SHA256 key.
pub fn parse_key(hex_key: &str) -> Result<Vec<u8>, MacError> {
    let bytes = hex::decode(hex_key.trim()).map_err(|e| MacError::KeyHex(e.to_string()))?;
    if bytes.is_empty() || bytes.len() > 64 {
        return Err(MacError::KeyLength(bytes.len()));
    }
    Ok(bytes)
}

/// What we know of one neighbour (RFC 8967 §3.2: its Index and last Packet Counter, and the
/// challenge we sent it).
#[derive(Debug, Default)]
struct Neighbour {
    index: Option<Vec<u8>>,
    pc: u32,
    /// The nonce of our outstanding challenge request and when it was sent.
    challenge: Option<([u8; NONCE_LEN], Instant)>,
    last_request: Option<Instant>,
    last_reply: Option<Instant>,
}

/// A challenge packet waiting to be sent: its unsigned body and its destination.
#[derive(Debug)]
struct Pending {
    dst: Ipv6Addr,
    tlv_type: u8,
    nonce: Vec<u8>,
}

/// RFC 8967 state of one interface: its keys, our Index and PC, and the neighbours' (Index, PC).
#[derive(Debug)]
pub struct MacState {
    keys: Vec<hmac::Key>,
    index: [u8; INDEX_LEN],
    pc: u32,
    neighbours: HashMap<Ipv6Addr, Neighbour>,
    pending: VecDeque<Pending>,
    rng: StdRng,
    counters: MacCounters,
}

impl MacState {
    /// State for an interface with `keys` (each 1..=64 bytes); `seed` drives the Index and nonces.
    pub fn new(keys: &[Vec<u8>], seed: u64) -> Result<Self, MacError> {
        let mut hkeys = Vec::with_capacity(keys.len());
        for k in keys {
            if k.is_empty() || k.len() > 64 {
                return Err(MacError::KeyLength(k.len()));
            }
            hkeys.push(hmac::Key::new(hmac::HMAC_SHA256, k));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut index = [0u8; INDEX_LEN];
        rng.fill(&mut index[..]);
        Ok(MacState {
            keys: hkeys,
            index,
            pc: 0,
            neighbours: HashMap::new(),
            pending: VecDeque::new(),
            rng,
            counters: MacCounters::default(),
        })
    }

    /// The counters.
    pub fn counters(&self) -> MacCounters {
        self.counters
    }

    /// The MAC of `packet[..HEADER_LEN + body]` under `key` with the §4.1 pseudo-header.
    fn compute(key: &hmac::Key, src: Ipv6Addr, dst: Ipv6Addr, packet: &[u8]) -> hmac::Tag {
        let port = BABEL_PORT.to_be_bytes();
        let mut ctx = hmac::Context::with_key(key);
        ctx.update(&src.octets());
        ctx.update(&port);
        ctx.update(&dst.octets());
        ctx.update(&port);
        ctx.update(packet);
        ctx.sign()
    }

    /// Adds a PC TLV to the body of `packet` (a complete Babel packet without trailer, as the router
    /// builds it) and appends one MAC TLV per key, computed for a datagram from `src` to `dst`.
    pub fn sign(
        &mut self,
        packet: &mut Vec<u8>,
        src: Ipv6Addr,
        dst: Ipv6Addr,
    ) -> Result<(), MacError> {
        let (magic, version, body_len) = match packet.get(..HEADER_LEN) {
            Some(&[m, v, a, b]) => (m, v, usize::from(u16::from_be_bytes([a, b]))),
            _ => return Err(MacError::NotBabel),
        };
        if magic != MAGIC || version != VERSION || packet.len() < HEADER_LEN + body_len {
            return Err(MacError::NotBabel);
        }
        // Drop any trailer the builder may have left; ours replaces it.
        packet.truncate(HEADER_LEN + body_len);
        // The PC strictly increases per Index; on wrap-around pick a new Index (§4.2).
        self.pc = match self.pc.checked_add(1) {
            Some(pc) => pc,
            None => {
                self.rng.fill(&mut self.index[..]);
                0
            }
        };
        let pc_tlv_len = 2 + 4 + INDEX_LEN;
        let new_body = u16::try_from(body_len + pc_tlv_len).map_err(|_| MacError::TooLong)?;
        packet.push(MESSAGE_PC);
        packet.push((4 + INDEX_LEN) as u8);
        packet.extend_from_slice(&self.pc.to_be_bytes());
        packet.extend_from_slice(&self.index);
        packet[2..4].copy_from_slice(&new_body.to_be_bytes());
        let covered = packet.len();
        for key in &self.keys {
            let tag = Self::compute(key, src, dst, packet.get(..covered).unwrap_or(&[]));
            let tag = tag.as_ref();
            packet.push(MESSAGE_MAC);
            packet.push(tag.len() as u8);
            packet.extend_from_slice(tag);
        }
        Ok(())
    }

    fn drop(&mut self, d: Drop) -> Verdict {
        let c = &mut self.counters;
        match d {
            Drop::Malformed => c.malformed += 1,
            Drop::NoMac => c.no_mac += 1,
            Drop::BadMac => c.bad_mac += 1,
            Drop::NoPc => c.no_pc += 1,
            Drop::Challenged => c.challenged += 1,
            Drop::Replay => c.replay += 1,
        }
        Verdict::Drop(d)
    }

    /// Checks a received datagram from `src` to `dst` (RFC 8967 §4.3). May queue challenge packets
    /// (see [`MacState::poll_transmit`]).
    pub fn verify(&mut self, now: Instant, packet: &[u8], src: Ipv6Addr, dst: Ipv6Addr) -> Verdict {
        let body_len = match packet.get(..HEADER_LEN) {
            Some(&[MAGIC, VERSION, a, b]) => usize::from(u16::from_be_bytes([a, b])),
            _ => return self.drop(Drop::Malformed),
        };
        let covered_len = HEADER_LEN + body_len;
        let (Some(covered), Some(trailer)) = (packet.get(..covered_len), packet.get(covered_len..))
        else {
            return self.drop(Drop::Malformed);
        };

        // 1. At least one MAC TLV in the trailer must verify under some key.
        let mut saw_mac = false;
        let mut ok = false;
        for (t, v) in TlvIter::new(trailer) {
            if t != MESSAGE_MAC {
                continue;
            }
            saw_mac = true;
            if self.keys.iter().any(|k| {
                let tag = Self::compute(k, src, dst, covered);
                equal_ct(tag.as_ref(), v)
            }) {
                ok = true;
                break;
            }
        }
        if !saw_mac {
            return self.drop(Drop::NoMac);
        }
        if !ok {
            return self.drop(Drop::BadMac);
        }

        // 2. Gather the PC (the first one counts), challenge requests and replies from the body.
        let body = covered.get(HEADER_LEN..).unwrap_or(&[]);
        let mut pc: Option<(u32, &[u8])> = None;
        let mut requests: Vec<&[u8]> = Vec::new();
        let mut replies: Vec<&[u8]> = Vec::new();
        for (t, v) in TlvIter::new(body) {
            match t {
                MESSAGE_PC if pc.is_none() => {
                    if let (Some(&[a, b, c, d]), Some(index)) = (v.get(..4), v.get(4..)) {
                        pc = Some((u32::from_be_bytes([a, b, c, d]), index));
                    }
                }
                MESSAGE_CHALLENGE_REQUEST if v.len() <= 192 => requests.push(v),
                MESSAGE_CHALLENGE_REPLY => replies.push(v),
                _ => {}
            }
        }

        if !self.neighbours.contains_key(&src) && self.neighbours.len() >= MAX_NEIGHBOURS {
            // Forget neighbours that never completed a challenge before refusing new ones.
            self.neighbours.retain(|_, n| n.index.is_some());
            if self.neighbours.len() >= MAX_NEIGHBOURS {
                return self.drop(Drop::Challenged);
            }
        }
        let neigh = self.neighbours.entry(src).or_default();

        // 3. Answer challenge requests, whatever else happens to the packet (rate-limited).
        if let Some(nonce) = requests.first() {
            let due = neigh
                .last_reply
                .is_none_or(|t| now.saturating_duration_since(t) >= CHALLENGE_RATE);
            if due && self.pending.len() < MAX_PENDING {
                neigh.last_reply = Some(now);
                self.pending.push_back(Pending {
                    dst: src,
                    tlv_type: MESSAGE_CHALLENGE_REPLY,
                    nonce: nonce.to_vec(),
                });
            }
        }

        let Some((pc, index)) = pc else {
            return self.drop(Drop::NoPc);
        };

        // 4. A known Index: the PC must increase.
        if neigh.index.as_deref() == Some(index) {
            if pc <= neigh.pc {
                return self.drop(Drop::Replay);
            }
            neigh.pc = pc;
            self.counters.accepted += 1;
            return Verdict::Accept { len: covered_len };
        }

        // 5. An unknown Index: accept only with a reply to our outstanding challenge.
        if let Some((nonce, sent)) = neigh.challenge {
            let fresh = now.saturating_duration_since(sent) < CHALLENGE_TIMEOUT;
            if fresh && replies.contains(&nonce.as_slice()) {
                neigh.index = Some(index.to_vec());
                neigh.pc = pc;
                neigh.challenge = None;
                self.counters.accepted += 1;
                return Verdict::Accept { len: covered_len };
            }
        }
        let due = neigh
            .last_request
            .is_none_or(|t| now.saturating_duration_since(t) >= CHALLENGE_RATE);
        if due && self.pending.len() < MAX_PENDING {
            let mut nonce = [0u8; NONCE_LEN];
            self.rng.fill(&mut nonce[..]);
            neigh.challenge = Some((nonce, now));
            neigh.last_request = Some(now);
            self.pending.push_back(Pending {
                dst: src,
                tlv_type: MESSAGE_CHALLENGE_REQUEST,
                nonce: nonce.to_vec(),
            });
        }
        self.drop(Drop::Challenged)
    }

    /// Forgets a neighbour (when the router reports it gone).
    pub fn forget(&mut self, neighbour: &Ipv6Addr) {
        self.neighbours.remove(neighbour);
    }

    /// Writes the next queued challenge packet (unsigned: pass it to [`MacState::sign`]) into `buf`
    /// and returns its unicast destination.
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> Option<Ipv6Addr> {
        let p = self.pending.pop_front()?;
        match p.tlv_type {
            MESSAGE_CHALLENGE_REQUEST => self.counters.challenge_requests_sent += 1,
            _ => self.counters.challenge_replies_sent += 1,
        }
        buf.clear();
        // Nonces are at most 192 bytes (checked on receipt; ours are NONCE_LEN).
        let nonce_len = p.nonce.len().min(192);
        buf.extend_from_slice(&[MAGIC, VERSION, 0, (2 + nonce_len) as u8]);
        buf.push(p.tlv_type);
        buf.push(nonce_len as u8);
        buf.extend_from_slice(p.nonce.get(..nonce_len).unwrap_or(&[]));
        Some(p.dst)
    }
}

/// Compares two MACs without an early exit on the first differing byte.
fn equal_ct(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Iterates over (type, value) of the TLVs in `bytes`, skipping Pad1 and stopping at the first
/// truncated TLV (the router reports malformed bodies; here only well-formed TLVs matter).
struct TlvIter<'a> {
    rest: &'a [u8],
}

impl<'a> TlvIter<'a> {
    fn new(rest: &'a [u8]) -> Self {
        TlvIter { rest }
    }
}

impl<'a> Iterator for TlvIter<'a> {
    type Item = (u8, &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (&t, rest) = self.rest.split_first()?;
            if t == MESSAGE_PAD1 {
                self.rest = rest;
                continue;
            }
            let (&len, rest) = rest.split_first()?;
            let len = usize::from(len);
            let (Some(v), Some(after)) = (rest.get(..len), rest.get(len..)) else {
                self.rest = &[];
                return None;
            };
            self.rest = after;
            return Some((t, v));
        }
    }
}

/// Entry points for the fuzz targets in /fuzz (not a stable API).
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// The first byte picks the mode. Even: `rest` is a received datagram, verified under a fixed
    /// key. Odd: `rest` is a packet body; a peer signs it and the result must never be rejected as
    /// unauthentic or malformed, then a replay of it must be rejected once the peer is known.
    pub fn fuzz_verify(data: &[u8]) {
        const SRC: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
        const DST: Ipv6Addr = hypha_proto::babel::BABEL_MULTICAST_V6;
        let Some((&mode, rest)) = data.split_first() else {
            return;
        };
        let key = vec![7u8; 32];
        let Ok(mut rx) = MacState::new(std::slice::from_ref(&key), 1) else {
            return;
        };
        if mode & 1 == 0 {
            let _ = rx.verify(Instant::ZERO, rest, SRC, DST);
            return;
        }
        let Ok(mut tx) = MacState::new(std::slice::from_ref(&key), 2) else {
            return;
        };
        let Ok(len) = u16::try_from(rest.len()) else {
            return;
        };
        let mut p = vec![MAGIC, VERSION];
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(rest);
        if tx.sign(&mut p, SRC, DST).is_err() {
            return;
        }
        let v = rx.verify(Instant::ZERO, &p, SRC, DST);
        assert!(
            !matches!(
                v,
                Verdict::Drop(Drop::BadMac | Drop::NoMac | Drop::Malformed)
            ),
            "our own signed packet rejected: {v:?}"
        );
        if let Verdict::Accept { .. } = v {
            assert_eq!(
                rx.verify(Instant::ZERO, &p, SRC, DST),
                Verdict::Drop(Drop::Replay)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    const B: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);
    const GROUP: Ipv6Addr = hypha_proto::babel::BABEL_MULTICAST_V6;

    /// A Babel packet with one Hello TLV (type 4, unicast flag clear, seqno 7, interval 400).
    fn hello() -> Vec<u8> {
        vec![42, 2, 0, 8, 4, 6, 0, 0, 0, 7, 1, 144]
    }

    fn t(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    /// Runs the challenge exchange between `a` (sender) and `b` (receiver) and returns the
    /// verdict of a packet sent after it.
    fn handshake(a: &mut MacState, b: &mut MacState) {
        let mut p = hello();
        a.sign(&mut p, A, GROUP).unwrap();
        assert_eq!(
            b.verify(t(0), &p, A, GROUP),
            Verdict::Drop(Drop::Challenged)
        );
        let mut req = Vec::new();
        assert_eq!(b.poll_transmit(&mut req), Some(A));
        b.sign(&mut req, B, A).unwrap();
        // A doesn't know B's index either: it answers the request and challenges back.
        assert_eq!(a.verify(t(1), &req, B, A), Verdict::Drop(Drop::Challenged));
        let mut out = Vec::new();
        let mut replies = Vec::new();
        while let Some(dst) = a.poll_transmit(&mut out) {
            assert_eq!(dst, B);
            let mut signed = out.clone();
            a.sign(&mut signed, A, B).unwrap();
            replies.push(signed);
        }
        assert_eq!(replies.len(), 2);
        let reply = replies
            .iter()
            .find(|r| r.get(4) == Some(&MESSAGE_CHALLENGE_REPLY))
            .unwrap();
        assert!(matches!(
            b.verify(t(2), reply, A, B),
            Verdict::Accept { .. }
        ));
    }

    #[test]
    fn sign_then_verify_after_challenge() {
        let key = parse_key("000102030405060708090a0b0c0d0e0f").unwrap();
        let mut a = MacState::new(std::slice::from_ref(&key), 1).unwrap();
        let mut b = MacState::new(&[key], 2).unwrap();
        handshake(&mut a, &mut b);
        let mut p = hello();
        a.sign(&mut p, A, GROUP).unwrap();
        // Body grew by the PC TLV (2 + 4 + 8); trailer holds one 32-byte MAC.
        assert_eq!(&p[..4], &[42, 2, 0, 8 + 14]);
        assert_eq!(p.len(), 4 + 22 + 2 + 32);
        match b.verify(t(3), &p, A, GROUP) {
            Verdict::Accept { len } => {
                assert_eq!(len, 26);
                assert_eq!(&p[4..12], &hello()[4..]);
            }
            v => panic!("{v:?}"),
        }
        // The same packet again is a replay.
        assert_eq!(b.verify(t(4), &p, A, GROUP), Verdict::Drop(Drop::Replay));
        assert_eq!(b.counters().replay, 1);
    }

    #[test]
    fn wrong_key_tampering_and_missing_mac_are_dropped() {
        let mut a = MacState::new(&[parse_key("aa").unwrap()], 1).unwrap();
        let mut b = MacState::new(&[parse_key("bb").unwrap()], 2).unwrap();
        let mut p = hello();
        a.sign(&mut p, A, GROUP).unwrap();
        assert_eq!(b.verify(t(0), &p, A, GROUP), Verdict::Drop(Drop::BadMac));
        // Right key, but tampered body or spoofed source.
        let mut c = MacState::new(&[parse_key("aa").unwrap()], 3).unwrap();
        let mut bad = p.clone();
        bad[9] ^= 1;
        assert_eq!(c.verify(t(0), &bad, A, GROUP), Verdict::Drop(Drop::BadMac));
        assert_eq!(c.verify(t(0), &p, B, GROUP), Verdict::Drop(Drop::BadMac));
        assert_eq!(
            c.verify(t(0), &hello(), A, GROUP),
            Verdict::Drop(Drop::NoMac)
        );
        assert_eq!(
            c.verify(t(0), &[42, 2, 1, 0], A, GROUP),
            Verdict::Drop(Drop::Malformed)
        );
        assert_eq!(
            c.verify(t(0), &[43], A, GROUP),
            Verdict::Drop(Drop::Malformed)
        );
        let k = c.counters();
        assert_eq!((k.bad_mac, k.no_mac, k.malformed), (2, 1, 2));
    }

    #[test]
    fn second_key_is_accepted_for_rollover() {
        let old = parse_key("01").unwrap();
        let new = parse_key("02").unwrap();
        let mut a = MacState::new(std::slice::from_ref(&new), 1).unwrap();
        let mut b = MacState::new(&[old, new], 2).unwrap();
        let mut p = hello();
        a.sign(&mut p, A, GROUP).unwrap();
        // Authentic (second key matches): goes on to the challenge, not BadMac.
        assert_eq!(
            b.verify(t(0), &p, A, GROUP),
            Verdict::Drop(Drop::Challenged)
        );
    }

    #[test]
    fn stale_challenge_reply_is_refused_and_requests_are_rate_limited() {
        let key = parse_key("0f0f").unwrap();
        let mut a = MacState::new(std::slice::from_ref(&key), 1).unwrap();
        let mut b = MacState::new(&[key], 2).unwrap();
        let mut p = hello();
        a.sign(&mut p, A, GROUP).unwrap();
        assert_eq!(
            b.verify(t(0), &p, A, GROUP),
            Verdict::Drop(Drop::Challenged)
        );
        let mut p2 = hello();
        a.sign(&mut p2, A, GROUP).unwrap();
        assert_eq!(
            b.verify(t(100), &p2, A, GROUP),
            Verdict::Drop(Drop::Challenged)
        );
        let mut req = Vec::new();
        assert!(b.poll_transmit(&mut req).is_some());
        // Only one request within the rate limit.
        assert!(b.poll_transmit(&mut Vec::new()).is_none());
        b.sign(&mut req, B, A).unwrap();
        a.verify(t(200), &req, B, A);
        let mut out = Vec::new();
        let mut reply = None;
        while a.poll_transmit(&mut out).is_some() {
            if out.get(4) == Some(&MESSAGE_CHALLENGE_REPLY) {
                let mut s = out.clone();
                a.sign(&mut s, A, B).unwrap();
                reply = Some(s);
            }
        }
        let reply = reply.unwrap();
        // 31 s later the nonce has expired.
        assert_eq!(
            b.verify(t(31_000), &reply, A, B),
            Verdict::Drop(Drop::Challenged)
        );
    }

    #[test]
    fn fuzz_entry_handles_edge_inputs() {
        fuzzing::fuzz_verify(&[]);
        fuzzing::fuzz_verify(&[0, 42, 2, 0, 0]);
        fuzzing::fuzz_verify(&[1]);
        fuzzing::fuzz_verify(&[1, 4, 6, 0, 0, 0, 7, 1, 144]);
        // A body with its own PC TLV first and a challenge reply.
        fuzzing::fuzz_verify(&[1, 17, 6, 0, 0, 0, 9, 1, 2, 19, 2, 0, 0]);
    }

    #[test]
    fn keys_are_validated() {
        assert_eq!(parse_key(""), Err(MacError::KeyLength(0)));
        assert!(matches!(parse_key("zz"), Err(MacError::KeyHex(_))));
        assert_eq!(parse_key(&"ab".repeat(65)), Err(MacError::KeyLength(65)));
        assert!(MacState::new(&[vec![]], 0).is_err());
        let mut m = MacState::new(&[vec![1]], 0).unwrap();
        let mut not_babel = vec![1, 2, 3];
        assert_eq!(m.sign(&mut not_babel, A, B), Err(MacError::NotBabel));
    }
}
