//! The E2E handshake messages: Noise IK (`Noise_IK_25519_ChaChaPoly_BLAKE2s`) and our payloads.
//!
//! ```text
//! E2E_HANDSHAKE_INIT  -> e, es, s, ss   + payload: sender index (4), timestamp (12), cipher (1)
//!                                          = 32 + 48 + 17 + 16 = 113 bytes
//! E2E_HANDSHAKE_RESP  <- e, ee, se      + payload: sender index (4) = 32 + 4 + 16 = 52 bytes
//! ```
//!
//! IK because the initiator already knows the responder's static key: it travels with the route
//! (the origin's key in its Babel update), so one round trip authenticates both ends. The prologue
//! binds the handshake to the data header's addresses (`"hypha-e2e-v1" ‖ initiator address ‖
//! responder address`): a message moved to other addresses does not decrypt.
//!
//! This module only wraps `snow` and encodes the payloads; who sends what and when lives in
//! [`super::SessionManager`].

use hypha_proto::key::PublicKey;
use snow::{Builder, HandshakeState};

/// The Noise protocol name.
pub(crate) const PATTERN: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// The first bytes of the prologue (domain separation, version).
pub(crate) const PROLOGUE_TAG: &[u8; 12] = b"hypha-e2e-v1";
/// Length of the prologue: tag, initiator address, responder address.
pub(crate) const PROLOGUE_LEN: usize = PROLOGUE_TAG.len() + 16 + 16;

/// Plaintext payload of message 1: sender index, timestamp, cipher.
pub(crate) const INIT_PAYLOAD_LEN: usize = 4 + TIMESTAMP_LEN + 1;
/// Plaintext payload of message 2: sender index.
pub(crate) const RESP_PAYLOAD_LEN: usize = 4;
/// Message 1 on the wire: `e` (32), encrypted `s` (32 + 16), encrypted payload (+ 16).
pub(crate) const INIT_LEN: usize = 32 + 48 + INIT_PAYLOAD_LEN + 16;
/// Message 2 on the wire: `e` (32), encrypted payload (+ 16).
pub(crate) const RESP_LEN: usize = 32 + RESP_PAYLOAD_LEN + 16;
/// Length of a [`Timestamp`].
pub(crate) const TIMESTAMP_LEN: usize = 12;

const _: () = assert!(INIT_LEN == 113);
const _: () = assert!(RESP_LEN == 52);

/// TAI64N (8-byte big-endian 2^62 + seconds, 4-byte big-endian nanoseconds), as WireGuard's
/// initiation timestamp: byte order is time order, so `Ord` on the bytes compares times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct Timestamp(pub(crate) [u8; TIMESTAMP_LEN]);

impl Timestamp {
    /// The TAI64N label of `since_epoch` after the Unix epoch (leap seconds ignored).
    pub(crate) fn from_unix(since_epoch: core::time::Duration) -> Timestamp {
        let secs = (1u64 << 62).saturating_add(since_epoch.as_secs());
        let mut b = [0u8; TIMESTAMP_LEN];
        b[..8].copy_from_slice(&secs.to_be_bytes());
        b[8..].copy_from_slice(&since_epoch.subsec_nanos().to_be_bytes());
        Timestamp(b)
    }

    /// The next label after `self` (one nanosecond later).
    pub(crate) fn succ(self) -> Timestamp {
        let mut secs = [0u8; 8];
        secs.copy_from_slice(&self.0[..8]);
        let mut nanos = [0u8; 4];
        nanos.copy_from_slice(&self.0[8..]);
        let (mut secs, mut nanos) = (u64::from_be_bytes(secs), u32::from_be_bytes(nanos));
        nanos += 1;
        if nanos >= 1_000_000_000 {
            nanos = 0;
            secs = secs.saturating_add(1);
        }
        let mut b = [0u8; TIMESTAMP_LEN];
        b[..8].copy_from_slice(&secs.to_be_bytes());
        b[8..].copy_from_slice(&nanos.to_be_bytes());
        Timestamp(b)
    }
}

/// The decoded payload of message 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct InitPayload {
    /// The initiator's session index (the RESP's header receiver index).
    pub(crate) sender_index: u32,
    /// Monotonic per initiator; the responder refuses one not greater than the last it accepted.
    pub(crate) timestamp: Timestamp,
    /// The transport cipher byte ([`super::Cipher::to_byte`]).
    pub(crate) cipher: u8,
}

