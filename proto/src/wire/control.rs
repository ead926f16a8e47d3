//! The control-frame envelope (frame types 0x02..=0x05): link handshake messages and AEAD-protected
//! frames between two neighbours.
//!
//! Links use Noise XX (`Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s` with a network key): peers are
//! configured by `udp://host:port` without a key, so the responder's static key can't be known in
//! advance as IK needs. The envelope carries the two session indices that let each side find the
//! link in one lookup, and for LINK_DATA the AEAD counter. The 20 envelope bytes are the AEAD's
//! additional data, so nothing in them can be changed in transit.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | frame type (0x02..=0x05) |
//! | 1 | 1 | version = 1 |
//! | 2 | 2 | body length (exactly the bytes after the envelope) |
//! | 4 | 4 | sender index |
//! | 8 | 4 | receiver index |
//! | 12 | 8 | counter (LINK_DATA: AEAD nonce; others 0) |
//! | 20 | .. | body |

use zerocopy::byteorder::network_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Ref, Unaligned};

use super::{FrameType, WireError, TAG_LEN};

/// Length of the envelope.
pub const HEADER_LEN: usize = core::mem::size_of::<field::Header>();

/// The only envelope version.
pub const VERSION: u8 = 1;

/// The largest body an envelope can describe.
pub const MAX_BODY_LEN: usize = u16::MAX as usize;

/// The minimum LINK_DATA body: the inner channel byte ([`Channel`]) plus the AEAD tag.
pub const MIN_LINK_DATA_BODY: usize = 1 + TAG_LEN;

mod field {
    use super::*;

    /// The envelope as it lies on the wire.
    #[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
    #[repr(C)]
    pub(super) struct Header {
        pub(super) frame_type: u8,
        pub(super) version: u8,
        pub(super) body_len: U16,
        pub(super) sender_index: U32,
        pub(super) receiver_index: U32,
        pub(super) counter: U64,
    }

    const _: () = assert!(core::mem::size_of::<Header>() == 20);
}

/// The four control frame types (the [`FrameType`]s other than DATA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ControlType {
    /// Link handshake message 1 (`-> e`).
    LinkInit = 0x02,
    /// Link handshake message 2 (`<- e, ee, s, es`).
    LinkResp = 0x03,
    /// Link handshake message 3 (`-> s, se` [+ psk3]).
    LinkFinish = 0x04,
    /// An AEAD-protected frame between neighbours.
    LinkData = 0x05,
}

impl TryFrom<FrameType> for ControlType {
    type Error = WireError;

    fn try_from(t: FrameType) -> Result<Self, WireError> {
        match t {
            FrameType::Data => Err(WireError::UnexpectedFrameType(FrameType::Data)),
            FrameType::LinkInit => Ok(ControlType::LinkInit),
            FrameType::LinkResp => Ok(ControlType::LinkResp),
            FrameType::LinkFinish => Ok(ControlType::LinkFinish),
            FrameType::LinkData => Ok(ControlType::LinkData),
        }
    }
}

impl TryFrom<u8> for ControlType {
    type Error = WireError;

    fn try_from(b: u8) -> Result<Self, WireError> {
        ControlType::try_from(FrameType::try_from(b)?)
    }
}

impl From<ControlType> for FrameType {
    fn from(t: ControlType) -> FrameType {
        match t {
            ControlType::LinkInit => FrameType::LinkInit,
            ControlType::LinkResp => FrameType::LinkResp,
            ControlType::LinkFinish => FrameType::LinkFinish,
            ControlType::LinkData => FrameType::LinkData,
        }
    }
}

/// The first byte of a decrypted LINK_DATA body: which channel the rest belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Channel {
    /// A complete RFC 8966 Babel packet (header and body).
    Babel = 0x01,
    /// A keepalive; nothing follows.
    Keepalive = 0x02,
}

impl TryFrom<u8> for Channel {
    type Error = u8;

    /// The unknown byte is the error; the caller counts and drops the frame.
    fn try_from(b: u8) -> Result<Self, u8> {
        match b {
            0x01 => Ok(Channel::Babel),
            0x02 => Ok(Channel::Keepalive),
            other => Err(other),
        }
    }
}

