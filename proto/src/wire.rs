//! Underlay wire formats: what goes into the one UDP datagram type every node exchanges.
//!
//! One UDP port carries everything, so the first byte of every datagram names its [`FrameType`]:
//! end-to-end data ([`data`], a 48-byte header) or one of four link-level control frames ([`control`],
//! a 20-byte envelope). The byte layouts are written down in `docs/protocol.md`.
//!
//! # Checking contract (as smoltcp's `wire`)
//! Each format has two layers:
//! - `Packet<T: AsRef<[u8]>>`, a zero-copy view over a byte buffer. `Packet::new_unchecked` checks
//!   nothing; `Packet::check_len` checks that the buffer is long enough and self-consistent;
//!   `Packet::new_checked` does both. After `check_len` has passed, no accessor can panic.
//!   `new_checked` is **required** for bytes from a socket, TUN or shared memory; `new_unchecked` is
//!   for emitting into a buffer the caller sized itself (it is wrong to "check" a reused buffer that
//!   still holds old bytes). Getters need `AsRef<[u8]>`, setters `AsMut<[u8]>`.
//! - `Repr`, the checked high-level value. `Repr::parse` never panics on a checked packet and returns
//!   a [`WireError`] for anything malformed; `Repr::emit` never panics on a buffer of at least
//!   `Repr::buffer_len()` bytes.
//!
//! All integers are big-endian. Fixed headers are `#[repr(C)]` zerocopy structs with network-endian
//! fields, read in place through [`zerocopy::Ref::from_prefix`].

pub mod control;
pub mod data;

use core::fmt;

/// Why a datagram was rejected. Callers count and drop; they don't log each one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The datagram is shorter than its fixed header (or than what its header says follows).
    #[error("datagram truncated: need {needed} bytes, got {len}")]
    Truncated {
        /// Bytes the format needs at least.
        needed: usize,
        /// Bytes present.
        len: usize,
    },
    /// The first byte is not a known frame type.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownFrameType(u8),
    /// A known frame type, but not one this parser handles (e.g. a control frame given to the data
    /// parser).
    #[error("unexpected frame type {0}")]
    UnexpectedFrameType(FrameType),
    /// The data header's kind byte is not a known [`data::Kind`].
    #[error("unknown data packet kind 0x{0:02x}")]
    UnknownKind(u8),
    /// The control envelope's version is not 1.
    #[error("unsupported control frame version {0}")]
    UnsupportedVersion(u8),
    /// The control envelope's body length differs from the bytes that follow the envelope.
    #[error("control frame body length {declared} but {actual} bytes follow the envelope")]
    BodyLengthMismatch {
        /// Body length written in the envelope.
        declared: u16,
        /// Bytes actually following the envelope.
        actual: usize,
    },
    /// An AEAD-protected payload or body is too short to hold its 16-byte tag (plus the inner type
    /// byte, where there is one).
    #[error("ciphertext of {len} bytes is shorter than the minimum {min}")]
    CiphertextTooShort {
        /// Bytes of ciphertext present.
        len: usize,
        /// The minimum (tag, plus inner type byte where the format has one).
        min: usize,
    },
}

/// Length of the AEAD tag (ChaCha20-Poly1305 and AES-GCM) that ends every encrypted payload or body.
pub const TAG_LEN: usize = 16;

/// The first byte of every underlay datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// End-to-end data packet ([`data`]).
    Data = 0x01,
    /// Link handshake message 1 (Noise XX `-> e`, initiator to responder).
    LinkInit = 0x02,
    /// Link handshake message 2 (`<- e, ee, s, es`, responder to initiator).
    LinkResp = 0x03,
    /// Link handshake message 3 (`-> s, se` [+ psk3], initiator to responder).
    LinkFinish = 0x04,
    /// AEAD-protected control frame between two neighbours (Babel, neighbour maintenance).
    LinkData = 0x05,
}

impl FrameType {
    /// Every frame type, in wire order.
    pub const ALL: [FrameType; 5] = [
        FrameType::Data,
        FrameType::LinkInit,
        FrameType::LinkResp,
        FrameType::LinkFinish,
        FrameType::LinkData,
    ];

    /// The frame type of a datagram: its first byte. Empty datagrams and unknown types are errors.
    pub fn of(datagram: &[u8]) -> Result<FrameType, WireError> {
        match datagram.first() {
            Some(&b) => FrameType::try_from(b),
            None => Err(WireError::Truncated { needed: 1, len: 0 }),
        }
    }

