//! Babel TLVs (RFC 8966 §4.6) and the body iterator that keeps the per-packet parser state (§4.5).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::reader::Reader;
use super::*;

/// Acknowledgment Request (§4.6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckReq {
    /// Echoed in the Ack.
    pub opaque: u16,
    /// Deadline for the Ack, in centiseconds.
    pub interval: u16,
}

/// Hello (§4.6.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Flags; [`HELLO_FLAG_UNICAST`] marks a unicast Hello.
    pub flags: u16,
    /// The sender's Hello seqno for this interface (multicast or unicast sequence).
    pub seqno: u16,
    /// Time until the next scheduled Hello of the same kind, in centiseconds (0: none scheduled).
    pub interval: u16,
    /// RFC 9616 Timestamp sub-TLV: the sender's clock in microseconds when it sent the packet.
    pub timestamp: Option<u32>,
}

/// IHU, "I Heard You" (§4.6.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ihu {
    /// The sender's rxcost for the link to the addressed neighbour.
    pub rxcost: u16,
    /// Time until the next IHU, in centiseconds.
    pub interval: u16,
    /// The neighbour this IHU is about; `None` (AE 0) means "whoever receives it".
    pub addr: Option<IpAddr>,
    /// RFC 9616 Timestamp sub-TLV: (origin, receive). Origin echoes the transmit timestamp of the
    /// last Hello the sender got from the addressed neighbour; receive is the sender's clock when that
    /// Hello arrived. Both microseconds, wrapping.
    pub timestamp: Option<(u32, u32)>,
}

/// Update (§4.6.9), with the parser state of §4.5 already applied: the prefix is complete, the
/// router-id and next hop are those in force when the Update was parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Update {
    /// The prefix; `None` for AE 0, which (with an infinite metric) retracts every route the sender
    /// announced.
    pub prefix: Option<Prefix>,
    /// The IPv4 prefix was sent with AE 4 (RFC 9229): its next hop is an IPv6 address.
    pub v4_via_v6: bool,
    /// Time until the next scheduled Update for this prefix, in centiseconds.
    pub interval: u16,
    /// The source's seqno (§3.2.1).
    pub seqno: u16,
    /// The sender's metric; [`INFINITY`] makes this a retraction.
    pub metric: u16,
    /// The router-id in force (from a Router-Id TLV or the router-id flag). Always present when the
    /// metric is finite.
    pub router_id: Option<RouterId>,
    /// The next hop in force for this Update's family (from a Next Hop TLV); `None` means the
    /// sender's source address.
    pub next_hop: Option<IpAddr>,
    /// Hypha's origin-key sub-TLV ([`SUBTLV_ORIGIN_KEY`]): the originating node's public key.
    pub origin_key: Option<[u8; 32]>,
}

/// Route Request (§4.6.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRequest {
    /// The requested prefix; `None` (AE 0) asks for a full route table dump.
    pub prefix: Option<Prefix>,
}

/// Seqno Request (§4.6.11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqnoRequest {
    /// The requested prefix.
    pub prefix: Prefix,
    /// The seqno asked for.
    pub seqno: u16,
    /// Remaining hops this request may be forwarded.
    pub hop_count: u8,
    /// The source whose seqno is requested.
    pub router_id: RouterId,
}

/// One TLV of a Babel packet body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Tlv {
    /// Pad1 (§4.6.1).
    Pad1,
    /// PadN (§4.6.2) with this many bytes of padding.
    PadN(u8),
    /// Acknowledgment Request (§4.6.3).
    AckReq(AckReq),
    /// Acknowledgment (§4.6.4): the echoed opaque value.
    Ack(u16),
    /// Hello (§4.6.5).
    Hello(Hello),
    /// IHU (§4.6.6).
    Ihu(Ihu),
    /// Router-Id (§4.6.7); also applied to the following Updates.
    RouterId(RouterId),
    /// Next Hop (§4.6.8); also applied to the following Updates of its family.
    NextHop(IpAddr),
    /// Update (§4.6.9).
    Update(Update),
    /// Route Request (§4.6.10).
    RouteRequest(RouteRequest),
    /// Seqno Request (§4.6.11).
    SeqnoRequest(SeqnoRequest),
    /// A TLV type this codec does not know; skipped (§4.3).
    Unknown {
        /// TLV type.
        kind: u8,
    },
    /// A known TLV carrying an unknown mandatory sub-TLV: ignored (§4.4), though Router-Id, Next
    /// Hop and Update TLVs still updated the parser state.
    Ignored {
        /// TLV type.
        kind: u8,
    },
}

