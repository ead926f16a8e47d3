//! The `virtio_net_hdr` in front of TUN packets (`IFF_VNET_HDR`), and software segmentation of the
//! TSO/USO super-packets it announces.
//!
//! With offloads on ([`crate::tun::Offloads`]) one TUN read can return a 64 KiB TCP or UDP
//! "super-packet": one IPv6 header, one TCP/UDP header and up to 64 KiB of payload, with the
//! transport checksum left partial (`VIRTIO_NET_HDR_F_NEEDS_CSUM`). The overlay carries
//! MTU-sized packets, so the worker cuts it into segments of `gso_size` payload bytes, each a
//! complete IPv6 packet with its own length, TCP sequence number or UDP length, and a full
//! checksum (RFC 8200 §8.1 pseudo-header), the same result the kernel's GSO would have produced
//! — or, for TCP with [`Segments::partial_tcp_checksum`] (what the worker uses), the partial
//! checksum that TSO output carries, left for the receiving TUN to complete.
//! Every segment is written straight into a caller buffer (a pool buffer's data area), so
//! segmentation allocates nothing.
//!
//! The header is little-endian: TUN uses the legacy virtio layout in host byte order unless
//! `TUNSETVNETLE`/`BE` is set, and the dataplane targets little-endian hosts (x86_64, aarch64).
//!
//! Input comes from the kernel, but is still checked like outside bytes: a packet that doesn't
//! hold what its header announces is an error, never a panic. IPv6 extension headers in a
//! super-packet are not supported (the kernel's TCP/UDP stacks don't emit them for GSO here) and
//! are refused.

/// Length of the header (`struct virtio_net_hdr`).
pub const LEN: usize = 10;

/// The header for a complete, unsegmented packet: what the dataplane writes in front of every
/// packet it delivers to the TUN.
pub const NONE: [u8; LEN] = [0; LEN];

/// `flags`: the transport checksum is partial and must be completed.
pub const F_NEEDS_CSUM: u8 = 1;
/// `gso_type`: no segmentation.
pub const GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv6.
pub const GSO_TCPV6: u8 = 4;
/// `gso_type`: UDP segmentation (USO), IPv4 or IPv6.
pub const GSO_UDP_L4: u8 = 5;
/// `gso_type` flag: the TCP stream uses ECN (CWR on the first segment only).
pub const GSO_ECN: u8 = 0x80;

const IPV6_HDR: usize = 40;
const NEXT_TCP: u8 = 6;
const NEXT_UDP: u8 = 17;
const TCP_MIN: usize = 20;
const UDP_HDR: usize = 8;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// A malformed super-packet or header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VnetError {
    /// Shorter than the headers it must contain.
    #[error("truncated packet")]
    Truncated,
    /// Not IPv6, or an IPv6 payload length that disagrees with the packet.
    #[error("not a well-formed IPv6 packet")]
    BadIpv6,
    /// `gso_type` is not one we segment, or does not match the next header.
    #[error("unsupported gso_type {0:#x}")]
    UnsupportedGso(u8),
    /// `gso_size` is zero.
    #[error("gso_size is zero")]
    ZeroGsoSize,
    /// A checksum offset outside the packet.
    #[error("checksum offset outside the packet")]
    BadCsumOffset,
    /// The output buffer cannot hold the segment.
    #[error("output buffer too small")]
    OutputTooSmall,
}