    /// The byte on the wire.
    pub const fn to_u8(self) -> u8 {
        self as u8
    }

    /// Whether this is one of the link-level control frames (everything but [`FrameType::Data`]).
    pub const fn is_control(self) -> bool {
        !matches!(self, FrameType::Data)
    }
}

impl TryFrom<u8> for FrameType {
    type Error = WireError;

    fn try_from(b: u8) -> Result<Self, WireError> {
        match b {
            0x01 => Ok(FrameType::Data),
            0x02 => Ok(FrameType::LinkInit),
            0x03 => Ok(FrameType::LinkResp),
            0x04 => Ok(FrameType::LinkFinish),
            0x05 => Ok(FrameType::LinkData),
            other => Err(WireError::UnknownFrameType(other)),
        }
    }
}

impl From<FrameType> for u8 {
    fn from(t: FrameType) -> u8 {
        t.to_u8()
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            FrameType::Data => "DATA",
            FrameType::LinkInit => "LINK_INIT",
            FrameType::LinkResp => "LINK_RESP",
            FrameType::LinkFinish => "LINK_FINISH",
            FrameType::LinkData => "LINK_DATA",
        };
        f.write_str(name)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn frame_type_of_every_byte() {
        for b in 0..=u8::MAX {
            let got = FrameType::of(&[b, 0xa5]);
            match b {
                0x01..=0x05 => {
                    let t = got.unwrap();
                    assert_eq!(t.to_u8(), b);
                    assert_eq!(t.is_control(), b != 0x01);
                }
                _ => assert_eq!(got, Err(WireError::UnknownFrameType(b))),
            }
        }
        assert_eq!(
            FrameType::of(&[]),
            Err(WireError::Truncated { needed: 1, len: 0 })
        );
    }

    #[test]
    fn frame_type_names() {
        let names: Vec<String> = FrameType::ALL.iter().map(|t| t.to_string()).collect();
        assert_eq!(
            names,
            ["DATA", "LINK_INIT", "LINK_RESP", "LINK_FINISH", "LINK_DATA"]
        );
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any bytes: the parsers return a value or an error, and what parses re-emits identically.
        #[test]
        fn data_parse_emit_roundtrip(bytes in proptest::collection::vec(any::<u8>(), 0..120), fix_type in any::<bool>()) {
            let mut bytes = bytes;
            if fix_type && bytes.len() > 2 {
                bytes[0] = 0x01;
                bytes[2] %= 3;
            }
            let Ok(packet) = data::Packet::new_checked(&bytes[..]) else { return Ok(()) };
            let repr = data::Repr::parse(&packet).unwrap();
            let mut out = vec![0xa5u8; bytes.len()];
            let mut view = data::Packet::new_unchecked(&mut out[..]);
            repr.emit(&mut view);
            view.payload_mut().copy_from_slice(packet.payload());
            let again = data::Packet::new_checked(&out[..]).unwrap();
            prop_assert_eq!(data::Repr::parse(&again).unwrap(), repr);
            // Everything but the ignored reserved byte survives.
            prop_assert_eq!(&out[..3], &bytes[..3]);
            prop_assert_eq!(&out[4..], &bytes[4..]);
        }

        #[test]
        fn control_parse_emit_roundtrip(bytes in proptest::collection::vec(any::<u8>(), 0..80), fix in any::<bool>()) {
            let mut bytes = bytes;
            if fix && bytes.len() >= 20 {
                bytes[0] = 0x02 + bytes[0] % 4;
                bytes[1] = 1;
                let body = u16::try_from(bytes.len() - 20).unwrap();
                bytes[2..4].copy_from_slice(&body.to_be_bytes());
            }
            let Ok(packet) = control::Packet::new_checked(&bytes[..]) else { return Ok(()) };
            let repr = control::Repr::parse(&packet).unwrap();
            prop_assert_eq!(repr.buffer_len(), bytes.len());
            let mut out = vec![0xa5u8; repr.buffer_len()];
            let mut view = control::Packet::new_unchecked(&mut out[..]);
            repr.emit(&mut view);
            view.body_mut().copy_from_slice(packet.body());
            prop_assert_eq!(&out, &bytes);
        }
    }
}
