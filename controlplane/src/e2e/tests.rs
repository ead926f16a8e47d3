//! Two or three managers wired through an in-memory overlay that forwards by destination address,
//! on virtual time (quinn-proto's `Pair`, generalised).

use super::handshake::{self, InitPayload, Timestamp};
use super::*;

fn secret(n: u8) -> SecretKey {
    SecretKey::from_bytes([n; 32])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sent {
    at: Instant,
    from: usize,
    to: OverlayAddr,
    kind: Kind,
}

/// Decides whether the network loses a packet: (sender, packet) -> lose it?
type Loss = Box<dyn FnMut(usize, &[u8]) -> bool>;

struct Net {
    nodes: Vec<SessionManager>,
    events: Vec<Vec<Event>>,
    now: Instant,
    sent: Vec<Sent>,
    /// Packets the network loses: (sender, packet) -> drop?
    lose: Loss,
    /// Packets in flight, delivered on the next `deliver`.
    wire: VecDeque<(usize, Vec<u8>)>,
    errors: Vec<(usize, String)>,
}

impl Net {
    fn new(secrets: &[u8], cfg: impl Fn(&mut E2eConfig)) -> Net {
        let nodes: Vec<_> = secrets
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let mut c = E2eConfig::new(secret(n));
                c.seed = i as u64;
                c.wall_clock = Duration::from_secs(1_700_000_000);
                cfg(&mut c);
                SessionManager::new(c, Instant::ZERO)
            })
            .collect();
        Net {
            events: vec![Vec::new(); nodes.len()],
            nodes,
            now: Instant::ZERO,
            sent: Vec::new(),
            lose: Box::new(|_, _| false),
            wire: VecDeque::new(),
            errors: Vec::new(),
        }
    }

    fn addr(&self, i: usize) -> OverlayAddr {
        self.nodes[i].address()
    }

    fn key(&self, i: usize) -> PublicKey {
        self.nodes[i].public_key()
    }

    /// Moves every node's output onto the wire (or into its event log).
    fn collect(&mut self) {
        let mut buf = Vec::new();
        for i in 0..self.nodes.len() {
            while let Some(to) = self.nodes[i].poll_transmit(&mut buf) {
                let kind = Packet::new_checked(&buf[..]).unwrap().kind().unwrap();
                self.sent.push(Sent {
                    at: self.now,
                    from: i,
                    to,
                    kind,
                });
                assert_eq!(
                    Packet::new_checked(&buf[..]).unwrap().src_addr(),
                    self.addr(i).ip()
                );
                if !(self.lose)(i, &buf) {
                    self.wire.push_back((i, buf.clone()));
                }
            }
            while let Some(e) = self.nodes[i].poll_event() {
                self.events[i].push(e);
            }
        }
    }

    /// Delivers what is in flight now, one hop (zero latency); returns how many.
    fn deliver_once(&mut self) -> usize {
        let batch: Vec<_> = self.wire.drain(..).collect();
        let n = batch.len();
        for (_, bytes) in batch {
            let dst = Packet::new_checked(&bytes[..]).unwrap().dst_addr();
            if let Some(j) = self.nodes.iter().position(|m| m.address().ip() == dst) {
                if let Err(e) = self.nodes[j].handle_packet(self.now, &bytes) {
                    self.errors.push((j, e.to_string()));
                }
            }
        }
        self.collect();
        n
    }

    /// Delivers until the network is quiet.
    fn drive(&mut self) {
        self.collect();
        for _ in 0..100 {
            if self.deliver_once() == 0 {
                return;
            }
        }
        panic!("network never went quiet");
    }

    /// Runs timers up to and including `to`, delivering after each.
    fn advance(&mut self, to: Instant) {
        self.drive();
        loop {
            let next = self.nodes.iter().filter_map(|m| m.poll_timeout()).min();
            match next {
                Some(t) if t <= to => {
                    // Inputs other than timeouts may leave a deadline in the past: fire it now.
                    let t = t.max(self.now);
                    self.now = t;
                    for m in &mut self.nodes {
                        m.handle_timeout(t);
                        // handle_timeout leaves nothing due behind.
                        assert!(m.poll_timeout().is_none_or(|d| d > t), "still due at {t:?}");
                    }
                    self.drive();
                }
                _ => break,
            }
        }
        self.now = to;
        for m in &mut self.nodes {
            m.handle_timeout(to);
        }
        self.drive();
    }

    fn connect(&mut self, from: usize, to: usize) {
        let (dst, key) = (self.addr(to), self.key(to));
        self.nodes[from].connect(self.now, dst, Some(key)).unwrap();
        self.collect();
    }

    fn take_events(&mut self, i: usize) -> Vec<Event> {
        std::mem::take(&mut self.events[i])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Inst {
    peer: OverlayAddr,
    peer_key: PublicKey,
    local: u32,
    remote: u32,
    tx: [u8; 32],
    rx: [u8; 32],
    cipher: Cipher,
    role: Role,
    created: Instant,
}

fn installs(events: &[Event]) -> Vec<Inst> {
    events
        .iter()
        .filter_map(|e| match *e {
            Event::Install {
                peer,
                peer_key,
                local_index,
                remote_index,
                tx_key,
                rx_key,
                cipher,
                role,
                created,
            } => Some(Inst {
                peer,
                peer_key,
                local: local_index,
                remote: remote_index,
                tx: tx_key,
                rx: rx_key,
                cipher,
                role,
                created,
            }),
            _ => None,
        })
        .collect()
}

fn removes(events: &[Event]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match *e {
            Event::Remove { local_index } => Some(local_index),
            _ => None,
        })
        .collect()
}

