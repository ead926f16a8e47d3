//! The bus over an in-memory network with explicit time, seeded loss, delay and reordering
//! (quinn-proto's `Pair`, for N buses).

use std::collections::BTreeMap;
use std::time::Duration;

use hypha_proto::addr::OverlayAddr;
use hypha_proto::time::Instant;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

fn addr(n: u8) -> OverlayAddr {
    OverlayAddr::new(std::net::Ipv6Addr::new(
        0x400,
        0,
        0,
        0,
        0,
        0,
        0,
        u16::from(n),
    ))
    .expect("in 400::/7")
}

struct Net {
    now: Instant,
    nodes: Vec<(OverlayAddr, Bus)>,
    /// (deliver_at, seq) -> (from, to, frame)
    queue: BTreeMap<(Instant, u64), (OverlayAddr, OverlayAddr, Vec<u8>)>,
    seq: u64,
    loss: f64,
    delay: Duration,
    jitter: Duration,
    /// Frames to this address are dropped (an unreachable node).
    blackhole: Option<OverlayAddr>,
    rng: StdRng,
    events: Vec<(OverlayAddr, Event)>,
    frames: u64,
    duplicate_every: u64,
}

impl Net {
    fn new(n: u8, cfg: BusConfig, seed: u64) -> Net {
        let now = Instant::from_secs(1);
        let nodes = (1..=n)
            .map(|i| {
                let cfg = BusConfig {
                    rng_seed: seed ^ u64::from(i),
                    ..cfg.clone()
                };
                (addr(i), Bus::new(cfg, now))
            })
            .collect();
        Net {
            now,
            nodes,
            queue: BTreeMap::new(),
            seq: 0,
            loss: 0.0,
            delay: Duration::from_millis(1),
            jitter: Duration::ZERO,
            blackhole: None,
            rng: StdRng::seed_from_u64(seed),
            events: Vec::new(),
            frames: 0,
            duplicate_every: 0,
        }
    }

    fn bus(&mut self, n: u8) -> &mut Bus {
        &mut self.nodes[usize::from(n) - 1].1
    }

    fn flush(&mut self) {
        let mut buf = Vec::new();
        for i in 0..self.nodes.len() {
            let from = self.nodes[i].0;
            while let Some(to) = self.nodes[i].1.poll_transmit(self.now, &mut buf) {
                self.frames += 1;
                let lost = self.rng.random_bool(self.loss) || Some(to) == self.blackhole;
                if lost {
                    continue;
                }
                let copies = if self.duplicate_every > 0
                    && self.frames.is_multiple_of(self.duplicate_every)
                {
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    let jitter = if self.jitter.is_zero() {
                        Duration::ZERO
                    } else {
                        self.jitter.mul_f64(self.rng.random::<f64>())
                    };
                    self.seq += 1;
                    self.queue.insert(
                        (self.now + self.delay + jitter, self.seq),
                        (from, to, buf.clone()),
                    );
                }
            }
            while let Some(e) = self.nodes[i].1.poll_event() {
                self.events.push((from, e));
            }
        }
    }

    /// One step: send what's queued, jump to the next delivery or timer, process it.
    fn step(&mut self) -> bool {
        self.flush();
        let next_frame = self.queue.keys().next().map(|k| k.0);
        let next_timer = self
            .nodes
            .iter()
            .filter_map(|(_, b)| b.poll_timeout())
            .min();
        let Some(next) = [next_frame, next_timer].into_iter().flatten().min() else {
            return false;
        };
        self.now = self.now.max(next);
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let (from, to, bytes) = entry.remove();
            if let Some((_, bus)) = self.nodes.iter_mut().find(|(a, _)| *a == to) {
                bus.handle_frame(self.now, from, &bytes)
                    .expect("well-formed frames from honest peers");
            }
        }
        let now = self.now;
        for (_, b) in &mut self.nodes {
            if b.poll_timeout().is_some_and(|t| t <= now) {
                b.handle_timeout(now);
            }
        }
        self.flush();
        true
    }

    fn drive_until(&mut self, limit: Instant, mut done: impl FnMut(&mut Net) -> bool) {
        while !done(self) {
            assert!(self.now <= limit, "not done by {limit}");
            if !self.step() {
                return;
            }
        }
    }
}

fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut r = StdRng::seed_from_u64(seed);
    (0..len).map(|_| r.random()).collect()
}

#[test]
fn one_mib_with_loss_and_delay_arrives_intact() {
    let mut net = Net::new(2, BusConfig::default(), 7);
    net.loss = 0.05;
    net.delay = Duration::from_millis(20);
    let data = payload(1 << 20, 1);
    let t0 = net.now;
    let id = net
        .bus(1)
        .push(t0, addr(2), b"bulk", data.clone(), None, None)
        .expect("fits");
    assert_eq!(
        net.bus(1).status(id).map(|s| s.state),
        Some(MessageState::Pending)
    );
    net.drive_until(t0 + Duration::from_secs(60), |n| {
        n.events.contains(&(addr(1), Event::Delivered { id }))
    });
    let took = net.now - t0;
    let now = net.now;
    let got = net
        .bus(2)
        .pop_inbound(now, Some(b"bulk"), false)
        .expect("received");
    assert_eq!(got.src, addr(1));
    assert_eq!(got.id, id);
    assert_eq!(blake3::hash(&got.payload), blake3::hash(&data));
    assert_eq!(got.payload, data);
    assert_eq!(
        net.bus(1).status(id).map(|s| s.state),
        Some(MessageState::Delivered)
    );
    assert_eq!(
        net.bus(2).status(id).map(|s| s.state),
        Some(MessageState::Read)
    );
    let c1 = net.bus(1).counters().clone();
    assert!(
        c1.chunks_retransmitted > 0,
        "5% loss must cause retransmissions"
    );
    assert_eq!(c1.outbound_bytes, 0);
    assert_eq!(net.bus(2).counters().inbound_bytes, 0);
    // Loss recovery keeps to RTT scale: ~874 chunks at a 128-chunk window over a 40 ms RTT.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let srtt = net.bus(1).srtt(addr(2)).expect("measured");
    assert!(
        srtt >= Duration::from_millis(40) && srtt < Duration::from_millis(200),
        "{srtt:?}"
    );
}

#[test]
fn reordering_and_duplicates_are_harmless() {
    let cfg = BusConfig {
        chunk_size: 100,
        ..BusConfig::default()
    };
    let mut net = Net::new(2, cfg, 3);
    net.delay = Duration::from_millis(5);
    net.jitter = Duration::from_millis(30);
    net.duplicate_every = 3;
    let data = payload(50_000, 2);
    let t0 = net.now;
    let id = net
        .bus(1)
        .push(t0, addr(2), b"", data.clone(), None, None)
        .expect("fits");
    net.drive_until(t0 + Duration::from_secs(60), |n| {
        n.events.contains(&(addr(1), Event::Delivered { id }))
    });
    // Let the stragglers (duplicates still in the network) arrive, then check one delivery only.
    let end = net.now + Duration::from_secs(2);
    net.drive_until(end + Duration::from_secs(1), |n| n.now >= end);
    let received = net
        .events
        .iter()
        .filter(|e| **e == (addr(2), Event::Received { id }))
        .count();
    assert_eq!(received, 1);
    assert!(net.bus(2).counters().duplicate_chunks > 0);
    let now = net.now;
    let got = net.bus(2).pop_inbound(now, None, false).expect("one");
    assert_eq!(got.payload, data);
    let now = net.now;
    assert!(net.bus(2).pop_inbound(now, None, false).is_none());
}

