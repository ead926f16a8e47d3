//! The forwarding decisions, without I/O (DESIGN.md, "Dataplane"): what happens to a packet read
//! from the TUN ([`outbound`]) and to a datagram received on the UDP port ([`inbound`]). The
//! workers do the I/O the returned action names; these functions only parse, look up, rewrite and
//! encrypt or decrypt in place.
//!
//! Outbound: IPv6 destination → FIB longest-prefix match → next-hop peer → session for the
//! destination /64 → data header pushed into the headroom → sealed in place, tag into the
//! tailroom. Inbound, by first byte: DATA for our /64 → session by receiver index → replay check,
//! decrypt, replay accept → inner type (IPv6 to the TUN, message-bus frames punted); DATA for
//! someone else → hop limit − 1 → FIB → forwarded unchanged; control frames → punted.

use std::net::Ipv6Addr;

use hypha_proto::time::Instant;
use hypha_proto::wire::data::{self, Kind, Packet, PayloadType, Repr, HEADER_LEN};
use hypha_proto::wire::FrameType;

use crate::counters::Counter;
use crate::fib::Fib;
use crate::icmp::ipv6_addrs;
use crate::pool::PacketBuf;
use crate::session::{SessionError, SessionSet, TAG_LEN};
use crate::state::{upper64, PeerAddr, PeerTable};

/// The hop limit a locally originated data packet starts with.
pub const INITIAL_HOP_LIMIT: u8 = 64;

/// One batch's view of the published tables.
pub struct Tables<'a> {
    /// The FIB.
    pub fib: &'a Fib,
    /// The sessions.
    pub sessions: &'a SessionSet,
    /// The neighbours' addresses.
    pub peers: &'a PeerTable,
    /// Our /64.
    pub prefix: u64,
    /// The batch's time.
    pub now: Instant,
}

/// What to do with a packet read from the TUN.
#[derive(Debug)]
pub enum Outbound {
    /// The buffer now holds the sealed datagram: send it to this peer.
    Send(PeerAddr),
    /// No route to the destination: answer with ICMPv6 unreachable, tell the control plane.
    NoRoute(Ipv6Addr),
    /// No (usable) session to the destination /64: queue the packet, tell the control plane.
    NoSession(Ipv6Addr),
    /// Drop and count.
    Drop(Counter),
}

/// Routes and seals an IPv6 packet from the TUN. `buf` holds exactly the packet (virtio header
/// already pulled); on [`Outbound::Send`] it holds the datagram, otherwise it is unchanged.
pub fn outbound(t: &Tables<'_>, buf: &mut PacketBuf) -> Outbound {
    let Some((src, dst)) = ipv6_addrs(buf.data()) else {
        return Outbound::Drop(Counter::dropped_malformed);
    };
    let dst_prefix = upper64(&dst);
    if dst_prefix == t.prefix {
        // Our own /64 is local: the kernel never routes it into the TUN unless misconfigured.
        return Outbound::Drop(Counter::dropped_malformed);
    }
    let Some(hop) = t.fib.lookup(&dst) else {
        return Outbound::NoRoute(dst);
    };
    let Some(session) = t.sessions.for_dest(dst_prefix) else {
        return Outbound::NoSession(dst);
    };
    let Some(peer) = t.peers.get(hop.peer) else {
        return Outbound::Drop(Counter::dropped_no_peer);
    };
    let counter = match session.next_counter(t.now) {
        Ok(c) => c,
        Err(_) => return Outbound::NoSession(dst),
    };
    let repr = Repr {
        hop_limit: INITIAL_HOP_LIMIT,
        kind: Kind::Transport,
        receiver_index: session.remote_index(),
        counter,
        src,
        dst,
    };
    match seal(session, &repr, buf) {
        Ok(()) => Outbound::Send(*peer),
        Err(c) => Outbound::Drop(c),
    }
}

