//! The underlay UDP sockets: one per worker, all bound to the node's port.
//!
//! Every socket is dual-stack (`[::]:port` with `IPV6_V6ONLY` off), so IPv4 peers appear as
//! v4-mapped addresses (`::ffff:a.b.c.d`) and one code path serves both families
//! ([`to_sockaddr`]/[`from_sockaddr`] convert). `SO_REUSEPORT` lets every worker bind the same
//! port; the kernel spreads flows over the sockets by 4-tuple hash.
//!
//! Offloads: `UDP_GRO` on receive (the kernel may hand one buffer holding several datagrams of
//! equal size; the segment size arrives in a `UDP_GRO` control message) and `UDP_SEGMENT` on send
//! (several equal-size datagrams to one destination in one `sendmsg`). Both are probed at start; a
//! kernel without them gets one datagram per operation ([`Offloads`]).

#![allow(unsafe_code)]

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `SOL_UDP` option numbers (linux/udp.h); libc has them, spelled out for clarity.
pub const UDP_SEGMENT: libc::c_int = 103;
/// Enables GRO on a UDP socket and names its control message.
pub const UDP_GRO: libc::c_int = 104;

/// What the kernel accepted on a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offloads {
    /// `UDP_GRO` is on: receives may hold several datagrams.
    pub gro: bool,
    /// `UDP_SEGMENT` is usable on send.
    pub gso: bool,
}

/// Why a socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UdpError {
    /// A socket call failed.
    #[error("{what}: {source}")]
    Sys {
        /// The call.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn sys(what: &'static str) -> impl FnOnce(io::Error) -> UdpError {
    move |source| UdpError::Sys { what, source }
}

fn setsockopt_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and its size is passed; the fd is open.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens a dual-stack UDP socket bound to `[::]:port` with `SO_REUSEPORT`, large buffers, and
/// GRO/GSO where the kernel has them. The socket is blocking: io_uring drives it.
pub fn bind(port: u16) -> Result<(OwnedFd, Offloads), UdpError> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET6,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::IPPROTO_UDP,
        )
    };
    if raw < 0 {
        return Err(sys("socket")(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0).map_err(sys("IPV6_V6ONLY"))?;
    setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1).map_err(sys("SO_REUSEPORT"))?;
    // Bigger buffers absorb bursts between two ring submissions; failure only costs speed.
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        let _ = setsockopt_int(&fd, libc::SOL_SOCKET, opt, 4 << 20);
    }
    let gro = setsockopt_int(&fd, libc::SOL_UDP, UDP_GRO, 1).is_ok();
    // UDP_SEGMENT as a socket option sets a default segment size; probing it with 0 (= off)
    // tells whether the kernel knows the option at all.
    let gso = setsockopt_int(&fd, libc::SOL_UDP, UDP_SEGMENT, 0).is_ok();
    let addr = to_sockaddr(&SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::UNSPECIFIED,
        port,
        0,
        0,
    )));
    // SAFETY: `addr` is a valid sockaddr_in6 and its size is passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_in6).cast(),
            size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(sys("bind")(io::Error::last_os_error()));
    }
    Ok((fd, Offloads { gro, gso }))
}

/// The port a socket is bound to.
pub fn local_port(fd: &OwnedFd) -> io::Result<u16> {
    let mut addr = MaybeUninit::<libc::sockaddr_in6>::zeroed();
    let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: `addr` has room for `len` bytes; getsockname writes at most that.
    let rc = unsafe { libc::getsockname(fd.as_raw_fd(), addr.as_mut_ptr().cast(), &mut len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised and (partly) written by the kernel: every bit pattern is valid.
    let addr = unsafe { addr.assume_init() };
    Ok(u16::from_be(addr.sin6_port))
}

/// A socket address as the dual-stack socket wants it: IPv4 becomes v4-mapped IPv6.
pub fn to_sockaddr(addr: &SocketAddr) -> libc::sockaddr_in6 {
    let (ip, port, flow, scope) = match addr {
        SocketAddr::V4(v4) => (v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
        SocketAddr::V6(v6) => (*v6.ip(), v6.port(), v6.flowinfo(), v6.scope_id()),
    };
    libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: port.to_be(),
        sin6_flowinfo: flow,
        sin6_addr: libc::in6_addr {
            s6_addr: ip.octets(),
        },
        sin6_scope_id: scope,
    }
}

/// Parses a source address the kernel wrote (`sockaddr_in6` bytes, or `sockaddr_in`); v4-mapped
/// addresses come back as IPv4. `None` for anything else.
pub fn from_sockaddr(bytes: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([*bytes.first()?, *bytes.get(1)?]);
    let port = u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?]);
    match libc::c_int::from(family) {
        libc::AF_INET6 => {
            let octets: [u8; 16] = bytes.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(bytes.get(24..28)?.try_into().ok()?);
            let ip = Ipv6Addr::from(octets);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope)),
            })
        }
        libc::AF_INET => {
            let o: [u8; 4] = bytes.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(o.into(), port)))
        }
        _ => None,
    }
}