/// A zero-copy view of a control frame (envelope and body). See the [module contract](super).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it. Accessors panic if it is shorter than [`HEADER_LEN`];
    /// use this only for emitting into a buffer you sized.
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wraps and checks a buffer: at least [`HEADER_LEN`] bytes, a control frame type, version 1,
    /// a body length equal to the bytes that follow, and a LINK_DATA body long enough for its channel
    /// byte and tag.
    pub fn new_checked(buffer: T) -> Result<Packet<T>, WireError> {
        let packet = Packet::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks what [`Packet::new_checked`] checks. After it passes, no accessor panics.
    pub fn check_len(&self) -> Result<(), WireError> {
        let buf = self.buffer.as_ref();
        let Ok((header, body)) = Ref::<_, field::Header>::from_prefix(buf) else {
            return Err(WireError::Truncated {
                needed: HEADER_LEN,
                len: buf.len(),
            });
        };
        let control_type = ControlType::try_from(header.frame_type)?;
        if header.version != VERSION {
            return Err(WireError::UnsupportedVersion(header.version));
        }
        let declared = header.body_len.get();
        if usize::from(declared) != body.len() {
            return Err(WireError::BodyLengthMismatch {
                declared,
                actual: body.len(),
            });
        }
        if control_type == ControlType::LinkData && body.len() < MIN_LINK_DATA_BODY {
            return Err(WireError::CiphertextTooShort {
                len: body.len(),
                min: MIN_LINK_DATA_BODY,
            });
        }
        Ok(())
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn header(&self) -> &field::Header {
        match Ref::<_, field::Header>::from_prefix(self.buffer.as_ref()) {
            Ok((header, _)) => Ref::into_ref(header),
            // Only reachable through `new_unchecked` on a short buffer, which its contract forbids.
            Err(_) => panic!("control frame buffer shorter than {HEADER_LEN} bytes"),
        }
    }

    /// The frame type; an error only on an unchecked packet.
    pub fn frame_type(&self) -> Result<ControlType, WireError> {
        ControlType::try_from(self.header().frame_type)
    }

    /// The version byte (1 on a checked packet).
    pub fn version(&self) -> u8 {
        self.header().version
    }

    /// The body length written in the envelope.
    pub fn body_len(&self) -> u16 {
        self.header().body_len.get()
    }

    /// The sender index (LINK_INIT, LINK_RESP: the index the sender chose; otherwise 0).
    pub fn sender_index(&self) -> u32 {
        self.header().sender_index.get()
    }

    /// The receiver index (LINK_RESP: the initiator's sender index; LINK_FINISH: the responder's;
    /// LINK_DATA: the receiver's; LINK_INIT: 0).
    pub fn receiver_index(&self) -> u32 {
        self.header().receiver_index.get()
    }

    /// The counter (LINK_DATA: the AEAD nonce; otherwise 0).
    pub fn counter(&self) -> u64 {
        self.header().counter.get()
    }

    /// The 20 envelope bytes: the AEAD additional data of a LINK_DATA frame.
    pub fn aad(&self) -> &[u8] {
        self.header().as_bytes()
    }

    /// The body: every byte after the envelope (on a checked packet, exactly `body_len` bytes).
    pub fn body(&self) -> &[u8] {
        match Ref::<_, field::Header>::from_prefix(self.buffer.as_ref()) {
            Ok((_, body)) => body,
            Err(_) => &[],
        }
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn header_mut(&mut self) -> &mut field::Header {
        match Ref::<_, field::Header>::from_prefix(self.buffer.as_mut()) {
            Ok((header, _)) => Ref::into_mut(header),
            // Only reachable through `new_unchecked` on a short buffer, which its contract forbids.
            Err(_) => panic!("control frame buffer shorter than {HEADER_LEN} bytes"),
        }
    }

    /// Sets the frame type.
    pub fn set_frame_type(&mut self, t: ControlType) {
        self.header_mut().frame_type = t as u8;
    }

    /// Sets the version byte.
    pub fn set_version(&mut self, version: u8) {
        self.header_mut().version = version;
    }

    /// Sets the body length.
    pub fn set_body_len(&mut self, len: u16) {
        self.header_mut().body_len.set(len);
    }

    /// Sets the sender index.
    pub fn set_sender_index(&mut self, index: u32) {
        self.header_mut().sender_index.set(index);
    }

    /// Sets the receiver index.
    pub fn set_receiver_index(&mut self, index: u32) {
        self.header_mut().receiver_index.set(index);
    }

    /// Sets the counter.
    pub fn set_counter(&mut self, counter: u64) {
        self.header_mut().counter.set(counter);
    }

    /// The body, mutably: every byte after the envelope.
    pub fn body_mut(&mut self) -> &mut [u8] {
        match Ref::<_, field::Header>::from_prefix(self.buffer.as_mut()) {
            Ok((_, body)) => body,
            Err(_) => &mut [],
        }
    }

    /// The envelope bytes (AAD) and the body, mutably, at the same time: for sealing or opening a
    /// LINK_DATA body in place.
    pub fn aad_and_body_mut(&mut self) -> (&[u8], &mut [u8]) {
        match Ref::<_, field::Header>::from_prefix(self.buffer.as_mut()) {
            Ok((header, body)) => (Ref::into_ref(header).as_bytes(), body),
            Err(_) => (&[], &mut []),
        }
    }
}

/// A parsed envelope. The body stays in the packet ([`Packet::body`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Repr {
    /// Which control frame.
    pub frame_type: ControlType,
    /// Sender index.
    pub sender_index: u32,
    /// Receiver index.
    pub receiver_index: u32,
    /// Counter (LINK_DATA: AEAD nonce).
    pub counter: u64,
    /// Body length in bytes.
    pub body_len: u16,
}

impl Repr {
    /// Parses a checked packet's envelope.
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Repr, WireError> {
        packet.check_len()?;
        Ok(Repr {
            frame_type: packet.frame_type()?,
            sender_index: packet.sender_index(),
            receiver_index: packet.receiver_index(),
            counter: packet.counter(),
            body_len: packet.body_len(),
        })
    }

    /// Bytes the whole frame takes: envelope plus body.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN + self.body_len as usize
    }

    /// Writes the envelope (version 1 and every field) into `packet`, which must be at least
    /// [`HEADER_LEN`] bytes long; send exactly [`Repr::buffer_len`] bytes. The body is left alone:
    /// write it through [`Packet::body_mut`].
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        packet.set_frame_type(self.frame_type);
        packet.set_version(VERSION);
        packet.set_body_len(self.body_len);
        packet.set_sender_index(self.sender_index);
        packet.set_receiver_index(self.receiver_index);
        packet.set_counter(self.counter);
    }
}