impl Tlv {
    /// True for TLVs that carry meaning of their own: not padding, not unknown or ignored, and not
    /// the Router-Id/Next Hop state TLVs (whose effect is folded into each [`Update`]).
    pub fn is_semantic(&self) -> bool {
        !matches!(
            self,
            Tlv::Pad1
                | Tlv::PadN(_)
                | Tlv::RouterId(_)
                | Tlv::NextHop(_)
                | Tlv::Unknown { .. }
                | Tlv::Ignored { .. }
        )
    }
}

/// Per-packet parser state (§4.5).
#[derive(Debug, Clone, Default)]
struct State {
    router_id: Option<RouterId>,
    nh_v4: Option<Ipv4Addr>,
    nh_v6: Option<Ipv6Addr>,
    default_v4: Option<[u8; 4]>,
    default_v6: Option<[u8; 16]>,
}

/// Iterator over the TLVs of a packet body; see the [module docs](super).
#[derive(Debug, Clone)]
pub struct Tlvs<'a> {
    body: Reader<'a>,
    state: State,
    done: bool,
}

impl<'a> Tlvs<'a> {
    /// Iterates over `body`, the bytes between the packet header and the trailer.
    pub fn new(body: &'a [u8]) -> Self {
        Tlvs {
            body: Reader::new(body),
            state: State::default(),
            done: false,
        }
    }

    fn next_tlv(&mut self) -> Option<Result<Tlv, InvalidMessage>> {
        let kind = self.body.u8()?;
        if kind == MESSAGE_PAD1 {
            return Some(Ok(Tlv::Pad1));
        }
        let Some(len) = self.body.u8() else {
            self.done = true;
            return Some(Err(InvalidMessage::TlvTruncated { kind }));
        };
        let Some(r) = self.body.sub(usize::from(len)) else {
            self.done = true;
            return Some(Err(InvalidMessage::TlvTruncated { kind }));
        };
        Some(self.parse(kind, len, r))
    }

