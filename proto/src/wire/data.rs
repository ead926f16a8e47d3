//! The end-to-end data packet (frame type 0x01): a 48-byte clear header, then the payload.
//!
//! Transit nodes route on the destination and the hop limit only, so both sit at fixed offsets and
//! forwarding needs no keys (this is what lets XDP forward in the kernel). Everything but the hop
//! limit is authenticated end to end: for [`Kind::Transport`] the AEAD's additional data is the
//! header with the hop-limit byte zeroed ([`Packet::aad`]), as IPsec leaves mutable fields out of its
//! ICV (RFC 4302 §3.3.3.1).
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | frame type = 0x01 |
//! | 1 | 1 | hop limit (not authenticated) |
//! | 2 | 1 | kind ([`Kind`]) |
//! | 3 | 1 | reserved: 0 on send, ignored on receive |
//! | 4 | 4 | receiver session index |
//! | 8 | 8 | counter (AEAD nonce for TRANSPORT, 0 otherwise) |
//! | 16 | 16 | source overlay address |
//! | 32 | 16 | destination overlay address |
//! | 48 | .. | payload |

use core::net::Ipv6Addr;

use zerocopy::byteorder::network_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Ref, Unaligned};

use super::{FrameType, WireError, TAG_LEN};

/// Length of the data header.
pub const HEADER_LEN: usize = core::mem::size_of::<field::Header>();

/// The minimum TRANSPORT payload: the inner type byte ([`PayloadType`]) plus the AEAD tag.
pub const MIN_TRANSPORT_PAYLOAD: usize = 1 + TAG_LEN;

mod field {
    use super::*;

    /// The header as it lies on the wire.
    #[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
    #[repr(C)]
    pub(super) struct Header {
        pub(super) frame_type: u8,
        pub(super) hop_limit: u8,
        pub(super) kind: u8,
        pub(super) reserved: u8,
        pub(super) receiver_index: U32,
        pub(super) counter: U64,
        pub(super) src: [u8; 16],
        pub(super) dst: [u8; 16],
    }

    const _: () = assert!(core::mem::size_of::<Header>() == 48);

    /// Offset of the hop-limit byte (zeroed in the AAD).
    pub(super) const HOP_LIMIT: usize = 1;
}

/// What a data packet's payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// AEAD ciphertext plus 16-byte tag under an established E2E session.
    Transport = 0x00,
    /// An E2E Noise IK handshake message 1.
    HandshakeInit = 0x01,
    /// An E2E Noise IK handshake message 2.
    HandshakeResp = 0x02,
}

impl TryFrom<u8> for Kind {
    type Error = WireError;

    fn try_from(b: u8) -> Result<Self, WireError> {
        match b {
            0x00 => Ok(Kind::Transport),
            0x01 => Ok(Kind::HandshakeInit),
            0x02 => Ok(Kind::HandshakeResp),
            other => Err(WireError::UnknownKind(other)),
        }
    }
}

/// The first byte of a decrypted TRANSPORT payload: what the plaintext carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PayloadType {
    /// An IPv6 packet for the TUN device.
    Ipv6 = 0x00,
    /// A message-bus frame.
    Message = 0x01,
}

impl TryFrom<u8> for PayloadType {
    type Error = u8;

    /// The unknown byte is the error; the caller counts and drops the packet.
    fn try_from(b: u8) -> Result<Self, u8> {
        match b {
            0x00 => Ok(PayloadType::Ipv6),
            0x01 => Ok(PayloadType::Message),
            other => Err(other),
        }
    }
}

