//! Emitting Babel packets into a caller's buffer (RFC 8966 §4), as smoltcp emits into caller
//! memory: [`PacketBuilder::new`] writes the header, [`PacketBuilder::push`] appends one TLV (plus the
//! Router-Id/Next Hop TLVs it needs) or nothing at all, and [`PacketBuilder::finish`] fills in the
//! body length.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::tlv::{Hello, Ihu, Update};
use super::*;

/// Why a TLV was not added. The packet is unchanged either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EmitError {
    /// The TLV does not fit in what is left of the MTU: send this packet and start another.
    #[error("packet full")]
    Full,
    /// The TLV cannot be encoded (an unknown TLV, a finite wildcard Update, a next hop of the wrong
    /// family, or a router-id/next hop that would have to be "unset" mid-packet).
    #[error("TLV cannot be encoded: {0}")]
    Unrepresentable(&'static str),
}

/// Emitter-side copy of the §4.5 parser state, so the receiver resolves each Update to what we meant.
#[derive(Debug, Clone, Copy, Default)]
struct State {
    router_id: Option<RouterId>,
    nh_v4: Option<Ipv4Addr>,
    nh_v6: Option<Ipv6Addr>,
    default_v4: Option<[u8; 16]>,
    default_v6: Option<[u8; 16]>,
}

/// Writes one Babel packet into a `Vec<u8>`, never beyond `mtu` bytes in total.
#[derive(Debug)]
pub struct PacketBuilder<'b> {
    buf: &'b mut Vec<u8>,
    mtu: usize,
    compress: bool,
    state: State,
}

impl<'b> PacketBuilder<'b> {
    /// Clears `buf` and writes a packet header into it. `mtu` bounds the whole packet (header and
    /// body); it is clamped to what the 16-bit body length can describe.
    pub fn new(buf: &'b mut Vec<u8>, mtu: usize) -> Self {
        buf.clear();
        buf.extend_from_slice(&[BABEL_MAGIC, BABEL_VERSION, 0, 0]);
        PacketBuilder {
            buf,
            mtu: mtu.min(HEADER_LEN + usize::from(u16::MAX)),
            compress: false,
            state: State::default(),
        }
    }

    /// Enables or disables prefix compression for the Updates that follow (§4.5).
    pub fn compress(mut self, on: bool) -> Self {
        self.compress = on;
        self
    }

    /// Bytes of body written so far.
    pub fn body_len(&self) -> usize {
        self.buf.len() - HEADER_LEN
    }

    /// True while no TLV has been added.
    pub fn is_empty(&self) -> bool {
        self.body_len() == 0
    }

    /// Bytes still available under the MTU.
    pub fn remaining(&self) -> usize {
        self.mtu.saturating_sub(self.buf.len())
    }

    /// Appends `tlv` (preceded by the Router-Id and Next Hop TLVs an Update needs), or nothing.
    pub fn push(&mut self, tlv: &Tlv) -> Result<(), EmitError> {
        let (len, state) = (self.buf.len(), self.state);
        let r = self.push_inner(tlv);
        if r.is_ok() && self.buf.len() > self.mtu {
            self.buf.truncate(len);
            self.state = state;
            return Err(EmitError::Full);
        }
        if r.is_err() {
            self.buf.truncate(len);
            self.state = state;
        }
        r
    }

    /// Writes the body length and returns the packet's total length.
    pub fn finish(self) -> usize {
        let body = u16::try_from(self.body_len()).unwrap_or(u16::MAX);
        self.buf[2..4].copy_from_slice(&body.to_be_bytes());
        self.buf.len()
    }

