//! Deterministic tests of the link layer: several `LinkLayer`s wired together in memory on a
//! virtual clock (quinn-proto's `Pair` harness, generalised to N nodes).

use super::*;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

const LATENCY: Duration = Duration::from_millis(10);

fn addr(host: u8, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, host), port))
}

fn secret(i: u8) -> [u8; 32] {
    [i; 32]
}

fn public(secret: [u8; 32]) -> [u8; 32] {
    *SecretKey::from_bytes(secret).public_key().as_bytes()
}

const LINK_INIT: u8 = ControlType::LinkInit as u8;
const LINK_RESP: u8 = ControlType::LinkResp as u8;
const LINK_FINISH: u8 = ControlType::LinkFinish as u8;
const LINK_DATA: u8 = ControlType::LinkData as u8;

struct Node {
    ll: LinkLayer,
    addr: SocketAddr,
    events: Vec<LinkEvent>,
    errors: Vec<LinkError>,
    alive: bool,
}

type Filter = Box<dyn FnMut(SocketAddr, SocketAddr, &mut Vec<u8>) -> bool>;

/// Nodes, a wire with fixed latency, a tap of everything sent and a filter that may drop or alter.
struct World {
    now: Instant,
    nodes: Vec<Node>,
    wire: BTreeMap<(Instant, u64), (SocketAddr, SocketAddr, Vec<u8>)>,
    seq: u64,
    tap: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
    filter: Filter,
}

impl World {
    fn new() -> Self {
        World {
            now: Instant::from_secs(1000),
            nodes: Vec::new(),
            wire: BTreeMap::new(),
            seq: 0,
            tap: Vec::new(),
            filter: Box::new(|_, _, _| true),
        }
    }

    fn cfg(i: u8) -> LinkConfig {
        let mut cfg = LinkConfig::new(secret(i));
        cfg.seed = u64::from(i);
        cfg
    }

    fn add(&mut self, cfg: LinkConfig, addr: SocketAddr) -> usize {
        self.nodes.push(Node {
            ll: LinkLayer::new(cfg, self.now),
            addr,
            events: Vec::new(),
            errors: Vec::new(),
            alive: true,
        });
        self.nodes.len() - 1
    }

    fn collect(&mut self, i: usize) {
        let mut buf = Vec::new();
        let node = &mut self.nodes[i];
        while let Some(to) = node.ll.poll_transmit(&mut buf) {
            self.tap.push((node.addr, to, buf.clone()));
            let mut d = buf.clone();
            if (self.filter)(node.addr, to, &mut d) {
                self.seq += 1;
                self.wire
                    .insert((self.now + LATENCY, self.seq), (node.addr, to, d));
            }
        }
        while let Some(ev) = node.ll.poll_event() {
            node.events.push(ev);
        }
    }

    /// The process stops: no timers, nothing delivered, its address free for another node.
    fn kill(&mut self, i: usize) {
        self.nodes[i].alive = false;
    }

    fn connect(&mut self, i: usize, j: usize) {
        let to = self.nodes[j].addr;
        self.nodes[i].ll.connect(self.now, to);
        self.collect(i);
    }

    fn send(&mut self, i: usize, link: LinkId, payload: &[u8]) -> Result<(), LinkError> {
        let r = self.nodes[i]
            .ll
            .send(self.now, link, Channel::Babel, payload);
        self.collect(i);
        r
    }

    /// Delivers a datagram now, bypassing the wire.
    fn inject(&mut self, i: usize, from: SocketAddr, d: &[u8]) -> Result<(), LinkError> {
        let r = self.nodes[i].ll.handle_datagram(self.now, from, d);
        self.collect(i);
        r
    }