    fn parse(&mut self, kind: u8, len: u8, mut r: Reader<'a>) -> Result<Tlv, InvalidMessage> {
        let short = InvalidMessage::TlvTooShort { kind };
        match kind {
            MESSAGE_PADN => Ok(Tlv::PadN(len)),
            MESSAGE_ACK_REQ => {
                let (_reserved, opaque, interval) = (
                    r.u16().ok_or(short)?,
                    r.u16().ok_or(short)?,
                    r.u16().ok_or(short)?,
                );
                let ignored = subtlvs(kind, r, |_, _| false)?;
                Ok(ignored_or(
                    kind,
                    ignored,
                    Tlv::AckReq(AckReq { opaque, interval }),
                ))
            }
            MESSAGE_ACK => {
                let opaque = r.u16().ok_or(short)?;
                let ignored = subtlvs(kind, r, |_, _| false)?;
                Ok(ignored_or(kind, ignored, Tlv::Ack(opaque)))
            }
            MESSAGE_HELLO => {
                let flags = r.u16().ok_or(short)?;
                let seqno = r.u16().ok_or(short)?;
                let interval = r.u16().ok_or(short)?;
                let mut timestamp = None;
                let ignored = subtlvs(kind, r, |t, mut b| match t {
                    SUBTLV_TIMESTAMP => {
                        // RFC 9616 §3.1: 4 bytes on a Hello; babeld tolerates more, so do we.
                        timestamp = timestamp.or(b.u32());
                        true
                    }
                    _ => false,
                })?;
                Ok(ignored_or(
                    kind,
                    ignored,
                    Tlv::Hello(Hello {
                        flags,
                        seqno,
                        interval,
                        timestamp,
                    }),
                ))
            }
            MESSAGE_IHU => {
                let ae = r.u8().ok_or(short)?;
                let _reserved = r.u8().ok_or(short)?;
                let rxcost = r.u16().ok_or(short)?;
                let interval = r.u16().ok_or(short)?;
                let addr = parse_address(kind, ae, &mut r)?;
                let mut timestamp = None;
                let ignored = subtlvs(kind, r, |t, mut b| match t {
                    SUBTLV_TIMESTAMP => {
                        if timestamp.is_none() {
                            timestamp = b.u32().zip(b.u32());
                        }
                        true
                    }
                    _ => false,
                })?;
                Ok(ignored_or(
                    kind,
                    ignored,
                    Tlv::Ihu(Ihu {
                        rxcost,
                        interval,
                        addr,
                        timestamp,
                    }),
                ))
            }
            MESSAGE_ROUTER_ID => {
                let parsed = (|| {
                    let _reserved = r.u16().ok_or(short)?;
                    let id = RouterId(r.array().ok_or(short)?);
                    if id == RouterId::ZERO || id == RouterId::ONES {
                        return Err(InvalidMessage::BadRouterId);
                    }
                    Ok(id)
                })();
                // A bad Router-Id TLV leaves no router-id in force, so the Updates after it are
                // rejected rather than attributed to the previous router.
                self.state.router_id = parsed.as_ref().ok().copied();
                let id = parsed?;
                let ignored = subtlvs(kind, r, |_, _| false)?;
                Ok(ignored_or(kind, ignored, Tlv::RouterId(id)))
            }
            MESSAGE_NH => {
                let parsed = (|| {
                    let ae = r.u8().ok_or(short)?;
                    let _reserved = r.u8().ok_or(short)?;
                    parse_address(kind, ae, &mut r)?
                        .ok_or(InvalidMessage::BadAddressEncoding { kind, ae })
                })();
                let nh = match parsed {
                    Ok(nh) => nh,
                    Err(e) => {
                        // As babeld: a broken Next Hop voids both next hops.
                        self.state.nh_v4 = None;
                        self.state.nh_v6 = None;
                        return Err(e);
                    }
                };
                match nh {
                    IpAddr::V4(a) => self.state.nh_v4 = Some(a),
                    IpAddr::V6(a) => self.state.nh_v6 = Some(a),
                }
                let ignored = subtlvs(kind, r, |_, _| false)?;
                Ok(ignored_or(kind, ignored, Tlv::NextHop(nh)))
            }
            MESSAGE_UPDATE => self.parse_update(r),
            MESSAGE_REQUEST => {
                let ae = r.u8().ok_or(short)?;
                let plen = r.u8().ok_or(short)?;
                let prefix = parse_request_prefix(kind, ae, plen, &mut r)?;
                let ignored = subtlvs(kind, r, |_, _| false)?;
                Ok(ignored_or(
                    kind,
                    ignored,
                    Tlv::RouteRequest(RouteRequest { prefix }),
                ))
            }
            MESSAGE_MH_REQUEST => {
                let ae = r.u8().ok_or(short)?;
                let plen = r.u8().ok_or(short)?;
                let seqno = r.u16().ok_or(short)?;
                let hop_count = r.u8().ok_or(short)?;
                let _reserved = r.u8().ok_or(short)?;
                let router_id = RouterId(r.array().ok_or(short)?);
                let prefix = parse_request_prefix(kind, ae, plen, &mut r)?
                    .ok_or(InvalidMessage::BadAddressEncoding { kind, ae })?;
                let ignored = subtlvs(kind, r, |_, _| false)?;
                Ok(ignored_or(
                    kind,
                    ignored,
                    Tlv::SeqnoRequest(SeqnoRequest {
                        prefix,
                        seqno,
                        hop_count,
                        router_id,
                    }),
                ))
            }
            _ => Ok(Tlv::Unknown { kind }),
        }
    }

