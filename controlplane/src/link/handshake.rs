//! The link handshake: Noise XX (`Noise_XX_25519_ChaChaPoly_BLAKE2s`), or XXpsk3 with a network key.
//!
//! ```text
//! LINK_INIT    -> e                  (32 bytes; 48 with psk3, where `e` is mixed into the key and the
//!                                     empty payload carries a tag)
//! LINK_RESP    <- e, ee, s, es       (96 bytes)
//! LINK_FINISH  -> s, se [, psk]      (64 bytes)
//! ```
//!
//! XX rather than IK because configured peers are addresses without a key: XX transmits both static
//! keys (encrypted) and authenticates them, so each side learns who the other is. The network key
//! enters at psk3, i.e. at the end of message 3: a node without the key completes nothing, and a
//! responder only accepts a peer that proved knowledge of it. (If only one side has a key, message 1
//! already has the wrong length for the responder, and the protocol names differ anyway.)
//!
//! This module only wraps `snow`; which message goes where, retries and state limits live in
//! [`super::LinkLayer`].

use snow::{Builder, HandshakeState};

/// Protocol name without a network key.
pub(crate) const PATTERN: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
/// Protocol name with a network key (Noise §9.2, psk at the end of message 3).
pub(crate) const PATTERN_PSK: &str = "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s";

/// Message 1 without psk: `e`.
pub(crate) const MSG1_LEN: usize = 32;
/// Message 1 with psk3: `e` and the empty payload's tag.
pub(crate) const MSG1_PSK_LEN: usize = 48;
/// Message 2: `e` (32), encrypted `s` (48), empty payload's tag (16).
pub(crate) const MSG2_LEN: usize = 96;
/// Message 3: encrypted `s` (48), empty payload's tag (16).
pub(crate) const MSG3_LEN: usize = 64;

/// Why a handshake step failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NoiseError {
    /// `snow` could not set up a handshake (a local problem, e.g. the RNG).
    #[error("noise setup failed: {0}")]
    Setup(snow::Error),
    /// A received message did not decrypt or authenticate (wrong network key, corruption, forgery).
    #[error("noise message rejected: {0}")]
    Rejected(snow::Error),
    /// The handshake finished without a 32-byte remote static key.
    #[error("no remote static key")]
    NoPeerKey,
}

/// The keys from Split() and the authenticated peer.
pub(crate) struct Finished {
    /// Protects initiator → responder.
    pub(crate) k_i2r: [u8; 32],
    /// Protects responder → initiator.
    pub(crate) k_r2i: [u8; 32],
    /// The peer's static X25519 public key.
    pub(crate) peer_key: [u8; 32],
}

/// Our side's long-term handshake inputs.
pub(crate) struct Noise {
    secret: [u8; 32],
    psk: Option<[u8; 32]>,
}

impl Noise {
    pub(crate) fn new(secret: [u8; 32], psk: Option<[u8; 32]>) -> Self {
        Noise { secret, psk }
    }

    /// Exact length of a valid message 1 under our configuration.
    pub(crate) fn msg1_len(&self) -> usize {
        if self.psk.is_some() {
            MSG1_PSK_LEN
        } else {
            MSG1_LEN
        }
    }

    fn build(&self, initiator: bool) -> Result<HandshakeState, NoiseError> {
        let pattern = if self.psk.is_some() {
            PATTERN_PSK
        } else {
            PATTERN
        };
        let params = pattern.parse().map_err(NoiseError::Setup)?;
        let mut builder = Builder::new(params)
            .local_private_key(&self.secret)
            .map_err(NoiseError::Setup)?;
        if let Some(psk) = &self.psk {
            builder = builder.psk(3, psk).map_err(NoiseError::Setup)?;
        }
        if initiator {
            builder.build_initiator()
        } else {
            builder.build_responder()
        }
        .map_err(NoiseError::Setup)
    }

    /// Starts a handshake as initiator: the state and message 1 (`msg1_len()` bytes of `out`).
    pub(crate) fn initiate(
        &self,
        out: &mut [u8; MSG1_PSK_LEN],
    ) -> Result<Box<HandshakeState>, NoiseError> {
        let mut hs = Box::new(self.build(true)?);
        let n = hs.write_message(&[], out).map_err(NoiseError::Setup)?;
        if n != self.msg1_len() {
            return Err(NoiseError::Setup(snow::Error::Input));
        }
        Ok(hs)
    }

