//! The node's UDP socket in `--no-dataplane` mode: one dual-stack socket for IPv4 and IPv6 peers.
//!
//! Why canonical addresses: a `[::]` socket reports IPv4 peers as v4-mapped IPv6
//! (`[::ffff:10.0.0.1]:9651`) while configured peers say `10.0.0.1:9651`. Everything above this
//! module sees plain IPv4 addresses; they are mapped back when sending.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use mio::net::UdpSocket;

/// Binds `[::]:port` with IPV6_V6ONLY off, or `0.0.0.0:port` where IPv6 is unavailable.
pub fn bind(port: u16) -> io::Result<(UdpSocket, bool)> {
    match bind_dual_stack(port) {
        Ok(s) => Ok((UdpSocket::from_std(s), true)),
        Err(e) if e.kind() != io::ErrorKind::AddrInUse => {
            tracing::warn!(error = %e, "no IPv6: binding 0.0.0.0, IPv6 peers unreachable");
            let s = std::net::UdpSocket::bind(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                port,
            ))?;
            s.set_nonblocking(true)?;
            Ok((UdpSocket::from_std(s), false))
        }
        Err(e) => Err(e),
    }
}

/// `[::]:port` with IPV6_V6ONLY cleared before the bind (it cannot change afterwards).
fn bind_dual_stack(port: u16) -> io::Result<std::net::UdpSocket> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn6};
    let fd = socket::socket(
        AddressFamily::Inet6,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    socket::setsockopt(&fd, socket::sockopt::Ipv6V6Only, &false).map_err(io::Error::from)?;
    let addr = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
    socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).map_err(io::Error::from)?;
    Ok(std::net::UdpSocket::from(fd))
}

/// A v4-mapped IPv6 socket address as plain IPv4; others unchanged.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// The address to pass to `send_to` on a socket (`dual_stack`: bound to `[::]`).
pub fn for_socket(addr: SocketAddr, dual_stack: bool) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) if dual_stack => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_and_unmaps() {
        let v4: SocketAddr = "10.0.0.1:9651".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:9651".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:9651".parse().unwrap();
        assert_eq!(canonical(mapped), v4);
        assert_eq!(canonical(v6), v6);
        assert_eq!(canonical(v4), v4);
        assert_eq!(for_socket(v4, true), mapped);
        assert_eq!(for_socket(v4, false), v4);
        assert_eq!(for_socket(v6, true), v6);
    }

    #[test]
    fn dual_stack_socket_talks_to_ipv4() {
        let (a, dual) = bind(0).unwrap();
        let port = a.local_addr().unwrap().port();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        b.send_to(b"hi", to).unwrap();
        let b_addr = b.local_addr().unwrap();
        let mut buf = [0u8; 8];
        let (n, from) = loop {
            match a.recv_from(&mut buf) {
                Ok(r) => break r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!((n, canonical(from)), (2, b_addr));
        a.send_to(b"yo", for_socket(b_addr, dual)).unwrap();
        b.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let (n, _) = b.recv_from(&mut buf).unwrap();
        assert_eq!(n, 2);
    }
}