/// A zero-copy view of a data packet (header and payload). See the [module contract](super).
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

    /// Wraps and checks a buffer: at least [`HEADER_LEN`] bytes, frame type DATA, a known kind, and a
    /// TRANSPORT payload long enough for its type byte and tag.
    pub fn new_checked(buffer: T) -> Result<Packet<T>, WireError> {
        let packet = Packet::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks what [`Packet::new_checked`] checks. After it passes, no accessor panics.
    pub fn check_len(&self) -> Result<(), WireError> {
        let buf = self.buffer.as_ref();
        let Ok((header, payload)) = Ref::<_, field::Header>::from_prefix(buf) else {
            return Err(WireError::Truncated {
                needed: HEADER_LEN,
                len: buf.len(),
            });
        };
        match FrameType::try_from(header.frame_type)? {
            FrameType::Data => {}
            other => return Err(WireError::UnexpectedFrameType(other)),
        }
        if Kind::try_from(header.kind)? == Kind::Transport && payload.len() < MIN_TRANSPORT_PAYLOAD
        {
            return Err(WireError::CiphertextTooShort {
                len: payload.len(),
                min: MIN_TRANSPORT_PAYLOAD,
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
            Err(_) => panic!("data packet buffer shorter than {HEADER_LEN} bytes"),
        }
    }

    /// The frame-type byte (0x01 on a checked packet).
    pub fn frame_type(&self) -> u8 {
        self.header().frame_type
    }

    /// The hop limit.
    pub fn hop_limit(&self) -> u8 {
        self.header().hop_limit
    }

    /// The payload kind; an error only on an unchecked packet with an unknown kind byte.
    pub fn kind(&self) -> Result<Kind, WireError> {
        Kind::try_from(self.header().kind)
    }

    /// The reserved byte (ignored on receive).
    pub fn reserved(&self) -> u8 {
        self.header().reserved
    }

    /// The receiver's session index (0 in a handshake init).
    pub fn receiver_index(&self) -> u32 {
        self.header().receiver_index.get()
    }

    /// The counter: the AEAD nonce of a TRANSPORT packet, 0 otherwise.
    pub fn counter(&self) -> u64 {
        self.header().counter.get()
    }

    /// The source overlay address.
    pub fn src_addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.header().src)
    }

    /// The destination overlay address.
    pub fn dst_addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.header().dst)
    }

    /// The header bytes.
    pub fn header_bytes(&self) -> &[u8] {
        self.header().as_bytes()
    }

    /// The payload: everything after the header.
    pub fn payload(&self) -> &[u8] {
        match Ref::<_, field::Header>::from_prefix(self.buffer.as_ref()) {
            Ok((_, payload)) => payload,
            Err(_) => &[],
        }
    }

    /// Writes the AEAD additional data for a TRANSPORT packet into `out`: the header with the hop
    /// limit zeroed. Takes a caller buffer so the hot path doesn't allocate.
    pub fn aad(&self, out: &mut [u8; HEADER_LEN]) {
        out.copy_from_slice(self.header().as_bytes());
        out[field::HOP_LIMIT] = 0;
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn header_mut(&mut self) -> &mut field::Header {
        match Ref::<_, field::Header>::from_prefix(self.buffer.as_mut()) {
            Ok((header, _)) => Ref::into_mut(header),
            // Only reachable through `new_unchecked` on a short buffer, which its contract forbids.
            Err(_) => panic!("data packet buffer shorter than {HEADER_LEN} bytes"),
        }
    }

    /// Sets the frame-type byte.
    pub fn set_frame_type(&mut self, t: FrameType) {
        self.header_mut().frame_type = t.to_u8();
    }

    /// Sets the hop limit.
    pub fn set_hop_limit(&mut self, hop_limit: u8) {
        self.header_mut().hop_limit = hop_limit;
    }

    /// Decrements the hop limit in place, as a transit node does before forwarding, and returns the
    /// new value. Returns `None` and leaves the packet unchanged if the hop limit is already 0. A
    /// transit node forwards only when this returns `Some(n)` with `n > 0` (RFC 8200 §3: a packet
    /// whose hop limit reaches zero is discarded).
    pub fn decrement_hop_limit(&mut self) -> Option<u8> {
        let header = self.header_mut();
        let new = header.hop_limit.checked_sub(1)?;
        header.hop_limit = new;
        Some(new)
    }

    /// Sets the kind.
    pub fn set_kind(&mut self, kind: Kind) {
        self.header_mut().kind = kind as u8;
    }

    /// Sets the reserved byte (0 when sending).
    pub fn set_reserved(&mut self, reserved: u8) {
        self.header_mut().reserved = reserved;
    }

    /// Sets the receiver session index.
    pub fn set_receiver_index(&mut self, index: u32) {
        self.header_mut().receiver_index.set(index);
    }

    /// Sets the counter.
    pub fn set_counter(&mut self, counter: u64) {
        self.header_mut().counter.set(counter);
    }

    /// Sets the source overlay address.
    pub fn set_src_addr(&mut self, addr: Ipv6Addr) {
        self.header_mut().src = addr.octets();
    }

    /// Sets the destination overlay address.
    pub fn set_dst_addr(&mut self, addr: Ipv6Addr) {
        self.header_mut().dst = addr.octets();
    }

    /// The payload, mutably (for in-place encryption and decryption).
    pub fn payload_mut(&mut self) -> &mut [u8] {
        match Ref::<_, field::Header>::from_prefix(self.buffer.as_mut()) {
            Ok((_, payload)) => payload,
            Err(_) => &mut [],
        }
    }
}

