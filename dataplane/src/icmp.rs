//! ICMPv6 errors a router sends back to the local TUN (RFC 4443), built in place.
//!
//! The dataplane answers for the overlay the way a router answers for its links: a packet from
//! this host to an overlay address without a route gets Destination Unreachable (§3.1), a packet
//! whose session never came up gets Destination Unreachable "address unreachable". The error is
//! built in the offending packet's own buffer: the packet is truncated so the error fits the
//! IPv6 minimum MTU (§2.4 (c)) and the IPv6 and ICMPv6 headers are pushed into the headroom.
//! Transit packets never get one: their source is not on our TUN (they are dropped and counted).

use std::net::Ipv6Addr;

use crate::pool::PacketBuf;

/// Length of the fixed IPv6 header.
pub const IPV6_HEADER_LEN: usize = 40;
/// Length of an ICMPv6 error header (type, code, checksum, 4-byte parameter).
pub const ICMPV6_ERROR_HEADER_LEN: usize = 8;
/// IPv6 next-header value of ICMPv6.
pub const NEXT_HEADER_ICMPV6: u8 = 58;
/// The IPv6 minimum MTU: no error is longer (RFC 4443 §2.4 (c)).
pub const MIN_MTU: usize = 1280;

/// ICMPv6 Destination Unreachable (§3.1).
pub const TYPE_DEST_UNREACHABLE: u8 = 1;
/// Code 0: no route to destination.
pub const CODE_NO_ROUTE: u8 = 0;
/// Code 3: address unreachable.
pub const CODE_ADDRESS_UNREACHABLE: u8 = 3;
/// ICMPv6 Time Exceeded (§3.3).
pub const TYPE_TIME_EXCEEDED: u8 = 3;

/// Why no error was built (RFC 4443 §2.4 (e): never answer an error, or a packet from nowhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoError {
    /// The packet is not a complete IPv6 header.
    #[error("not an IPv6 packet")]
    NotIpv6,
    /// The packet is itself an ICMPv6 error.
    #[error("packet is an ICMPv6 error")]
    IsError,
    /// Its source is unspecified or multicast, or its destination multicast.
    #[error("source is unspecified or multicast, or destination multicast")]
    BadSource,
    /// The buffer has no headroom for the headers.
    #[error("no headroom")]
    NoRoom,
}

/// The IPv6 source and destination of `packet`, if it starts with an IPv6 header.
pub fn ipv6_addrs(packet: &[u8]) -> Option<(Ipv6Addr, Ipv6Addr)> {
    if packet.len() < IPV6_HEADER_LEN || packet.first()? >> 4 != 6 {
        return None;
    }
    let src: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
    let dst: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
    Some((src.into(), dst.into()))
}

