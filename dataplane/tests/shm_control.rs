//! hypha-dp driven over shared memory by a stand-in control plane (this test), in a network
//! namespace (root only; skipped otherwise): peers, routes and session keys go down the ring;
//! control frames and message-bus frames come up; a TUN packet without a session is queued, the
//! control plane is told (NoSession), and the packet leaves sealed once the keys arrive; the
//! control plane's packets go out from the node's port, sealed when they are overlay packets; a
//! resync removes what the replay omitted, and not before its end marker.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use hypha_dataplane::session::{Cipher, OpeningKey, SealingKey, TAG_LEN};
use hypha_proto::shm::{
    self, Consumer, Event, KeyDirection, PeerId, PeerUp, Producer, PuntReason, Record, Region,
    RegionConfig, Resync, Role, RouteEntry, SendTo, SessionKey,
};
use hypha_proto::wire::data::{Kind, Packet, Repr, HEADER_LEN};
use hypha_testnet::dp::{is_root, stats, A, B, C, PORT, STATS};
use hypha_testnet::{wait_until, LinkOpts, TestNet};

fn addr(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn push(p: &mut Producer, r: &Record<'_>) {
    p.push(r, Duration::from_secs(2)).unwrap();
}

/// The next punted packet on the up-ring (skipping counter events), within 5 s.
fn next_punt(c: &mut Consumer) -> (SocketAddr, PuntReason, Vec<u8>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !c.wait(Duration::from_millis(100)).unwrap() {
            continue;
        }
        if let Some(Ok(rec)) = c.pop().unwrap() {
            if let Record::PuntedPacket {
                from,
                reason,
                bytes,
            } = rec.record
            {
                return (from, reason, bytes.to_vec());
            }
        }
    }
    panic!("no punted packet came up");
}