/// The next hop and session for a locally originated packet to `dst`, or what to do instead.
pub fn route<'t>(
    t: &'t Tables<'_>,
    dst: &Ipv6Addr,
) -> Result<(PeerAddr, &'t std::sync::Arc<crate::session::Session>), Outbound> {
    let dst_prefix = upper64(dst);
    if dst_prefix == t.prefix {
        return Err(Outbound::Drop(Counter::dropped_malformed));
    }
    let Some(hop) = t.fib.lookup(dst) else {
        return Err(Outbound::NoRoute(*dst));
    };
    let Some(session) = t.sessions.for_dest(dst_prefix) else {
        return Err(Outbound::NoSession(*dst));
    };
    let Some(peer) = t.peers.get(hop.peer) else {
        return Err(Outbound::Drop(Counter::dropped_no_peer));
    };
    Ok((*peer, session))
}

/// Seals one datagram laid out in `dgram`: the header `repr` is written into the first 48 bytes,
/// `dgram[48..48 + plain_len]` (inner type byte first) is encrypted in place and the tag written
/// behind it. Returns the datagram length.
pub fn seal_slice(
    session: &crate::session::Session,
    repr: &Repr,
    dgram: &mut [u8],
    plain_len: usize,
) -> Option<usize> {
    let (hdr, rest) = dgram.split_at_mut_checked(HEADER_LEN)?;
    let mut packet = Packet::new_unchecked(&mut *hdr);
    repr.emit(&mut packet);
    let mut aad = [0u8; HEADER_LEN];
    packet.aad(&mut aad);
    session
        .seal_in_place_append(repr.counter, &aad, rest, plain_len)
        .ok()
        .map(|n| HEADER_LEN + n)
}

/// Prepends the inner type byte (IPv6) and the data header `repr`, and seals the payload in place
/// with the tag in the tailroom. On error the buffer may have been changed (drop it).
pub fn seal(
    session: &crate::session::Session,
    repr: &Repr,
    buf: &mut PacketBuf,
) -> Result<(), Counter> {
    buf.push_header(1)
        .map_err(|_| Counter::dropped_malformed)?
        .copy_from_slice(&[PayloadType::Ipv6 as u8]);
    seal_payload(session, repr, buf)
}

/// Like [`seal`], for a buffer that already starts with the inner type byte.
pub fn seal_payload(
    session: &crate::session::Session,
    repr: &Repr,
    buf: &mut PacketBuf,
) -> Result<(), Counter> {
    if buf.tailroom() < TAG_LEN {
        return Err(Counter::dropped_malformed);
    }
    let header = buf
        .push_header(HEADER_LEN)
        .map_err(|_| Counter::dropped_malformed)?;
    let mut packet = Packet::new_unchecked(header);
    repr.emit(&mut packet);
    let mut aad = [0u8; HEADER_LEN];
    packet.aad(&mut aad);
    let len = buf.len() - HEADER_LEN;
    let body = buf
        .data_and_tail_mut()
        .get_mut(HEADER_LEN..)
        .ok_or(Counter::dropped_malformed)?;
    session
        .seal_in_place_append(repr.counter, &aad, body, len)
        .map_err(|_| Counter::dropped_malformed)?;
    buf.extend_tail(TAG_LEN)
        .map_err(|_| Counter::dropped_malformed)?;
    Ok(())
}

/// What to do with a datagram received on the UDP port.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// Decrypted IPv6 packet for the TUN at `seg[start..start + len]` (at least 49 bytes of the
    /// datagram precede it, so a virtio header fits in front).
    ToTun {
        /// Offset of the IPv6 packet in the datagram.
        start: usize,
        /// Its length.
        len: usize,
    },
    /// A message-bus frame for us: `seg[..len]` is the header followed by the decrypted payload
    /// (inner type byte first, tag removed); punt it.
    PuntDecrypted {
        /// Bytes to punt.
        len: usize,
    },
    /// Punt the datagram as it is (control frame, or an E2E handshake for us).
    Punt(hypha_proto::shm::PuntReason),
    /// Forward the datagram (hop limit already decremented) to this peer.
    Forward(PeerAddr),
    /// Drop and count.
    Drop(Counter),
}

fn session_error(e: SessionError) -> Counter {
    match e {
        SessionError::Replay(_) => Counter::dropped_replay,
        SessionError::Auth | SessionError::Short => Counter::dropped_auth,
        SessionError::Expired | SessionError::CounterExhausted => Counter::dropped_expired,
        _ => Counter::dropped_malformed,
    }
}

