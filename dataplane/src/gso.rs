//! Coalescing decrypted TCP segments into TUN super-packets: the receive-side twin of
//! [`crate::vnet::Segments`].
//!
//! A UDP GRO receive hands the worker ~45 datagrams of one sender at once; decrypted, they are
//! usually consecutive segments of one TCP flow. Writing each to the TUN costs a write and a pass
//! through the kernel's TCP receive path per packet; merged into one `gso_type` TCPv6 write (as
//! the kernel's own GRO would merge them), the TUN takes one write and the stack sees one
//! super-packet.

use crate::icmp::IPV6_HEADER_LEN;

use crate::vnet::{fold, sum_bytes, GSO_TCPV6};

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
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
        self.head(out.get_mut(..vnet + self.hdr_len)?, pos - vnet, last_flags)?;
        Some(pos)
    }

    /// For a gathered write (`writev`) that copies nothing in user space: turns the run's first
    /// segment, with [`crate::tun::VNET_HDR_LEN`] bytes of room in front (`head`: room, then
    /// the whole first segment), into the virtio header and headers of the super-packet, so that
    /// `head` followed by every later segment's payload (the bytes after its [`TcpRun::hdr_len`])
    /// is what [`TcpRun::write`] would produce. `last_flags` is the last segment's TCP flags
    /// byte ([`TcpRun::flags_of`]).
    pub fn write_head(&self, head: &mut [u8], last_flags: u8) -> Option<()> {
        let vnet = crate::tun::VNET_HDR_LEN;
        self.head(head.get_mut(..vnet + self.hdr_len)?, self.bytes, last_flags)
    }

    /// The TCP flags byte of a segment of the run.
    pub fn flags_of(segment: &[u8]) -> Option<u8> {
        segment.get(IPV6_HEADER_LEN + 13).copied()
    }

    /// Length of the IPv6 and TCP headers every segment of the run starts with.
    pub fn hdr_len(&self) -> usize {
        self.hdr_len
    }

    /// Fills in the virtio header and patches the copied headers (`out`: virtio header, then
    /// the first segment's headers) for a super-packet of `total` bytes.
    fn head(&self, out: &mut [u8], total: usize, last_flags: u8) -> Option<()> {
        let vnet = crate::tun::VNET_HDR_LEN;
        let pkt = out.get_mut(vnet..vnet + self.hdr_len)?;
        let plen = u16::try_from(total.checked_sub(IPV6_HEADER_LEN)?).ok()?;
        pkt.get_mut(4..6)?.copy_from_slice(&plen.to_be_bytes());
        *pkt.get_mut(IPV6_HEADER_LEN + 13)? = last_flags;
        let tcp_len = u64::from(plen);
        let pseudo = sum_bytes(tcp_len + 6, pkt.get(8..40)?);
        pkt.get_mut(IPV6_HEADER_LEN + 16..IPV6_HEADER_LEN + 18)?
            .copy_from_slice(&fold(pseudo).to_be_bytes());
        let hdr = out.get_mut(..vnet)?;
        hdr[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
        hdr[1] = GSO_TCPV6;
        hdr[2..4].copy_from_slice(&(self.hdr_len as u16).to_le_bytes());
        hdr[4..6].copy_from_slice(&(self.mss as u16).to_le_bytes());
        hdr[6..8].copy_from_slice(&(IPV6_HEADER_LEN as u16).to_le_bytes());
        hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vnet::{Segments, VnetHdr};
    use std::net::Ipv6Addr;

    const TCP_SYN_FLAG: u8 = TCP_SYN;

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

    fn segments(p: &[u8], mss: u16) -> Vec<Vec<u8>> {
        let hdr = VnetHdr {
            flags: 1,
            gso_type: GSO_TCPV6,
            hdr_len: 72,
            gso_size: mss,
            csum_start: 40,
            csum_offset: 16,
        };
        let mut s = Segments::new(&hdr, p).unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 2000];
        while let Some(r) = s.next_into(&mut buf) {
            out.push(buf[..r.unwrap()].to_vec());
        }
        out
    }

    #[test]
    fn segments_coalesce_back_into_one_super_packet() {
        let p = tcp_super(3000, 0x10 | TCP_PSH);
        let segs = segments(&p, 1200);
        assert_eq!(segs.len(), 3);
        let mut run = TcpRun::start(&segs[0]).unwrap();
        assert!(run.try_push(&segs[0], &segs[1]));
        assert!(run.try_push(&segs[0], &segs[2]));
        assert_eq!(run.count(), 3);
        assert_eq!(run.bytes(), 72 + 3000);
        // The last one had PSH: the run is closed.
        assert!(!run.try_push(&segs[0], &segs[2]));
        let mut out = vec![0xa5u8; 4000];
        let n = run.write(segs.iter().map(|v| &v[..]), &mut out).unwrap();
        assert_eq!(n, 10 + 72 + 3000);
        // Headers as the original (but the partial checksum), payload in order, PSH kept.
        assert_eq!(&out[10..10 + 56], &p[..56]);
        assert_eq!(&out[10 + 58..10 + 72], &p[58..72]);
        assert_eq!(&out[10 + 72..n], &p[72..]);
        let h = VnetHdr::parse(&out).unwrap();
        assert_eq!((h.gso_type, h.gso_size, h.hdr_len), (GSO_TCPV6, 1200, 72));
        assert_eq!((h.flags, h.csum_start, h.csum_offset), (1, 40, 16));
        // Segmenting the result again gives the same segments: the round trip is exact.
        let again = segments(&out[10..n], 1200);
        assert_eq!(again, segs);
    }

    #[test]
    fn gathered_write_equals_the_copied_one() {
        let p = tcp_super(5000, 0x10 | TCP_PSH);
        let segs = segments(&p, 1300);
        let mut run = TcpRun::start(&segs[0]).unwrap();
        for s in &segs[1..] {
            assert!(run.try_push(&segs[0], s));
        }
        let mut copied = vec![0xa5u8; 6000];
        let n = run.write(segs.iter().map(|v| &v[..]), &mut copied).unwrap();
        let mut head = vec![0xa5u8; 10];
        head.extend_from_slice(&segs[0]);
        let last = TcpRun::flags_of(segs.last().unwrap()).unwrap();
        run.write_head(&mut head, last).unwrap();
        let mut gathered = head;
        for s in &segs[1..] {
            gathered.extend_from_slice(&s[run.hdr_len()..]);
        }
        assert_eq!(gathered, &copied[..n]);
        assert!(run.write_head(&mut [0u8; 20], last).is_none());
    }

    #[test]
    fn runs_stop_at_gaps_other_flows_and_control_flags() {
        let p = tcp_super(3000, 0x10);
        let segs = segments(&p, 1200);
        let mut run = TcpRun::start(&segs[0]).unwrap();
        assert!(!run.try_push(&segs[0], &segs[2]), "out of order");
        let mut other = segs[1].clone();
        other[41] ^= 1;
        assert!(!run.try_push(&segs[0], &other), "other port");
        assert!(run.try_push(&segs[0], &segs[1]));
        // The last, short segment closes the run.
        assert!(run.try_push(&segs[0], &segs[2]));
        let mut syn = segs[0].clone();
        syn[53] |= TCP_SYN_FLAG;
        assert!(TcpRun::start(&syn).is_none());
        assert!(TcpRun::start(&segs[0][..60]).is_none());
        assert!(TcpRun::start(&[0u8; 100]).is_none());
    }
}