#[test]
fn control_plane_over_shm() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let t0 = Instant::now();
    let net = TestNet::new("dpshm").unwrap();
    let a = net.add_node("a").unwrap();
    let b = net.add_node("b").unwrap();
    let ab = net.link(&a, &b, LinkOpts::default()).unwrap();
    let b_ep = SocketAddr::new(IpAddr::V4(ab.b().ipv4()), PORT);

    let region = Region::create(&RegionConfig {
        down_capacity: 256,
        up_capacity: 256,
        slot_size: 2048,
    })
    .unwrap();
    let (mut down, mut up) = region.split(Role::ControlPlane).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hypha-dp"));
    cmd.args(["--addr", B, "--workers", "2", "--stats-listen", STATS])
        .env("RUST_LOG", "debug");
    region.share_with(&mut cmd);
    let _dp = b.spawn("dp-b", cmd).unwrap();
    wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        stats(&b).is_some()
    })
    .unwrap();

    // "a" is played by a plain UDP socket.
    let sock = a
        .run_in(|| UdpSocket::bind((ab.a().ipv4(), 0)))
        .unwrap()
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let a_ep = sock.local_addr().unwrap();

    push(
        &mut down,
        &Record::PeerUp(PeerUp {
            peer: PeerId(77),
            underlay: a_ep,
            public_key: [9; 32],
        }),
    );
    let route = RouteEntry::new(addr(A), 64, PeerId(77), 256).unwrap();
    push(&mut down, &Record::RouteAdd(&[route]));
    wait_until(Duration::from_secs(3), Duration::from_millis(50), || {
        stats(&b).is_some_and(|s| s["routes"] == 1 && s["peers"] == 1)
    })
    .expect("route and peer not installed");

    // A control frame from a is punted up with its source address.
    let frame = [
        0x05u8, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef,
    ];
    sock.send_to(&frame, b_ep).unwrap();
    let (from, reason, bytes) = next_punt(&mut up);
    assert_eq!(
        (from, reason, &bytes[..]),
        (a_ep, PuntReason::ControlFrame, &frame[..])
    );

    // The control plane's link frame goes out from the node's port to the peer.
    push(
        &mut down,
        &Record::PacketToSend {
            to: SendTo::Peer(PeerId(77)),
            bytes: &frame,
        },
    );
    let mut buf = [0u8; 2048];
    let (n, src) = sock.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], src.port()), (&frame[..], PORT));

    // A packet from b's TUN to a, before any session: queued, and the control plane is told.
    let _ping = b
        .spawn_args("ping-a", ["ping", "-n", "-c", "1", "-W", "8", A])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut told = false;
    while Instant::now() < deadline && !told {
        if up.wait(Duration::from_millis(100)).unwrap() {
            if let Some(Ok(rec)) = up.pop().unwrap() {
                told = rec.record == Record::Event(Event::NoSession(addr(A)));
            }
        }
    }
    assert!(told, "no NoSession event for a: {:?}", stats(&b));
    assert!(stats(&b).unwrap()["counters"]["queued_no_session"].as_u64() >= Some(1));

    // Session keys, one per direction, make one session.
    let (k_ab, k_ba) = ([0x11u8; 32], [0x22u8; 32]);
    for (index, direction, key) in [
        (500, KeyDirection::Receive, k_ab),
        (600, KeyDirection::Send, k_ba),
    ] {
        push(
            &mut down,
            &Record::SessionKeyInstall(SessionKey {
                index,
                direction,
                cipher: shm::Cipher::ChaCha20Poly1305,
                peer: addr(A),
                key,
                counter: 0,
            }),
        );
    }
    wait_until(Duration::from_secs(3), Duration::from_millis(50), || {
        stats(&b).is_some_and(|s| s["sessions"] == 1)
    })
    .expect("session not installed");

    // The queued echo request leaves as soon as the session exists, sealed for a.
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    let got = Packet::new_checked(&buf[..n]).unwrap();
    assert_eq!((got.receiver_index(), got.dst_addr()), (600, addr(A)));
    let mut aad = [0u8; HEADER_LEN];
    got.aad(&mut aad);
    let counter = got.counter();
    let mut body = buf[HEADER_LEN..n].to_vec();
    let open = OpeningKey::new(Cipher::ChaCha20Poly1305, &k_ba).unwrap();
    let inner = open.open_in_place(counter, &aad, &mut body).unwrap();
    assert_eq!(inner[0], 0x00, "inner type IPv6");
    assert_eq!(
        &inner[1 + 24..1 + 40],
        &addr(A).octets(),
        "inner destination"
    );
    assert_eq!(
        (inner[1 + 6], inner[1 + 40]),
        (58, 128),
        "an ICMPv6 echo request"
    );

    // An overlay message from the control plane is sealed and routed to a.
    let mut overlay = vec![0u8; HEADER_LEN];
    Repr {
        hop_limit: 0,
        kind: Kind::Transport,
        receiver_index: 0,
        counter: 0,
        src: addr(B),
        dst: addr(A),
    }
    .emit(&mut Packet::new_unchecked(&mut overlay[..]));
    overlay.extend_from_slice(b"\x01bus frame to a");
    push(
        &mut down,
        &Record::PacketToSend {
            to: SendTo::Overlay(addr(A)),
            bytes: &overlay,
        },
    );
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    let got = Packet::new_checked(&buf[..n]).unwrap();
    assert_eq!((got.receiver_index(), got.dst_addr()), (600, addr(A)));
    let mut aad = [0u8; HEADER_LEN];
    got.aad(&mut aad);
    let counter = got.counter();
    let mut body = buf[HEADER_LEN..n].to_vec();
    let open = OpeningKey::new(Cipher::ChaCha20Poly1305, &k_ba).unwrap();
    assert_eq!(
        open.open_in_place(counter, &aad, &mut body).unwrap(),
        b"\x01bus frame to a"
    );

    // A message-bus frame from a is decrypted and punted up (header + plaintext).
    let mut pkt = vec![0u8; HEADER_LEN];
    Repr {
        hop_limit: 64,
        kind: Kind::Transport,
        receiver_index: 500,
        counter: 3,
        src: addr(A),
        dst: addr(B),
    }
    .emit(&mut Packet::new_unchecked(&mut pkt[..]));
    let mut aad = [0u8; HEADER_LEN];
    Packet::new_unchecked(&pkt[..]).aad(&mut aad);
    let plain = b"\x01hello b";
    pkt.extend_from_slice(plain);
    pkt.extend_from_slice(&[0; TAG_LEN]);
    let seal = SealingKey::new(Cipher::ChaCha20Poly1305, &k_ab).unwrap();
    seal.seal_in_place_append(3, &aad, &mut pkt[HEADER_LEN..], plain.len())
        .unwrap();
    sock.send_to(&pkt, b_ep).unwrap();
    let (_, reason, bytes) = next_punt(&mut up);
    assert_eq!(reason, PuntReason::LocalDelivery);
    assert_eq!(&bytes[HEADER_LEN..], plain);

    // Counters come up the ring.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut saw_counters = false;
    while Instant::now() < deadline && !saw_counters {
        if up.wait(Duration::from_millis(100)).unwrap() {
            if let Some(Ok(rec)) = up.pop().unwrap() {
                saw_counters =
                    matches!(rec.record, Record::Event(Event::Counters(c)) if c.punted_packets > 0);
            }
        }
    }
    assert!(saw_counters, "no counters event with punts");

    // The control plane "restarts": its producer goes away and a new one (a new epoch) takes
    // over. Nothing changes in the dataplane until the new producer's replay is complete.
    let old_epoch = down.epoch();
    drop(down);
    std::thread::sleep(Duration::from_millis(300));
    let s = stats(&b).unwrap();
    assert_eq!(
        (s["routes"].as_u64(), s["sessions"].as_u64()),
        (Some(1), Some(1))
    );
    let mut down = region.producer(shm::Direction::Down).unwrap();
    assert_ne!(down.epoch(), old_epoch);

    // Resync: the replay mentions only a route to c via a new peer; the old route, peer and
    // session go, the new ones stay.
    push(&mut down, &Record::Resync(Resync::Begin { generation: 1 }));
    push(
        &mut down,
        &Record::PeerUp(PeerUp {
            peer: PeerId(78),
            underlay: a_ep,
            public_key: [8; 32],
        }),
    );
    let route_c = RouteEntry::new(addr(C), 64, PeerId(78), 256).unwrap();
    push(&mut down, &Record::RouteAdd(&[route_c]));
    // Before the end marker, the old state still forwards.
    std::thread::sleep(Duration::from_millis(300));
    let s = stats(&b).unwrap();
    assert_eq!(
        (s["routes"].as_u64(), s["sessions"].as_u64()),
        (Some(2), Some(1))
    );
    push(&mut down, &Record::Resync(Resync::End { generation: 1 }));
    wait_until(Duration::from_secs(3), Duration::from_millis(50), || {
        stats(&b).is_some_and(|s| s["routes"] == 1 && s["sessions"] == 0 && s["peers"] == 1)
    })
    .unwrap_or_else(|_| panic!("stale state not removed: {:?}", stats(&b)));
    eprintln!("shm test took {:?}", t0.elapsed());
}