/// Sends one datagram synchronously (the control thread's path for control frames; workers send
/// through io_uring).
pub fn send_to(fd: &OwnedFd, bytes: &[u8], to: &SocketAddr) -> io::Result<usize> {
    let addr = to_sockaddr(to);
    // SAFETY: `bytes` and `addr` are valid for the given lengths during the call.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
            (&addr as *const libc::sockaddr_in6).cast(),
            size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// Finds the `UDP_GRO` segment size in a control-message buffer, if the kernel coalesced.
pub fn gro_segment_size(control: &[u8]) -> Option<usize> {
    const HDR: usize = size_of::<libc::cmsghdr>();
    let align = size_of::<usize>();
    let mut rest = control;
    while rest.len() >= HDR {
        let len = usize::from_ne_bytes(rest.get(..align)?.try_into().ok()?);
        let level = i32::from_ne_bytes(rest.get(align..align + 4)?.try_into().ok()?);
        let kind = i32::from_ne_bytes(rest.get(align + 4..align + 8)?.try_into().ok()?);
        if len < HDR {
            return None;
        }
        if level == libc::SOL_UDP && kind == UDP_GRO {
            let v = i32::from_ne_bytes(rest.get(HDR..HDR + 4)?.try_into().ok()?);
            return usize::try_from(v).ok().filter(|v| *v > 0);
        }
        let step = len.div_ceil(align).checked_mul(align)?;
        rest = rest.get(step..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_is_mapped_and_back() {
        let a: SocketAddr = "10.1.2.3:9651".parse().unwrap();
        let s = to_sockaddr(&a);
        assert_eq!(u16::from_be(s.sin6_port), 9651);
        assert_eq!(
            Ipv6Addr::from(s.sin6_addr.s6_addr),
            "::ffff:10.1.2.3".parse::<Ipv6Addr>().unwrap()
        );
        // SAFETY: reading a plain-old-data struct as bytes.
        let bytes: [u8; 28] = unsafe { core::mem::transmute(s) };
        assert_eq!(from_sockaddr(&bytes), Some(a));
        let b: SocketAddr = "[fd00::2]:7".parse().unwrap();
        let bytes: [u8; 28] = unsafe { core::mem::transmute(to_sockaddr(&b)) };
        assert_eq!(from_sockaddr(&bytes), Some(b));
        assert_eq!(from_sockaddr(&bytes[..5]), None);
        assert_eq!(from_sockaddr(&[0u8; 28]), None);
    }

    #[test]
    fn gro_cmsg_is_found_and_garbage_is_not() {
        let hdr = size_of::<libc::cmsghdr>();
        let mut buf = vec![0u8; hdr + 8];
        buf[..8].copy_from_slice(&((hdr + 4) as usize).to_ne_bytes());
        buf[8..12].copy_from_slice(&libc::SOL_UDP.to_ne_bytes());
        buf[12..16].copy_from_slice(&UDP_GRO.to_ne_bytes());
        buf[hdr..hdr + 4].copy_from_slice(&1452i32.to_ne_bytes());
        assert_eq!(gro_segment_size(&buf), Some(1452));
        assert_eq!(gro_segment_size(&buf[..hdr + 2]), None);
        assert_eq!(gro_segment_size(&[0xff; 40]), None);
        assert_eq!(gro_segment_size(&[]), None);
    }

    #[test]
    fn two_sockets_share_a_port_and_talk_v4() {
        let (a, off) = bind(0).unwrap();
        let port = local_port(&a).unwrap();
        assert!(port != 0);
        let (_b, _) = bind(port).unwrap();
        let _ = off;
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = peer.local_addr().unwrap();
        assert_eq!(send_to(&a, b"hi", &to).unwrap(), 2);
        let mut buf = [0u8; 8];
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hi");
        assert_eq!(from.port(), port);
    }
}