#[test]
fn a_resent_message_after_completion_is_not_delivered_twice() {
    // The COMPLETE ack is lost every time until the receiver has delivered: the sender keeps
    // probing, the receiver answers from its completed set, and the inbox holds one copy.
    let mut net = Net::new(2, BusConfig::default(), 11);
    net.loss = 0.3;
    let t0 = net.now;
    let id = net
        .bus(1)
        .push(t0, addr(2), b"t", b"once".to_vec(), None, None)
        .expect("fits");
    net.drive_until(t0 + Duration::from_secs(120), |n| {
        n.events.contains(&(addr(1), Event::Delivered { id }))
    });
    assert_eq!(net.bus(2).counters().received, 1);
    assert_eq!(net.bus(2).counters().inbox_len, 1);
}

#[test]
fn deadline_expiry_aborts_and_releases_memory() {
    let mut net = Net::new(2, BusConfig::default(), 5);
    net.blackhole = Some(addr(2));
    let t0 = net.now;
    let idle = net.bus(1).counters().clone();
    let id = net
        .bus(1)
        .push(
            t0,
            addr(2),
            b"",
            payload(200_000, 4),
            Some(Duration::from_secs(10)),
            None,
        )
        .expect("fits");
    assert!(net.bus(1).counters().outbound_bytes >= 200_000);
    net.drive_until(t0 + Duration::from_secs(11), |n| {
        n.events.contains(&(addr(1), Event::Aborted { id }))
    });
    assert!(net.now >= t0 + Duration::from_secs(10));
    let st = net.bus(1).status(id).expect("kept");
    assert_eq!(st.state, MessageState::Aborted);
    let c = net.bus(1).counters();
    assert_eq!(c.outbound_bytes, idle.outbound_bytes);
    assert_eq!(c.outbound_active, 0);
    assert_eq!(c.aborted, 1);
    // Backoff: far fewer retransmissions than 10 s / 100 ms per chunk in the window.
    assert!(
        c.chunks_retransmitted < 128 * 10,
        "{}",
        c.chunks_retransmitted
    );
    // Nothing left to do but expire the status.
    let next = net.bus(1).poll_timeout().expect("status expiry");
    assert!(next >= net.now + Duration::from_secs(3000));
}

#[test]
fn reply_flow() {
    let mut net = Net::new(2, BusConfig::default(), 9);
    net.delay = Duration::from_millis(10);
    let t0 = net.now;
    let id = net
        .bus(1)
        .push(t0, addr(2), b"ask", b"ping".to_vec(), None, None)
        .expect("fits");
    net.drive_until(t0 + Duration::from_secs(5), |n| {
        n.events.contains(&(addr(2), Event::Received { id }))
    });
    let now = net.now;
    let q = net
        .bus(2)
        .pop_inbound(now, Some(b"ask"), false)
        .expect("arrived");
    assert_eq!(q.payload, b"ping");
    assert_eq!(net.bus(2).knows_inbound(id), Some(addr(1)));
    let rid = net
        .bus(2)
        .push(now, q.src, b"ask", b"pong".to_vec(), None, Some(q.id))
        .expect("fits");
    net.drive_until(now + Duration::from_secs(5), |n| {
        n.events.contains(&(addr(1), Event::Received { id: rid }))
    });
    let now = net.now;
    // A plain receive with another topic doesn't see it; take_reply does.
    assert!(net.bus(1).pop_inbound(now, Some(b"other"), false).is_none());
    let r = net.bus(1).take_reply(now, id).expect("reply");
    assert_eq!(r.payload, b"pong");
    assert_eq!(r.reply_to, Some(id));
    assert!(net.bus(1).take_reply(now, id).is_none());
}