impl InitPayload {
    fn encode(&self) -> [u8; INIT_PAYLOAD_LEN] {
        let mut b = [0u8; INIT_PAYLOAD_LEN];
        b[..4].copy_from_slice(&self.sender_index.to_be_bytes());
        b[4..4 + TIMESTAMP_LEN].copy_from_slice(&self.timestamp.0);
        b[INIT_PAYLOAD_LEN - 1] = self.cipher;
        b
    }

    fn decode(b: &[u8; INIT_PAYLOAD_LEN]) -> InitPayload {
        let mut index = [0u8; 4];
        index.copy_from_slice(&b[..4]);
        let mut ts = [0u8; TIMESTAMP_LEN];
        ts.copy_from_slice(&b[4..4 + TIMESTAMP_LEN]);
        InitPayload {
            sender_index: u32::from_be_bytes(index),
            timestamp: Timestamp(ts),
            cipher: b[INIT_PAYLOAD_LEN - 1],
        }
    }
}

/// Why a handshake step failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NoiseError {
    /// `snow` could not set up or write a message (a local problem).
    #[error("noise setup failed: {0}")]
    Setup(snow::Error),
    /// A received message did not decrypt or authenticate.
    #[error("noise message rejected: {0}")]
    Rejected(snow::Error),
    /// A received message has the wrong length for its type.
    #[error("handshake message of {0} bytes has the wrong length")]
    Length(usize),
    /// No 32-byte remote static key after message 1 (cannot happen with IK).
    #[error("no remote static key")]
    NoPeerKey,
}

/// The Split() keys.
pub(crate) struct Keys {
    /// Protects initiator → responder.
    pub(crate) i2r: [u8; 32],
    /// Protects responder → initiator.
    pub(crate) r2i: [u8; 32],
}

/// The prologue binding a handshake to the initiator's and responder's addresses.
pub(crate) fn prologue(initiator: [u8; 16], responder: [u8; 16]) -> [u8; PROLOGUE_LEN] {
    let mut p = [0u8; PROLOGUE_LEN];
    p[..PROLOGUE_TAG.len()].copy_from_slice(PROLOGUE_TAG);
    p[PROLOGUE_TAG.len()..PROLOGUE_TAG.len() + 16].copy_from_slice(&initiator);
    p[PROLOGUE_TAG.len() + 16..].copy_from_slice(&responder);
    p
}

fn builder<'a>(
    secret: &'a [u8; 32],
    prologue: &'a [u8; PROLOGUE_LEN],
) -> Result<Builder<'a>, NoiseError> {
    let params = PATTERN.parse().map_err(NoiseError::Setup)?;
    Builder::new(params)
        .local_private_key(secret)
        .and_then(|b| b.prologue(prologue))
        .map_err(NoiseError::Setup)
}

/// Initiator: the handshake state and message 1 to `responder`.
pub(crate) fn initiate(
    secret: &[u8; 32],
    responder: &PublicKey,
    prologue: &[u8; PROLOGUE_LEN],
    payload: &InitPayload,
) -> Result<(Box<HandshakeState>, [u8; INIT_LEN]), NoiseError> {
    let mut hs = Box::new(
        builder(secret, prologue)?
            .remote_public_key(responder.as_bytes())
            .and_then(|b| b.build_initiator())
            .map_err(NoiseError::Setup)?,
    );
    let mut out = [0u8; INIT_LEN];
    let n = hs
        .write_message(&payload.encode(), &mut out)
        .map_err(NoiseError::Setup)?;
    if n != INIT_LEN {
        return Err(NoiseError::Setup(snow::Error::Input));
    }
    Ok((hs, out))
}

/// A message 1 read by the responder: who sent it and what it says. The reply is not written yet,
/// so the caller can refuse the initiator first.
pub(crate) struct ReadInit {
    hs: Box<HandshakeState>,
    /// The initiator's static key, authenticated by `ss`.
    pub(crate) peer_key: PublicKey,
    /// The decrypted payload.
    pub(crate) payload: InitPayload,
}

/// Responder: reads message 1.
pub(crate) fn read_init(
    secret: &[u8; 32],
    prologue: &[u8; PROLOGUE_LEN],
    msg: &[u8],
) -> Result<ReadInit, NoiseError> {
    if msg.len() != INIT_LEN {
        return Err(NoiseError::Length(msg.len()));
    }
    let mut hs = Box::new(
        builder(secret, prologue)?
            .build_responder()
            .map_err(NoiseError::Setup)?,
    );
    let mut payload = [0u8; INIT_LEN];
    let n = hs
        .read_message(msg, &mut payload)
        .map_err(NoiseError::Rejected)?;
    let payload: &[u8; INIT_PAYLOAD_LEN] = payload
        .get(..n)
        .and_then(|p| p.try_into().ok())
        .ok_or(NoiseError::Length(msg.len()))?;
    let peer_key: [u8; 32] = hs
        .get_remote_static()
        .and_then(|k| k.try_into().ok())
        .ok_or(NoiseError::NoPeerKey)?;
    Ok(ReadInit {
        hs,
        peer_key: PublicKey::from_bytes(peer_key),
        payload: InitPayload::decode(payload),
    })
}