/// Decides about one received datagram, decrypting or rewriting it in place.
pub fn inbound(t: &Tables<'_>, seg: &mut [u8]) -> Inbound {
    use hypha_proto::shm::PuntReason;
    let frame = match FrameType::of(seg) {
        Ok(f) => f,
        Err(_) => return Inbound::Drop(Counter::dropped_malformed),
    };
    if frame.is_control() {
        return Inbound::Punt(PuntReason::ControlFrame);
    }
    let mut packet = match Packet::new_checked(&mut *seg) {
        Ok(p) => p,
        Err(_) => return Inbound::Drop(Counter::dropped_malformed),
    };
    let dst = packet.dst_addr();
    if upper64(&dst) != t.prefix {
        return transit(t, &mut packet, &dst);
    }
    let kind = match packet.kind() {
        Ok(k) => k,
        Err(_) => return Inbound::Drop(Counter::dropped_malformed),
    };
    if kind != Kind::Transport {
        return Inbound::Punt(PuntReason::LocalDelivery);
    }
    let Some(session) = t.sessions.get(packet.receiver_index()) else {
        return Inbound::Drop(Counter::dropped_unknown_session);
    };
    let mut aad = [0u8; HEADER_LEN];
    packet.aad(&mut aad);
    let counter = packet.counter();
    let outer_src = packet.src_addr();
    let plain_len = match session.open_in_place(t.now, counter, &aad, packet.payload_mut()) {
        Ok(plain) => plain.len(),
        Err(e) => return Inbound::Drop(session_error(e)),
    };
    // The session authenticates its peer's /64: nothing else may appear as the source.
    if upper64(&outer_src) != session.remote_prefix() {
        return Inbound::Drop(Counter::dropped_spoofed);
    }
    let plain = match seg.get(HEADER_LEN..HEADER_LEN + plain_len) {
        Some(p) => p,
        None => return Inbound::Drop(Counter::dropped_malformed),
    };
    match plain.first().map(|b| PayloadType::try_from(*b)) {
        Some(Ok(PayloadType::Ipv6)) => {
            let inner = plain.get(1..).unwrap_or(&[]);
            let Some((src, dst)) = ipv6_addrs(inner) else {
                return Inbound::Drop(Counter::dropped_malformed);
            };
            if upper64(&src) != session.remote_prefix() || upper64(&dst) != t.prefix {
                return Inbound::Drop(Counter::dropped_spoofed);
            }
            Inbound::ToTun {
                start: HEADER_LEN + 1,
                len: plain_len - 1,
            }
        }
        Some(Ok(PayloadType::Message)) => Inbound::PuntDecrypted {
            len: HEADER_LEN + plain_len,
        },
        _ => Inbound::Drop(Counter::dropped_malformed),
    }
}

fn transit(t: &Tables<'_>, packet: &mut Packet<&mut [u8]>, dst: &Ipv6Addr) -> Inbound {
    match packet.decrement_hop_limit() {
        Some(n) if n > 0 => {}
        _ => return Inbound::Drop(Counter::dropped_hop_limit),
    }
    let Some(hop) = t.fib.lookup(dst) else {
        return Inbound::Drop(Counter::dropped_no_route);
    };
    match t.peers.get(hop.peer) {
        Some(peer) => Inbound::Forward(*peer),
        None => Inbound::Drop(Counter::dropped_no_peer),
    }
}

