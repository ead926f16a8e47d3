//! Babel (RFC 8966) wire codec.
//!
//! The same bytes travel in overlay mode (inside link-protected control frames) and in lab mode (UDP
//! 6696 on real interfaces, interoperable with babeld and BIRD), so this is plain RFC 8966 §4 with two
//! additions that every Babel speaker may ignore: the RFC 9616 Timestamp sub-TLV on Hello and IHU, and
//! our origin-key sub-TLV (type [`SUBTLV_ORIGIN_KEY`] = 112, non-mandatory) on Update, which carries
//! the 32-byte public key of the node that originated the route.
//!
//! # Layers (as smoltcp's `wire`)
//! - [`Packet`] is a view over a whole Babel packet: header (magic 42, version 2, body length), body
//!   and trailer. [`Packet::new_checked`] is required for outside bytes; after it passed, no accessor
//!   panics. The trailer (RFC 8966 §4.2, used by RFC 8967 MACs) stays reachable via
//!   [`Packet::trailer`].
//! - [`Packet::tlvs`] iterates the body and yields `Result<`[`Tlv`]`, `[`InvalidMessage`]`>`. The
//!   iterator keeps the per-packet parser state of §4.5 (current router-id, next hops, default
//!   prefixes for compression), so every [`Update`] it yields carries its full prefix, router-id and
//!   next hop. Unknown TLVs come out as [`Tlv::Unknown`], TLVs made void by an unknown mandatory
//!   sub-TLV (§4.4) as [`Tlv::Ignored`]; a malformed TLV yields an error and parsing resumes after it
//!   when its length is known, and stops when it is not.
//! - [`PacketBuilder`] writes TLVs into a caller's `Vec<u8>` up to an MTU, inserting Router-Id and
//!   Next Hop TLVs as needed and compressing prefixes (§4.5) when asked to.
//!
//! Constants are named as babeld's message.h names them, so the two can be diffed.

mod builder;
mod prefix;
mod reader;
mod tlv;

pub use builder::{EmitError, PacketBuilder};
pub use prefix::{Prefix, RouterId};
pub use tlv::{AckReq, Hello, Ihu, RouteRequest, SeqnoRequest, Tlv, Tlvs, Update};

/// Babel's magic number, the first byte of every packet (§4.2).
pub const BABEL_MAGIC: u8 = 42;
/// The protocol version this codec speaks (§4.2).
pub const BABEL_VERSION: u8 = 2;
/// Length of the packet header: magic, version, body length.
pub const HEADER_LEN: usize = 4;
/// UDP port for Babel in lab mode (§5).
pub const BABEL_PORT: u16 = 6696;
/// Link-local multicast group for Babel over IPv6 (§5): `ff02::1:6`.
pub const BABEL_MULTICAST_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 6);
/// The metric that means "unreachable" (§2.1); an Update with it is a retraction.
pub const INFINITY: u16 = 0xFFFF;

/// Pad1 (§4.6.1): a single zero byte, no length field.
pub const MESSAGE_PAD1: u8 = 0;
/// PadN (§4.6.2).
pub const MESSAGE_PADN: u8 = 1;
/// Acknowledgment Request (§4.6.3).
pub const MESSAGE_ACK_REQ: u8 = 2;
/// Acknowledgment (§4.6.4).
pub const MESSAGE_ACK: u8 = 3;
/// Hello (§4.6.5).
pub const MESSAGE_HELLO: u8 = 4;
/// IHU, "I Heard You" (§4.6.6).
pub const MESSAGE_IHU: u8 = 5;
/// Router-Id (§4.6.7).
pub const MESSAGE_ROUTER_ID: u8 = 6;
/// Next Hop (§4.6.8).
pub const MESSAGE_NH: u8 = 7;
/// Update (§4.6.9).
pub const MESSAGE_UPDATE: u8 = 8;
/// Route Request (§4.6.10).
pub const MESSAGE_REQUEST: u8 = 9;
/// Seqno Request, "multi-hop request" in babeld (§4.6.11).
pub const MESSAGE_MH_REQUEST: u8 = 10;
/// MAC trailer TLV (RFC 8967), only valid in the packet trailer.
pub const MESSAGE_MAC: u8 = 16;
/// Packet Counter (RFC 8967).
pub const MESSAGE_PC: u8 = 17;
/// Challenge Request (RFC 8967).
pub const MESSAGE_CHALLENGE_REQUEST: u8 = 18;
/// Challenge Reply (RFC 8967).
pub const MESSAGE_CHALLENGE_REPLY: u8 = 19;