/// A parsed data header. The payload stays in the packet ([`Packet::payload`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Repr {
    /// Hop limit.
    pub hop_limit: u8,
    /// What the payload is.
    pub kind: Kind,
    /// Receiver session index (0 for a handshake init).
    pub receiver_index: u32,
    /// AEAD nonce for TRANSPORT, 0 otherwise.
    pub counter: u64,
    /// Source overlay address.
    pub src: Ipv6Addr,
    /// Destination overlay address.
    pub dst: Ipv6Addr,
}

impl Repr {
    /// Parses a checked packet's header. The reserved byte is ignored.
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Repr, WireError> {
        packet.check_len()?;
        Ok(Repr {
            hop_limit: packet.hop_limit(),
            kind: packet.kind()?,
            receiver_index: packet.receiver_index(),
            counter: packet.counter(),
            src: packet.src_addr(),
            dst: packet.dst_addr(),
        })
    }

    /// Bytes the header needs ([`HEADER_LEN`]); the payload comes on top.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes the header (frame type, reserved byte 0, every field) into `packet`, which must be at
    /// least [`Repr::buffer_len`] bytes long. The payload is left alone: write it through
    /// [`Packet::payload_mut`].
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        packet.set_frame_type(FrameType::Data);
        packet.set_hop_limit(self.hop_limit);
        packet.set_kind(self.kind);
        packet.set_reserved(0);
        packet.set_receiver_index(self.receiver_index);
        packet.set_counter(self.counter);
        packet.set_src_addr(self.src);
        packet.set_dst_addr(self.dst);
    }
}

#[cfg(test)]
mod test {
    use super::*;

    /// A TRANSPORT packet: hop limit 64, index 0x01020304, counter 0x1112131415161718,
    /// 548:c783:d7ce:74a3:9ba1:a0cb:ae21:338d -> 4ff::1, 17-byte payload.
    static PACKET: [u8; 65] = [
        0x01, 0x40, 0x00, 0x00, // type, hop limit, kind, reserved
        0x01, 0x02, 0x03, 0x04, // receiver index
        0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, // counter
        0x05, 0x48, 0xc7, 0x83, 0xd7, 0xce, 0x74, 0xa3, // src
        0x9b, 0xa1, 0xa0, 0xcb, 0xae, 0x21, 0x33, 0x8d, //
        0x04, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // dst
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, //
        0x00, 0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, // payload
        0xc7, 0xc8, 0xc9, 0xca, 0xcb, 0xcc, 0xcd, 0xce, //
        0xcf,
    ];

    fn repr() -> Repr {
        Repr {
            hop_limit: 64,
            kind: Kind::Transport,
            receiver_index: 0x0102_0304,
            counter: 0x1112_1314_1516_1718,
            src: "548:c783:d7ce:74a3:9ba1:a0cb:ae21:338d".parse().unwrap(),
            dst: "4ff::1".parse().unwrap(),
        }
    }

    #[test]
    fn deconstruct() {
        let packet = Packet::new_checked(&PACKET[..]).unwrap();
        assert_eq!(packet.frame_type(), 0x01);
        assert_eq!(packet.hop_limit(), 64);
        assert_eq!(packet.kind(), Ok(Kind::Transport));
        assert_eq!(packet.reserved(), 0);
        assert_eq!(packet.receiver_index(), 0x0102_0304);
        assert_eq!(packet.counter(), 0x1112_1314_1516_1718);
        assert_eq!(packet.src_addr(), repr().src);
        assert_eq!(packet.dst_addr(), repr().dst);
        assert_eq!(packet.header_bytes(), &PACKET[..48]);
        assert_eq!(packet.payload(), &PACKET[48..]);
        assert_eq!(
            PayloadType::try_from(packet.payload()[0]),
            Ok(PayloadType::Ipv6)
        );
        assert_eq!(Repr::parse(&packet), Ok(repr()));
    }

    #[test]
    fn construct() {
        let mut bytes = [0xa5u8; 65];
        let mut packet = Packet::new_unchecked(&mut bytes[..]);
        let repr = repr();
        assert_eq!(repr.buffer_len(), 48);
        repr.emit(&mut packet);
        packet.payload_mut().copy_from_slice(&PACKET[48..]);
        assert_eq!(bytes, PACKET);
    }