    fn run_until(&mut self, limit: Instant) {
        for _ in 0..1_000_000 {
            let next_wire = self.wire.keys().next().map(|k| k.0);
            let next_timer = self
                .nodes
                .iter()
                .filter(|n| n.alive)
                .filter_map(|n| n.ll.poll_timeout())
                .min();
            let next = match (next_wire, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(t) => t,
                    None => break,
                },
            };
            if next > limit {
                break;
            }
            self.now = self.now.max(next);
            if next_wire == Some(next) {
                let Some((_, (from, to, d))) = self.wire.pop_first() else {
                    continue;
                };
                if let Some(i) = self.nodes.iter().position(|n| n.alive && n.addr == to) {
                    if let Err(e) = self.nodes[i].ll.handle_datagram(self.now, from, &d) {
                        self.nodes[i].errors.push(e);
                    }
                    self.collect(i);
                }
            } else {
                for i in 0..self.nodes.len() {
                    let due = self.nodes[i]
                        .ll
                        .poll_timeout()
                        .is_some_and(|t| t <= self.now);
                    if self.nodes[i].alive && due {
                        self.nodes[i].ll.handle_timeout(self.now);
                        self.collect(i);
                    }
                }
            }
        }
        self.now = self.now.max(limit);
    }

    fn run_for(&mut self, d: Duration) {
        let limit = self.now + d;
        self.run_until(limit);
    }

    fn ups(&self, i: usize) -> Vec<(LinkId, SocketAddr, [u8; 32])> {
        self.nodes[i]
            .events
            .iter()
            .filter_map(|e| match e {
                LinkEvent::Up {
                    link,
                    remote,
                    peer_key,
                } => Some((*link, *remote, *peer_key)),
                _ => None,
            })
            .collect()
    }

    fn downs(&self, i: usize) -> Vec<(LinkId, DownReason)> {
        self.nodes[i]
            .events
            .iter()
            .filter_map(|e| match e {
                LinkEvent::Down { link, reason } => Some((*link, *reason)),
                _ => None,
            })
            .collect()
    }

    fn received(&self, i: usize) -> Vec<Vec<u8>> {
        self.nodes[i]
            .events
            .iter()
            .filter_map(|e| match e {
                LinkEvent::Received {
                    channel: Channel::Babel,
                    payload,
                    ..
                } => Some(payload.clone()),
                _ => None,
            })
            .collect()
    }

    fn failures(&self, i: usize) -> Vec<HandshakeFailure> {
        self.nodes[i]
            .events
            .iter()
            .filter_map(|e| match e {
                LinkEvent::HandshakeFailed { reason, .. } => Some(*reason),
                _ => None,
            })
            .collect()
    }

    fn only_link(&self, i: usize) -> LinkView {
        let links: Vec<LinkView> = self.nodes[i].ll.links().collect();
        assert_eq!(links.len(), 1, "node {i} links: {links:?}");
        links[0].clone()
    }

    /// Tapped datagrams of one frame type from `from`.
    fn tapped(&self, from: SocketAddr, frame_type: u8) -> Vec<Vec<u8>> {
        self.tap
            .iter()
            .filter(|(f, _, d)| *f == from && d.first() == Some(&frame_type))
            .map(|(_, _, d)| d.clone())
            .collect()
    }
}

/// Two nodes, `a` connects to `b`, both up.
fn pair() -> World {
    let mut w = World::new();
    w.add(World::cfg(1), addr(1, 9651));
    w.add(World::cfg(2), addr(2, 9651));
    w.connect(0, 1);
    w.run_for(Duration::from_millis(100));
    w
}

#[test]
fn handshake_completes_with_both_keys() {
    let w = pair();
    let a = w.ups(0);
    let b = w.ups(1);
    assert_eq!(a.len(), 1);
    assert_eq!(b.len(), 1);
    assert_eq!(a[0].1, addr(2, 9651));
    assert_eq!(a[0].2, public(secret(2)));
    assert_eq!(b[0].1, addr(1, 9651));
    assert_eq!(b[0].2, public(secret(1)));
    assert_eq!(w.nodes[0].ll.public_key(), public(secret(1)));
    let la = w.only_link(0);
    assert_eq!(la.state, LinkState::Up);
    assert_eq!(la.peer_key, public(secret(2)));
    // 1.5 RTT plus the confirming keepalive: exactly three handshake messages, no retries.
    assert_eq!(w.tapped(addr(1, 9651), LINK_INIT).len(), 1);
    assert_eq!(w.tapped(addr(2, 9651), LINK_RESP).len(), 1);
    assert_eq!(w.tapped(addr(1, 9651), LINK_FINISH).len(), 1);
    for n in &w.nodes {
        assert_eq!(n.ll.counters().handshakes_completed, 1);
        assert_eq!(n.ll.table_sizes().handshakes, 0);
        assert_eq!(n.ll.table_sizes().half_open, 0);
        assert!(n.errors.is_empty(), "{:?}", n.errors);
    }
}

#[test]
fn wire_format_of_handshake_and_data() {
    let mut w = pair();
    let init = &w.tapped(addr(1, 9651), LINK_INIT)[0];
    assert_eq!(init.len(), 20 + 32);
    assert_eq!(&init[1..4], &[1, 0, 32]);
    assert_eq!(&init[8..20], &[0; 12]);
    let resp = &w.tapped(addr(2, 9651), LINK_RESP)[0];
    assert_eq!(resp.len(), 20 + 96);
    // LINK_RESP's receiver index is LINK_INIT's sender index.
    assert_eq!(&resp[8..12], &init[4..8]);
    let fin = &w.tapped(addr(1, 9651), LINK_FINISH)[0];
    assert_eq!(fin.len(), 20 + 64);
    assert_eq!(&fin[4..8], &[0; 4]);
    assert_eq!(&fin[8..12], &resp[4..8]);
    let id = w.only_link(0).id;
    w.send(0, id, b"babel").expect("send");
    let data = w.tapped(addr(1, 9651), LINK_DATA);
    let d = data.last().expect("data");
    assert_eq!(d.len(), 20 + 1 + 5 + 16);
    assert_eq!(&d[2..4], &(22u16).to_be_bytes());
    // Receiver index: the responder's index; counter 0 (first frame a sends).
    assert_eq!(&d[8..12], &resp[4..8]);
    assert_eq!(&d[12..20], &[0; 8]);
}