    fn parse_update(&mut self, mut r: Reader<'a>) -> Result<Tlv, InvalidMessage> {
        let kind = MESSAGE_UPDATE;
        let short = InvalidMessage::TlvTooShort { kind };
        let ae = r.u8().ok_or(short)?;
        let flags = r.u8().ok_or(short)?;
        let fixed = (|| {
            let plen = r.u8().ok_or(short)?;
            let omitted = r.u8().ok_or(short)?;
            let interval = r.u16().ok_or(short)?;
            let seqno = r.u16().ok_or(short)?;
            let metric = r.u16().ok_or(short)?;
            let raw = self.update_prefix(ae, plen, omitted, &mut r)?;
            Ok((plen, interval, seqno, metric, raw))
        })();
        let (plen, interval, seqno, metric, raw) = match fixed {
            Ok(f) => f,
            Err(e) => {
                if flags & UPDATE_FLAG_PREFIX != 0 {
                    // As babeld: a broken Update that meant to set the default prefix voids both.
                    self.state.default_v4 = None;
                    self.state.default_v6 = None;
                }
                return Err(e);
            }
        };
        if flags & UPDATE_FLAG_PREFIX != 0 {
            match ae {
                AE_IPV4 | AE_V4_VIA_V6 => {
                    let mut d = [0u8; 4];
                    d.copy_from_slice(&raw[..4]);
                    self.state.default_v4 = Some(d);
                }
                AE_IPV6 | AE_LINK_LOCAL => self.state.default_v6 = Some(raw),
                _ => {}
            }
        }
        if flags & UPDATE_FLAG_ROUTER_ID != 0 {
            let mut id = [0u8; 8];
            match ae {
                AE_IPV4 | AE_V4_VIA_V6 => id[4..].copy_from_slice(&raw[..4]),
                AE_IPV6 | AE_LINK_LOCAL => id.copy_from_slice(&raw[8..]),
                _ => {}
            }
            if ae != AE_WILDCARD {
                let id = RouterId(id);
                self.state.router_id = (id != RouterId::ZERO && id != RouterId::ONES).then_some(id);
            }
        }
        let mut origin_key = None;
        let ignored = subtlvs(kind, r, |t, mut b| match t {
            SUBTLV_ORIGIN_KEY => {
                // Exactly 32 bytes; anything else is treated as absent.
                if b.left() == 32 {
                    origin_key = b.array();
                }
                true
            }
            SUBTLV_DIVERSITY => true,
            _ => false,
        })?;
        let prefix = match ae {
            AE_WILDCARD => None,
            AE_IPV4 | AE_V4_VIA_V6 => {
                let a = Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]);
                Prefix::new(IpAddr::V4(a), plen)
            }
            _ => Prefix::new(IpAddr::V6(Ipv6Addr::from(raw)), plen),
        };
        if ae == AE_WILDCARD && metric != INFINITY {
            return Err(InvalidMessage::WildcardUpdateNotRetraction);
        }
        if ae != AE_WILDCARD && metric != INFINITY && self.state.router_id.is_none() {
            return Err(InvalidMessage::MissingRouterId);
        }
        if ignored {
            return Ok(Tlv::Ignored { kind });
        }
        let next_hop = match ae {
            AE_WILDCARD => None,
            AE_IPV4 => self.state.nh_v4.map(IpAddr::V4),
            _ => self.state.nh_v6.map(IpAddr::V6),
        };
        Ok(Tlv::Update(Update {
            prefix,
            v4_via_v6: ae == AE_V4_VIA_V6,
            interval,
            seqno,
            metric,
            router_id: self.state.router_id,
            next_hop,
            origin_key,
        }))
    }

    /// Reconstructs an Update's prefix bytes from the Omitted bytes of the default prefix and the
    /// bytes on the wire (§4.5). Returns 16 bytes (IPv4 in the first 4), zero beyond the prefix.
    fn update_prefix(
        &self,
        ae: u8,
        plen: u8,
        omitted: u8,
        r: &mut Reader<'a>,
    ) -> Result<[u8; 16], InvalidMessage> {
        let kind = MESSAGE_UPDATE;
        let mut out = [0u8; 16];
        let (width, default): (usize, Option<&[u8]>) = match ae {
            AE_WILDCARD => return Ok(out),
            AE_IPV4 | AE_V4_VIA_V6 => (4, self.state.default_v4.as_ref().map(|d| &d[..])),
            AE_IPV6 => (16, self.state.default_v6.as_ref().map(|d| &d[..])),
            AE_LINK_LOCAL => return link_local_prefix(kind, plen, r),
            _ => return Err(InvalidMessage::BadAddressEncoding { kind, ae }),
        };
        if usize::from(plen) > width * 8 {
            return Err(InvalidMessage::BadPrefixLength { kind, plen });
        }
        let pb = usize::from(plen).div_ceil(8);
        let om = usize::from(omitted);
        if om > width {
            return Err(InvalidMessage::BadOmitted { omitted });
        }
        if om > 0 {
            let d = default.ok_or(InvalidMessage::BadOmitted { omitted })?;
            out[..om].copy_from_slice(&d[..om]);
        }
        if pb > om {
            let bytes = r
                .take(pb - om)
                .ok_or(InvalidMessage::TlvTooShort { kind })?;
            out[om..pb].copy_from_slice(bytes);
        }
        Ok(out)
    }
}

impl Iterator for Tlvs<'_> {
    type Item = Result<Tlv, InvalidMessage>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.next_tlv();
        if r.is_none() {
            self.done = true;
        }
        r
    }
}