#[cfg(test)]
mod test {
    use super::*;

    /// A LINK_RESP: sender index 0xaabbccdd, receiver index 0x01020304, 3-byte body.
    static LINK_RESP: [u8; 23] = [
        0x03, 0x01, 0x00, 0x03, // type, version, body length
        0xaa, 0xbb, 0xcc, 0xdd, // sender index
        0x01, 0x02, 0x03, 0x04, // receiver index
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // counter
        0xe1, 0xe2, 0xe3, // body
    ];

    /// A LINK_DATA: receiver index 7, counter 0x0102030405060708, 17-byte body.
    static LINK_DATA: [u8; 37] = [
        0x05, 0x01, 0x00, 0x11, // type, version, body length
        0x00, 0x00, 0x00, 0x00, // sender index
        0x00, 0x00, 0x00, 0x07, // receiver index
        0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // counter
        0xb0, 0xb1, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, // body
        0xb9, 0xba, 0xbb, 0xbc, 0xbd, 0xbe, 0xbf, 0xc0,
    ];

    fn resp_repr() -> Repr {
        Repr {
            frame_type: ControlType::LinkResp,
            sender_index: 0xaabb_ccdd,
            receiver_index: 0x0102_0304,
            counter: 0,
            body_len: 3,
        }
    }

    fn data_repr() -> Repr {
        Repr {
            frame_type: ControlType::LinkData,
            sender_index: 0,
            receiver_index: 7,
            counter: 0x0102_0304_0506_0708,
            body_len: 17,
        }
    }

    #[test]
    fn deconstruct() {
        let packet = Packet::new_checked(&LINK_RESP[..]).unwrap();
        assert_eq!(packet.frame_type(), Ok(ControlType::LinkResp));
        assert_eq!(packet.version(), 1);
        assert_eq!(packet.body_len(), 3);
        assert_eq!(packet.sender_index(), 0xaabb_ccdd);
        assert_eq!(packet.receiver_index(), 0x0102_0304);
        assert_eq!(packet.counter(), 0);
        assert_eq!(packet.body(), &[0xe1, 0xe2, 0xe3]);
        assert_eq!(packet.aad(), &LINK_RESP[..20]);
        assert_eq!(Repr::parse(&packet), Ok(resp_repr()));

        let packet = Packet::new_checked(&LINK_DATA[..]).unwrap();
        assert_eq!(Repr::parse(&packet), Ok(data_repr()));
        assert_eq!(packet.body(), &LINK_DATA[20..]);
    }