#[test]
fn data_round_trip_both_ways() {
    let mut w = pair();
    let la = w.only_link(0).id;
    let lb = w.only_link(1).id;
    w.send(0, la, b"hello b").expect("send");
    w.send(1, lb, b"hello a").expect("send");
    w.send(0, la, &[0xAB; 1400]).expect("send");
    w.run_for(Duration::from_millis(100));
    assert_eq!(w.received(1), vec![b"hello b".to_vec(), vec![0xAB; 1400]]);
    assert_eq!(w.received(0), vec![b"hello a".to_vec()]);
    assert!(w.only_link(1).rx_bytes > 1400);
    assert!(w.only_link(0).tx_bytes > 1400);
    assert_eq!(
        w.send(0, LinkId(999), b"x"),
        Err(LinkError::UnknownLink(LinkId(999)))
    );
    assert!(matches!(
        w.send(0, la, &vec![0; 70_000]),
        Err(LinkError::PayloadTooLarge(70_000))
    ));
}

#[test]
fn replayed_data_dropped_and_counted() {
    let mut w = pair();
    let la = w.only_link(0).id;
    w.send(0, la, b"once").expect("send");
    w.run_for(Duration::from_millis(100));
    assert_eq!(w.received(1).len(), 1);
    let frame = w
        .tapped(addr(1, 9651), LINK_DATA)
        .last()
        .cloned()
        .expect("frame");
    assert_eq!(
        w.inject(1, addr(1, 9651), &frame),
        Err(LinkError::Replay(0))
    );
    assert_eq!(w.nodes[1].ll.counters().replay_duplicate, 1);
    assert_eq!(w.received(1).len(), 1);
    // Far behind the window: sent a few thousand frames later, the first one is too old.
    let first = frame;
    for i in 0..5000u32 {
        w.nodes[0]
            .ll
            .send(w.now, la, Channel::Babel, &i.to_be_bytes())
            .expect("send");
        w.collect(0);
        if i % 500 == 0 {
            w.run_for(Duration::from_millis(20));
        }
    }
    w.run_for(Duration::from_millis(100));
    assert_eq!(w.received(1).len(), 5001);
    assert_eq!(
        w.inject(1, addr(1, 9651), &first),
        Err(LinkError::TooOld(0))
    );
    assert_eq!(w.nodes[1].ll.counters().replay_too_old, 1);
}

#[test]
fn reordered_data_accepted_once() {
    let mut w = pair();
    let la = w.only_link(0).id;
    // Hold back the frames, then deliver them in reverse order.
    w.filter = Box::new(|_, _, d| d.first() != Some(&LINK_DATA));
    for i in 0..50u8 {
        w.send(0, la, &[i]).expect("send");
    }
    let frames = w.tapped(addr(1, 9651), LINK_DATA);
    for f in frames.iter().rev() {
        w.inject(1, addr(1, 9651), f)
            .expect("reordered frame accepted");
    }
    let got: Vec<u8> = w.received(1).iter().map(|p| p[0]).collect();
    let want: Vec<u8> = (0..50u8).rev().collect();
    assert_eq!(got, want);
}

#[test]
fn flipped_bits_fail_authentication() {
    let mut w = pair();
    let la = w.only_link(0).id;
    w.filter = Box::new(|_, _, d| d.first() != Some(&LINK_DATA));
    w.send(0, la, b"integrity").expect("send");
    let frame = w
        .tapped(addr(1, 9651), LINK_DATA)
        .last()
        .cloned()
        .expect("frame");
    // A bit in the ciphertext, in the tag, and in the counter (AAD and nonce).
    for pos in [25, frame.len() - 1, 19] {
        let mut bad = frame.clone();
        bad[pos] ^= 0x04;
        assert_eq!(
            w.inject(1, addr(1, 9651), &bad),
            Err(LinkError::Authentication),
            "flip at {pos}"
        );
    }
    assert_eq!(w.nodes[1].ll.counters().auth_failures, 3);
    // The receiver index bit: no such session.
    let mut bad = frame.clone();
    bad[11] ^= 0x01;
    assert!(matches!(
        w.inject(1, addr(1, 9651), &bad),
        Err(LinkError::UnknownIndex(_))
    ));
    assert!(w.received(1).is_empty());
    // The genuine frame still passes: failed frames did not move the window.
    w.inject(1, addr(1, 9651), &frame).expect("genuine");
    assert_eq!(w.received(1), vec![b"integrity".to_vec()]);
}