/// The one's-complement sum of `bytes` as 16-bit big-endian words, added to `sum` (RFC 1071).
pub fn sum_words(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

/// Folds a sum to 16 bits.
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The ICMPv6 checksum over the IPv6 pseudo-header (RFC 8200 §8.1) and `message` (whose checksum
/// field must be zero).
pub fn icmpv6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, message: &[u8]) -> u16 {
    let mut sum = sum_words(0, &src.octets());
    sum = sum_words(sum, &dst.octets());
    let len = message.len() as u32;
    sum = sum_words(sum, &len.to_be_bytes());
    sum = sum_words(sum, &[0, 0, 0, NEXT_HEADER_ICMPV6]);
    sum = sum_words(sum, message);
    !fold(sum)
}

/// Turns the IPv6 packet in `buf` into an ICMPv6 error from `from` back to its source: truncates
/// it, pushes the ICMPv6 and IPv6 headers and computes the checksum. On error `buf` is unchanged.
pub fn error_in_place(
    buf: &mut PacketBuf,
    from: Ipv6Addr,
    icmp_type: u8,
    code: u8,
) -> Result<(), NoError> {
    let data = buf.data();
    let (orig_src, orig_dst) = ipv6_addrs(data).ok_or(NoError::NotIpv6)?;
    // §2.4 (e): no errors about packets from nowhere or to a multicast group.
    if orig_src.is_unspecified() || orig_src.is_multicast() || orig_dst.is_multicast() {
        return Err(NoError::BadSource);
    }
    // An ICMPv6 error (type < 128) right after the fixed header is never answered.
    if data.get(6) == Some(&NEXT_HEADER_ICMPV6)
        && data.get(IPV6_HEADER_LEN).is_some_and(|t| *t < 128)
    {
        return Err(NoError::IsError);
    }
    if buf.headroom() < IPV6_HEADER_LEN + ICMPV6_ERROR_HEADER_LEN {
        return Err(NoError::NoRoom);
    }
    buf.truncate(MIN_MTU - IPV6_HEADER_LEN - ICMPV6_ERROR_HEADER_LEN);
    let icmp_len = buf.len() + ICMPV6_ERROR_HEADER_LEN;
    let hdr = buf
        .push_header(ICMPV6_ERROR_HEADER_LEN)
        .map_err(|_| NoError::NoRoom)?;
    hdr.copy_from_slice(&[icmp_type, code, 0, 0, 0, 0, 0, 0]);
    let sum = icmpv6_checksum(&from, &orig_src, buf.data());
    if let Some(c) = buf.data_mut().get_mut(2..4) {
        c.copy_from_slice(&sum.to_be_bytes());
    }
    let ip = buf
        .push_header(IPV6_HEADER_LEN)
        .map_err(|_| NoError::NoRoom)?;
    ip.fill(0);
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
    ip[6] = NEXT_HEADER_ICMPV6;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&from.octets());
    ip[24..40].copy_from_slice(&orig_src.octets());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{BufLayout, PacketPool};

    fn echo_request(src: Ipv6Addr, dst: Ipv6Addr, payload: usize) -> Vec<u8> {
        let mut p = vec![0u8; 40 + 8 + payload];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
        p[6] = 58;
        p[7] = 64;
        p[8..24].copy_from_slice(&src.octets());
        p[24..40].copy_from_slice(&dst.octets());
        p[40] = 128;
        p
    }

    #[test]
    fn unreachable_is_well_formed_and_checksummed() {
        let me: Ipv6Addr = "4aa::1".parse().unwrap();
        let there: Ipv6Addr = "5bb::9".parse().unwrap();
        let mut pool = PacketPool::new(1, BufLayout::LARGE).unwrap();
        let mut buf = pool.alloc().unwrap();
        let req = echo_request(me, there, 1400);
        buf.extend_tail(req.len()).unwrap().copy_from_slice(&req);
        error_in_place(&mut buf, me, TYPE_DEST_UNREACHABLE, CODE_NO_ROUTE).unwrap();
        let p = buf.data();
        assert_eq!(p.len(), MIN_MTU);
        assert_eq!(ipv6_addrs(p), Some((me, me)));
        assert_eq!(u16::from_be_bytes([p[4], p[5]]) as usize, MIN_MTU - 40);
        assert_eq!(&p[40..42], &[1, 0]);
        // The invoking packet follows the 8-byte header.
        assert_eq!(&p[48..88], &req[..40]);
        // Verifying: the checksum over everything including the field is 0xffff → complement 0.
        let mut sum = sum_words(0, &me.octets());
        sum = sum_words(sum, &me.octets());
        sum = sum_words(sum, &((MIN_MTU - 40) as u32).to_be_bytes());
        sum = sum_words(sum, &[0, 0, 0, 58]);
        sum = sum_words(sum, &p[40..]);
        assert_eq!(fold(sum), 0xffff);
    }

    #[test]
    fn errors_and_bad_sources_get_no_answer() {
        let me: Ipv6Addr = "4aa::1".parse().unwrap();
        let mut pool = PacketPool::new(1, BufLayout::MTU).unwrap();
        let mut buf = pool.alloc().unwrap();
        let mut err = echo_request(me, "5bb::1".parse().unwrap(), 8);
        err[40] = 1;
        buf.extend_tail(err.len()).unwrap().copy_from_slice(&err);
        assert_eq!(error_in_place(&mut buf, me, 1, 0), Err(NoError::IsError));
        assert_eq!(buf.data(), &err[..]);
        buf.reset(crate::pool::HEADROOM);
        let req = echo_request(Ipv6Addr::UNSPECIFIED, me, 8);
        buf.extend_tail(req.len()).unwrap().copy_from_slice(&req);
        assert_eq!(error_in_place(&mut buf, me, 1, 0), Err(NoError::BadSource));
        buf.reset(crate::pool::HEADROOM);
        buf.extend_tail(20).unwrap().fill(0x60);
        assert_eq!(error_in_place(&mut buf, me, 1, 0), Err(NoError::NotIpv6));
    }
}