#[test]
fn limits_refuse_pushes_and_backpressure_inbound() {
    let cfg = BusConfig {
        max_message_size: 1000,
        max_outbound_per_dst: 3000,
        max_outbound_total: 5000,
        max_inbound_per_src: 2000,
        max_inbound_total: 10_000,
        ..BusConfig::default()
    };
    let mut net = Net::new(3, cfg, 1);
    let t0 = net.now;
    let b = net.bus(1);
    assert_eq!(
        b.push(t0, addr(2), b"", vec![0; 1001], None, None),
        Err(PushError::TooLarge {
            len: 1001,
            max: 1000
        })
    );
    assert_eq!(
        b.push(t0, addr(2), &[0; 256], vec![], None, None),
        Err(PushError::TopicTooLong(256))
    );
    assert_eq!(
        b.push(t0, addr(2), b"", vec![], Some(Duration::ZERO), None),
        Err(PushError::InvalidDeadline)
    );
    let a = b
        .push(t0, addr(2), b"", vec![1; 1000], None, None)
        .expect("1st");
    let a2 = b
        .push(t0, addr(2), b"", vec![2; 1000], None, None)
        .expect("2nd");
    assert_eq!(
        b.push(t0, addr(2), b"", vec![3; 1000], None, None),
        Err(PushError::DestinationFull(addr(2)))
    );
    let c = b
        .push(t0, addr(3), b"", vec![4; 1000], None, None)
        .expect("other dst");
    assert_eq!(
        b.push(t0, addr(3), b"", vec![5; 1000], None, None),
        Err(PushError::TotalFull)
    );
    assert_eq!(b.counters().push_refused, 5);
    // Receiver 2 holds at most 2000 bytes from node 1: the first message is accepted, the second
    // waits (unacked) until the application reads the first.
    net.drive_until(t0 + Duration::from_secs(5), |n| {
        n.events.contains(&(addr(1), Event::Delivered { id: a }))
            && n.events.contains(&(addr(1), Event::Delivered { id: c }))
    });
    let settle = net.now + Duration::from_secs(3);
    net.drive_until(settle + Duration::from_secs(1), |n| n.now >= settle);
    assert!(!net.events.contains(&(addr(1), Event::Delivered { id: a2 })));
    assert!(net.bus(2).counters().chunks_refused_full > 0);
    assert!(matches!(
        net.bus(1).status(a2).map(|s| s.state),
        Some(MessageState::Sending { .. })
    ));
    let now = net.now;
    assert_eq!(
        net.bus(2).pop_inbound(now, None, false).map(|m| m.id),
        Some(a)
    );
    net.drive_until(now + Duration::from_secs(30), |n| {
        n.events.contains(&(addr(1), Event::Delivered { id: a2 }))
    });
}

#[test]
fn checksum_mismatch_is_reported_and_resent() {
    // Node 2 receives one chunk with corrupted bytes (a buggy sender): the whole message fails its
    // checksum, node 2 says FAILED, node 1 sends everything again and it arrives intact.
    let cfg = BusConfig {
        chunk_size: 10,
        ..BusConfig::default()
    };
    let mut bus1 = Bus::new(cfg.clone(), Instant::ZERO);
    let mut bus2 = Bus::new(cfg, Instant::ZERO);
    let data = payload(25, 8);
    let mut now = Instant::from_millis(1);
    let id = bus1
        .push(now, addr(2), b"", data.clone(), None, None)
        .expect("fits");
    let mut buf = Vec::new();
    let mut first = true;
    for _ in 0..200 {
        while let Some(to) = bus1.poll_transmit(now, &mut buf) {
            assert_eq!(to, addr(2));
            if first {
                // Flip a payload byte of chunk 0.
                if let Some(b) = buf.last_mut() {
                    *b ^= 1;
                }
                first = false;
            }
            bus2.handle_frame(now, addr(1), &buf).expect("parses");
        }
        while let Some(to) = bus2.poll_transmit(now, &mut buf) {
            assert_eq!(to, addr(1));
            bus1.handle_frame(now, addr(2), &buf).expect("parses");
        }
        if bus1.counters().delivered == 1 {
            break;
        }
        now += Duration::from_millis(50);
        bus1.handle_timeout(now);
        bus2.handle_timeout(now);
    }
    assert_eq!(bus2.counters().checksum_failures, 1);
    assert_eq!(
        bus1.status(id).map(|s| s.state),
        Some(MessageState::Delivered)
    );
    assert_eq!(
        bus2.pop_inbound(now, None, false).map(|m| m.payload),
        Some(data)
    );
}