#[test]
fn network_key_mismatch_no_link() {
    let mut w = World::new();
    let mut ca = World::cfg(1);
    ca.network_key = Some([7; 32]);
    let mut cb = World::cfg(2);
    cb.network_key = Some([8; 32]);
    w.add(ca, addr(1, 9651));
    w.add(cb, addr(2, 9651));
    w.connect(0, 1);
    w.run_for(Duration::from_secs(30));
    assert!(w.ups(0).is_empty());
    assert!(w.ups(1).is_empty());
    assert_eq!(w.nodes[0].ll.links().count(), 0);
    assert_eq!(w.nodes[1].ll.links().count(), 0);
    // The responder rejects message 3; the initiator never hears back and gives up.
    assert!(w.failures(1).contains(&HandshakeFailure::Rejected));
    assert_eq!(w.failures(0), vec![HandshakeFailure::Timeout]);
    assert_eq!(w.nodes[1].ll.table_sizes().half_open, 0);
}

#[test]
fn network_key_on_one_side_only_no_link() {
    let mut w = World::new();
    let mut ca = World::cfg(1);
    ca.network_key = Some([7; 32]);
    w.add(ca, addr(1, 9651));
    w.add(World::cfg(2), addr(2, 9651));
    // Message 1 is 48 bytes with psk3 and 32 without: each responder drops the other's.
    w.connect(1, 0);
    w.connect(0, 1);
    w.run_for(Duration::from_secs(30));
    assert!(w.ups(0).is_empty() && w.ups(1).is_empty());
    assert_eq!(w.failures(0), vec![HandshakeFailure::Timeout]);
    assert_eq!(w.failures(1), vec![HandshakeFailure::Timeout]);
    assert!(w.nodes[0].ll.counters().malformed > 0);
    assert!(w.nodes[1].ll.counters().malformed > 0);
    assert_eq!(w.nodes[0].ll.table_sizes().half_open, 0);
}

#[test]
fn same_network_key_links() {
    let mut w = World::new();
    let mut ca = World::cfg(1);
    ca.network_key = Some([7; 32]);
    let mut cb = World::cfg(2);
    cb.network_key = Some([7; 32]);
    w.add(ca, addr(1, 9651));
    w.add(cb, addr(2, 9651));
    w.connect(0, 1);
    w.run_for(Duration::from_millis(100));
    assert_eq!(w.ups(0).len(), 1);
    assert_eq!(w.ups(1).len(), 1);
    let init = &w.tapped(addr(1, 9651), LINK_INIT)[0];
    assert_eq!(init.len(), 20 + 48);
}

#[test]
fn simultaneous_open_yields_one_link() {
    let mut w = World::new();
    w.add(World::cfg(1), addr(1, 9651));
    w.add(World::cfg(2), addr(2, 9651));
    w.connect(0, 1);
    w.connect(1, 0);
    w.run_for(Duration::from_millis(200));
    assert_eq!(w.ups(0).len(), 1, "{:?}", w.nodes[0].events);
    assert_eq!(w.ups(1).len(), 1, "{:?}", w.nodes[1].events);
    assert!(w.downs(0).is_empty() && w.downs(1).is_empty());
    let la = w.only_link(0);
    let lb = w.only_link(1);
    // Both handshakes completed on both sides, onto the same link.
    assert_eq!(w.nodes[0].ll.counters().handshakes_completed, 2);
    assert_eq!(w.nodes[1].ll.counters().handshakes_completed, 2);
    // Both send on the same session: the one initiated by the lower static key.
    let a = &w.nodes[0].ll.links[&la.id];
    let b = &w.nodes[1].ll.links[&lb.id];
    assert_eq!(a.current.local_index, b.current.remote_index);
    assert_eq!(a.current.remote_index, b.current.local_index);
    let a_lower = public(secret(1)) < public(secret(2));
    assert_eq!(a.current.we_initiated, a_lower);
    w.send(0, la.id, b"x").expect("send");
    w.send(1, lb.id, b"y").expect("send");
    w.run_for(Duration::from_secs(60));
    assert_eq!(w.received(1), vec![b"x".to_vec()]);
    assert_eq!(w.received(0), vec![b"y".to_vec()]);
    assert!(w.downs(0).is_empty() && w.downs(1).is_empty());
}