fn assert_paired(a: &Inst, b: &Inst) {
    assert_eq!(a.tx, b.rx);
    assert_eq!(a.rx, b.tx);
    assert_ne!(a.tx, a.rx);
    assert_eq!(a.local, b.remote);
    assert_eq!(a.remote, b.local);
    assert_eq!(a.cipher, b.cipher);
    assert_ne!(a.local, 0);
    assert_ne!(b.local, 0);
}

/// A handshake from `a` to `b` as raw bytes, with any source address and sender key.
fn forged_init(
    sender: &SecretKey,
    src: OverlayAddr,
    dst_key: &PublicKey,
    timestamp: Timestamp,
) -> Vec<u8> {
    let payload = InitPayload {
        sender_index: 0x1234_5678,
        timestamp,
        cipher: Cipher::ChaCha20Poly1305.to_byte(),
    };
    let prologue = handshake::prologue(src.octets(), dst_key.address().octets());
    let (_, msg) = handshake::initiate(sender.as_bytes(), dst_key, &prologue, &payload).unwrap();
    let mut bytes = vec![0u8; HEADER_LEN + msg.len()];
    let mut packet = Packet::new_unchecked(&mut bytes[..]);
    Repr {
        hop_limit: 64,
        kind: Kind::HandshakeInit,
        receiver_index: 0,
        counter: 0,
        src: src.ip(),
        dst: dst_key.address().ip(),
    }
    .emit(&mut packet);
    packet.payload_mut().copy_from_slice(&msg);
    bytes
}

fn ts(secs: u64) -> Timestamp {
    Timestamp::from_unix(Duration::from_secs(secs))
}

#[test]
fn handshake_completes_with_matching_keys() {
    let mut net = Net::new(&[1, 2], |_| {});
    net.nodes[0] = {
        let mut c = E2eConfig::new(secret(1));
        c.cipher = Cipher::Aes256Gcm;
        SessionManager::new(c, Instant::ZERO)
    };
    net.now = Instant::from_millis(10);
    net.connect(0, 1);
    net.drive();
    let (a, b) = (net.take_events(0), net.take_events(1));
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(b.len(), 1, "{b:?}");
    let (ia, ib) = (installs(&a)[0], installs(&b)[0]);
    assert_paired(&ia, &ib);
    assert_eq!(ia.role, Role::Initiator);
    assert_eq!(ib.role, Role::Responder);
    // The initiator's cipher wins.
    assert_eq!(ia.cipher, Cipher::Aes256Gcm);
    assert_eq!((ia.peer, ia.peer_key), (net.addr(1), net.key(1)));
    assert_eq!((ib.peer, ib.peer_key), (net.addr(0), net.key(0)));
    assert_eq!(ia.created, Instant::from_millis(10));
    let kinds: Vec<_> = net.sent.iter().map(|s| (s.from, s.kind)).collect();
    assert_eq!(kinds, [(0, Kind::HandshakeInit), (1, Kind::HandshakeResp)]);
    let views: Vec<_> = net.nodes[0].sessions().collect();
    assert_eq!(views.len(), 1);
    assert_eq!(views[0].local_index, ia.local);
    assert!(!views[0].confirmed);
    assert_eq!(net.nodes[0].counters().inits_sent, 1);
    assert_eq!(net.nodes[1].counters().resps_sent, 1);
    assert_eq!(net.nodes[0].pending_handshakes(), 0);
    // A second connect while the session is fresh does nothing.
    net.connect(0, 1);
    net.drive();
    assert_eq!(net.sent.len(), 2);
    assert!(net.errors.is_empty(), "{:?}", net.errors);
}

#[test]
fn wire_layout_of_handshake_packets() {
    let mut net = Net::new(&[1, 2], |c| c.hop_limit = 17);
    let (dst, key) = (net.addr(1), net.key(1));
    net.nodes[0].connect(Instant::ZERO, dst, Some(key)).unwrap();
    let mut buf = Vec::new();
    let dst = net.nodes[0].poll_transmit(&mut buf).unwrap();
    assert_eq!(dst, net.addr(1));
    assert_eq!(buf.len(), HEADER_LEN + 113);
    assert_eq!(&buf[..4], &[0x01, 17, 0x01, 0x00]);
    assert_eq!(&buf[4..16], &[0u8; 12], "receiver index and counter are 0");
    assert_eq!(&buf[16..32], &net.addr(0).octets());
    assert_eq!(&buf[32..48], &net.addr(1).octets());
    net.nodes[1].handle_packet(Instant::ZERO, &buf).unwrap();
    let mut resp = Vec::new();
    assert_eq!(net.nodes[1].poll_transmit(&mut resp), Some(net.addr(0)));
    assert_eq!(resp.len(), HEADER_LEN + 52);
    assert_eq!(&resp[..4], &[0x01, 17, 0x02, 0x00]);
    // The RESP's receiver index is the initiator's index, which its Install reports as local.
    net.nodes[0].handle_packet(Instant::ZERO, &resp).unwrap();
    let a = installs(&std::iter::from_fn(|| net.nodes[0].poll_event()).collect::<Vec<_>>());
    assert_eq!(&resp[4..8], &a[0].local.to_be_bytes());
    assert_eq!(&resp[8..16], &[0u8; 8]);
}

#[test]
fn wrong_destination_key_refused() {
    let mut net = Net::new(&[1, 2, 3], |_| {});
    let (dst, wrong) = (net.addr(1), net.key(2));
    let r = net.nodes[0].connect(Instant::ZERO, dst, Some(wrong));
    assert!(matches!(r, Err(E2eError::KeyMismatch { .. })), "{r:?}");
    net.drive();
    assert!(net.sent.is_empty());
    assert_eq!(net.take_events(0), [Event::Failed { dst }]);
    assert_eq!(net.nodes[0].counters().key_mismatch, 1);
    assert_eq!(net.nodes[0].pending_handshakes(), 0);
}