/// A parsed `virtio_net_hdr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    /// `F_NEEDS_CSUM` and friends.
    pub flags: u8,
    /// `GSO_*`, possibly with `GSO_ECN`.
    pub gso_type: u8,
    /// Length of the headers (IPv6 + transport).
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS for TCP).
    pub gso_size: u16,
    /// Where checksumming starts (the transport header).
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start`.
    pub csum_offset: u16,
}

fn le16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at + 2) {
        Some(&[lo, hi]) => u16::from_le_bytes([lo, hi]),
        _ => 0,
    }
}

impl VnetHdr {
    /// Parses the first [`LEN`] bytes of `buf`.
    pub fn parse(buf: &[u8]) -> Result<VnetHdr, VnetError> {
        let b = buf.get(..LEN).ok_or(VnetError::Truncated)?;
        Ok(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le16(b, 2),
            gso_size: le16(b, 4),
            csum_start: le16(b, 6),
            csum_offset: le16(b, 8),
        })
    }

    /// Writes the header into `out[..LEN]`.
    pub fn emit(&self, out: &mut [u8]) -> Result<(), VnetError> {
        let o = out.get_mut(..LEN).ok_or(VnetError::OutputTooSmall)?;
        o[0] = self.flags;
        o[1] = self.gso_type;
        o[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        o[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        o[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        o[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        Ok(())
    }

    /// Whether the packet is a super-packet to cut.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }
}

/// The ones'-complement sum of `data` (RFC 1071) added to `sum`, folded to at most 17 bits but
/// not complemented. Reads 8 bytes at a time: 2^64 ≡ 1 (mod 2^16 − 1), so summing big-endian u64
/// words with end-around carry gives the same result as summing u16 words (RFC 1071 §2(B)).
/// `data` may have odd length only in the last call of a chain.
pub fn sum_bytes(sum: u64, data: &[u8]) -> u64 {
    let mut acc = u128::from(sum);
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        acc += u128::from(u64::from_be_bytes(b));
    }
    let mut rest = words.remainder().chunks_exact(2);
    for c in &mut rest {
        acc += u128::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = rest.remainder() {
        acc += u128::from(u16::from_be_bytes([*last, 0]));
    }
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u64
}

/// Folds a sum from [`sum_bytes`] to 16 bits (not complemented).
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The IPv6 pseudo-header sum (RFC 8200 §8.1) for an upper-layer packet of `len` bytes.
fn pseudo_sum(ip: &[u8], next_header: u8, len: usize) -> u64 {
    let addrs = ip.get(8..40).unwrap_or(&[]);
    let len = len as u64;
    sum_bytes(0, addrs) + (len >> 16) + (len & 0xffff) + u64::from(next_header)
}

/// Completes a partial transport checksum in place (`F_NEEDS_CSUM` on a non-GSO packet): the
/// field at `csum_start + csum_offset` holds the pseudo-header sum, and the result covers
/// everything from `csum_start` on.
pub fn complete_checksum(hdr: &VnetHdr, packet: &mut [u8]) -> Result<(), VnetError> {
    if hdr.flags & F_NEEDS_CSUM == 0 {
        return Ok(());
    }
    let start = usize::from(hdr.csum_start);
    let field = start + usize::from(hdr.csum_offset);
    if field + 2 > packet.len() {
        return Err(VnetError::BadCsumOffset);
    }
    let sum = fold(sum_bytes(0, packet.get(start..).unwrap_or(&[])));
    let mut csum = !sum;
    if csum == 0 && packet.get(6) == Some(&NEXT_UDP) {
        // RFC 8200 §8.1: a zero UDP checksum is sent as 0xffff.
        csum = 0xffff;
    }
    packet
        .get_mut(field..field + 2)
        .ok_or(VnetError::BadCsumOffset)?
        .copy_from_slice(&csum.to_be_bytes());
    Ok(())
}

const NEXT_ICMPV6: u8 = 58;

/// Offset of the checksum field in the transport header for TCP, UDP and ICMPv6.
fn checksum_offset(next_header: u8) -> Option<usize> {
    match next_header {
        NEXT_TCP => Some(16),
        NEXT_UDP => Some(6),
        NEXT_ICMPV6 => Some(2),
        _ => None,
    }
}

/// The IPv6 header and upper-layer bytes of a packet without extension headers, if consistent.
fn split_ipv6(packet: &[u8]) -> Result<(u8, usize), VnetError> {
    let ip = packet.get(..IPV6_HDR).ok_or(VnetError::Truncated)?;
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if ip[0] >> 4 != 6 || IPV6_HDR + payload_len != packet.len() {
        return Err(VnetError::BadIpv6);
    }
    Ok((ip[6], payload_len))
}

/// Computes and writes the full transport checksum of a TCP, UDP or ICMPv6 packet over IPv6 (no
/// extension headers), e.g. for ICMPv6 errors the dataplane generates.
pub fn fill_checksum(packet: &mut [u8]) -> Result<(), VnetError> {
    let (next, upper_len) = split_ipv6(packet)?;
    let off = checksum_offset(next).ok_or(VnetError::UnsupportedGso(next))?;
    let field = IPV6_HDR + off;
    packet
        .get_mut(field..field + 2)
        .ok_or(VnetError::Truncated)?
        .copy_from_slice(&[0, 0]);
    let sum = pseudo_sum(packet, next, upper_len);
    let sum = sum_bytes(sum, packet.get(IPV6_HDR..).unwrap_or(&[]));
    let mut csum = !fold(sum);
    if csum == 0 && next == NEXT_UDP {
        csum = 0xffff;
    }
    packet
        .get_mut(field..field + 2)
        .ok_or(VnetError::Truncated)?
        .copy_from_slice(&csum.to_be_bytes());
    Ok(())
}

/// Whether the transport checksum of a TCP, UDP or ICMPv6 packet over IPv6 (no extension
/// headers) verifies.
pub fn verify_checksum(packet: &[u8]) -> bool {
    match split_ipv6(packet) {
        Ok((next, upper_len)) if checksum_offset(next).is_some() => {
            let sum = pseudo_sum(packet, next, upper_len);
            fold(sum_bytes(sum, packet.get(IPV6_HDR..).unwrap_or(&[]))) == 0xffff
        }
        _ => false,
    }
}

/// `csum_start` and `csum_offset` of a TCP/IPv6 packet without extension headers.
pub const TCP_CSUM_START: u16 = IPV6_HDR as u16;
/// See [`TCP_CSUM_START`].
pub const TCP_CSUM_OFFSET: u16 = 16;

/// If `packet` is TCP over IPv6 without extension headers, overwrites its checksum field with
/// the partial checksum (the folded pseudo-header sum, not complemented) and returns true: the
/// packet can then go to the TUN with `F_NEEDS_CSUM`, `csum_start` [`TCP_CSUM_START`] and
/// `csum_offset` [`TCP_CSUM_OFFSET`], whatever the field held before (a full checksum, or the
/// partial one [`Segments::partial_tcp_checksum`] leaves). The kernel completes it only if the
/// packet leaves the host; local delivery trusts it.
pub fn set_partial_tcp_checksum(packet: &mut [u8]) -> bool {
    let Ok((NEXT_TCP, upper_len)) = split_ipv6(packet) else {
        return false;
    };
    if upper_len < TCP_MIN {
        return false;
    }
    let partial = fold(pseudo_sum(packet, NEXT_TCP, upper_len));
    let field = IPV6_HDR + usize::from(TCP_CSUM_OFFSET);
    match packet.get_mut(field..field + 2) {
        Some(f) => {
            f.copy_from_slice(&partial.to_be_bytes());
            true
        }
        None => false,
    }
}

/// Cuts a TCP/IPv6 or UDP/IPv6 super-packet into MTU-sized packets, one at a time.
#[derive(Debug)]
pub struct Segments<'a> {
    packet: &'a [u8],
    /// IPv6 + transport header length.
    hdr_len: usize,
    next_header: u8,
    gso_size: usize,
    ecn: bool,
    offset: usize,
    index: u32,
    /// TCP segments get the partial checksum (pseudo-header sum) instead of the full one.
    partial_tcp: bool,
}

impl<'a> Segments<'a> {
    /// Prepares to cut `packet` (without the vnet header) as `hdr` says.
    pub fn new(hdr: &VnetHdr, packet: &'a [u8]) -> Result<Segments<'a>, VnetError> {
        let ip = packet.get(..IPV6_HDR).ok_or(VnetError::Truncated)?;
        if ip[0] >> 4 != 6 {
            return Err(VnetError::BadIpv6);
        }
        let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
        if IPV6_HDR + payload_len != packet.len() {
            // TUN super-packets stay within 64 KiB, so no jumbograms (payload length 0).
            return Err(VnetError::BadIpv6);
        }
        let next_header = ip[6];
        let kind = hdr.gso_type & !GSO_ECN;
        let transport_len = match (kind, next_header) {
            (GSO_TCPV6, NEXT_TCP) => {
                let off = *packet.get(IPV6_HDR + 12).ok_or(VnetError::Truncated)?;
                let len = usize::from(off >> 4) * 4;
                if len < TCP_MIN {
                    return Err(VnetError::Truncated);
                }
                len
            }
            (GSO_UDP_L4, NEXT_UDP) => UDP_HDR,
            _ => return Err(VnetError::UnsupportedGso(hdr.gso_type)),
        };
        let hdr_len = IPV6_HDR + transport_len;
        if packet.len() < hdr_len {
            return Err(VnetError::Truncated);
        }
        if hdr.gso_size == 0 {
            return Err(VnetError::ZeroGsoSize);
        }
        Ok(Segments {
            packet,
            hdr_len,
            next_header,
            gso_size: usize::from(hdr.gso_size),
            ecn: hdr.gso_type & GSO_ECN != 0,
            offset: 0,
            index: 0,
            partial_tcp: false,
        })
    }

    /// Leaves each TCP segment's checksum partial (the pseudo-header sum, as TSO output is)
    /// instead of summing its payload: for segments whose receiver completes or skips the
    /// checksum — the dataplane's receiver writes every decrypted TCP packet to its TUN with
    /// `F_NEEDS_CSUM` ([`set_partial_tcp_checksum`]), and the AEAD tag already protects the bytes.
    /// UDP segments keep their full checksum.
    pub fn partial_tcp_checksum(mut self) -> Self {
        self.partial_tcp = true;
        self
    }

    fn payload_len(&self) -> usize {
        self.packet.len() - self.hdr_len
    }

    /// How many segments the packet makes (at least one, even with an empty payload).
    pub fn count(&self) -> usize {
        self.payload_len().div_ceil(self.gso_size).max(1)
    }

    /// The largest segment: headers plus `gso_size` bytes.
    pub fn max_segment_len(&self) -> usize {
        self.hdr_len + self.gso_size.min(self.payload_len())
    }

    /// Writes the next segment into `out` and returns its length, or `None` when done.
    pub fn next_into(&mut self, out: &mut [u8]) -> Option<Result<usize, VnetError>> {
        let total = self.payload_len();
        if self.offset >= total && !(total == 0 && self.index == 0) {
            return None;
        }
        let chunk = self.gso_size.min(total - self.offset);
        let seg_len = self.hdr_len + chunk;
        let Some(seg) = out.get_mut(..seg_len) else {
            return Some(Err(VnetError::OutputTooSmall));
        };
        let last = self.offset + chunk >= total;
        let (headers, data) = seg.split_at_mut(self.hdr_len);
        headers.copy_from_slice(self.packet.get(..self.hdr_len).unwrap_or(&[]));
        let src = self.hdr_len + self.offset;
        data.copy_from_slice(self.packet.get(src..src + chunk).unwrap_or(&[]));

        // IPv6 payload length.
        let upper_len = self.hdr_len - IPV6_HDR + chunk;
        headers[4..6].copy_from_slice(&(upper_len as u16).to_be_bytes());
        let csum_field = match self.next_header {
            NEXT_TCP => {
                let t = IPV6_HDR;
                let seq = u32::from_be_bytes([
                    headers[t + 4],
                    headers[t + 5],
                    headers[t + 6],
                    headers[t + 7],
                ])
                .wrapping_add(self.offset as u32);
                headers[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
                let mut flags = headers[t + 13];
                if !last {
                    flags &= !(TCP_FIN | TCP_PSH);
                }
                if self.index > 0 && self.ecn {
                    flags &= !TCP_CWR;
                }
                headers[t + 13] = flags;
                t + 16
            }
            _ => {
                let u = IPV6_HDR;
                headers[u + 4..u + 6].copy_from_slice(&(upper_len as u16).to_be_bytes());
                u + 6
            }
        };
        let pseudo = pseudo_sum(headers, self.next_header, upper_len);
        if self.partial_tcp && self.next_header == NEXT_TCP {
            headers[csum_field..csum_field + 2].copy_from_slice(&fold(pseudo).to_be_bytes());
        } else {
            headers[csum_field..csum_field + 2].copy_from_slice(&[0, 0]);
            let sum = sum_bytes(pseudo, &headers[IPV6_HDR..]);
            let sum = sum_bytes(sum, data);
            let mut csum = !fold(sum);
            if csum == 0 && self.next_header == NEXT_UDP {
                csum = 0xffff;
            }
            headers[csum_field..csum_field + 2].copy_from_slice(&csum.to_be_bytes());
        }

        self.offset += chunk;
        self.index += 1;
        Some(Ok(seg_len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SRC: [u8; 16] = [0x04, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
    const DST: [u8; 16] = [0x05, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2];

    /// A TCP/IPv6 super-packet as the kernel hands it over: checksum field = pseudo-header sum.
    fn tcp_super(payload: &[u8], seq: u32, flags: u8, options: usize) -> Vec<u8> {
        let tcp_len = TCP_MIN + options;
        let mut p = vec![0u8; IPV6_HDR + tcp_len];
        p[0] = 0x60;
        let plen = (tcp_len + payload.len()) as u16;
        p[4..6].copy_from_slice(&plen.to_be_bytes());
        p[6] = NEXT_TCP;
        p[7] = 64;
        p[8..24].copy_from_slice(&SRC);
        p[24..40].copy_from_slice(&DST);
        let t = IPV6_HDR;
        p[t..t + 2].copy_from_slice(&40000u16.to_be_bytes());
        p[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
        p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        p[t + 8..t + 12].copy_from_slice(&7u32.to_be_bytes());
        p[t + 12] = ((tcp_len / 4) as u8) << 4;
        p[t + 13] = flags;
        p[t + 14..t + 16].copy_from_slice(&512u16.to_be_bytes());
        for (i, b) in p[t + TCP_MIN..].iter_mut().enumerate() {
            *b = if i + 1 == options { 0 } else { 1 }; // NOPs, then EOL
        }
        p.extend_from_slice(payload);
        let partial = fold(pseudo_sum(&p, NEXT_TCP, tcp_len + payload.len()));
        p[t + 16..t + 18].copy_from_slice(&partial.to_be_bytes());
        p
    }

    fn udp_super(payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; IPV6_HDR + UDP_HDR];
        p[0] = 0x60;
        let plen = (UDP_HDR + payload.len()) as u16;
        p[4..6].copy_from_slice(&plen.to_be_bytes());
        p[6] = NEXT_UDP;
        p[7] = 64;
        p[8..24].copy_from_slice(&SRC);
        p[24..40].copy_from_slice(&DST);
        p[40..42].copy_from_slice(&5353u16.to_be_bytes());
        p[42..44].copy_from_slice(&9651u16.to_be_bytes());
        p[44..46].copy_from_slice(&plen.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    fn checksum_ok(p: &[u8]) -> bool {
        verify_checksum(p)
    }

    fn hdr(gso_type: u8, gso_size: u16, hdr_len: usize) -> VnetHdr {
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: hdr_len as u16,
            gso_size,
            csum_start: IPV6_HDR as u16,
            csum_offset: if gso_type & !GSO_ECN == GSO_TCPV6 {
                16
            } else {
                6
            },
        }
    }

    fn segments(h: &VnetHdr, p: &[u8]) -> Vec<Vec<u8>> {
        let mut s = Segments::new(h, p).unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0xa5u8; s.max_segment_len()];
        while let Some(r) = s.next_into(&mut buf) {
            let n = r.unwrap();
            out.push(buf[..n].to_vec());
        }
        assert_eq!(out.len(), s.count());
        out
    }

    #[test]
    fn header_round_trip() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV6 | GSO_ECN,
            hdr_len: 60,
            gso_size: 1380,
            csum_start: 40,
            csum_offset: 16,
        };
        let mut b = [0xa5u8; LEN];
        h.emit(&mut b).unwrap();
        assert_eq!(b, [1, 0x84, 60, 0, 0x64, 0x05, 40, 0, 16, 0]);
        assert_eq!(VnetHdr::parse(&b), Ok(h));
        assert!(h.is_gso());
        assert!(!VnetHdr::parse(&NONE).unwrap().is_gso());
        assert_eq!(VnetHdr::parse(&b[..9]), Err(VnetError::Truncated));
    }

    #[test]
    fn tcp_segments_have_lengths_seqs_flags_and_checksums() {
        let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let flags = TCP_PSH | TCP_FIN | TCP_CWR | 0x10;
        let p = tcp_super(&payload, u32::MAX - 1000, flags, 12);
        let h = hdr(GSO_TCPV6 | GSO_ECN, 1388, IPV6_HDR + 32);
        let segs = segments(&h, &p);
        assert_eq!(segs.len(), 4);
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert!(checksum_ok(s), "segment {i} checksum");
            let plen = u16::from_be_bytes([s[4], s[5]]) as usize;
            assert_eq!(plen + IPV6_HDR, s.len());
            let seq = u32::from_be_bytes([s[44], s[45], s[46], s[47]]);
            assert_eq!(seq, (u32::MAX - 1000).wrapping_add(1388 * i as u32));
            let f = s[53];
            let last = i == segs.len() - 1;
            assert_eq!(f & (TCP_FIN | TCP_PSH) != 0, last);
            assert_eq!(f & TCP_CWR != 0, i == 0);
            assert_eq!(f & 0x10, 0x10, "ACK kept");
            assert_eq!(&s[..4], &p[..4]);
            assert_eq!(&s[6..40], &p[6..40]);
            joined.extend_from_slice(&s[IPV6_HDR + 32..]);
        }
        assert_eq!(joined, payload);
        assert_eq!(segs[3].len(), IPV6_HDR + 32 + 5000 - 3 * 1388);
    }

    #[test]
    fn partial_tcp_segments_complete_to_the_full_ones() {
        let payload: Vec<u8> = (0..4000u32).map(|i| (i * 13) as u8).collect();
        let p = tcp_super(&payload, 77, 0x10 | TCP_PSH, 12);
        let h = hdr(GSO_TCPV6, 1300, IPV6_HDR + 32);
        let full = segments(&h, &p);
        let mut s = Segments::new(&h, &p).unwrap().partial_tcp_checksum();
        let mut buf = vec![0xa5u8; s.max_segment_len()];
        let mut i = 0;
        while let Some(r) = s.next_into(&mut buf) {
            let seg = &mut buf[..r.unwrap()];
            assert_eq!(seg.len(), full[i].len());
            // Everything but the checksum field matches; the field is the pseudo-header sum.
            assert_eq!(&seg[..56], &full[i][..56]);
            assert_eq!(&seg[58..], &full[i][58..]);
            let mut again = seg.to_vec();
            assert!(set_partial_tcp_checksum(&mut again));
            assert_eq!(again, seg, "already partial");
            // Completing it as the kernel would (NEEDS_CSUM) gives the full checksum.
            let vh = VnetHdr {
                flags: F_NEEDS_CSUM,
                csum_start: TCP_CSUM_START,
                csum_offset: TCP_CSUM_OFFSET,
                ..VnetHdr::default()
            };
            complete_checksum(&vh, seg).unwrap();
            assert_eq!(seg, &full[i][..]);
            // And a full one turns partial again.
            let mut f = full[i].clone();
            assert!(set_partial_tcp_checksum(&mut f));
            complete_checksum(&vh, &mut f).unwrap();
            assert_eq!(f, full[i]);
            i += 1;
        }
        assert_eq!(i, full.len());
        let mut udp = udp_super(&payload[..100]);
        assert!(!set_partial_tcp_checksum(&mut udp));
        assert!(!set_partial_tcp_checksum(&mut [0u8; 10]));
    }

    #[test]
    fn udp_segments() {
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let p = udp_super(&payload);
        let segs = segments(&hdr(GSO_UDP_L4, 1200, IPV6_HDR + UDP_HDR), &p);
        assert_eq!(segs.len(), 3);
        for s in &segs {
            assert!(checksum_ok(s));
            let ulen = u16::from_be_bytes([s[44], s[45]]) as usize;
            assert_eq!(ulen + IPV6_HDR, s.len());
            assert_ne!(u16::from_be_bytes([s[46], s[47]]), 0);
        }
        assert_eq!(segs[2].len(), IPV6_HDR + UDP_HDR + 600);
    }

    #[test]
    fn complete_checksum_of_a_single_packet() {
        let mut p = tcp_super(b"hello, overlay", 1, 0x18, 0);
        let h = VnetHdr {
            csum_offset: 16,
            ..hdr(GSO_NONE, 0, IPV6_HDR + TCP_MIN)
        };
        assert!(!checksum_ok(&p));
        complete_checksum(&h, &mut p).unwrap();
        assert!(checksum_ok(&p));
        let bad = VnetHdr {
            csum_offset: 1000,
            ..h
        };
        assert_eq!(
            complete_checksum(&bad, &mut p),
            Err(VnetError::BadCsumOffset)
        );
    }

    #[test]
    fn fill_and_verify_icmpv6_udp_tcp() {
        let mut tcp = tcp_super(b"abc", 9, 0x18, 4);
        let mut udp = udp_super(b"defg");
        let mut icmp = udp_super(&[0u8; 12]);
        icmp[6] = NEXT_ICMPV6;
        icmp[40] = 128;
        for p in [&mut tcp, &mut udp, &mut icmp] {
            p[45] ^= 0x55; // break whatever checksum was there
            fill_checksum(p).unwrap();
            assert!(verify_checksum(p));
            p[50] ^= 1;
            assert!(!verify_checksum(p));
        }
        let mut other = udp_super(b"x");
        other[6] = 59; // no next header
        assert_eq!(
            fill_checksum(&mut other),
            Err(VnetError::UnsupportedGso(59))
        );
        assert!(!verify_checksum(&other));
        assert!(!verify_checksum(&other[..20]));
    }

    #[test]
    fn malformed_input_is_an_error() {
        let p = tcp_super(&[0; 100], 1, 0x10, 0);
        let h = hdr(GSO_TCPV6, 50, IPV6_HDR + TCP_MIN);
        assert_eq!(
            Segments::new(&h, &p[..30]).err(),
            Some(VnetError::Truncated)
        );
        assert_eq!(Segments::new(&h, &p[..100]).err(), Some(VnetError::BadIpv6));
        assert_eq!(
            Segments::new(&hdr(GSO_UDP_L4, 50, 48), &p).err(),
            Some(VnetError::UnsupportedGso(GSO_UDP_L4))
        );
        assert_eq!(
            Segments::new(&hdr(GSO_TCPV6, 0, 60), &p).err(),
            Some(VnetError::ZeroGsoSize)
        );
        let mut short_off = p.clone();
        short_off[IPV6_HDR + 12] = 0x40; // data offset 16 bytes
        assert_eq!(
            Segments::new(&h, &short_off).err(),
            Some(VnetError::Truncated)
        );
        let mut s = Segments::new(&h, &p).unwrap();
        let mut small = [0u8; 60];
        assert_eq!(
            s.next_into(&mut small),
            Some(Err(VnetError::OutputTooSmall))
        );
    }

    /// RFC 1071 the slow way: u16 words, end-around carry.
    fn naive_sum(data: &[u8]) -> u16 {
        let mut sum = 0u32;
        for c in data.chunks(2) {
            let w = u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0));
            sum += w;
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    proptest! {
        #[test]
        fn wide_sum_matches_rfc1071(
            data in prop::collection::vec(any::<u8>(), 0..3000),
            seed in any::<u16>(),
        ) {
            let wide = fold(sum_bytes(u64::from(seed), &data));
            let mut with_seed = vec![(seed >> 8) as u8, seed as u8];
            with_seed.extend_from_slice(&data);
            let narrow = naive_sum(&with_seed);
            // 0x0000 and 0xffff are the same number in ones' complement.
            prop_assert!(wide == narrow || (wide.is_multiple_of(0xffff) && narrow.is_multiple_of(0xffff)));
            // All-ones data sums to the ones'-complement "negative zero".
            prop_assert_eq!(fold(sum_bytes(0, &[0xff; 64])), 0xffff);
        }

        #[test]
        fn any_tcp_super_packet_splits_correctly(
            len in 0usize..20_000,
            mss in 1u16..2000,
            seq in any::<u32>(),
            options in (0usize..=10).prop_map(|o| o * 4),
            flags in any::<u8>(),
        ) {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let p = tcp_super(&payload, seq, flags, options);
            let h = hdr(GSO_TCPV6, mss, IPV6_HDR + TCP_MIN + options);
            let segs = segments(&h, &p);
            prop_assert_eq!(segs.len(), len.div_ceil(mss as usize).max(1));
            let mut joined = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                prop_assert!(checksum_ok(s));
                prop_assert!(s.len() <= IPV6_HDR + TCP_MIN + options + mss as usize);
                let got = u32::from_be_bytes([s[44], s[45], s[46], s[47]]);
                prop_assert_eq!(got, seq.wrapping_add(i as u32 * u32::from(mss)));
                joined.extend_from_slice(&s[IPV6_HDR + TCP_MIN + options..]);
            }
            prop_assert_eq!(joined, payload);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(h) = VnetHdr::parse(&bytes) {
                let rest = bytes.get(LEN..).unwrap_or(&[]);
                if let Ok(mut s) = Segments::new(&h, rest) {
                    let mut out = [0u8; 256];
                    for _ in 0..300 {
                        if s.next_into(&mut out).is_none() {
                            break;
                        }
                    }
                }
                let mut copy = rest.to_vec();
                let _ = complete_checksum(&h, &mut copy);
            }
        }
    }
}