#[test]
fn dead_interval_takes_link_down() {
    let mut w = pair();
    let la = w.only_link(0).id;
    // Keepalives hold the link up while nothing else is sent.
    w.run_for(Duration::from_secs(60));
    assert!(w.downs(0).is_empty() && w.downs(1).is_empty());
    assert!(w.nodes[0].ll.counters().keepalives_sent >= 10);
    // Cut the wire: down exactly a dead interval after the last frame received.
    w.filter = Box::new(|_, _, _| false);
    let last = w.only_link(0).last_rx;
    w.run_until(last + Duration::from_millis(19_999));
    assert!(w.downs(0).is_empty());
    w.run_for(Duration::from_millis(2));
    assert_eq!(w.downs(0), vec![(la, DownReason::Dead)]);
    w.run_for(Duration::from_secs(20));
    assert_eq!(w.downs(1).len(), 1);
    assert_eq!(w.nodes[0].ll.links().count(), 0);
    assert_eq!(w.nodes[0].ll.table_sizes().sessions, 0);
    assert_eq!(w.send(0, la, b"x"), Err(LinkError::UnknownLink(la)));
    // Heal and reconnect: a fresh link.
    w.filter = Box::new(|_, _, _| true);
    w.connect(0, 1);
    w.run_for(Duration::from_millis(100));
    assert_eq!(w.ups(0).len(), 2);
    assert_ne!(w.ups(0)[1].0, la);
}

#[test]
fn close_is_local_and_peer_notices() {
    let mut w = pair();
    let la = w.only_link(0).id;
    w.nodes[0].ll.close(w.now, la);
    w.collect(0);
    assert_eq!(w.downs(0), vec![(la, DownReason::Closed)]);
    w.run_for(Duration::from_secs(25));
    assert_eq!(w.downs(1).len(), 1);
    assert_eq!(w.downs(1)[0].1, DownReason::Dead);
    // B's keepalives after the close hit an unknown index at A.
    assert!(w.nodes[0].ll.counters().unknown_index > 0);
}

#[test]
fn peer_restart_same_key_new_address_replaces() {
    let mut w = pair();
    let old_b = w.only_link(0).id;
    // B restarts on another port with the same static key and reconnects.
    let b2 = w.add(World::cfg(2), addr(2, 7000));
    w.connect(b2, 0);
    w.run_for(Duration::from_millis(100));
    assert_eq!(w.downs(0), vec![(old_b, DownReason::Replaced)]);
    let ups = w.ups(0);
    assert_eq!(ups.len(), 2);
    assert_eq!(ups[1].1, addr(2, 7000));
    assert_eq!(ups[1].2, public(secret(2)));
    let l = w.only_link(0);
    assert_eq!(l.remote, addr(2, 7000));
    w.send(0, l.id, b"to new b").expect("send");
    w.run_for(Duration::from_millis(100));
    assert_eq!(w.received(b2), vec![b"to new b".to_vec()]);
}

#[test]
fn peer_restart_new_key_same_address_replaces() {
    let mut w = pair();
    let old_b = w.only_link(0).id;
    // The process at B's address is replaced by one with another identity.
    w.kill(1);
    let b2 = w.add(World::cfg(3), addr(2, 9651));
    w.connect(b2, 0);
    w.run_for(Duration::from_millis(100));
    assert_eq!(w.downs(0), vec![(old_b, DownReason::Replaced)]);
    let l = w.only_link(0);
    assert_eq!(l.peer_key, public(secret(3)));
    assert_eq!(l.remote, addr(2, 9651));
}

#[test]
fn peer_restart_same_key_same_address_rekeys() {
    let mut w = pair();
    let old = w.only_link(0);
    w.kill(1);
    let b2 = w.add(World::cfg(2), addr(2, 9651));
    w.connect(b2, 0);
    w.run_for(Duration::from_millis(100));
    // Same identity at the same place: the link survives on the new session.
    assert!(w.downs(0).is_empty());
    assert_eq!(w.only_link(0).id, old.id);
    w.send(0, old.id, b"still here").expect("send");
    w.run_for(Duration::from_millis(100));
    assert_eq!(w.received(b2), vec![b"still here".to_vec()]);
    w.run_for(Duration::from_secs(60));
    assert!(w.downs(0).is_empty());
}

#[test]
fn handshake_survives_lost_messages() {
    for lost in [LINK_INIT, LINK_RESP, LINK_FINISH] {
        let mut w = World::new();
        w.add(World::cfg(1), addr(1, 9651));
        w.add(World::cfg(2), addr(2, 9651));
        let mut dropped = false;
        w.filter = Box::new(move |_, _, d| {
            if !dropped && d.first() == Some(&lost) {
                dropped = true;
                return false;
            }
            true
        });
        w.connect(0, 1);
        w.run_for(Duration::from_secs(3));
        assert_eq!(w.ups(0).len(), 1, "lost {lost:#x}: {:?}", w.nodes[0].events);
        assert_eq!(w.ups(1).len(), 1, "lost {lost:#x}");
        assert!(w.nodes[0].ll.counters().handshake_retransmits >= 1);
        assert_eq!(w.nodes[1].ll.table_sizes().half_open, 0, "lost {lost:#x}");
    }
}