    fn push_inner(&mut self, tlv: &Tlv) -> Result<(), EmitError> {
        match *tlv {
            Tlv::Pad1 => self.buf.push(MESSAGE_PAD1),
            Tlv::PadN(n) => {
                self.buf.extend_from_slice(&[MESSAGE_PADN, n]);
                self.buf.resize(self.buf.len() + usize::from(n), 0);
            }
            Tlv::AckReq(a) => {
                self.tlv(MESSAGE_ACK_REQ, |b| {
                    b.extend_from_slice(&[0, 0]);
                    b.extend_from_slice(&a.opaque.to_be_bytes());
                    b.extend_from_slice(&a.interval.to_be_bytes());
                });
            }
            Tlv::Ack(opaque) => {
                self.tlv(MESSAGE_ACK, |b| b.extend_from_slice(&opaque.to_be_bytes()));
            }
            Tlv::Hello(h) => self.hello(&h),
            Tlv::Ihu(i) => self.ihu(&i),
            Tlv::RouterId(id) => self.router_id(id),
            Tlv::NextHop(nh) => self.next_hop(nh),
            Tlv::Update(u) => self.update(&u)?,
            Tlv::RouteRequest(r) => {
                self.tlv(MESSAGE_REQUEST, |b| match r.prefix {
                    None => b.extend_from_slice(&[AE_WILDCARD, 0]),
                    Some(p) => {
                        b.extend_from_slice(&[request_ae(&p), p.len()]);
                        request_prefix(b, &p);
                    }
                });
            }
            Tlv::SeqnoRequest(s) => {
                self.tlv(MESSAGE_MH_REQUEST, |b| {
                    b.extend_from_slice(&[request_ae(&s.prefix), s.prefix.len()]);
                    b.extend_from_slice(&s.seqno.to_be_bytes());
                    b.extend_from_slice(&[s.hop_count, 0]);
                    b.extend_from_slice(&s.router_id.0);
                    request_prefix(b, &s.prefix);
                });
            }
            Tlv::Unknown { .. } | Tlv::Ignored { .. } => {
                return Err(EmitError::Unrepresentable("unknown or ignored TLV"));
            }
        }
        Ok(())
    }