    #[test]
    fn reserved_ignored_on_receive_zeroed_on_send() {
        let mut bytes = PACKET;
        bytes[3] = 0x7f;
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(packet.reserved(), 0x7f);
        let parsed = Repr::parse(&packet).unwrap();
        assert_eq!(parsed, repr());
        let mut out = [0xa5u8; 48];
        parsed.emit(&mut Packet::new_unchecked(&mut out[..]));
        assert_eq!(out[3], 0);
        assert_eq!(out[..], PACKET[..48]);
    }

    #[test]
    fn aad_zeroes_hop_limit_only() {
        let packet = Packet::new_checked(&PACKET[..]).unwrap();
        let mut aad = [0xa5u8; HEADER_LEN];
        packet.aad(&mut aad);
        let mut expected = [0u8; 48];
        expected.copy_from_slice(&PACKET[..48]);
        expected[1] = 0;
        assert_eq!(aad, expected);
        // The AAD doesn't change when a transit node decrements the hop limit.
        let mut bytes = PACKET;
        let mut packet = Packet::new_checked(&mut bytes[..]).unwrap();
        assert_eq!(packet.decrement_hop_limit(), Some(63));
        let mut aad2 = [0u8; HEADER_LEN];
        packet.aad(&mut aad2);
        assert_eq!(aad, aad2);
    }

    #[test]
    fn decrement_hop_limit() {
        let mut bytes = PACKET;
        bytes[1] = 2;
        let mut packet = Packet::new_checked(&mut bytes[..]).unwrap();
        assert_eq!(packet.decrement_hop_limit(), Some(1));
        assert_eq!(packet.decrement_hop_limit(), Some(0));
        assert_eq!(packet.decrement_hop_limit(), None);
        assert_eq!(packet.hop_limit(), 0);
        assert_eq!(bytes[1], 0);
        assert_eq!(bytes[2..], PACKET[2..]);
    }

    #[test]
    fn handshake_kinds() {
        for (byte, kind) in [(1u8, Kind::HandshakeInit), (2, Kind::HandshakeResp)] {
            let mut bytes = [0u8; 48];
            bytes[..48].copy_from_slice(&PACKET[..48]);
            bytes[2] = byte;
            // Handshake payloads have no minimum here: the Noise layer judges them.
            let packet = Packet::new_checked(&bytes[..]).unwrap();
            assert_eq!(Repr::parse(&packet).unwrap().kind, kind);
            assert!(packet.payload().is_empty());
        }
    }

    #[test]
    fn truncated() {
        for len in 0..48 {
            assert_eq!(
                Packet::new_checked(&PACKET[..len]),
                Err(WireError::Truncated { needed: 48, len })
            );
        }
        // A TRANSPORT packet needs a type byte and a tag.
        for len in 48..65 {
            assert_eq!(
                Packet::new_checked(&PACKET[..len]),
                Err(WireError::CiphertextTooShort {
                    len: len - 48,
                    min: 17
                })
            );
        }
    }

    #[test]
    fn wrong_type_and_kind() {
        let mut bytes = PACKET;
        bytes[0] = 0x05;
        assert_eq!(
            Packet::new_checked(&bytes[..]),
            Err(WireError::UnexpectedFrameType(FrameType::LinkData))
        );
        bytes[0] = 0x00;
        assert_eq!(
            Packet::new_checked(&bytes[..]),
            Err(WireError::UnknownFrameType(0))
        );
        let mut bytes = PACKET;
        bytes[2] = 0x03;
        assert_eq!(
            Packet::new_checked(&bytes[..]),
            Err(WireError::UnknownKind(3))
        );
        // An unchecked view reports the bad kind instead of panicking; parse rejects it.
        let packet = Packet::new_unchecked(&bytes[..]);
        assert_eq!(packet.kind(), Err(WireError::UnknownKind(3)));
        assert_eq!(Repr::parse(&packet), Err(WireError::UnknownKind(3)));
    }

    #[test]
    fn payload_type() {
        assert_eq!(PayloadType::try_from(0), Ok(PayloadType::Ipv6));
        assert_eq!(PayloadType::try_from(1), Ok(PayloadType::Message));
        assert_eq!(PayloadType::try_from(2), Err(2));
    }
}