#[test]
fn lost_confirmation_is_resent() {
    let mut w = World::new();
    w.add(World::cfg(1), addr(1, 9651));
    w.add(World::cfg(2), addr(2, 9651));
    // Drop B's first LINK_DATA (the keepalive confirming message 3).
    let mut dropped = false;
    w.filter = Box::new(move |_, _, d| {
        if !dropped && d.first() == Some(&LINK_DATA) {
            dropped = true;
            return false;
        }
        true
    });
    w.connect(0, 1);
    w.run_for(Duration::from_millis(100));
    assert_eq!(w.ups(1).len(), 1);
    assert!(w.ups(0).is_empty(), "A must wait for the confirmation");
    w.run_for(Duration::from_secs(2));
    assert_eq!(w.ups(0).len(), 1);
    assert_eq!(w.nodes[0].ll.links().count(), 1);
    assert_eq!(w.nodes[1].ll.links().count(), 1);
}

#[test]
fn connect_is_idempotent_and_times_out() {
    let mut w = World::new();
    w.add(World::cfg(1), addr(1, 9651));
    let nowhere = addr(9, 9651);
    w.nodes[0].ll.connect(w.now, nowhere);
    w.nodes[0].ll.connect(w.now, nowhere);
    w.collect(0);
    assert_eq!(w.tap.len(), 1);
    assert_eq!(w.nodes[0].ll.handshakes().count(), 1);
    w.run_for(Duration::from_secs(11));
    assert_eq!(w.failures(0), vec![HandshakeFailure::Timeout]);
    // Retransmitted roughly every second, then given up.
    let inits = w.tapped(addr(1, 9651), LINK_INIT).len();
    assert!((8..=11).contains(&inits), "{inits} inits");
    assert_eq!(w.nodes[0].ll.handshakes().count(), 0);
    assert_eq!(w.nodes[0].ll.poll_timeout(), None);
}

#[test]
fn self_connection_refused() {
    let mut w = World::new();
    w.add(World::cfg(1), addr(1, 9651));
    w.add(World::cfg(1), addr(1, 9652));
    w.connect(0, 1);
    w.run_for(Duration::from_secs(1));
    assert!(w.ups(0).is_empty() && w.ups(1).is_empty());
    assert_eq!(w.failures(0), vec![HandshakeFailure::SelfConnection]);
}

#[test]
fn three_nodes_star() {
    let mut w = World::new();
    for i in 1..=3 {
        w.add(World::cfg(i), addr(i, 9651));
    }
    w.connect(0, 1);
    w.connect(0, 2);
    w.connect(1, 2);
    w.run_for(Duration::from_millis(200));
    for i in 0..3 {
        assert_eq!(w.nodes[i].ll.links().count(), 2, "node {i}");
    }
    let to_c = w.nodes[0]
        .ll
        .links()
        .find(|l| l.peer_key == public(secret(3)))
        .expect("a-c")
        .id;
    w.send(0, to_c, b"for c").expect("send");
    w.run_for(Duration::from_millis(100));
    assert_eq!(w.received(2), vec![b"for c".to_vec()]);
    assert!(w.received(1).is_empty());
}

#[test]
fn init_flood_from_one_source_is_bounded() {
    let mut w = World::new();
    let mut cfg = World::cfg(2);
    cfg.max_half_open = 64;
    w.add(cfg, addr(2, 9651));
    let attacker = addr(66, 4444);
    let mut msg = vec![LINK_INIT, 1, 0, 32];
    msg.extend_from_slice(&[0; 16]);
    msg.extend_from_slice(&[9; 32]);
    let mut accepted = 0;
    for i in 1..=10_000u32 {
        msg[4..8].copy_from_slice(&i.to_be_bytes());
        if w.inject(0, attacker, &msg).is_ok() {
            accepted += 1;
        }
    }
    // Only the burst gets through.
    assert_eq!(accepted, 10);
    let c = w.nodes[0].ll.counters();
    assert_eq!(c.handshake_rate_limited, 10_000 - 10);
    let t = w.nodes[0].ll.table_sizes();
    assert_eq!(t.half_open, 10);
    assert_eq!(t.rate_limit_sources, 1);
    assert!(t.transmit_queue <= 10);
    // A second later, rate (5/s) more.
    w.now += Duration::from_secs(1);
    for i in 20_000..20_100u32 {
        msg[4..8].copy_from_slice(&i.to_be_bytes());
        let _ = w.inject(0, attacker, &msg);
    }
    assert_eq!(w.nodes[0].ll.table_sizes().half_open, 15);
    // Half-open states expire.
    w.run_for(Duration::from_secs(11));
    assert_eq!(w.nodes[0].ll.table_sizes().half_open, 0);
    assert_eq!(w.nodes[0].ll.table_sizes().handshakes, 0);
}