/// The destination and kind of a DATA frame the control plane wants sent. A TRANSPORT frame from
/// the control plane carries plaintext without a tag yet, so only the header is checked.
pub fn data_dst(bytes: &[u8]) -> Option<(Ipv6Addr, Kind)> {
    let header = bytes.get(..HEADER_LEN)?;
    if FrameType::of(header).ok()? != FrameType::Data {
        return None;
    }
    let packet = data::Packet::new_unchecked(header);
    Some((packet.dst_addr(), packet.kind().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fib::{FibHasherBuilder, NextHop, Prefix};
    use crate::pool::{BufLayout, PacketPool};
    use crate::session::{Cipher, Session, SessionParams, SessionTable};
    use std::sync::Arc;

    const A: &str = "4aa:1:2:3::1";
    const B: &str = "5bb:4:5:6::2";
    const C: &str = "4cc:7:8:9::3";

    fn addr(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn ipv6_packet(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        p[6] = 59;
        p[7] = 64;
        p[8..24].copy_from_slice(&addr(src).octets());
        p[24..40].copy_from_slice(&addr(dst).octets());
        p.extend_from_slice(payload);
        p
    }

    struct Node {
        fib: Fib,
        sessions: SessionTable,
        peers: PeerTable,
        prefix: u64,
    }

    impl Node {
        fn tables(&self) -> (arc_swap::Guard<Arc<SessionSet>>, &Fib, &PeerTable, u64) {
            (self.sessions.load(), &self.fib, &self.peers, self.prefix)
        }
    }

    /// a and b with a session between them; a routes b's /64 (and c's) via peer 1.
    fn pair() -> (Node, Node) {
        let now = Instant::from_micros(0);
        let (ka, kb) = ([1u8; 32], [2u8; 32]);
        let mk = |me: &str, other: &str, local, remote, send, recv| {
            let sessions = SessionTable::new();
            let params = SessionParams {
                local_index: local,
                remote_index: remote,
                remote_prefix: upper64(&addr(other)),
                cipher: Cipher::Aes256Gcm,
                send_key: send,
                recv_key: recv,
                initiator: false,
                send_counter: 0,
                replay_base: 0,
            };
            sessions.insert(Arc::new(Session::new(&params, now).unwrap()), true);
            let fib = Fib::from_routes(
                FibHasherBuilder::with_seed(7),
                [
                    (
                        Prefix::slash64(upper64(&addr(other))),
                        NextHop { peer: 1, metric: 1 },
                    ),
                    (
                        Prefix::slash64(upper64(&addr(C))),
                        NextHop { peer: 1, metric: 1 },
                    ),
                ],
            );
            let mut peers = PeerTable::default();
            peers.set(1, Some("10.0.0.2:9651".parse().unwrap()));
            Node {
                fib,
                sessions,
                peers,
                prefix: upper64(&addr(me)),
            }
        };
        (mk(A, B, 10, 20, ka, kb), mk(B, A, 20, 10, kb, ka))
    }

    fn run_out(n: &Node, buf: &mut PacketBuf) -> Outbound {
        let (s, fib, peers, prefix) = n.tables();
        let t = Tables {
            fib,
            sessions: &s,
            peers,
            prefix,
            now: Instant::from_micros(1),
        };
        outbound(&t, buf)
    }

    fn run_in(n: &Node, seg: &mut [u8]) -> Inbound {
        let (s, fib, peers, prefix) = n.tables();
        let t = Tables {
            fib,
            sessions: &s,
            peers,
            prefix,
            now: Instant::from_micros(2),
        };
        inbound(&t, seg)
    }

    #[test]
    fn sealed_on_a_opens_on_b_once() {
        let (a, b) = pair();
        let mut pool = PacketPool::new(2, BufLayout::MTU).unwrap();
        let mut buf = pool.alloc().unwrap();
        let ip = ipv6_packet(A, B, b"hello overlay");
        buf.extend_tail(ip.len()).unwrap().copy_from_slice(&ip);
        match run_out(&a, &mut buf) {
            Outbound::Send(p) => assert_eq!(p.addr, "10.0.0.2:9651".parse().unwrap()),
            other => panic!("{other:?}"),
        }
        assert_eq!(buf.len(), HEADER_LEN + 1 + ip.len() + TAG_LEN);
        let wire = buf.data().to_vec();
        assert_eq!(wire[0], 0x01);
        assert_eq!(wire[1], INITIAL_HOP_LIMIT);
        assert_eq!(&wire[4..8], &20u32.to_be_bytes());

        let mut seg = wire.clone();
        assert_eq!(
            run_in(&b, &mut seg),
            Inbound::ToTun {
                start: 49,
                len: ip.len()
            }
        );
        assert_eq!(&seg[49..49 + ip.len()], &ip[..]);

        // The same bytes again: a replay.
        let mut again = wire.clone();
        assert_eq!(
            run_in(&b, &mut again),
            Inbound::Drop(Counter::dropped_replay)
        );

        // A flipped ciphertext bit under a fresh counter: authentication fails. (The counter is
        // part of the AAD, so take a fresh packet.)
        let mut buf2 = pool.alloc().unwrap();
        buf2.extend_tail(ip.len()).unwrap().copy_from_slice(&ip);
        assert!(matches!(run_out(&a, &mut buf2), Outbound::Send(_)));
        let mut bad = buf2.data().to_vec();
        bad[60] ^= 0x01;
        assert_eq!(run_in(&b, &mut bad), Inbound::Drop(Counter::dropped_auth));
        // The hop limit is not authenticated: changing it still opens.
        let mut hop = buf2.data().to_vec();
        hop[1] = 3;
        assert!(matches!(run_in(&b, &mut hop), Inbound::ToTun { .. }));
    }

    #[test]
    fn transit_decrements_and_expires() {
        let (a, b) = pair();
        let mut pool = PacketPool::new(1, BufLayout::MTU).unwrap();
        let mut buf = pool.alloc().unwrap();
        let ip = ipv6_packet(B, C, b"to c via a");
        buf.extend_tail(ip.len()).unwrap().copy_from_slice(&ip);
        // b has no session to c.
        assert_eq!(
            format!("{:?}", run_out(&b, &mut buf)),
            format!("{:?}", Outbound::NoSession(addr(C)))
        );
        // A hand-made TRANSPORT frame to c arriving at a: forwarded with hop limit − 1.
        let mut frame = vec![0u8; HEADER_LEN + 40];
        let repr = Repr {
            hop_limit: 2,
            kind: Kind::Transport,
            receiver_index: 5,
            counter: 0,
            src: addr(B),
            dst: addr(C),
        };
        repr.emit(&mut Packet::new_unchecked(&mut frame[..]));
        assert!(matches!(run_in(&a, &mut frame), Inbound::Forward(_)));
        assert_eq!(frame[1], 1);
        assert_eq!(
            run_in(&a, &mut frame),
            Inbound::Drop(Counter::dropped_hop_limit)
        );
        // Unknown destination: no route.
        let mut lost = frame.clone();
        lost[1] = 9;
        lost[32..48].copy_from_slice(&addr("4dd::1").octets());
        assert_eq!(
            run_in(&a, &mut lost),
            Inbound::Drop(Counter::dropped_no_route)
        );
    }

    #[test]
    fn control_frames_punt_and_garbage_drops() {
        let (a, _) = pair();
        let mut link = vec![
            0x02, 1, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(
            run_in(&a, &mut link),
            Inbound::Punt(hypha_proto::shm::PuntReason::ControlFrame)
        );
        for mut junk in [vec![], vec![0x00; 10], vec![0x09; 60], vec![0x01; 20]] {
            assert_eq!(
                run_in(&a, &mut junk),
                Inbound::Drop(Counter::dropped_malformed)
            );
        }
        // Data for us with an unknown receiver index.
        let mut frame = vec![0u8; HEADER_LEN + 40];
        let repr = Repr {
            hop_limit: 2,
            kind: Kind::Transport,
            receiver_index: 999,
            counter: 0,
            src: addr(B),
            dst: addr(A),
        };
        repr.emit(&mut Packet::new_unchecked(&mut frame[..]));
        assert_eq!(
            run_in(&a, &mut frame),
            Inbound::Drop(Counter::dropped_unknown_session)
        );
        // An E2E handshake for us is punted.
        let repr = Repr {
            kind: Kind::HandshakeInit,
            receiver_index: 0,
            ..repr
        };
        repr.emit(&mut Packet::new_unchecked(&mut frame[..]));
        assert_eq!(
            run_in(&a, &mut frame),
            Inbound::Punt(hypha_proto::shm::PuntReason::LocalDelivery)
        );
    }

    #[test]
    fn no_route_is_reported() {
        let (a, _) = pair();
        let mut pool = PacketPool::new(1, BufLayout::MTU).unwrap();
        let mut buf = pool.alloc().unwrap();
        let ip = ipv6_packet(A, "4ee::5", b"x");
        buf.extend_tail(ip.len()).unwrap().copy_from_slice(&ip);
        assert!(matches!(run_out(&a, &mut buf), Outbound::NoRoute(d) if d == addr("4ee::5")));
        assert_eq!(buf.data(), &ip[..]);
    }
}