#[test]
fn no_key_asks_for_a_route_rate_limited() {
    let mut net = Net::new(&[1, 2], |_| {});
    let dst = net.addr(1);
    net.nodes[0].connect(Instant::ZERO, dst, None).unwrap();
    net.nodes[0]
        .connect(Instant::from_secs(1), dst, None)
        .unwrap();
    net.drive();
    assert_eq!(net.take_events(0), [Event::NeedRoute { dst }]);
    net.nodes[0]
        .connect(Instant::from_secs(5), dst, None)
        .unwrap();
    net.drive();
    assert_eq!(net.take_events(0), [Event::NeedRoute { dst }]);
    assert!(net.sent.is_empty());
    // With the key from the route, the handshake runs.
    net.now = Instant::from_secs(6);
    net.connect(0, 1);
    net.drive();
    assert_eq!(installs(&net.take_events(0)).len(), 1);
}

#[test]
fn spoofed_source_dropped_and_counted() {
    let mut net = Net::new(&[1, 2, 3], |_| {});
    // Node 2 (key 3) sends an init claiming node 0's address, with a prologue that matches it: the
    // Noise message is fine, but the address does not derive from the key inside.
    let pkt = forged_init(&secret(3), net.addr(0), &net.key(1), ts(1_700_000_000));
    let r = net.nodes[1].handle_packet(Instant::ZERO, &pkt);
    assert!(matches!(r, Err(E2eError::PeerMisbehaved { .. })), "{r:?}");
    assert_eq!(net.nodes[1].counters().peer_misbehaved, 1);
    // An honest init whose source was rewritten in transit fails authentication (the prologue
    // binds the addresses).
    let mut honest = forged_init(&secret(3), net.addr(2), &net.key(1), ts(1_700_000_000));
    honest[16..32].copy_from_slice(&net.addr(0).octets());
    let r = net.nodes[1].handle_packet(Instant::ZERO, &honest);
    assert!(matches!(r, Err(E2eError::AuthFailed(_))), "{r:?}");
    assert_eq!(net.nodes[1].counters().auth_failed, 1);
    net.drive();
    assert!(net.sent.is_empty());
    assert!(net.take_events(1).is_empty());
    assert_eq!(net.nodes[1].sessions().count(), 0);
}

#[test]
fn replayed_init_rejected() {
    let mut net = Net::new(&[1, 2], |_| {});
    let captured = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let c = captured.clone();
    net.lose = Box::new(move |from, bytes| {
        if from == 0 {
            c.borrow_mut().push(bytes.to_vec());
        }
        false
    });
    net.connect(0, 1);
    net.drive();
    assert_eq!(installs(&net.take_events(1)).len(), 1);
    let init = captured.borrow()[0].clone();
    net.now = Instant::from_secs(1);
    let r = net.nodes[1].handle_packet(net.now, &init);
    assert!(matches!(r, Err(E2eError::Replay)), "{r:?}");
    assert_eq!(net.nodes[1].counters().replayed, 1);
    net.drive();
    assert!(net.take_events(1).is_empty());
    assert_eq!(net.nodes[1].sessions().count(), 1);
    // An older timestamp from the same key is a replay too; a newer one is accepted.
    let old = forged_init(&secret(1), net.addr(0), &net.key(1), ts(1_000));
    assert!(matches!(
        net.nodes[1].handle_packet(net.now, &old),
        Err(E2eError::Replay)
    ));
    let new = forged_init(&secret(1), net.addr(0), &net.key(1), ts(1_800_000_000));
    net.nodes[1].handle_packet(net.now, &new).unwrap();
}

#[test]
fn rekey_after_time_then_old_removed_after_traffic() {
    let mut net = Net::new(&[1, 2], |_| {});
    net.connect(0, 1);
    net.drive();
    let (a0, b0) = (
        installs(&net.take_events(0))[0],
        installs(&net.take_events(1))[0],
    );
    // Traffic flows both ways: both sides confirm.
    net.nodes[1].handle_traffic(Instant::from_millis(1), b0.local);
    net.nodes[0].handle_traffic(Instant::from_millis(2), a0.local);
    assert_eq!(
        net.nodes[0].poll_timeout(),
        Some(Instant::ZERO + REKEY_AFTER_TIME)
    );
    net.advance(Instant::from_secs(119));
    assert_eq!(net.sent.len(), 2);
    net.advance(Instant::from_secs(120));
    let (a, b) = (net.take_events(0), net.take_events(1));
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(b.len(), 1, "{b:?}");
    let (a1, b1) = (installs(&a)[0], installs(&b)[0]);
    assert_paired(&a1, &b1);
    assert_eq!(a1.role, Role::Initiator);
    assert_ne!(a1.tx, a0.tx);
    assert_ne!(a1.local, a0.local);
    assert_eq!(a1.created, Instant::from_secs(120));
    // Both sessions live until the new one carries traffic.
    assert_eq!(net.nodes[0].sessions().count(), 2);
    net.advance(Instant::from_secs(150));
    assert!(net.take_events(0).is_empty() && net.take_events(1).is_empty());
    net.nodes[1].handle_traffic(Instant::from_secs(150), b1.local);
    net.nodes[0].handle_traffic(Instant::from_secs(150), a1.local);
    net.advance(Instant::from_secs(150) + PREVIOUS_SESSION_GRACE - Duration::from_micros(1));
    assert!(net.take_events(0).is_empty());
    net.advance(Instant::from_secs(150) + PREVIOUS_SESSION_GRACE);
    assert_eq!(
        net.take_events(0),
        [Event::Remove {
            local_index: a0.local
        }]
    );
    assert_eq!(
        net.take_events(1),
        [Event::Remove {
            local_index: b0.local
        }]
    );
    // The new session is rekeyed in turn at 240 s; the old one is never rekeyed.
    net.advance(Instant::from_secs(240));
    assert_eq!(installs(&net.take_events(0)).len(), 1);
    assert_eq!(net.nodes[0].counters().inits_sent, 3);
    assert!(net.errors.is_empty(), "{:?}", net.errors);
}