#[test]
fn init_flood_from_many_sources_is_bounded() {
    let mut w = World::new();
    let mut cfg = World::cfg(2);
    cfg.max_half_open = 16;
    cfg.rate_limit_sources = 64;
    w.add(cfg, addr(2, 9651));
    w.add(World::cfg(1), addr(1, 9651));
    let mut msg = vec![LINK_INIT, 1, 0, 32];
    msg.extend_from_slice(&[0; 16]);
    msg.extend_from_slice(&[9; 32]);
    // Each accepted LINK_INIT costs three X25519 operations (slow in debug builds): keep it small.
    for i in 1..=150u32 {
        msg[4..8].copy_from_slice(&i.to_be_bytes());
        let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i)), 1);
        w.inject(0, src, &msg).expect("first from each source");
        // Drain the responses (they go nowhere).
        w.wire.clear();
        let t = w.nodes[0].ll.table_sizes();
        assert!(t.half_open <= 16 && t.handshakes <= 16);
        assert!(t.rate_limit_sources <= 64);
    }
    assert_eq!(w.nodes[0].ll.counters().half_open_evicted, 150 - 16);
    // A legitimate peer still gets through during the flood (its handshake is newest).
    w.connect(1, 0);
    w.run_for(Duration::from_millis(100));
    assert_eq!(w.ups(0).len(), 1);
    assert_eq!(w.ups(1).len(), 1);
}

#[test]
fn rekey_keeps_data_flowing() {
    let mut w = pair();
    let la = w.only_link(0).id;
    let lb = w.only_link(1).id;
    let first_session = w.nodes[0].ll.links[&la].current.local_index;
    let mut sent = 0u32;
    // 400 s: past two rekeys and past the 180 s reject limit of the first session.
    for step in 0..800u32 {
        w.send(0, la, &step.to_be_bytes()).expect("a sends");
        w.send(1, lb, &step.to_be_bytes()).expect("b sends");
        sent += 1;
        w.run_for(Duration::from_millis(500));
    }
    w.run_for(Duration::from_millis(100));
    assert!(w.downs(0).is_empty() && w.downs(1).is_empty());
    assert_eq!(w.received(0).len() as u32, sent);
    assert_eq!(w.received(1).len() as u32, sent);
    let c = w.nodes[0].ll.counters();
    assert!(c.rekeys >= 3, "rekeys {}", c.rekeys);
    assert_eq!(c.auth_failures + c.unknown_index + c.expired_session, 0);
    let now_session = &w.nodes[0].ll.links[&la].current;
    assert_ne!(now_session.local_index, first_session);
    assert!(w.now - now_session.created < Duration::from_secs(125));
    // At most current and previous per link.
    assert!(w.nodes[0].ll.table_sizes().sessions <= 2);
}

#[test]
fn rekey_without_traffic_keeps_link() {
    let mut w = pair();
    w.run_for(Duration::from_secs(600));
    assert!(w.downs(0).is_empty() && w.downs(1).is_empty());
    assert!(w.nodes[0].ll.counters().rekeys >= 4);
}

#[test]
fn session_expires_when_rekey_impossible() {
    let mut w = pair();
    let la = w.only_link(0).id;
    // Drop every handshake message from now on; data still flows.
    w.filter = Box::new(|_, _, d| d.first() == Some(&LINK_DATA));
    w.run_for(Duration::from_secs(200));
    assert_eq!(w.downs(0), vec![(la, DownReason::Expired)]);
    assert_eq!(w.downs(1).len(), 1);
    // Rekey failures of a live link are retried, not reported.
    assert!(w.failures(0).is_empty());
}

