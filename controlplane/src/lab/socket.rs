//! The packet adapter of lab mode: Babel over UDP port 6696 on real interfaces (RFC 8966 §4).
//!
//! One IPv6 socket serves every interface, as babeld's does: it joins ff02::1:6 once per interface
//! (by ifindex), learns the incoming interface and destination of each datagram from
//! `IPV6_PKTINFO`, and chooses the outgoing interface and the link-local source address of each
//! datagram with a pktinfo control message. Babel speaks only to on-link neighbours, so the hop limit
//! is 1 for multicast and unicast alike (babeld does the same), and multicast loopback is off so we
//! never hear ourselves.

use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    bind, recvmsg, sendmsg, setsockopt, socket, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType, SockaddrIn6,
};

pub use hypha_proto::babel::{BABEL_MULTICAST_V6 as BABEL_GROUP, BABEL_PORT};

/// A received datagram's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes written into the caller's buffer.
    pub len: usize,
    /// Sender's address and port.
    pub from: SocketAddrV6,
    /// Interface the datagram arrived on.
    pub ifindex: u32,
    /// The datagram's destination (ff02::1:6 or our link-local address): part of RFC 8967's
    /// pseudo-header.
    pub dst: Ipv6Addr,
}

/// The Babel socket.
#[derive(Debug)]
pub struct BabelSocket {
    sock: UdpSocket,
}

fn errno(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// `setsockopt` for the few options nix has no typed wrapper for.
fn setsockopt_raw<T>(fd: RawFd, level: i32, name: i32, value: &T) -> io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<T>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `value` points to a live `T` of exactly `len` bytes for the duration of the call, and
    // the kernel only reads it.
    let rc = unsafe { libc::setsockopt(fd, level, name, (value as *const T).cast(), len) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl BabelSocket {
    /// Binds `[::]:port` (non-blocking), with pktinfo, hop limit 1 and no multicast loopback.
    /// Fails with `AddrInUse` when another daemon (babeld, BIRD, another hypha) holds the port.
    pub fn bind(port: u16) -> io::Result<Self> {
        let fd: OwnedFd = socket(
            AddressFamily::Inet6,
            SockType::Datagram,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(errno)?;
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(errno)?;
        // No SO_REUSEADDR: a second Babel daemon in the same namespace must fail to start, not
        // silently share the port.
        setsockopt(&fd, sockopt::Ipv6RecvPacketInfo, &true).map_err(errno)?;
        let raw = fd.as_raw_fd();
        let one: libc::c_int = 1;
        let zero: libc::c_int = 0;
        setsockopt_raw(raw, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS, &one)?;
        setsockopt_raw(raw, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, &one)?;
        setsockopt_raw(raw, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_LOOP, &zero)?;
        let addr = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
        bind(raw, &addr).map_err(errno)?;
        Ok(BabelSocket {
            sock: UdpSocket::from(fd),
        })
    }

    /// The local port (useful when bound to port 0 in tests).
    pub fn local_port(&self) -> io::Result<u16> {
        Ok(self.sock.local_addr()?.port())
    }

    fn membership(&self, ifindex: u32, opt: libc::c_int) -> io::Result<()> {
        let mreq = libc::ipv6_mreq {
            ipv6mr_multiaddr: libc::in6_addr {
                s6_addr: BABEL_GROUP.octets(),
            },
            ipv6mr_interface: ifindex,
        };
        setsockopt_raw(self.sock.as_raw_fd(), libc::IPPROTO_IPV6, opt, &mreq)
    }

    /// Joins ff02::1:6 on interface `ifindex`.
    pub fn join(&self, ifindex: u32) -> io::Result<()> {
        self.membership(ifindex, libc::IPV6_ADD_MEMBERSHIP)
    }

    /// Leaves ff02::1:6 on interface `ifindex`.
    pub fn leave(&self, ifindex: u32) -> io::Result<()> {
        self.membership(ifindex, libc::IPV6_DROP_MEMBERSHIP)
    }

    /// Receives one datagram into `buf`. `WouldBlock` when there is none. A datagram without
    /// pktinfo (which the kernel always supplies once it is enabled) is reported as
    /// `InvalidData`.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo);
        let mut iov = [IoSliceMut::new(buf)];
        let msg = recvmsg::<SockaddrIn6>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_TRUNC,
        )
        .map_err(errno)?;
        let len = msg.bytes;
        let from = msg
            .address
            .map(SocketAddrV6::from)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no source address"))?;
        let mut info = None;
        for c in msg.cmsgs().map_err(errno)? {
            if let ControlMessageOwned::Ipv6PacketInfo(pi) = c {
                info = Some((pi.ipi6_ifindex, Ipv6Addr::from(pi.ipi6_addr.s6_addr)));
            }
        }
        let (ifindex, dst) =
            info.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no pktinfo"))?;
        Ok(Received {
            len,
            from,
            ifindex,
            dst,
        })
    }

    /// Sends `buf` out of interface `ifindex` from link-local address `src` to `dst`
    /// (ff02::1:6 or a neighbour's link-local address) on `port`.
    pub fn send(
        &self,
        buf: &[u8],
        ifindex: u32,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        port: u16,
    ) -> io::Result<()> {
        let pi = libc::in6_pktinfo {
            ipi6_addr: libc::in6_addr {
                s6_addr: src.octets(),
            },
            ipi6_ifindex: ifindex,
        };
        let to = SockaddrIn6::from(SocketAddrV6::new(dst, port, 0, ifindex));
        let iov = [IoSlice::new(buf)];
        sendmsg(
            self.sock.as_raw_fd(),
            &iov,
            &[ControlMessage::Ipv6PacketInfo(&pi)],
            MsgFlags::empty(),
            Some(&to),
        )
        .map_err(errno)?;
        Ok(())
    }
}

impl AsRawFd for BabelSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl AsFd for BabelSocket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.sock.as_fd()
    }
}