    /// Answers message 1 as responder: the state and message 2.
    pub(crate) fn respond(
        &self,
        msg1: &[u8],
        out: &mut [u8; MSG2_LEN],
    ) -> Result<Box<HandshakeState>, NoiseError> {
        let mut hs = Box::new(self.build(false)?);
        let mut payload = [0u8; MSG1_PSK_LEN];
        hs.read_message(msg1, &mut payload)
            .map_err(NoiseError::Rejected)?;
        let n = hs.write_message(&[], out).map_err(NoiseError::Setup)?;
        if n != MSG2_LEN {
            return Err(NoiseError::Setup(snow::Error::Input));
        }
        Ok(hs)
    }
}

fn split(mut hs: Box<HandshakeState>) -> Result<Finished, NoiseError> {
    let peer_key: [u8; 32] = hs
        .get_remote_static()
        .and_then(|k| k.try_into().ok())
        .ok_or(NoiseError::NoPeerKey)?;
    if !hs.is_handshake_finished() {
        return Err(NoiseError::Setup(snow::Error::Input));
    }
    let (k_i2r, k_r2i) = hs.dangerously_get_raw_split();
    Ok(Finished {
        k_i2r,
        k_r2i,
        peer_key,
    })
}

/// Initiator: reads message 2, writes message 3 into `out`, finishes.
pub(crate) fn initiator_finish(
    mut hs: Box<HandshakeState>,
    msg2: &[u8],
    out: &mut [u8; MSG3_LEN],
) -> Result<Finished, NoiseError> {
    let mut payload = [0u8; MSG2_LEN];
    hs.read_message(msg2, &mut payload)
        .map_err(NoiseError::Rejected)?;
    let n = hs.write_message(&[], out).map_err(NoiseError::Setup)?;
    if n != MSG3_LEN {
        return Err(NoiseError::Setup(snow::Error::Input));
    }
    split(hs)
}

/// Responder: reads message 3, finishes.
pub(crate) fn responder_finish(
    mut hs: Box<HandshakeState>,
    msg3: &[u8],
) -> Result<Finished, NoiseError> {
    let mut payload = [0u8; MSG3_LEN];
    hs.read_message(msg3, &mut payload)
        .map_err(NoiseError::Rejected)?;
    split(hs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(a: Noise, b: Noise) -> Result<(Finished, Finished), NoiseError> {
        let mut m1 = [0u8; MSG1_PSK_LEN];
        let hi = a.initiate(&mut m1)?;
        let mut m2 = [0u8; MSG2_LEN];
        let hr = b.respond(&m1[..a.msg1_len()], &mut m2)?;
        let mut m3 = [0u8; MSG3_LEN];
        let fi = initiator_finish(hi, &m2, &mut m3)?;
        let fr = responder_finish(hr, &m3)?;
        Ok((fi, fr))
    }

    #[test]
    fn state_size() {
        // The fixed part of a half-open responder entry (boxed; plus small boxed primitives).
        let size = core::mem::size_of::<HandshakeState>();
        assert!(
            size < 2048,
            "HandshakeState is {size} bytes; update docs/link.md's DoS bounds"
        );
    }

    #[test]
    fn xx_completes_and_agrees() {
        let (fi, fr) = run(Noise::new([1; 32], None), Noise::new([2; 32], None)).expect("ok");
        assert_eq!(fi.k_i2r, fr.k_i2r);
        assert_eq!(fi.k_r2i, fr.k_r2i);
        assert_ne!(fi.k_i2r, fi.k_r2i);
        assert_ne!(fi.peer_key, fr.peer_key);
    }

    #[test]
    fn psk_mismatch_fails() {
        let r = run(
            Noise::new([1; 32], Some([7; 32])),
            Noise::new([2; 32], Some([8; 32])),
        );
        assert!(matches!(r, Err(NoiseError::Rejected(_))));
        // One side without a key: different protocol names.
        let r = run(
            Noise::new([1; 32], Some([7; 32])),
            Noise::new([2; 32], None),
        );
        assert!(r.is_err());
        let (fi, fr) = run(
            Noise::new([1; 32], Some([7; 32])),
            Noise::new([2; 32], Some([7; 32])),
        )
        .expect("same key");
        assert_eq!(fi.k_i2r, fr.k_i2r);
    }
}