#[test]
fn malformed_frames_counted_never_panic() {
    let mut w = pair();
    let from = addr(1, 9651);
    let cases: Vec<(Vec<u8>, LinkError)> = vec![
        (vec![], WireError::Truncated { needed: 20, len: 0 }.into()),
        (
            vec![0x05; 19],
            WireError::Truncated {
                needed: 20,
                len: 19,
            }
            .into(),
        ),
        (
            [&[0x09u8, 1, 0, 0][..], &[0; 16]].concat(),
            WireError::UnknownFrameType(9).into(),
        ),
        (
            [&[0x05u8, 2, 0, 0][..], &[0; 16]].concat(),
            WireError::UnsupportedVersion(2).into(),
        ),
        (
            [&[0x05u8, 1, 0, 9][..], &[0; 16]].concat(),
            WireError::BodyLengthMismatch {
                declared: 9,
                actual: 0,
            }
            .into(),
        ),
        (
            [&[0x02u8, 1, 0, 31][..], &[0; 16], &[1; 31]].concat(),
            MalformedFrame::Field.into(),
        ),
        (
            [&[0x02u8, 1, 0, 31][..], &[0, 0, 0, 1], &[0; 12], &[1; 31]].concat(),
            MalformedFrame::HandshakeLength.into(),
        ),
        (
            [
                &[0x03u8, 1, 0, 96][..],
                &[0, 0, 0, 1, 0, 0, 0, 1],
                &[0; 8],
                &[1; 96],
            ]
            .concat(),
            LinkError::UnknownIndex(1),
        ),
        (
            [
                &[0x04u8, 1, 0, 64][..],
                &[0, 0, 0, 0, 0, 0, 0, 7],
                &[0; 8],
                &[1; 64],
            ]
            .concat(),
            LinkError::UnknownIndex(7),
        ),
        (
            [
                &[0x05u8, 1, 0, 16][..],
                &[0, 0, 0, 0, 0, 0, 0, 7],
                &[0; 8],
                &[1; 16],
            ]
            .concat(),
            WireError::CiphertextTooShort { len: 16, min: 17 }.into(),
        ),
    ];
    for (d, want) in &cases {
        assert_eq!(w.inject(1, from, d).as_ref(), Err(want), "{d:02x?}");
    }
    let c = w.nodes[1].ll.counters();
    assert_eq!(c.malformed, 8);
    assert_eq!(c.unknown_index, 2);
    // The link is unaffected.
    let la = w.only_link(0).id;
    w.send(0, la, b"ok").expect("send");
    w.run_for(Duration::from_millis(50));
    assert_eq!(w.received(1), vec![b"ok".to_vec()]);
}

#[test]
fn deterministic_given_seed() {
    let run = || {
        let mut w = pair();
        let la = w.only_link(0).id;
        w.send(0, la, b"x").expect("send");
        w.run_for(Duration::from_secs(300));
        let events: Vec<String> = w
            .nodes
            .iter()
            .flat_map(|n| n.events.iter().map(|e| format!("{e:?}")))
            .collect();
        (events, w.now, w.nodes[0].ll.counters().clone())
    };
    assert_eq!(run(), run());
}

#[test]
fn rekey_by_message_count() {
    let mut w = pair();
    let la = w.only_link(0).id;
    let first = w.nodes[0].ll.links[&la].current.local_index;
    if let Some(l) = w.nodes[0].ll.links.get_mut(&la) {
        l.current
            .set_send_counter(session::REKEY_AFTER_MESSAGES - 1);
    }
    w.send(0, la, b"last of the old").expect("send");
    assert_eq!(w.only_link(0).state, LinkState::Rekeying);
    w.run_for(Duration::from_millis(100));
    assert_eq!(w.received(1), vec![b"last of the old".to_vec()]);
    assert_eq!(w.only_link(0).state, LinkState::Up);
    assert_ne!(w.nodes[0].ll.links[&la].current.local_index, first);
    w.send(0, la, b"first of the new").expect("send");
    w.run_for(Duration::from_millis(100));
    assert_eq!(w.received(1).len(), 2);
    // An exhausted session refuses to send.
    if let Some(l) = w.nodes[0].ll.links.get_mut(&la) {
        l.current.set_send_counter(session::REJECT_AFTER_MESSAGES);
    }
    assert_eq!(w.send(0, la, b"x"), Err(LinkError::SessionExpired));
}

#[test]
fn simultaneous_open_with_late_message_3() {
    // The node with the lower key (L) completes its handshake first; the higher one's (H) message
    // 3 is lost once and arrives a second later, when L's session is already up on both sides.
    let (l, h) = if public(secret(1)) < public(secret(2)) {
        (1, 2)
    } else {
        (2, 1)
    };
    let mut w = World::new();
    w.add(World::cfg(l), addr(l, 9651));
    w.add(World::cfg(h), addr(h, 9651));
    let h_addr = addr(h, 9651);
    let mut dropped = false;
    w.filter = Box::new(move |from, _, d| {
        if !dropped && from == h_addr && d.first() == Some(&LINK_FINISH) {
            dropped = true;
            return false;
        }
        true
    });
    w.connect(0, 1);
    w.connect(1, 0);
    w.run_for(Duration::from_secs(15));
    for i in 0..2 {
        assert_eq!(w.ups(i).len(), 1, "node {i}: {:?}", w.nodes[i].events);
        assert!(
            w.failures(i).is_empty(),
            "node {i}: {:?}",
            w.nodes[i].events
        );
        assert!(w.downs(i).is_empty());
        assert_eq!(w.nodes[i].ll.counters().handshakes_completed, 2);
        assert_eq!(w.nodes[i].ll.counters().handshake_unexpected, 0);
        assert_eq!(w.nodes[i].ll.counters().handshake_timeouts, 0);
    }
    let a = &w.nodes[0].ll.links[&w.only_link(0).id];
    let b = &w.nodes[1].ll.links[&w.only_link(1).id];
    assert_eq!(a.current.local_index, b.current.remote_index);
    // L's handshake won: node 0 (L) initiated the session both send on.
    assert!(a.current.we_initiated);
}