#[test]
fn sending_status_counts_chunks_and_empty_messages_work() {
    let cfg = BusConfig {
        chunk_size: 100,
        window: 4,
        ..BusConfig::default()
    };
    let mut bus = Bus::new(cfg, Instant::ZERO);
    let now = Instant::from_millis(1);
    let id = bus
        .push(now, addr(2), b"", vec![0; 1000], None, None)
        .expect("fits");
    let mut buf = Vec::new();
    assert!(bus.poll_transmit(now, &mut buf).is_some());
    assert_eq!(
        bus.status(id).map(|s| s.state),
        Some(MessageState::Sending {
            pending: 9,
            sent: 1,
            acked: 0
        })
    );
    let mut n = 1;
    while bus.poll_transmit(now, &mut buf).is_some() {
        n += 1;
    }
    assert_eq!(n, 4, "window of 4 chunks");
    // An empty message is one empty chunk and is delivered.
    let mut net = Net::new(2, BusConfig::default(), 2);
    let t0 = net.now;
    let e = net
        .bus(1)
        .push(t0, addr(2), b"x", vec![], None, None)
        .expect("fits");
    net.drive_until(t0 + Duration::from_secs(5), |n| {
        n.events.contains(&(addr(1), Event::Delivered { id: e }))
    });
    let now = net.now;
    let m = net
        .bus(2)
        .pop_inbound(now, Some(b"x"), true)
        .expect("peeked");
    assert!(m.payload.is_empty());
    assert_eq!(net.bus(2).counters().inbox_len, 1, "peek leaves it");
}

#[test]
fn hostile_frames_are_errors_not_panics() {
    let mut bus = Bus::new(BusConfig::default(), Instant::ZERO);
    let now = Instant::from_millis(1);
    let mut r = StdRng::seed_from_u64(99);
    for len in 0..200 {
        let mut f: Vec<u8> = (0..len).map(|_| r.random()).collect();
        if let Some(b) = f.first_mut() {
            *b = 1 + (*b % 2);
        }
        let _ = bus.handle_frame(now, addr(9), &f);
    }
    // A chunk claiming more than our limit.
    let mut buf = Vec::new();
    DataChunk {
        id: 5,
        reply_to: None,
        total_len: 2 << 20,
        index: 1,
        count: 2000,
        offset: 1200,
        topic: &[],
        checksum: [0; 16],
        data: &[0; 1200],
    }
    .emit(&mut buf);
    assert!(matches!(
        bus.handle_frame(now, addr(9), &buf),
        Err(BusError::PeerMisbehaved(_))
    ));
    assert!(bus.counters().malformed_frames > 0);
    assert!(bus.counters().inbound_bytes <= bus.config().max_inbound_total);
}