#[test]
fn unconfirmed_sessions_expire_without_rekey() {
    let mut net = Net::new(&[1, 2], |_| {});
    net.connect(0, 1);
    net.drive();
    let (a0, b0) = (
        installs(&net.take_events(0))[0],
        installs(&net.take_events(1))[0],
    );
    assert_eq!(
        net.nodes[0].poll_timeout(),
        Some(Instant::ZERO + REJECT_AFTER_TIME)
    );
    net.advance(Instant::from_secs(179));
    assert_eq!(net.sent.len(), 2, "idle sessions are not rekeyed");
    net.advance(Instant::from_secs(180));
    assert_eq!(
        net.take_events(0),
        [Event::Remove {
            local_index: a0.local
        }]
    );
    assert_eq!(
        net.take_events(1),
        [Event::Remove {
            local_index: b0.local
        }]
    );
    assert_eq!(net.nodes[0].poll_timeout(), None);
    // An old session doesn't stop a rekey the dataplane asks for.
    let mut net = Net::new(&[1, 2], |_| {});
    net.connect(0, 1);
    net.drive();
    net.now = Instant::from_secs(121);
    net.connect(0, 1);
    net.drive();
    assert_eq!(installs(&net.take_events(0)).len(), 2);
}

#[test]
fn lost_packets_retry_with_backoff_then_fail() {
    let mut net = Net::new(&[1, 2], |_| {});
    net.lose = Box::new(|_, _| true);
    net.connect(0, 1);
    net.advance(Instant::from_secs(200));
    let times: Vec<Instant> = net.sent.iter().map(|s| s.at).collect();
    assert!(net
        .sent
        .iter()
        .all(|s| s.kind == Kind::HandshakeInit && s.from == 0));
    assert_eq!(times.len(), 5, "{times:?}");
    assert_eq!(times[0], Instant::ZERO);
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let expected = [5u64, 10, 20, 30];
    for (gap, base) in gaps.iter().zip(expected) {
        let base = Duration::from_secs(base);
        assert!(
            *gap >= base && *gap <= base + REKEY_TIMEOUT_JITTER_MAX,
            "{gaps:?}"
        );
    }
    assert_eq!(net.take_events(0), [Event::Failed { dst: net.addr(1) }]);
    assert_eq!(net.nodes[0].counters().handshakes_failed, 1);
    assert_eq!(net.nodes[0].counters().init_retries, 4);
    assert_eq!(net.nodes[0].pending_handshakes(), 0);
}

#[test]
fn failed_exactly_at_attempt_time_then_retry_works() {
    let mut net = Net::new(&[1, 2], |_| {});
    net.lose = Box::new(|_, _| true);
    net.connect(0, 1);
    net.advance(Instant::ZERO + REKEY_ATTEMPT_TIME - Duration::from_micros(1));
    assert!(net.take_events(0).is_empty());
    net.advance(Instant::ZERO + REKEY_ATTEMPT_TIME);
    assert_eq!(net.take_events(0), [Event::Failed { dst: net.addr(1) }]);
    // The path heals; a new connect (the last init was long enough ago) starts at once.
    net.lose = Box::new(|_, _| false);
    net.connect(0, 1);
    net.drive();
    assert_eq!(installs(&net.take_events(0)).len(), 1);
}

#[test]
fn one_initiation_per_rekey_timeout_per_destination() {
    let mut net = Net::new(&[1, 2, 3], |c| c.limits.max_handshakes = 1);
    net.lose = Box::new(|_, _| true);
    // Many connects: one init.
    for ms in (0..4900).step_by(100) {
        net.now = Instant::from_millis(ms);
        net.connect(0, 1);
    }
    assert_eq!(net.sent.len(), 1);
    // Evict the pending handshake to B (cap 1) by connecting to C, then ask for B again at 2 s:
    // its init waits until 5 s after the last one.
    net.now = Instant::from_secs(1);
    net.connect(0, 2);
    assert_eq!(net.take_events(0), [Event::Failed { dst: net.addr(1) }]);
    assert_eq!(net.nodes[0].counters().handshakes_evicted, 1);
    net.now = Instant::from_secs(2);
    net.connect(0, 1);
    assert_eq!(net.take_events(0), [Event::Failed { dst: net.addr(2) }]);
    net.advance(Instant::from_secs(5) - Duration::from_micros(1));
    let to_b = |net: &Net| {
        net.sent
            .iter()
            .filter(|s| s.to == net.addr(1))
            .map(|s| s.at)
            .collect::<Vec<_>>()
    };
    assert_eq!(to_b(&net), [Instant::ZERO]);
    net.advance(Instant::from_secs(5));
    assert_eq!(to_b(&net), [Instant::ZERO, Instant::from_secs(5)]);
    // Over a long run, inits to B are always at least REKEY_TIMEOUT apart.
    net.advance(Instant::from_secs(100));
    let times = to_b(&net);
    assert!(
        times.windows(2).all(|w| w[1] - w[0] >= REKEY_TIMEOUT),
        "{times:?}"
    );
}

