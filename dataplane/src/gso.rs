//! Segmenting the TUN's TCP super-packets (`IFF_VNET_HDR` + `TUN_F_TSO6`) ourselves.
//!
//! With TSO on, one TUN read returns up to 64 KiB of one TCP flow with a virtio header saying
//! "TCPv6, segment every `gso_size` payload bytes, checksum partial". Every overlay packet must
//! fit one underlay datagram, so the worker cuts the super-packet into MSS-sized IPv6/TCP segments,
//! exactly as the kernel's `tcp_gso_segment` would (sequence numbers advance by the segment size,
//! FIN and PSH only on the last segment, CWR only on the first, full checksums), each written into
//! its own datagram slot of a send buffer and sealed there; the slots then leave in one UDP GSO
//! `sendmsg`. One TUN read and one send for ~45 packets instead of ~45 of each.

use std::net::Ipv6Addr;

use crate::icmp::IPV6_HEADER_LEN;

/// virtio_net_hdr gso_type: no segmentation.
pub const GSO_NONE: u8 = 0;
/// virtio_net_hdr gso_type: TCP over IPv6.
pub const GSO_TCPV6: u8 = 4;
/// virtio_net_hdr gso_type flag: ECN (CWR may be set on the first segment).
pub const GSO_ECN: u8 = 0x80;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// The one's-complement sum of `bytes` (RFC 1071), 8 bytes at a time, not yet folded.
pub fn sum(bytes: &[u8]) -> u64 {
    let mut acc: u64 = 0;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let v = u64::from_be_bytes(w);
        acc += (v >> 32) + (v & 0xffff_ffff);
    }
    let rest = chunks.remainder();
    let mut w = [0u8; 8];
    if let Some(dst) = w.get_mut(..rest.len()) {
        dst.copy_from_slice(rest);
    }
    let v = u64::from_be_bytes(w);
    acc + (v >> 32) + (v & 0xffff_ffff)
}

/// Folds a sum from [`sum`] to 16 bits.
pub fn fold64(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// A checked TCPv6 super-packet.
#[derive(Debug)]
pub struct TcpSuper<'a> {
    packet: &'a [u8],
    /// Offset of the TCP header (IPv6 header plus extension headers).
    l4: usize,
    /// Length of the TCP header with options.
    tcp_len: usize,
    /// Payload bytes per segment.
    mss: usize,
    src: Ipv6Addr,
    dst: Ipv6Addr,
}

impl<'a> TcpSuper<'a> {
    /// Checks a super-packet: IPv6, TCP at `csum_start`, a sane TCP header and segment size.
    pub fn parse(packet: &'a [u8], csum_start: usize, gso_size: usize) -> Option<Self> {
        let (src, dst) = crate::icmp::ipv6_addrs(packet)?;
        if csum_start < IPV6_HEADER_LEN || gso_size == 0 {
            return None;
        }
        let tcp = packet.get(csum_start..)?;
        let tcp_len = usize::from(*tcp.get(12)? >> 4) * 4;
        if tcp_len < 20 || tcp.len() < tcp_len {
            return None;
        }
        Some(TcpSuper {
            packet,
            l4: csum_start,
            tcp_len,
            mss: gso_size,
            src,
            dst,
        })
    }

    /// The destination address.
    pub fn dst(&self) -> Ipv6Addr {
        self.dst
    }

    fn payload_len(&self) -> usize {
        self.packet.len() - self.l4 - self.tcp_len
    }

    /// Headers (IPv6 + extensions + TCP) in front of each segment's payload.
    pub fn header_len(&self) -> usize {
        self.l4 + self.tcp_len
    }

    /// Bytes of the largest segment (headers + MSS).
    pub fn max_segment_len(&self) -> usize {
        self.header_len() + self.mss.min(self.payload_len().max(1))
    }

    /// How many segments it makes (at least one).
    pub fn segments(&self) -> usize {
        self.payload_len().div_ceil(self.mss).max(1)
    }