fn ignored_or(kind: u8, ignored: bool, tlv: Tlv) -> Tlv {
    if ignored {
        Tlv::Ignored { kind }
    } else {
        tlv
    }
}

/// Walks the sub-TLVs in `r` (§4.4). `known(type, body)` handles one and says whether it was
/// understood. Returns true if an unknown mandatory sub-TLV was seen, which voids the enclosing TLV.
fn subtlvs<'a>(
    kind: u8,
    mut r: Reader<'a>,
    mut known: impl FnMut(u8, Reader<'a>) -> bool,
) -> Result<bool, InvalidMessage> {
    let mut void = false;
    while let Some(t) = r.u8() {
        if t == SUBTLV_PAD1 {
            continue;
        }
        let len = r.u8().ok_or(InvalidMessage::SubTlvTruncated { kind })?;
        let body = r
            .sub(usize::from(len))
            .ok_or(InvalidMessage::SubTlvTruncated { kind })?;
        if t == SUBTLV_PADN {
            continue;
        }
        if !known(t, body) && t & SUBTLV_MANDATORY != 0 {
            void = true;
        }
    }
    Ok(void)
}

/// A full address in AE `ae` (IHU, Next Hop): `None` for AE 0.
fn parse_address(kind: u8, ae: u8, r: &mut Reader<'_>) -> Result<Option<IpAddr>, InvalidMessage> {
    let short = InvalidMessage::TlvTooShort { kind };
    match ae {
        AE_WILDCARD => Ok(None),
        AE_IPV4 => Ok(Some(IpAddr::V4(Ipv4Addr::from(
            r.array::<4>().ok_or(short)?,
        )))),
        AE_IPV6 => Ok(Some(IpAddr::V6(Ipv6Addr::from(
            r.array::<16>().ok_or(short)?,
        )))),
        AE_LINK_LOCAL => {
            let mut a = [0u8; 16];
            a[0] = 0xfe;
            a[1] = 0x80;
            a[8..].copy_from_slice(&r.array::<8>().ok_or(short)?);
            Ok(Some(IpAddr::V6(Ipv6Addr::from(a))))
        }
        _ => Err(InvalidMessage::BadAddressEncoding { kind, ae }),
    }
}

/// AE 3 used for a prefix: `fe80::/64` implied, then the bytes of the prefix beyond 8 (as babeld).
fn link_local_prefix(kind: u8, plen: u8, r: &mut Reader<'_>) -> Result<[u8; 16], InvalidMessage> {
    if plen > 128 {
        return Err(InvalidMessage::BadPrefixLength { kind, plen });
    }
    let mut out = [0u8; 16];
    out[0] = 0xfe;
    out[1] = 0x80;
    let pb = usize::from(plen).div_ceil(8);
    if pb > 8 {
        let bytes = r.take(pb - 8).ok_or(InvalidMessage::TlvTooShort { kind })?;
        out[8..pb].copy_from_slice(bytes);
    }
    Ok(out)
}

/// The uncompressed prefix of a Route or Seqno Request: `None` for AE 0.
fn parse_request_prefix(
    kind: u8,
    ae: u8,
    plen: u8,
    r: &mut Reader<'_>,
) -> Result<Option<Prefix>, InvalidMessage> {
    let short = InvalidMessage::TlvTooShort { kind };
    let bad_plen = InvalidMessage::BadPrefixLength { kind, plen };
    let pb = usize::from(plen).div_ceil(8);
    match ae {
        AE_WILDCARD => Ok(None),
        AE_IPV4 | AE_V4_VIA_V6 => {
            if plen > 32 {
                return Err(bad_plen);
            }
            let mut a = [0u8; 4];
            a[..pb].copy_from_slice(r.take(pb).ok_or(short)?);
            Ok(Prefix::new(IpAddr::V4(Ipv4Addr::from(a)), plen))
        }
        AE_IPV6 => {
            if plen > 128 {
                return Err(bad_plen);
            }
            let mut a = [0u8; 16];
            a[..pb].copy_from_slice(r.take(pb).ok_or(short)?);
            Ok(Prefix::new(IpAddr::V6(Ipv6Addr::from(a)), plen))
        }
        AE_LINK_LOCAL => {
            let a = link_local_prefix(kind, plen, r)?;
            Ok(Prefix::new(IpAddr::V6(Ipv6Addr::from(a)), plen))
        }
        _ => Err(InvalidMessage::BadAddressEncoding { kind, ae }),
    }
}