/// Pad1 sub-TLV (§4.7.1).
pub const SUBTLV_PAD1: u8 = 0;
/// PadN sub-TLV (§4.7.2).
pub const SUBTLV_PADN: u8 = 1;
/// Diversity sub-TLV (draft-chroboczek-babel-diversity-routing); recognised and skipped.
pub const SUBTLV_DIVERSITY: u8 = 2;
/// Timestamp sub-TLV on Hello and IHU (RFC 9616 §3).
pub const SUBTLV_TIMESTAMP: u8 = 3;
/// Hypha's origin-key sub-TLV on Update: the originating node's 32-byte public key. In the
/// experimental range (RFC 8966 §5.3: 112–126) and below 128, so other Babel speakers skip it.
pub const SUBTLV_ORIGIN_KEY: u8 = 112;
/// Sub-TLV types with this bit set are mandatory (§4.4): if not understood, the enclosing TLV is
/// ignored.
pub const SUBTLV_MANDATORY: u8 = 0x80;

/// Address encoding 0: wildcard, no address (§4.1.5).
pub const AE_WILDCARD: u8 = 0;
/// Address encoding 1: IPv4, compressible.
pub const AE_IPV4: u8 = 1;
/// Address encoding 2: IPv6, compressible.
pub const AE_IPV6: u8 = 2;
/// Address encoding 3: link-local IPv6, 8 bytes after an implied `fe80::/64`.
pub const AE_LINK_LOCAL: u8 = 3;
/// Address encoding 4: IPv4 prefix with an IPv6 next hop (RFC 9229 "v4-via-v6"); shares AE 1's
/// compression state.
pub const AE_V4_VIA_V6: u8 = 4;

/// Update flag: this prefix becomes the default prefix for compression (§4.6.9).
pub const UPDATE_FLAG_PREFIX: u8 = 0x80;
/// Update flag: the router-id is the low 8 bytes of the prefix (§4.6.9).
pub const UPDATE_FLAG_ROUTER_ID: u8 = 0x40;
/// Hello flag: unicast Hello (§4.6.5).
pub const HELLO_FLAG_UNICAST: u16 = 0x8000;

/// Why (part of) a Babel packet was rejected. Callers count and drop; they don't log each one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidMessage {
    /// Fewer bytes than a packet header.
    #[error("packet shorter than its 4-byte header")]
    PacketTooShort,
    /// The first byte is not 42.
    #[error("bad magic {0}")]
    BadMagic(u8),
    /// The version is not 2.
    #[error("unsupported Babel version {0}")]
    BadVersion(u8),
    /// The header's body length runs past the end of the packet.
    #[error("body length {body} but only {available} bytes follow the header")]
    BodyTooLong {
        /// Declared body length.
        body: u16,
        /// Bytes present after the header.
        available: usize,
    },
    /// A TLV's length runs past the end of the body; the rest of the body is unparseable.
    #[error("TLV type {kind} truncated")]
    TlvTruncated {
        /// TLV type.
        kind: u8,
    },
    /// A TLV is shorter than its fixed fields or its address.
    #[error("TLV type {kind} too short")]
    TlvTooShort {
        /// TLV type.
        kind: u8,
    },
    /// A sub-TLV runs past the end of its TLV.
    #[error("sub-TLV in TLV type {kind} truncated")]
    SubTlvTruncated {
        /// Enclosing TLV type.
        kind: u8,
    },
    /// An address encoding that is unknown or not allowed in this TLV.
    #[error("address encoding {ae} not allowed in TLV type {kind}")]
    BadAddressEncoding {
        /// TLV type.
        kind: u8,
        /// Address encoding.
        ae: u8,
    },
    /// A prefix length longer than the address family allows, or nonzero with AE 0.
    #[error("prefix length {plen} invalid in TLV type {kind}")]
    BadPrefixLength {
        /// TLV type.
        kind: u8,
        /// Prefix length.
        plen: u8,
    },
    /// An Update omits bytes but no default prefix was set earlier in the packet, or omits more
    /// bytes than an address has (§4.5).
    #[error("Update omits {omitted} bytes without a usable default prefix")]
    BadOmitted {
        /// The Omitted field.
        omitted: u8,
    },
    /// A Router-Id TLV with the all-zeros or all-ones id, which §4.6.7 forbids.
    #[error("forbidden router-id (all zeros or all ones)")]
    BadRouterId,
    /// An Update with a finite metric before any router-id in the packet (§4.6.9).
    #[error("Update with finite metric but no router-id")]
    MissingRouterId,
    /// A wildcard (AE 0) Update whose metric is not infinite (§4.6.9).
    #[error("wildcard Update with finite metric")]
    WildcardUpdateNotRetraction,
}