#[test]
fn flood_of_inits_stays_within_caps() {
    let mut net = Net::new(&[1, 2], |c| {
        c.limits.max_sessions = 16;
        c.limits.max_unconfirmed = 4;
        c.limits.max_replay_entries = 8;
        c.limits.max_queued = 64;
        c.limits.init_rate = 1_000_000;
        c.limits.init_burst = 1_000_000;
    });
    // A legitimate confirmed session first.
    net.connect(0, 1);
    net.drive();
    let b0 = installs(&net.take_events(1))[0];
    net.nodes[1].handle_traffic(Instant::ZERO, b0.local);
    let target = net.key(1);
    let mut buf = Vec::new();
    for i in 0..40u32 {
        let mut bytes = [0u8; 32];
        bytes[..4].copy_from_slice(&i.to_be_bytes());
        bytes[31] = 0x55;
        let fake = SecretKey::from_bytes(bytes);
        let pkt = forged_init(&fake, fake.public_key().address(), &target, ts(5));
        let m = &mut net.nodes[1];
        m.handle_packet(Instant::from_millis(u64::from(i)), &pkt)
            .unwrap();
        while m.poll_transmit(&mut buf).is_some() {}
        while m.poll_event().is_some() {}
        assert!(m.sessions().count() <= 16);
        assert!(m.sessions().filter(|s| !s.confirmed).count() <= 4);
        assert!(m.replay.len() <= 8 && m.replay_order.len() == m.replay.len());
    }
    let m = &net.nodes[1];
    assert_eq!(m.sessions().count(), 5);
    assert_eq!(m.counters().sessions_evicted, 36);
    // The confirmed session survived the flood.
    assert!(m.sessions().any(|s| s.local_index == b0.local));
}

