//! The socket and netlink adapters against a real kernel, each test in a network namespace of its
//! own (the test thread unshares one; commands it spawns inherit it).

use std::net::{IpAddr, Ipv6Addr, SocketAddrV6, UdpSocket};
use std::process::Command;
use std::time::Duration;

use super::netlink::{KernelRoute, Netlink, Prefix};
use super::socket::{BabelSocket, BABEL_GROUP, BABEL_PORT};

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "{cmd} failed");
}

/// Runs `f` on a thread inside a fresh network namespace with a veth pair `va`/`vb`, both up with
/// DAD off, `va` holding 10.0.0.1/24 and `vb` 10.0.0.2/24. The namespace dies with the thread.
fn in_netns(f: impl FnOnce(u32, u32) + Send + 'static) {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        sh("sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0");
        sh(
            "ip link set lo up && ip link add va type veth peer name vb && \
            ip addr add 10.0.0.1/24 dev va && ip addr add 10.0.0.2/24 dev vb && \
            ip link set va up && ip link set vb up",
        );
        let va = nix::net::if_::if_nametoindex("va").unwrap();
        let vb = nix::net::if_::if_nametoindex("vb").unwrap();
        f(va, vb)
    })
    .join()
    .unwrap();
}

fn wait_ll(nl: &mut Netlink, ifindex: u32) -> Ipv6Addr {
    for _ in 0..100 {
        if let Some(a) = nl.link_local(ifindex).unwrap() {
            return a;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no link-local address on {ifindex}");
}

#[test]
fn routes_are_installed_listed_and_flushed() {
    in_netns(|va, vb| {
        let mut nl = Netlink::open().unwrap();
        let ll_b = wait_ll(&mut nl, vb);
        let routes = [
            ("2001:db8:5::/48", IpAddr::V6(ll_b)),
            ("10.9.0.0/24", "10.0.0.2".parse().unwrap()),
            ("10.8.0.0/24", IpAddr::V6(ll_b)),
        ];
        for (p, nh) in routes {
            let r = KernelRoute {
                prefix: p.parse().unwrap(),
                next_hop: nh,
                oif: va,
            };
            nl.replace_route(&r).unwrap();
            // Replacing is idempotent.
            nl.replace_route(&r).unwrap();
        }
        let mut own = nl.own_routes().unwrap();
        own.sort();
        let want: Vec<Prefix> = ["10.8.0.0/24", "10.9.0.0/24", "2001:db8:5::/48"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let mut want_sorted = want.clone();
        want_sorted.sort();
        assert_eq!(own, want_sorted);
        let out = Command::new("ip")
            .args(["route", "show", "proto", "104"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("10.8.0.0/24 via inet6 fe80::"), "{text}");
        assert!(text.contains("10.9.0.0/24 via 10.0.0.2 dev va"), "{text}");
        // Deleting a missing route is fine; flushing removes the rest.
        nl.delete_route(&"10.9.0.0/24".parse().unwrap()).unwrap();
        nl.delete_route(&"10.9.0.0/24".parse().unwrap()).unwrap();
        assert_eq!(nl.flush_own_routes().unwrap(), 2);
        assert!(nl.own_routes().unwrap().is_empty());
        // Addresses: the configured IPv4 one is reported with its prefix length.
        let addrs = nl.addresses().unwrap();
        assert!(addrs.iter().any(|a| a.ifindex == va
            && a.addr == "10.0.0.1".parse::<IpAddr>().unwrap()
            && a.prefix_len == 24));
    });
}

#[test]
fn babel_socket_learns_interface_and_sends_from_link_local() {
    in_netns(|va, vb| {
        let mut nl = Netlink::open().unwrap();
        let ll_a = wait_ll(&mut nl, va);
        let ll_b = wait_ll(&mut nl, vb);
        let s = BabelSocket::bind(BABEL_PORT).unwrap();
        // The port is ours alone.
        let second = BabelSocket::bind(BABEL_PORT).unwrap_err();
        assert_eq!(second.kind(), std::io::ErrorKind::AddrInUse);
        s.join(va).unwrap();
        let peer = UdpSocket::bind(SocketAddrV6::new(ll_b, 0, 0, vb)).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1500];
        // Multicast from the peer arrives with the interface and group as destination.
        let mut got = None;
        for _ in 0..50 {
            peer.send_to(b"hello", SocketAddrV6::new(BABEL_GROUP, BABEL_PORT, 0, vb))
                .unwrap();
            std::thread::sleep(Duration::from_millis(20));
            if let Ok(r) = s.recv(&mut buf) {
                got = Some(r);
                break;
            }
        }
        let r = got.expect("multicast not received");
        assert_eq!(r.ifindex, va);
        assert_eq!(r.dst, BABEL_GROUP);
        assert_eq!(*r.from.ip(), ll_b);
        assert_eq!(&buf[..r.len], b"hello");
        // Unicast back, from our link-local address.
        let port = peer.local_addr().unwrap().port();
        s.send(b"reply", va, ll_a, ll_b, port).unwrap();
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"reply");
        match from {
            std::net::SocketAddr::V6(f) => {
                assert_eq!(*f.ip(), ll_a);
                assert_eq!(f.port(), BABEL_PORT);
            }
            other => panic!("{other}"),
        }
        // After leaving the group, multicast no longer arrives.
        s.leave(va).unwrap();
        peer.send_to(b"x", SocketAddrV6::new(BABEL_GROUP, BABEL_PORT, 0, vb))
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(s.recv(&mut buf).is_err());
    });
}