#[test]
fn message_id_text_form() {
    let id = MessageId(0x00ab_cdef_0123_4567);
    assert_eq!(id.to_string(), "00abcdef01234567");
    assert_eq!("00abcdef01234567".parse::<MessageId>(), Ok(id));
    assert!("abc".parse::<MessageId>().is_err());
    assert!("+0abcdef01234567".parse::<MessageId>().is_err());
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Any seed, loss up to 30%, jitter (reordering), duplicates, several messages both ways at
        /// once with small chunks: every message arrives intact exactly once, every sender sees it
        /// delivered, and once everything is read both buses hold zero bytes.
        #[test]
        fn everything_arrives_once_and_memory_returns_to_idle(
            seed in any::<u64>(),
            loss in 0.0f64..0.3,
            jitter_ms in 0u64..40,
            dup in prop_oneof![Just(0u64), 2u64..7],
            sizes in proptest::collection::vec(0usize..6000, 1..6),
        ) {
            let cfg = BusConfig { chunk_size: 300, window: 8, ..BusConfig::default() };
            let mut net = Net::new(2, cfg, seed);
            net.loss = loss;
            net.delay = Duration::from_millis(5);
            net.jitter = Duration::from_millis(jitter_ms);
            net.duplicate_every = dup;
            let t0 = net.now;
            let mut sent = Vec::new();
            for (i, len) in sizes.iter().enumerate() {
                let (from, to) = if i % 2 == 0 { (1u8, 2u8) } else { (2, 1) };
                let data = payload(*len, seed ^ i as u64);
                let id = net.bus(from).push(t0, addr(to), &[i as u8], data.clone(), None, None)
                    .expect("fits");
                sent.push((from, to, id, data));
            }
            net.drive_until(t0 + Duration::from_secs(280), |n| {
                sent.iter().all(|(from, _, id, _)| n.events.contains(&(addr(*from), Event::Delivered { id: *id })))
            });
            let now = net.now;
            // Inboxes fill in completion order, not push order.
            let mut got = std::collections::HashMap::new();
            for n in 1..=2u8 {
                while let Some(m) = net.bus(n).pop_inbound(now, None, false) {
                    prop_assert!(got.insert(m.id, (n, m)).is_none(), "delivered twice");
                }
            }
            prop_assert_eq!(got.len(), sent.len());
            for (from, to, id, data) in &sent {
                let (n, m) = got.get(id).expect("each delivered message is in an inbox");
                prop_assert_eq!(*n, *to);
                prop_assert_eq!(m.src, addr(*from));
                prop_assert_eq!(&m.payload, data);
            }
            // Let duplicates in flight drain; nothing more may arrive.
            let end = net.now + Duration::from_secs(2);
            net.drive_until(end + Duration::from_secs(1), |n| n.now >= end);
            for n in 1..=2u8 {
                let c = net.bus(n).counters().clone();
                prop_assert_eq!(c.inbox_len, 0);
                prop_assert_eq!(c.outbound_bytes, 0);
                prop_assert_eq!(c.inbound_bytes, 0);
                prop_assert_eq!(c.reassemblies, 0);
            }
        }
    }
}

/// What the first message to a node sees: no E2E session for a while (every frame lost), then a
/// lossy path; `hint` tells the bus when the path came up. Returns the time from then to delivery.
fn deliver_after_outage(hint: bool) -> Duration {
    let mut net = Net::new(2, BusConfig::default(), 11);
    net.delay = Duration::from_millis(40);
    net.blackhole = Some(addr(2));
    let data = payload(1 << 20, 2);
    let t0 = net.now;
    let id = net
        .bus(1)
        .push(t0, addr(2), b"", data, None, None)
        .expect("fits");
    net.drive_until(t0 + Duration::from_secs(40), |n| {
        n.now >= t0 + Duration::from_secs(37)
    });
    net.blackhole = None;
    net.loss = 0.1;
    let up = net.now;
    if hint {
        net.bus(1).handle_path_up(up, addr(2));
    }
    net.drive_until(up + Duration::from_secs(120), |n| {
        n.events.contains(&(addr(1), Event::Delivered { id }))
    });
    net.now - up
}

#[test]
fn a_message_sent_before_the_path_exists_recovers_quickly_once_it_does() {
    // Without a hint the first retransmission that gets through waits out a backed-off RTO (up
    // to max_rto); the first ack then resets every chunk's backoff.
    let took = deliver_after_outage(false);
    eprintln!("delivered {took:?} after the path came up (no hint)");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    // With the runtime's hint (an E2E session came up) the backed-off chunks go at once.
    let took = deliver_after_outage(true);
    eprintln!("delivered {took:?} after the path came up (hint)");
    assert!(took < Duration::from_secs(8), "took {took:?}");
}