#[test]
fn init_rate_limit_and_queue_bounds() {
    let mut net = Net::new(&[1, 2], |c| {
        c.limits.init_rate = 5;
        c.limits.init_burst = 10;
        c.limits.max_queued = 8;
    });
    let target = net.key(1);
    let mut ok = 0;
    for i in 0..30u32 {
        let mut bytes = [7u8; 32];
        bytes[..4].copy_from_slice(&i.to_be_bytes());
        let fake = SecretKey::from_bytes(bytes);
        let pkt = forged_init(&fake, fake.public_key().address(), &target, ts(5));
        match net.nodes[1].handle_packet(Instant::ZERO, &pkt) {
            Ok(()) => ok += 1,
            Err(E2eError::RateLimited) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(ok, 10);
    let m = &mut net.nodes[1];
    assert_eq!(m.counters().rate_limited, 20);
    // Nobody polled: the queues stayed at their cap and the rest was counted.
    assert_eq!(m.transmits.len(), 8);
    assert_eq!(m.events.len(), 8);
    assert!(m.counters().queue_overflow > 0);
    // One second refills five tokens.
    let fake = SecretKey::from_bytes([9; 32]);
    let pkt = forged_init(&fake, fake.public_key().address(), &target, ts(5));
    m.handle_packet(Instant::from_secs(1), &pkt).unwrap();
}

#[test]
fn pending_handshakes_capped() {
    let secrets: Vec<u8> = (1..=12).collect();
    let mut net = Net::new(&secrets, |c| c.limits.max_handshakes = 4);
    net.lose = Box::new(|_, _| true);
    for to in 1..12 {
        net.connect(0, to);
        assert!(net.nodes[0].pending_handshakes() <= 4);
    }
    let failed = net
        .take_events(0)
        .iter()
        .filter(|e| matches!(e, Event::Failed { .. }))
        .count();
    assert_eq!(failed, 7);
    assert_eq!(net.nodes[0].counters().handshakes_evicted, 7);
}

fn simultaneous(secrets: [u8; 2]) {
    let mut net = Net::new(&secrets, |_| {});
    // Both connect before either init arrives.
    net.connect(0, 1);
    net.connect(1, 0);
    net.drive();
    let (ea, eb) = (net.take_events(0), net.take_events(1));
    let (ia, ib) = (installs(&ea), installs(&eb));
    assert_eq!(ia.len(), 1, "{ea:?}");
    assert_eq!(ib.len(), 1, "{eb:?}");
    assert!(removes(&ea).is_empty() && removes(&eb).is_empty());
    assert_paired(&ia[0], &ib[0]);
    // The lower key's handshake is the one that completed.
    let lower = usize::from(net.key(1) < net.key(0));
    let (init, resp) = if lower == 0 {
        (ia[0], ib[0])
    } else {
        (ib[0], ia[0])
    };
    assert_eq!(init.role, Role::Initiator);
    assert_eq!(resp.role, Role::Responder);
    assert_eq!(net.nodes[lower].counters().glare, 1);
    assert_eq!(net.nodes[0].pending_handshakes(), 0);
    assert_eq!(net.nodes[1].pending_handshakes(), 0);
    // Traffic in both directions confirms it, nothing else happens, and a later connect from
    // either side finds the session.
    net.nodes[1 - lower].handle_traffic(Instant::ZERO, resp.local);
    net.nodes[lower].handle_traffic(Instant::ZERO, init.local);
    net.connect(0, 1);
    net.connect(1, 0);
    net.advance(Instant::from_secs(60));
    assert!(net.take_events(0).is_empty() && net.take_events(1).is_empty());
    assert_eq!(net.sent.len(), 3);
}

#[test]
fn simultaneous_initiation_both_key_orders() {
    simultaneous([1, 2]);
    simultaneous([2, 1]);
}

#[test]
fn simultaneous_with_one_init_lost() {
    // The winner's first init is lost; it ignores the loser's init, retries, and the loser answers.
    let mut net = Net::new(&[1, 2], |_| {});
    let lower = usize::from(net.key(1) < net.key(0));
    let mut lost = false;
    net.lose = Box::new(move |from, _| {
        if from == lower && !lost {
            lost = true;
            return true;
        }
        false
    });
    net.connect(0, 1);
    net.connect(1, 0);
    net.advance(Instant::from_secs(30));
    let (ia, ib) = (installs(&net.take_events(0)), installs(&net.take_events(1)));
    assert_eq!(ia.len(), 1);
    assert_eq!(ib.len(), 1);
    assert_paired(&ia[0], &ib[0]);
}

#[test]
fn responder_initiates_later_and_sessions_converge() {
    // A initiates; B later wants a session of its own (its responder session unconfirmed because
    // A's traffic was lost). Both pairs work; once each side has received on the newer one, the
    // older is removed on both sides.
    let mut net = Net::new(&[1, 2], |_| {});
    net.connect(0, 1);
    net.drive();
    let (a0, b0) = (
        installs(&net.take_events(0))[0],
        installs(&net.take_events(1))[0],
    );
    net.now = Instant::from_secs(1);
    net.connect(1, 0);
    net.drive();
    let (a1, b1) = (
        installs(&net.take_events(0))[0],
        installs(&net.take_events(1))[0],
    );
    assert_paired(&a1, &b1);
    assert_eq!(b1.role, Role::Initiator);
    net.nodes[0].handle_traffic(Instant::from_secs(2), a1.local);
    net.nodes[1].handle_traffic(Instant::from_secs(2), b1.local);
    net.advance(Instant::from_secs(2) + PREVIOUS_SESSION_GRACE);
    assert_eq!(
        net.take_events(0),
        [Event::Remove {
            local_index: a0.local
        }]
    );
    assert_eq!(
        net.take_events(1),
        [Event::Remove {
            local_index: b0.local
        }]
    );
}

#[test]
fn bad_packets_are_errors() {
    let mut net = Net::new(&[1, 2, 3], |_| {});
    let m = &mut net.nodes[1];
    let now = Instant::ZERO;
    assert!(matches!(
        m.handle_packet(now, &[]),
        Err(E2eError::Malformed(_))
    ));
    assert!(matches!(
        m.handle_packet(now, &[0x02; 60]),
        Err(E2eError::Malformed(_))
    ));
    let mut pkt = forged_init(
        &secret(1),
        secret(1).public_key().address(),
        &secret(2).public_key(),
        ts(9),
    );
    // Not for us.
    let mut other = pkt.clone();
    other[32..48].copy_from_slice(&secret(3).public_key().address().octets());
    assert!(matches!(
        m.handle_packet(now, &other),
        Err(E2eError::NotForUs(_))
    ));
    // Truncated Noise message.
    assert!(matches!(
        m.handle_packet(now, &pkt[..pkt.len() - 1]),
        Err(E2eError::BadLength(112))
    ));
    // Non-zero receiver index in an init.
    let mut indexed = pkt.clone();
    indexed[7] = 1;
    assert!(matches!(
        m.handle_packet(now, &indexed),
        Err(E2eError::BadIndex)
    ));
    // A flipped bit in the Noise message.
    let last = pkt.len() - 1;
    pkt[last] ^= 1;
    assert!(matches!(
        m.handle_packet(now, &pkt),
        Err(E2eError::AuthFailed(_))
    ));
    // A response for nothing.
    let mut resp = vec![0u8; HEADER_LEN + 52];
    let mut view = Packet::new_unchecked(&mut resp[..]);
    Repr {
        hop_limit: 3,
        kind: Kind::HandshakeResp,
        receiver_index: 77,
        counter: 0,
        src: secret(1).public_key().address().ip(),
        dst: m.address().ip(),
    }
    .emit(&mut view);
    assert!(matches!(
        m.handle_packet(now, &resp),
        Err(E2eError::UnknownIndex(77))
    ));
    // A transport packet is not a handshake.
    resp[2] = 0;
    assert!(matches!(
        m.handle_packet(now, &resp),
        Err(E2eError::NotHandshake)
    ));
    let c = m.counters().clone();
    assert_eq!(
        (c.malformed, c.not_for_us, c.auth_failed, c.unknown_index),
        (4, 2, 1, 1)
    );
    assert!(m.poll_event().is_none());
    assert!(m.poll_transmit(&mut Vec::new()).is_none());
}

#[test]
fn unknown_cipher_refused() {
    let a = secret(1);
    let b = secret(2).public_key();
    let payload = InitPayload {
        sender_index: 5,
        timestamp: ts(3),
        cipher: 9,
    };
    let prologue = handshake::prologue(a.public_key().address().octets(), b.address().octets());
    let (_, msg) = handshake::initiate(a.as_bytes(), &b, &prologue, &payload).unwrap();
    let mut pkt = vec![0u8; HEADER_LEN + msg.len()];
    let mut view = Packet::new_unchecked(&mut pkt[..]);
    Repr {
        hop_limit: 1,
        kind: Kind::HandshakeInit,
        receiver_index: 0,
        counter: 0,
        src: a.public_key().address().ip(),
        dst: b.address().ip(),
    }
    .emit(&mut view);
    view.payload_mut().copy_from_slice(&msg);
    let mut m = SessionManager::new(E2eConfig::new(secret(2)), Instant::ZERO);
    assert!(matches!(
        m.handle_packet(Instant::ZERO, &pkt),
        Err(E2eError::UnknownCipher(9))
    ));
    assert_eq!(m.counters().unknown_cipher, 1);
}

#[test]
fn timestamps_monotonic_across_restart() {
    // A restarted initiator (new manager, later wall clock) is accepted; one whose wall clock went
    // backwards is refused until its clock passes the remembered timestamp.
    let mut b = SessionManager::new(E2eConfig::new(secret(2)), Instant::ZERO);
    let mk = |wall: u64| {
        let mut c = E2eConfig::new(secret(1));
        c.wall_clock = Duration::from_secs(wall);
        SessionManager::new(c, Instant::from_secs(1000))
    };
    let init_from = |a: &mut SessionManager, now: Instant| {
        a.connect(
            now,
            secret(2).public_key().address(),
            Some(secret(2).public_key()),
        )
        .unwrap();
        let mut buf = Vec::new();
        a.poll_transmit(&mut buf).unwrap();
        buf
    };
    let mut a = mk(100);
    let p = init_from(&mut a, Instant::from_secs(1000));
    b.handle_packet(Instant::ZERO, &p).unwrap();
    let mut a = mk(200);
    let p = init_from(&mut a, Instant::from_secs(1000));
    b.handle_packet(Instant::ZERO, &p).unwrap();
    let mut a = mk(150);
    let p = init_from(&mut a, Instant::from_secs(1000));
    assert!(matches!(
        b.handle_packet(Instant::ZERO, &p),
        Err(E2eError::Replay)
    ));
}

#[test]
fn indices_unique_among_live_sessions() {
    let secrets: Vec<u8> = (1..=20).collect();
    let mut net = Net::new(&secrets, |c| c.seed = 7);
    for to in 1..20 {
        net.connect(0, to);
    }
    net.drive();
    let mut idx: Vec<u32> = net.nodes[0].sessions().map(|s| s.local_index).collect();
    assert_eq!(idx.len(), 19);
    idx.sort_unstable();
    idx.dedup();
    assert_eq!(idx.len(), 19);
    assert!(!idx.contains(&0));
}

#[test]
fn own_address_and_forget_sessions() {
    let mut net = Net::new(&[1, 2], |_| {});
    let (me, my_key) = (net.addr(0), net.key(0));
    assert!(matches!(
        net.nodes[0].connect(Instant::ZERO, me, Some(my_key)),
        Err(E2eError::OwnAddress)
    ));
    net.connect(0, 1);
    net.drive();
    assert_eq!(installs(&net.take_events(0)).len(), 1);
    // A restarted dataplane: the sessions are forgotten and the next connect handshakes again.
    net.nodes[0].forget_sessions();
    assert_eq!(net.nodes[0].sessions().count(), 0);
    net.now = Instant::from_secs(6);
    net.connect(0, 1);
    net.drive();
    assert_eq!(installs(&net.take_events(0)).len(), 1);
    assert_eq!(
        net.nodes[0].poll_timeout(),
        Some(Instant::from_secs(6) + REJECT_AFTER_TIME)
    );
}

#[test]
fn injected_resp_does_not_break_the_handshake() {
    // An attacker who learnt the initiator's index answers first with garbage: authentication
    // fails, the retry after REKEY_TIMEOUT completes with the real responder.
    let mut net = Net::new(&[1, 2, 3], |_| {});
    let captured = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let c = captured.clone();
    net.lose = Box::new(move |from, bytes| {
        if from == 1 {
            c.borrow_mut().push(bytes.to_vec());
            return true;
        }
        false
    });
    net.connect(0, 1);
    net.drive();
    let resp = captured.borrow()[0].clone();
    // Same index, wrong bytes.
    let mut forged = resp.clone();
    forged[60] ^= 0xff;
    let r = net.nodes[0].handle_packet(net.now, &forged);
    assert!(matches!(r, Err(E2eError::AuthFailed(_))), "{r:?}");
    // The genuine response now finds no handshake state: that attempt is spent.
    let r = net.nodes[0].handle_packet(net.now, &resp);
    assert!(matches!(r, Err(E2eError::UnknownIndex(_))), "{r:?}");
    // Same index from another source address: unknown as well.
    let mut moved = resp.clone();
    moved[16..32].copy_from_slice(&net.addr(2).octets());
    let r = net.nodes[0].handle_packet(net.now, &moved);
    assert!(matches!(r, Err(E2eError::UnknownIndex(_))), "{r:?}");
    net.lose = Box::new(|_, _| false);
    net.advance(Instant::from_secs(6));
    let (ia, ib) = (installs(&net.take_events(0)), installs(&net.take_events(1)));
    assert_eq!(ia.len(), 1);
    // B answered both inits; the second pairs with A's session.
    assert_eq!(ib.len(), 2);
    assert_paired(&ia[0], &ib[1]);
    assert_eq!(net.nodes[0].counters().init_retries, 1);
}

#[test]
fn rekeyed_session_never_confirmed_old_goes_at_reject_time() {
    let mut net = Net::new(&[1, 2], |_| {});
    net.connect(0, 1);
    net.drive();
    let (a0, b0) = (
        installs(&net.take_events(0))[0],
        installs(&net.take_events(1))[0],
    );
    net.nodes[0].handle_traffic(Instant::ZERO, a0.local);
    net.nodes[1].handle_traffic(Instant::ZERO, b0.local);
    net.advance(Instant::from_secs(120));
    let a1 = installs(&net.take_events(0))[0];
    assert_eq!(installs(&net.take_events(1)).len(), 1);
    let view = |net: &Net, i: u32| net.nodes[0].sessions().find(|s| s.local_index == i);
    assert_eq!(view(&net, a0.local).map(|v| v.retiring), Some(None));
    assert_eq!(view(&net, a1.local).map(|v| v.confirmed), Some(false));
    net.advance(Instant::from_secs(180));
    assert_eq!(
        net.take_events(0),
        [Event::Remove {
            local_index: a0.local
        }]
    );
    assert_eq!(
        net.take_events(1),
        [Event::Remove {
            local_index: b0.local
        }]
    );
    assert!(view(&net, a1.local).is_some());
    // The unconfirmed successor is not rekeyed and expires at 300 s.
    net.advance(Instant::from_secs(300));
    assert_eq!(
        net.take_events(0),
        [Event::Remove {
            local_index: a1.local
        }]
    );
    assert_eq!(net.nodes[0].counters().inits_sent, 2);
}

#[test]
fn any_address_in_the_peers_64_reaches_the_node() {
    let mut net = Net::new(&[1, 2, 3], |_| {});
    let node = net.addr(1);
    let mut host = node.octets();
    host[15] ^= 0x5a;
    host[8] ^= 0x01;
    let host = OverlayAddr::new(core::net::Ipv6Addr::from(host)).unwrap();
    assert_ne!(host, node);
    // No route yet: the route request names the address asked for.
    net.nodes[0].connect(Instant::ZERO, host, None).unwrap();
    assert_eq!(
        net.nodes[0].poll_event(),
        Some(Event::NeedRoute { dst: host })
    );
    // A route request for another address of the same /64 is rate-limited with it.
    net.nodes[0].connect(Instant::ZERO, node, None).unwrap();
    assert_eq!(net.nodes[0].poll_event(), None);
    let key = net.key(1);
    net.nodes[0]
        .connect(Instant::ZERO, host, Some(key))
        .unwrap();
    net.drive();
    let ia = installs(&net.take_events(0));
    assert_eq!(ia.len(), 1);
    assert_eq!(ia[0].peer, node);
    assert!(net.sent.iter().all(|s| s.to == node || s.to == net.addr(0)));
    // The node's own address then finds the same session.
    net.nodes[0]
        .connect(Instant::ZERO, node, Some(key))
        .unwrap();
    net.drive();
    assert_eq!(net.sent.len(), 2);
    // A key owning another /64 is refused.
    let other = net.key(2);
    assert!(matches!(
        net.nodes[0].connect(Instant::ZERO, host, Some(other)),
        Err(E2eError::KeyMismatch { .. })
    ));
}

mod random_ops {
    //! Random sequences of connects, losses, traffic reports and time jumps on three nodes: the
    //! event stream always mirrors the session table (what the dataplane installs is what the core
    //! holds), paired installs always carry mirrored keys, and afterwards every node reaches every
    //! other.
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[derive(Debug, Clone)]
    enum Op {
        Connect(usize, usize),
        Advance(u64),
        Traffic(usize, usize),
        Loss(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3usize, 0..3usize).prop_map(|(a, b)| Op::Connect(a, b)),
            3 => (0..60_000u64).prop_map(Op::Advance),
            3 => (0..3usize, 0..8usize).prop_map(|(n, k)| Op::Traffic(n, k)),
            1 => any::<bool>().prop_map(Op::Loss),
        ]
    }

    /// Installed sessions per node as the events say, and every install's keys.
    #[derive(Default)]
    struct Mirror {
        installed: Vec<HashSet<u32>>,
        keys: HashMap<(usize, u32), Inst>,
    }

    impl Mirror {
        fn absorb(&mut self, net: &mut Net) {
            for i in 0..net.nodes.len() {
                for e in net.take_events(i) {
                    match e {
                        Event::Install { .. } => {
                            let inst = installs(&[e])[0];
                            assert!(self.installed[i].insert(inst.local), "double install");
                            self.keys.insert((i, inst.local), inst);
                        }
                        Event::Remove { local_index } => {
                            assert!(self.installed[i].remove(&local_index), "remove unknown");
                        }
                        Event::Failed { .. } | Event::NeedRoute { .. } => {}
                    }
                }
                let live: HashSet<u32> = net.nodes[i].sessions().map(|s| s.local_index).collect();
                assert_eq!(live, self.installed[i]);
                assert!(net.nodes[i].pending_handshakes() <= 2);
            }
            // Any two installs that name each other carry mirrored keys.
            for (&(i, local), a) in &self.keys {
                let j = net
                    .nodes
                    .iter()
                    .position(|m| m.address() == a.peer)
                    .unwrap();
                if let Some(b) = self.keys.get(&(j, a.remote)) {
                    if b.remote == local {
                        assert_paired(a, b);
                    }
                }
                let _ = i;
            }
        }

        /// Whether `i` has a live session to `j` whose counterpart `j` still holds.
        fn reaches(&self, net: &Net, i: usize, j: usize) -> bool {
            net.nodes[i].sessions().any(|s| {
                s.peer == net.addr(j)
                    && s.retiring.is_none()
                    && self.installed[j].contains(&s.remote_index)
                    && self.keys.get(&(j, s.remote_index)).map(|b| b.remote) == Some(s.local_index)
            })
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]
        #[test]
        fn event_stream_mirrors_state(ops in proptest::collection::vec(op(), 1..24)) {
            let mut net = Net::new(&[1, 2, 3], |_| {});
            let mut mirror = Mirror { installed: vec![HashSet::new(); 3], ..Mirror::default() };
            let lossy = std::rc::Rc::new(std::cell::Cell::new(false));
            let l = lossy.clone();
            net.lose = Box::new(move |_, _| l.get());
            for op in ops {
                match op {
                    Op::Connect(a, b) if a != b => net.connect(a, b),
                    Op::Connect(..) => {}
                    Op::Advance(ms) => net.advance(net.now + Duration::from_millis(ms)),
                    Op::Traffic(n, k) => {
                        let mut idx: Vec<u32> = net.nodes[n].sessions().map(|s| s.local_index).collect();
                        idx.sort_unstable();
                        if let Some(&i) = idx.get(k % idx.len().max(1)) {
                            net.nodes[n].handle_traffic(net.now, i);
                        }
                    }
                    Op::Loss(on) => lossy.set(on),
                }
                net.drive();
                mirror.absorb(&mut net);
            }
            // Heal the network; everyone asks for everyone, and again after the longest retry
            // interval (a handshake may have given up meanwhile).
            lossy.set(false);
            for round in [MAX_RETRY_INTERVAL, REKEY_TIMEOUT] {
                for a in 0..3 {
                    for b in 0..3 {
                        if a != b {
                            net.connect(a, b);
                        }
                    }
                }
                net.advance(net.now + round + Duration::from_secs(1));
                mirror.absorb(&mut net);
            }
            for a in 0..3 {
                for b in 0..3 {
                    if a != b {
                        prop_assert!(mirror.reaches(&net, a, b), "{a} cannot reach {b}");
                    }
                }
            }
        }
    }
}
