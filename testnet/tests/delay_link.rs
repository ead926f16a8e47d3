//! Links with `LinkOpts::delay`: every frame waits in the user-space bridge, so ping RTT grows by
//! twice the delay, and UDP and TCP (checksum offload, GSO) still arrive intact.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use hypha_testnet::{LinkOpts, TestNet};

#[test]
fn ping_over_a_delayed_link_takes_twice_the_delay() {
    let net = TestNet::new("delay_ping").unwrap();
    let a = net.add_node("a").unwrap();
    let b = net.add_node("b").unwrap();
    let delay = Duration::from_millis(30);
    let ab = net
        .link(&a, &b, LinkOpts::default().with_delay(delay))
        .unwrap();
    let tag = net.tag().to_string();
    // The hidden middle namespace is part of the net.
    assert_eq!(TestNet::leftovers(&tag).unwrap().namespaces.len(), 3);

    for dst in [IpAddr::V4(ab.b().ipv4()), IpAddr::V6(ab.b().ipv6())] {
        let stats = a.ping(dst, 5, Duration::from_millis(50)).unwrap();
        assert!(stats.received >= 4, "{dst}: {stats:?}");
        let min = stats.rtt_min.unwrap();
        assert!(min >= 2 * delay, "{dst}: min RTT {min:?} < 2 × {delay:?}");
    }
    drop(net);
    assert!(TestNet::leftovers(&tag).unwrap().is_empty());
}

#[test]
fn udp_and_tcp_cross_a_delayed_link_intact() {
    let net = TestNet::new("delay_tcp").unwrap();
    let a = net.add_node("a").unwrap();
    let b = net.add_node("b").unwrap();
    let ab = net
        .link(
            &a,
            &b,
            LinkOpts::default().with_delay(Duration::from_millis(2)),
        )
        .unwrap();
    let b_ip = IpAddr::V4(ab.b().ipv4());

    // UDP: the kernel leaves the checksum to the "hardware"; it must still verify at b.
    let rx = b
        .run_in(move || UdpSocket::bind((b_ip, 0)))
        .unwrap()
        .unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let rx_addr = rx.local_addr().unwrap();
    let tx = a.run_in(|| UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    let payload: Vec<u8> = (0..1200u32).map(|i| (i * 7) as u8).collect();
    tx.send_to(&payload, rx_addr).unwrap();
    let mut buf = vec![0u8; 2048];
    let (n, _) = hypha_testnet::retry_interrupted(|| rx.recv_from(&mut buf)).unwrap();
    assert_eq!(&buf[..n], &payload[..]);

    // TCP: 4 MiB in large writes, so GSO super-packets cross the bridge.
    let listener = b
        .run_in(move || TcpListener::bind(SocketAddr::new(b_ip, 0)))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let data: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let expected = data.clone();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = hypha_testnet::retry_interrupted(|| listener.accept()).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).unwrap();
        got
    });
    let mut conn = a.run_in(move || TcpStream::connect(addr)).unwrap().unwrap();
    conn.write_all(&data).unwrap();
    drop(conn);
    let got = server.join().unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "TCP stream corrupted across the bridge");
}

#[test]
fn cutting_and_restoring_a_link() {
    let net = TestNet::new("cut").unwrap();
    let a = net.add_node("a").unwrap();
    let b = net.add_node("b").unwrap();
    let ab = net.link(&a, &b, LinkOpts::default()).unwrap();
    let dst = IpAddr::V6(ab.b().ipv6());
    // The first IPv6 pings on a fresh link can be lost to neighbour discovery: wait for the link.
    let up = hypha_testnet::wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        a.ping(dst, 3, Duration::from_millis(20))
            .is_ok_and(|s| s.received >= 2)
    });
    assert!(up.is_ok(), "a new link must carry pings");
    ab.set_up(false).unwrap();
    // With the carrier gone the route goes too: ping either cannot send or gets nothing back.
    match a.ping(dst, 3, Duration::from_millis(20)) {
        Ok(stats) => assert_eq!(stats.received, 0, "{stats:?}"),
        Err(hypha_testnet::Error::Command { stderr, .. }) => {
            assert!(stderr.contains("unreachable"), "{stderr}")
        }
        Err(e) => panic!("{e}"),
    }
    ab.set_up(true).unwrap();
    // Addresses survive the cut (keep_addr_on_down); the link is usable again.
    hypha_testnet::wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        a.ping(dst, 1, Duration::from_millis(10))
            .is_ok_and(|s| s.received == 1)
    })
    .unwrap();
}
