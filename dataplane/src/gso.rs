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

const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_URG: u8 = 0x20;

/// Most bytes of one coalesced super-packet (IPv6 payload length is 16 bits).
pub const MAX_COALESCED: usize = 64_000;
/// Most segments in one coalesced super-packet.
pub const MAX_COALESCED_SEGMENTS: usize = 64;

/// A run of consecutive, in-order segments of one TCP flow that can go to the TUN as one
/// super-packet (`gso_type` TCPv6), the way the kernel's GRO merges them (`tcp_gro_receive`): same
/// addresses, ports, ack, window and options, contiguous sequence numbers, every segment but the
/// last exactly the first one's size, no SYN/FIN/RST/URG, PSH only on the last.
#[derive(Debug)]
pub struct TcpRun {
    hdr_len: usize,
    mss: usize,
    next_seq: u32,
    bytes: usize,
    count: usize,
    closed: bool,
}

impl TcpRun {
    /// Starts a run with `first` (an IPv6 packet); `None` if it can't start one (not TCP right
    /// after the fixed header, no payload, or control flags).
    pub fn start(first: &[u8]) -> Option<TcpRun> {
        if first.len() < IPV6_HEADER_LEN + 20 || first.first()? >> 4 != 6 || *first.get(6)? != 6 {
            return None;
        }
        let th = usize::from(first.get(IPV6_HEADER_LEN + 12)? >> 4) * 4;
        let hdr_len = IPV6_HEADER_LEN + th;
        if th < 20 || first.len() <= hdr_len {
            return None;
        }
        let flags = *first.get(IPV6_HEADER_LEN + 13)?;
        if flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_URG) != 0 {
            return None;
        }
        let seq = u32::from_be_bytes(first.get(44..48)?.try_into().ok()?);
        let mss = first.len() - hdr_len;
        Some(TcpRun {
            hdr_len,
            mss,
            next_seq: seq.wrapping_add(mss as u32),
            bytes: first.len(),
            count: 1,
            closed: flags & TCP_PSH != 0,
        })
    }

    /// Segments in the run.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Bytes the super-packet will have.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Adds `next` if it continues the run started by `first`.
    pub fn try_push(&mut self, first: &[u8], next: &[u8]) -> bool {
        if self.closed || self.count >= MAX_COALESCED_SEGMENTS || next.len() <= self.hdr_len {
            return false;
        }
        let payload = next.len() - self.hdr_len;
        if payload > self.mss || self.bytes + payload > MAX_COALESCED {
            return false;
        }
        let same = |r: core::ops::Range<usize>| {
            first.get(r.clone()).is_some() && first.get(r.clone()) == next.get(r)
        };
        let tcp = IPV6_HEADER_LEN;
        let seq_ok = next
            .get(tcp + 4..tcp + 8)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
            == Some(self.next_seq);
        let flags_ok = match (first.get(tcp + 13), next.get(tcp + 13)) {
            (Some(f), Some(n)) => f & !TCP_PSH == n & !TCP_PSH,
            _ => false,
        };
        if !(same(0..4)
            && same(6..IPV6_HEADER_LEN)
            && same(tcp..tcp + 4)
            && seq_ok
            && same(tcp + 8..tcp + 13)
            && flags_ok
            && same(tcp + 14..tcp + 16)
            && same(tcp + 18..self.hdr_len))
        {
            return false;
        }
        self.next_seq = self.next_seq.wrapping_add(payload as u32);
        self.bytes += payload;
        self.count += 1;
        let psh = next.get(tcp + 13).is_some_and(|f| f & TCP_PSH != 0);
        if payload < self.mss || psh {
            self.closed = true;
        }
        true
    }

    /// Writes the virtio header and the super-packet made of `segments` (the run's packets, in
    /// order; the first supplies the headers) into `out`; returns the bytes written. The TCP
    /// checksum is left partial (pseudo-header sum) with NEEDS_CSUM, as TSO output is.
    pub fn write<'s>(
        &self,
        segments: impl Iterator<Item = &'s [u8]>,
        out: &mut [u8],
    ) -> Option<usize> {
        let vnet = crate::tun::VNET_HDR_LEN;
        let mut pos = vnet + self.hdr_len;
        let mut last_flags = 0;
        for (i, seg) in segments.enumerate() {
            if i == 0 {
                out.get_mut(vnet..pos)?
                    .copy_from_slice(seg.get(..self.hdr_len)?);
            }
            last_flags = *seg.get(IPV6_HEADER_LEN + 13)?;
            let payload = seg.get(self.hdr_len..)?;
            out.get_mut(pos..pos + payload.len())?
                .copy_from_slice(payload);
            pos += payload.len();
        }
        let total = pos - vnet;
        let pkt = out.get_mut(vnet..pos)?;
        let plen = u16::try_from(total - IPV6_HEADER_LEN).ok()?;
        pkt.get_mut(4..6)?.copy_from_slice(&plen.to_be_bytes());
        *pkt.get_mut(IPV6_HEADER_LEN + 13)? = last_flags;
        let tcp_len = (total - IPV6_HEADER_LEN) as u64;
        let pseudo = sum(pkt.get(8..40)?) + tcp_len + 6;
        pkt.get_mut(IPV6_HEADER_LEN + 16..IPV6_HEADER_LEN + 18)?
            .copy_from_slice(&fold64(pseudo).to_be_bytes());
        let hdr = out.get_mut(..vnet)?;
        hdr[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
        hdr[1] = GSO_TCPV6;
        hdr[2..4].copy_from_slice(&(self.hdr_len as u16).to_le_bytes());
        hdr[4..6].copy_from_slice(&(self.mss as u16).to_le_bytes());
        hdr[6..8].copy_from_slice(&(IPV6_HEADER_LEN as u16).to_le_bytes());
        hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
        Some(pos)
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
    fn segments_coalesce_back_into_one_super_packet() {
        let p = tcp_super(3000, 0x10 | TCP_PSH);
        let s = TcpSuper::parse(&p, 40, 1200).unwrap();
        let segs: Vec<Vec<u8>> = (0..3)
            .map(|i| {
                let mut out = vec![0u8; 2000];
                let n = s.write_segment(i, &mut out).unwrap();
                out.truncate(n);
                out
            })
            .collect();
        let mut run = TcpRun::start(&segs[0]).unwrap();
        assert!(run.try_push(&segs[0], &segs[1]));
        assert!(run.try_push(&segs[0], &segs[2]));
        assert_eq!(run.count(), 3);
        // The last one had PSH: the run is closed.
        assert!(!run.try_push(&segs[0], &segs[2]));
        let mut out = vec![0u8; 4000];
        let n = run.write(segs.iter().map(|v| &v[..]), &mut out).unwrap();
        assert_eq!(n, 10 + 72 + 3000);
        assert_eq!(&out[10 + 72..n], &p[72..]);
        assert_eq!(out[1], GSO_TCPV6);
        assert_eq!(u16::from_le_bytes([out[4], out[5]]), 1200);
        // Out of order or another flow: no.
        let mut run = TcpRun::start(&segs[0]).unwrap();
        assert!(!run.try_push(&segs[0], &segs[2]));
        let mut other = segs[1].clone();
        other[41] ^= 1;
        assert!(!run.try_push(&segs[0], &other));
        assert!(run.try_push(&segs[0], &segs[1]));
        // A SYN never starts a run.
        let mut syn = segs[0].clone();
        syn[53] |= TCP_SYN;
        assert!(TcpRun::start(&syn).is_none());
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