    /// Writes type, a length placeholder, the body from `f`, then patches the length. Bodies longer
    /// than 255 bytes cannot happen with the TLVs we emit (the longest, an Update with origin key, is
    /// 60 bytes).
    fn tlv(&mut self, kind: u8, f: impl FnOnce(&mut Vec<u8>)) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[kind, 0]);
        f(self.buf);
        let len = self.buf.len() - start - 2;
        self.buf[start + 1] = u8::try_from(len).unwrap_or(u8::MAX);
    }

    fn hello(&mut self, h: &Hello) {
        self.tlv(MESSAGE_HELLO, |b| {
            b.extend_from_slice(&h.flags.to_be_bytes());
            b.extend_from_slice(&h.seqno.to_be_bytes());
            b.extend_from_slice(&h.interval.to_be_bytes());
            if let Some(ts) = h.timestamp {
                b.extend_from_slice(&[SUBTLV_TIMESTAMP, 4]);
                b.extend_from_slice(&ts.to_be_bytes());
            }
        });
    }

    fn ihu(&mut self, i: &Ihu) {
        self.tlv(MESSAGE_IHU, |b| {
            let ae = match i.addr {
                None => AE_WILDCARD,
                Some(IpAddr::V4(_)) => AE_IPV4,
                Some(IpAddr::V6(a)) if is_link_local(&a) => AE_LINK_LOCAL,
                Some(IpAddr::V6(_)) => AE_IPV6,
            };
            b.extend_from_slice(&[ae, 0]);
            b.extend_from_slice(&i.rxcost.to_be_bytes());
            b.extend_from_slice(&i.interval.to_be_bytes());
            if let Some(a) = i.addr {
                address(b, a);
            }
            if let Some((origin, receive)) = i.timestamp {
                b.extend_from_slice(&[SUBTLV_TIMESTAMP, 8]);
                b.extend_from_slice(&origin.to_be_bytes());
                b.extend_from_slice(&receive.to_be_bytes());
            }
        });
    }

    fn router_id(&mut self, id: RouterId) {
        self.tlv(MESSAGE_ROUTER_ID, |b| {
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(&id.0);
        });
        self.state.router_id = Some(id);
    }

    fn next_hop(&mut self, nh: IpAddr) {
        self.tlv(MESSAGE_NH, |b| {
            let ae = match nh {
                IpAddr::V4(_) => AE_IPV4,
                IpAddr::V6(a) if is_link_local(&a) => AE_LINK_LOCAL,
                IpAddr::V6(_) => AE_IPV6,
            };
            b.extend_from_slice(&[ae, 0]);
            address(b, nh);
        });
        match nh {
            IpAddr::V4(a) => self.state.nh_v4 = Some(a),
            IpAddr::V6(a) => self.state.nh_v6 = Some(a),
        }
    }

    fn update(&mut self, u: &Update) -> Result<(), EmitError> {
        let Some(prefix) = u.prefix else {
            self.sync_router_id(u)?;
            if u.metric != INFINITY {
                return Err(EmitError::Unrepresentable("wildcard Update must retract"));
            }
            if u.next_hop.is_some() || u.v4_via_v6 || u.origin_key.is_some() {
                return Err(EmitError::Unrepresentable(
                    "wildcard Update with extra fields",
                ));
            }
            self.tlv(MESSAGE_UPDATE, |b| {
                b.extend_from_slice(&[AE_WILDCARD, 0, 0, 0]);
                b.extend_from_slice(&u.interval.to_be_bytes());
                b.extend_from_slice(&u.seqno.to_be_bytes());
                b.extend_from_slice(&u.metric.to_be_bytes());
            });
            return Ok(());
        };
        if u.v4_via_v6 && !prefix.is_ipv4() {
            return Err(EmitError::Unrepresentable("v4-via-v6 with an IPv6 prefix"));
        }
        // Next hop in force for this Update's family.
        let v6_nh = !prefix.is_ipv4() || u.v4_via_v6;
        match (u.next_hop, v6_nh) {
            (Some(IpAddr::V4(a)), false) => {
                if self.state.nh_v4 != Some(a) {
                    self.next_hop(IpAddr::V4(a));
                }
            }
            (Some(IpAddr::V6(a)), true) => {
                if self.state.nh_v6 != Some(a) {
                    self.next_hop(IpAddr::V6(a));
                }
            }
            (Some(_), _) => return Err(EmitError::Unrepresentable("next hop of wrong family")),
            // A retraction's next hop does not matter (§4.6.9): whatever is in force will do.
            (None, false) if self.state.nh_v4.is_some() && u.metric != INFINITY => {
                return Err(EmitError::Unrepresentable("cannot unset next hop"));
            }
            (None, true) if self.state.nh_v6.is_some() && u.metric != INFINITY => {
                return Err(EmitError::Unrepresentable("cannot unset next hop"));
            }
            (None, _) => {}
        }
        // Router-id in force for this Update (after the Next Hop, in babeld's order).
        self.sync_router_id(u)?;
        let ae = if !prefix.is_ipv4() {
            AE_IPV6
        } else if u.v4_via_v6 {
            AE_V4_VIA_V6
        } else {
            AE_IPV4
        };
        let (octets, _) = prefix.octets();
        let pb = usize::from(prefix.len()).div_ceil(8);
        let (mut flags, mut omitted) = (0u8, 0usize);
        if self.compress {
            let default = if prefix.is_ipv4() {
                &mut self.state.default_v4
            } else {
                &mut self.state.default_v6
            };
            if let Some(d) = default {
                omitted = octets[..pb]
                    .iter()
                    .zip(&d[..pb])
                    .take_while(|(a, b)| a == b)
                    .count();
            }
            flags |= UPDATE_FLAG_PREFIX;
            *default = Some(octets);
        }
        self.tlv(MESSAGE_UPDATE, |b| {
            // omitted <= pb <= 16, so the cast is lossless.
            b.extend_from_slice(&[ae, flags, prefix.len(), omitted as u8]);
            b.extend_from_slice(&u.interval.to_be_bytes());
            b.extend_from_slice(&u.seqno.to_be_bytes());
            b.extend_from_slice(&u.metric.to_be_bytes());
            b.extend_from_slice(&octets[omitted..pb]);
            if let Some(key) = u.origin_key {
                b.extend_from_slice(&[SUBTLV_ORIGIN_KEY, 32]);
                b.extend_from_slice(&key);
            }
        });
        Ok(())
    }

    /// Emits a Router-Id TLV if `u` needs a different router-id from the one in force.
    fn sync_router_id(&mut self, u: &Update) -> Result<(), EmitError> {
        match (u.router_id, self.state.router_id) {
            (Some(want), have) if have != Some(want) => {
                if want == RouterId::ZERO || want == RouterId::ONES {
                    return Err(EmitError::Unrepresentable("forbidden router-id"));
                }
                self.router_id(want);
            }
            // A retraction's router-id does not matter (§4.6.9), so whatever is in force will do.
            (None, Some(_)) if u.metric != INFINITY => {
                return Err(EmitError::Unrepresentable("cannot unset router-id"));
            }
            (None, None) if u.metric != INFINITY && u.prefix.is_some() => {
                return Err(EmitError::Unrepresentable(
                    "finite Update without router-id",
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

fn is_link_local(a: &Ipv6Addr) -> bool {
    a.segments()[..4] == [0xfe80, 0, 0, 0]
}

fn address(b: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(a) => b.extend_from_slice(&a.octets()),
        IpAddr::V6(a) if is_link_local(&a) => b.extend_from_slice(&a.octets()[8..]),
        IpAddr::V6(a) => b.extend_from_slice(&a.octets()),
    }
}

fn request_ae(p: &Prefix) -> u8 {
    if p.is_ipv4() {
        AE_IPV4
    } else {
        AE_IPV6
    }
}

fn request_prefix(b: &mut Vec<u8>, p: &Prefix) {
    let (octets, _) = p.octets();
    let pb = usize::from(p.len()).div_ceil(8);
    b.extend_from_slice(&octets[..pb]);
}
