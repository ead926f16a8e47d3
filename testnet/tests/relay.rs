//! The UDP delay relay: it adds its delay in each direction, keeps datagram order, and keeps
//! several clients apart.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hypha_testnet::{LinkOpts, Node, TestNet};

/// A UDP echo server in `node`, bound to `ip`; stops when the flag is set.
fn echo_server(node: &Node, ip: IpAddr) -> (SocketAddr, Arc<AtomicBool>, JoinHandle<()>) {
    let sock = node
        .run_in(move || UdpSocket::bind((ip, 0)))
        .unwrap()
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let addr = sock.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !flag.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        }
    });
    (addr, stop, thread)
}

fn client(node: &Node, bind: &'static str) -> UdpSocket {
    let sock = node.run_in(move || UdpSocket::bind(bind)).unwrap().unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock
}

#[test]
fn relay_adds_its_delay_both_ways_and_keeps_order() {
    let net = TestNet::new("relay").unwrap();
    let a = net.add_node("a").unwrap();
    let b = net.add_node("b").unwrap();
    let ab = net.link(&a, &b, LinkOpts::default()).unwrap();
    let (echo, stop, echo_thread) = echo_server(&b, IpAddr::V4(ab.b().ipv4()));

    let delay = Duration::from_millis(40);
    let relay = net
        .udp_delay_relay(&a, "127.0.0.1:0".parse().unwrap(), echo, delay)
        .unwrap();
    assert_ne!(relay.local_addr().port(), 0);
    assert_eq!(relay.target(), echo);

    // Round trips through the relay: each at least twice the one-way delay.
    let sock = client(&a, "127.0.0.1:0");
    let mut buf = [0u8; 64];
    for i in 0u8..5 {
        let start = Instant::now();
        sock.send_to(&[i], relay.local_addr()).unwrap();
        let (n, from) = hypha_testnet::retry_interrupted(|| sock.recv_from(&mut buf)).unwrap();
        let rtt = start.elapsed();
        assert_eq!((&buf[..n], from), (&[i][..], relay.local_addr()));
        assert!(rtt >= 2 * delay, "round trip {rtt:?} < 2 × {delay:?}");
    }

    // A burst of 200 numbered datagrams comes back complete and in order.
    for i in 0u32..200 {
        sock.send_to(&i.to_be_bytes(), relay.local_addr()).unwrap();
    }
    for i in 0u32..200 {
        let (n, _) = hypha_testnet::retry_interrupted(|| sock.recv_from(&mut buf)).unwrap();
        assert_eq!(&buf[..n], &i.to_be_bytes(), "datagram {i} out of order");
    }
    // The counters are bumped just after each send; stopping joins the thread, so they are final.
    relay.stop();
    assert_eq!(relay.forwarded_to_target(), 205);
    assert_eq!(relay.forwarded_to_clients(), 205);
    assert_eq!(relay.dropped(), 0);
    stop.store(true, Ordering::Relaxed);
    echo_thread.join().unwrap();
}

#[test]
fn relay_keeps_clients_apart() {
    let net = TestNet::new("relay_clients").unwrap();
    let a = net.add_node("a").unwrap();
    let b = net.add_node("b").unwrap();
    let ab = net.link(&a, &b, LinkOpts::default()).unwrap();
    let (echo, stop, echo_thread) = echo_server(&b, IpAddr::V6(ab.b().ipv6()));
    // IPv6 relay on a's link address; the target is reached over the veth.
    let listen = SocketAddr::new(IpAddr::V6(ab.a().ipv6()), 0);
    let relay = net
        .udp_delay_relay(&a, listen, echo, Duration::from_millis(5))
        .unwrap();

    let one = client(&a, "[::]:0");
    let two = client(&a, "[::]:0");
    let to = relay.local_addr();
    let mut buf = [0u8; 16];
    for round in 0u8..10 {
        one.send_to(&[1, round], to).unwrap();
        two.send_to(&[2, round], to).unwrap();
        let (n, _) = hypha_testnet::retry_interrupted(|| one.recv_from(&mut buf)).unwrap();
        assert_eq!(&buf[..n], &[1, round]);
        let (n, _) = hypha_testnet::retry_interrupted(|| two.recv_from(&mut buf)).unwrap();
        assert_eq!(&buf[..n], &[2, round]);
    }
    stop.store(true, Ordering::Relaxed);
    echo_thread.join().unwrap();
    // The relay is stopped by the TestNet's drop.
}