impl ReadInit {
    /// Responder: writes message 2 carrying `sender_index`, and splits.
    pub(crate) fn respond(
        mut self,
        sender_index: u32,
    ) -> Result<([u8; RESP_LEN], Keys), NoiseError> {
        let mut out = [0u8; RESP_LEN];
        let n = self
            .hs
            .write_message(&sender_index.to_be_bytes(), &mut out)
            .map_err(NoiseError::Setup)?;
        if n != RESP_LEN || !self.hs.is_handshake_finished() {
            return Err(NoiseError::Setup(snow::Error::Input));
        }
        let (i2r, r2i) = self.hs.dangerously_get_raw_split();
        Ok((out, Keys { i2r, r2i }))
    }
}

/// Initiator: reads message 2; the responder's sender index and the keys.
pub(crate) fn read_resp(
    mut hs: Box<HandshakeState>,
    msg: &[u8],
) -> Result<(u32, Keys), NoiseError> {
    if msg.len() != RESP_LEN {
        return Err(NoiseError::Length(msg.len()));
    }
    let mut payload = [0u8; RESP_LEN];
    let n = hs
        .read_message(msg, &mut payload)
        .map_err(NoiseError::Rejected)?;
    let index: [u8; RESP_PAYLOAD_LEN] = payload
        .get(..n)
        .and_then(|p| p.try_into().ok())
        .ok_or(NoiseError::Length(msg.len()))?;
    if !hs.is_handshake_finished() {
        return Err(NoiseError::Setup(snow::Error::Input));
    }
    let (i2r, r2i) = hs.dangerously_get_raw_split();
    Ok((u32::from_be_bytes(index), Keys { i2r, r2i }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypha_proto::key::SecretKey;

    #[test]
    fn ik_completes_and_agrees() {
        let (a, b) = (
            SecretKey::from_bytes([1; 32]),
            SecretKey::from_bytes([2; 32]),
        );
        let p = prologue([4; 16], [5; 16]);
        let payload = InitPayload {
            sender_index: 7,
            timestamp: Timestamp::from_unix(core::time::Duration::from_secs(5)),
            cipher: 2,
        };
        let (hs, m1) = initiate(a.as_bytes(), &b.public_key(), &p, &payload).unwrap();
        let read = read_init(b.as_bytes(), &p, &m1).unwrap();
        assert_eq!(read.peer_key, a.public_key());
        assert_eq!(read.payload, payload);
        let (m2, kr) = read.respond(9).unwrap();
        let (index, ki) = read_resp(hs, &m2).unwrap();
        assert_eq!(index, 9);
        assert_eq!(ki.i2r, kr.i2r);
        assert_eq!(ki.r2i, kr.r2i);
        assert_ne!(ki.i2r, ki.r2i);
    }

    #[test]
    fn prologue_binds_addresses() {
        let (a, b) = (
            SecretKey::from_bytes([1; 32]),
            SecretKey::from_bytes([2; 32]),
        );
        let payload = InitPayload {
            sender_index: 7,
            timestamp: Timestamp::default(),
            cipher: 1,
        };
        let (_, m1) = initiate(
            a.as_bytes(),
            &b.public_key(),
            &prologue([4; 16], [5; 16]),
            &payload,
        )
        .unwrap();
        assert!(matches!(
            read_init(b.as_bytes(), &prologue([6; 16], [5; 16]), &m1),
            Err(NoiseError::Rejected(_))
        ));
        assert!(matches!(
            read_init(b.as_bytes(), &prologue([4; 16], [5; 16]), &m1[..100]),
            Err(NoiseError::Length(100))
        ));
    }

    #[test]
    fn timestamps_order() {
        let t = |s, n| Timestamp::from_unix(core::time::Duration::new(s, n));
        assert!(t(1, 999_999_999) < t(2, 0));
        assert!(t(1, 5) < t(1, 6));
        assert_eq!(t(1, 999_999_999).succ(), t(2, 0));
        assert_eq!(t(1, 5).succ(), t(1, 6));
        assert_eq!(&t(0, 0).0[..8], &(1u64 << 62).to_be_bytes());
    }
}