/// A view over a whole Babel packet (§4.2): header, body, trailer.
///
/// Follows smoltcp's contract: [`Packet::new_unchecked`] checks nothing, [`Packet::check`] checks the
/// header, [`Packet::new_checked`] does both and is required for outside bytes.
#[derive(Debug, Clone, Copy)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

mod field {
    pub(super) type Field = core::ops::Range<usize>;
    pub(super) const MAGIC: usize = 0;
    pub(super) const VERSION: usize = 1;
    pub(super) const BODY_LEN: Field = 2..4;
    pub(super) const BODY: usize = BODY_LEN.end;
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wraps a buffer after [`Packet::check`].
    pub fn new_checked(buffer: T) -> Result<Packet<T>, InvalidMessage> {
        let p = Packet::new_unchecked(buffer);
        p.check()?;
        Ok(p)
    }

    /// Checks magic, version and that the body fits. After this passed, no accessor panics.
    pub fn check(&self) -> Result<(), InvalidMessage> {
        let b = self.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(InvalidMessage::PacketTooShort);
        }
        if b[field::MAGIC] != BABEL_MAGIC {
            return Err(InvalidMessage::BadMagic(b[field::MAGIC]));
        }
        if b[field::VERSION] != BABEL_VERSION {
            return Err(InvalidMessage::BadVersion(b[field::VERSION]));
        }
        let body = self.body_len();
        let available = b.len() - HEADER_LEN;
        if usize::from(body) > available {
            return Err(InvalidMessage::BodyTooLong { body, available });
        }
        Ok(())
    }

    /// The magic byte.
    pub fn magic(&self) -> u8 {
        self.buffer.as_ref()[field::MAGIC]
    }

    /// The version byte.
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VERSION]
    }

    /// The body length from the header.
    pub fn body_len(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::BODY_LEN];
        u16::from_be_bytes([b[0], b[1]])
    }

    /// The body: the TLVs.
    pub fn body(&self) -> &[u8] {
        let end = field::BODY + usize::from(self.body_len());
        &self.buffer.as_ref()[field::BODY..end]
    }

    /// The trailer: whatever follows the body (§4.2; RFC 8967 MAC TLVs live here).
    pub fn trailer(&self) -> &[u8] {
        let end = field::BODY + usize::from(self.body_len());
        &self.buffer.as_ref()[end..]
    }

    /// An iterator over the body's TLVs with the per-packet parser state of §4.5.
    pub fn tlvs(&self) -> Tlvs<'_> {
        Tlvs::new(self.body())
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

/// Entry points for the fuzz targets in `/fuzz` (not part of the stable API).
#[doc(hidden)]
pub mod fuzzing {
    use super::{Packet, PacketBuilder, Tlv};

    /// Parses `data` as a Babel packet; re-emits the TLVs that carry meaning (everything but
    /// padding, unknown and ignored TLVs and the Router-Id/Next Hop state TLVs, which the builder
    /// re-inserts); re-parses and asserts the same TLVs come back, once without and once with prefix
    /// compression. When the builder cannot continue a packet (a malformed TLV in the input had
    /// voided the router-id or next hop, which a sender cannot express), it starts a new one.
    pub fn fuzz_packet(data: &[u8]) {
        let Ok(packet) = Packet::new_checked(data) else {
            return;
        };
        let _ = packet.trailer();
        let first: Vec<Tlv> = packet
            .tlvs()
            .filter_map(Result::ok)
            .filter(Tlv::is_semantic)
            .collect();
        for compress in [false, true] {
            let mut packets = Vec::new();
            let mut buf = Vec::new();
            let mut b = PacketBuilder::new(&mut buf, usize::MAX).compress(compress);
            for t in &first {
                if b.push(t).is_err() {
                    b.finish();
                    packets.push(core::mem::take(&mut buf));
                    b = PacketBuilder::new(&mut buf, usize::MAX).compress(compress);
                    b.push(t)
                        .expect("a parsed TLV re-emits into an empty packet");
                }
            }
            b.finish();
            packets.push(buf);
            let mut second = Vec::new();
            for p in &packets {
                let again = Packet::new_checked(&p[..]).expect("emitted packet parses");
                for t in again.tlvs() {
                    let t = t.expect("emitted TLVs parse");
                    if t.is_semantic() {
                        second.push(t);
                    }
                }
            }
            assert_eq!(normalize(&first), normalize(&second));
        }
    }

    /// A retraction's router-id and next hop carry no meaning (§4.6.9), and the builder may leave
    /// whatever is in force; compare without them.
    fn normalize(tlvs: &[Tlv]) -> Vec<Tlv> {
        tlvs.iter()
            .map(|t| match *t {
                Tlv::Update(mut u) if u.metric == super::INFINITY => {
                    u.router_id = None;
                    u.next_hop = None;
                    Tlv::Update(u)
                }
                t => t,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