    #[test]
    fn construct() {
        for (repr, expected) in [(resp_repr(), &LINK_RESP[..]), (data_repr(), &LINK_DATA[..])] {
            let mut bytes = [0xa5u8; 40];
            let len = repr.buffer_len();
            assert_eq!(len, expected.len());
            let mut packet = Packet::new_unchecked(&mut bytes[..len]);
            repr.emit(&mut packet);
            packet.body_mut().copy_from_slice(&expected[20..]);
            assert_eq!(&bytes[..len], expected);
            assert!(bytes[len..].iter().all(|&b| b == 0xa5));
        }
    }

    #[test]
    fn aad_and_body_mut() {
        let mut bytes = LINK_DATA;
        let mut packet = Packet::new_checked(&mut bytes[..]).unwrap();
        let (aad, body) = packet.aad_and_body_mut();
        assert_eq!(aad, &LINK_DATA[..20]);
        body.fill(0);
        assert_eq!(bytes[..20], LINK_DATA[..20]);
        assert!(bytes[20..].iter().all(|&b| b == 0));
    }

    #[test]
    fn handshake_types() {
        for (byte, t) in [
            (0x02, ControlType::LinkInit),
            (0x03, ControlType::LinkResp),
            (0x04, ControlType::LinkFinish),
        ] {
            let mut bytes = LINK_RESP;
            bytes[0] = byte;
            let packet = Packet::new_checked(&bytes[..]).unwrap();
            assert_eq!(Repr::parse(&packet).unwrap().frame_type, t);
            assert_eq!(FrameType::from(t).to_u8(), byte);
        }
    }

    #[test]
    fn truncated() {
        for len in 0..20 {
            assert_eq!(
                Packet::new_checked(&LINK_RESP[..len]),
                Err(WireError::Truncated { needed: 20, len })
            );
        }
        for len in 20..23 {
            assert_eq!(
                Packet::new_checked(&LINK_RESP[..len]),
                Err(WireError::BodyLengthMismatch {
                    declared: 3,
                    actual: len - 20
                })
            );
        }
    }

    #[test]
    fn trailing_bytes() {
        let mut bytes = [0u8; 24];
        bytes[..23].copy_from_slice(&LINK_RESP);
        assert_eq!(
            Packet::new_checked(&bytes[..]),
            Err(WireError::BodyLengthMismatch {
                declared: 3,
                actual: 4
            })
        );
    }

    #[test]
    fn link_data_needs_channel_and_tag() {
        let mut bytes = LINK_DATA;
        bytes[3] = 16;
        assert_eq!(
            Packet::new_checked(&bytes[..36]),
            Err(WireError::CiphertextTooShort { len: 16, min: 17 })
        );
        // Handshake bodies may be empty here; the Noise layer judges them.
        let mut empty = [0u8; 20];
        empty.copy_from_slice(&LINK_RESP[..20]);
        empty[3] = 0;
        assert!(Packet::new_checked(&empty[..]).is_ok());
    }

    #[test]
    fn wrong_type_and_version() {
        let mut bytes = LINK_RESP;
        bytes[0] = 0x01;
        assert_eq!(
            Packet::new_checked(&bytes[..]),
            Err(WireError::UnexpectedFrameType(FrameType::Data))
        );
        bytes[0] = 0x06;
        assert_eq!(
            Packet::new_checked(&bytes[..]),
            Err(WireError::UnknownFrameType(6))
        );
        let mut bytes = LINK_RESP;
        for version in [0u8, 2, 0xff] {
            bytes[1] = version;
            assert_eq!(
                Packet::new_checked(&bytes[..]),
                Err(WireError::UnsupportedVersion(version))
            );
        }
    }

    #[test]
    fn channel() {
        assert_eq!(Channel::try_from(1), Ok(Channel::Babel));
        assert_eq!(Channel::try_from(2), Ok(Channel::Keepalive));
        assert_eq!(Channel::try_from(0), Err(0));
    }
}