    /// Writes segment `i` (an IPv6 packet) at the start of `out`; returns its length, or `None` if
    /// `i` is out of range or `out` too short.
    pub fn write_segment(&self, i: usize, out: &mut [u8]) -> Option<usize> {
        let n = self.segments();
        if i >= n {
            return None;
        }
        let hl = self.header_len();
        let start = hl + i * self.mss;
        let end = (start + self.mss).min(self.packet.len());
        let chunk = self.packet.get(start..end)?;
        let len = hl + chunk.len();
        let seg = out.get_mut(..len)?;
        seg.get_mut(..hl)?.copy_from_slice(self.packet.get(..hl)?);
        seg.get_mut(hl..)?.copy_from_slice(chunk);
        // IPv6 payload length.
        let plen = u16::try_from(len - IPV6_HEADER_LEN).ok()?;
        seg.get_mut(4..6)?.copy_from_slice(&plen.to_be_bytes());
        let tcp = seg.get_mut(self.l4..)?;
        let seq = u32::from_be_bytes(tcp.get(4..8)?.try_into().ok()?);
        let seq = seq.wrapping_add((i * self.mss) as u32);
        tcp.get_mut(4..8)?.copy_from_slice(&seq.to_be_bytes());
        let flags = tcp.get_mut(13)?;
        if i + 1 < n {
            *flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            *flags &= !TCP_CWR;
        }
        tcp.get_mut(16..18)?.copy_from_slice(&[0, 0]);
        let tcp_total = tcp.len() as u32;
        let mut acc = sum(&self.src.octets()) + sum(&self.dst.octets());
        acc += u64::from(tcp_total) + 6;
        acc += sum(tcp);
        let csum = !fold64(acc);
        tcp.get_mut(16..18)?.copy_from_slice(&csum.to_be_bytes());
        Some(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::icmp::{fold, sum_words};

    fn tcp_super(payload: usize, flags: u8) -> Vec<u8> {
        let src: Ipv6Addr = "4aa::1".parse().unwrap();
        let dst: Ipv6Addr = "5bb::2".parse().unwrap();
        let mut p = vec![0u8; 40 + 32 + payload];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((32 + payload) as u16).to_be_bytes());
        p[6] = 6;
        p[7] = 64;
        p[8..24].copy_from_slice(&src.octets());
        p[24..40].copy_from_slice(&dst.octets());
        let t = &mut p[40..];
        t[0..2].copy_from_slice(&5201u16.to_be_bytes());
        t[2..4].copy_from_slice(&40000u16.to_be_bytes());
        t[4..8].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        t[12] = 8 << 4;
        t[13] = flags;
        for (i, b) in p[72..].iter_mut().enumerate() {
            *b = i as u8;
        }
        p
    }

    fn tcp_checksum_ok(seg: &[u8]) -> bool {
        let (src, dst) = crate::icmp::ipv6_addrs(seg).unwrap();
        let tcp = &seg[40..];
        let mut s = sum_words(0, &src.octets());
        s = sum_words(s, &dst.octets());
        s = sum_words(s, &(tcp.len() as u32).to_be_bytes());
        s = sum_words(s, &[0, 0, 0, 6]);
        s = sum_words(s, tcp);
        fold(s) == 0xffff
    }

    #[test]
    fn fast_sum_matches_rfc1071() {
        for len in [0usize, 1, 7, 8, 9, 1500, 1501] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            assert_eq!(fold64(sum(&data)), fold(sum_words(0, &data)), "len {len}");
        }
    }

    #[test]
    fn segments_like_the_kernel() {
        let p = tcp_super(3000, TCP_PSH | TCP_FIN | TCP_CWR | 0x10);
        let s = TcpSuper::parse(&p, 40, 1200).unwrap();
        assert_eq!(s.segments(), 3);
        assert_eq!(s.header_len(), 72);
        let mut out = vec![0xa5u8; 2000];
        let mut payload = Vec::new();
        for i in 0..3 {
            let n = s.write_segment(i, &mut out).unwrap();
            let seg = &out[..n];
            assert_eq!(n, 72 + if i < 2 { 1200 } else { 600 });
            assert_eq!(u16::from_be_bytes([seg[4], seg[5]]) as usize, n - 40);
            let seq = u32::from_be_bytes(seg[44..48].try_into().unwrap());
            assert_eq!(seq, 0xffff_fff0u32.wrapping_add(1200 * i as u32));
            let flags = seg[53];
            assert_eq!(flags & TCP_FIN != 0, i == 2);
            assert_eq!(flags & TCP_PSH != 0, i == 2);
            assert_eq!(flags & TCP_CWR != 0, i == 0);
            assert_eq!(flags & 0x10, 0x10, "ACK stays");
            assert!(tcp_checksum_ok(seg), "segment {i} checksum");
            payload.extend_from_slice(&seg[72..]);
        }
        assert_eq!(&payload[..], &p[72..]);
        assert_eq!(s.write_segment(3, &mut out), None);
        assert_eq!(s.write_segment(0, &mut out[..100]), None);
    }

    #[test]
    fn rejects_garbage() {
        let p = tcp_super(100, 0);
        assert!(TcpSuper::parse(&p, 20, 100).is_none());
        assert!(TcpSuper::parse(&p, 40, 0).is_none());
        assert!(TcpSuper::parse(&p, 170, 100).is_none());
        let mut bad = p.clone();
        bad[52] = 2 << 4;
        assert!(TcpSuper::parse(&bad, 40, 100).is_none());
        assert!(TcpSuper::parse(&p[..30], 40, 100).is_none());
    }
}
