//! The kernel adapter of lab mode: routes go into the kernel FIB through rtnetlink, the way babeld's
//! kernel_netlink.c does it.
//!
//! Every route we install carries our own routing protocol number, [`RTPROT_HYPHA`] (104), so that
//! `ip route show proto 104` lists exactly ours, a restart can flush what a crashed predecessor left
//! behind, and a clean exit removes them all. The number is not assigned by IANA (the kernel reserves
//! none above 4 either); it is unused in iproute2's `rt_protos` (babeld uses 42, BIRD 12).
//!
//! The socket is blocking and every request waits for the kernel's ACK: route changes are rare (a
//! handful per second at worst) and a synchronous error is far easier to report than one that
//! arrives later on a shared event loop.

// netlink-packet-route's message types are `#[non_exhaustive]`: they can only be built from
// `Default` and then filled in.
#![allow(clippy::field_reassign_with_default)]

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
    RouteVia,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

pub use hypha_proto::babel::Prefix;

/// Our routing protocol number (`rtm_protocol`), shown by `ip route` as `proto 104`.
pub const RTPROT_HYPHA: u8 = 104;

/// The kernel metric (`RTA_PRIORITY`) of every route we install. babeld's default
/// `kernel-priority` is 0 as well: the Babel metric is not a kernel preference, and keeping one
/// priority means a changed route replaces the old one in place instead of adding a second.
pub const KERNEL_PRIORITY: u32 = 0;

/// What can go wrong talking to the kernel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetlinkError {
    /// The netlink socket could not be opened, or a send or receive on it failed.
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    /// The kernel refused a request (the errno it gave).
    #[error("kernel refused {what}: {source}")]
    Refused {
        /// What we asked for.
        what: &'static str,
        /// The kernel's errno.
        source: io::Error,
    },
    /// The kernel sent bytes we could not decode.
    #[error("undecodable netlink message: {0}")]
    Decode(String),
    /// A prefix length does not fit its address family.
    #[error("prefix length {0} out of range")]
    BadPrefixLength(u8),
}

/// One route as we install it: destination, next hop (the neighbour's address on `oif`) and the
/// outgoing interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelRoute {
    /// Destination prefix.
    pub prefix: Prefix,
    /// Next hop. For an IPv4 prefix with an IPv6 next hop the route is installed with `RTA_VIA`
    /// (v4-via-v6, RFC 9229).
    pub next_hop: IpAddr,
    /// Outgoing interface index.
    pub oif: u32,
}

/// An address configured on an interface, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterfaceAddress {
    /// Interface index.
    pub ifindex: u32,
    /// The address.
    pub addr: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// Still undergoing duplicate address detection (not usable as a source yet).
    pub tentative: bool,
}

/// A blocking rtnetlink socket.
pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").field("seq", &self.seq).finish()
    }
}

const RECV_BUF: usize = 64 * 1024;

impl Netlink {
    /// Opens a NETLINK_ROUTE socket in the caller's network namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Ask for extended acks so refusals come with the kernel's reason where it has one; not
        // fatal on kernels without it.
        let _ = socket.set_ext_ack(true);
        Ok(Netlink {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// Installs `route`, replacing any route of ours (or anyone's) to the same prefix at
    /// [`KERNEL_PRIORITY`] in the main table.
    pub fn replace_route(&mut self, route: &KernelRoute) -> Result<(), NetlinkError> {
        let msg = route_message(route)?;
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
            "route replace",
        )
    }

    /// Removes our route to `prefix`. A route that is already gone is not an error.
    pub fn delete_route(&mut self, prefix: &Prefix) -> Result<(), NetlinkError> {
        let mut msg = RouteMessage::default();
        msg.header = route_header(prefix)?;
        msg.header.scope = RouteScope::NoWhere;
        msg.attributes
            .push(RouteAttribute::Destination(prefix.addr().into()));
        msg.attributes
            .push(RouteAttribute::Priority(KERNEL_PRIORITY));
        match self.request(RouteNetlinkMessage::DelRoute(msg), 0, "route delete") {
            Err(NetlinkError::Refused { source, .. })
                if source.raw_os_error() == Some(libc::ESRCH) =>
            {
                Ok(())
            }
            r => r,
        }
    }

    /// All routes in the main table carrying [`RTPROT_HYPHA`]: what a previous run left behind.
    pub fn own_routes(&mut self) -> Result<Vec<Prefix>, NetlinkError> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet6, AddressFamily::Inet] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            let replies = self.dump(RouteNetlinkMessage::GetRoute(msg))?;
            for reply in replies {
                let RouteNetlinkMessage::NewRoute(r) = reply else {
                    continue;
                };
                if r.header.protocol != RouteProtocol::Other(RTPROT_HYPHA)
                    || r.header.table != RouteHeader::RT_TABLE_MAIN
                {
                    continue;
                }
                let dst = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                    RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                    _ => None,
                });
                let dst = dst.unwrap_or(match family {
                    AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    _ => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                });
                if let Some(p) = Prefix::new(dst, r.header.destination_prefix_length) {
                    out.push(p);
                }
            }
        }
        Ok(out)
    }

    /// Deletes every route of ours (see [`Netlink::own_routes`]); returns how many were removed.
    pub fn flush_own_routes(&mut self) -> Result<usize, NetlinkError> {
        let routes = self.own_routes()?;
        for p in &routes {
            self.delete_route(p)?;
        }
        Ok(routes.len())
    }

    /// Every address on every interface.
    pub fn addresses(&mut self) -> Result<Vec<InterfaceAddress>, NetlinkError> {
        let replies = self.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))?;
        let mut out = Vec::new();
        for reply in replies {
            let RouteNetlinkMessage::NewAddress(a) = reply else {
                continue;
            };
            // IFA_ADDRESS is the peer on point-to-point links; IFA_LOCAL our own. Prefer LOCAL.
            let local = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let address = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            let Some(addr) = local.or(address) else {
                continue;
            };
            let flags = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Flags(f) => Some(*f),
                _ => None,
            });
            let tentative = flags.is_some_and(|f| {
                f.contains(AddressFlags::Tentative) || f.contains(AddressFlags::Dadfailed)
            });
            out.push(InterfaceAddress {
                ifindex: a.header.index,
                addr,
                prefix_len: a.header.prefix_len,
                tentative,
            });
        }
        Ok(out)
    }

    /// The usable (non-tentative) IPv6 link-local address of `ifindex`, if it has one.
    pub fn link_local(&mut self, ifindex: u32) -> Result<Option<Ipv6Addr>, NetlinkError> {
        Ok(self.addresses()?.into_iter().find_map(|a| match a.addr {
            IpAddr::V6(v6)
                if a.ifindex == ifindex && !a.tentative && v6.is_unicast_link_local() =>
            {
                Some(v6)
            }
            _ => None,
        }))
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<u32, NetlinkError> {
        let seq = self.next_seq();
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        nl.finalize();
        let mut bytes = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        Ok(seq)
    }

    /// Receives one datagram into `self.buf` and decodes every netlink message in it.
    fn recv_batch(&mut self) -> Result<Vec<NetlinkMessage<RouteNetlinkMessage>>, NetlinkError> {
        self.buf.clear();
        self.buf.reserve(RECV_BUF);
        let (n, _) = self.socket.recv_from(&mut self.buf, 0)?;
        let data = self.buf.get(..n).unwrap_or(&[]);
        let mut out = Vec::new();
        let mut off = 0usize;
        while off < data.len() {
            let rest = data.get(off..).unwrap_or(&[]);
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)
                .map_err(|e| NetlinkError::Decode(e.to_string()))?;
            let len = msg.header.length as usize;
            if len == 0 {
                break;
            }
            // Messages are 4-byte aligned within a datagram.
            off = off.saturating_add((len + 3) & !3);
            out.push(msg);
        }
        Ok(out)
    }

    /// Sends `msg` with NLM_F_ACK and waits for the kernel's answer.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        what: &'static str,
    ) -> Result<(), NetlinkError> {
        let seq = self.send(msg, flags | NLM_F_ACK)?;
        loop {
            for m in self.recv_batch()? {
                if m.header.sequence_number != seq {
                    continue;
                }
                if let NetlinkPayload::Error(e) = m.payload {
                    return match e.code {
                        None => Ok(()),
                        Some(code) => Err(NetlinkError::Refused {
                            what,
                            source: io::Error::from_raw_os_error(-code.get()),
                        }),
                    };
                }
            }
        }
    }

    /// Sends a dump request and collects every reply until NLMSG_DONE.
    fn dump(&mut self, msg: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let seq = self.send(msg, NLM_F_DUMP)?;
        let mut out = Vec::new();
        loop {
            for m in self.recv_batch()? {
                if m.header.sequence_number != seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        if let Some(code) = e.code {
                            return Err(NetlinkError::Refused {
                                what: "dump",
                                source: io::Error::from_raw_os_error(-code.get()),
                            });
                        }
                    }
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    _ => {}
                }
            }
        }
    }
}

fn route_header(prefix: &Prefix) -> Result<RouteHeader, NetlinkError> {
    let mut h = RouteHeader::default();
    h.address_family = match prefix.addr() {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    h.destination_prefix_length = prefix.len();
    h.table = RouteHeader::RT_TABLE_MAIN;
    h.protocol = RouteProtocol::Other(RTPROT_HYPHA);
    h.scope = RouteScope::Universe;
    h.kind = RouteType::Unicast;
    Ok(h)
}

fn route_message(route: &KernelRoute) -> Result<RouteMessage, NetlinkError> {
    let mut msg = RouteMessage::default();
    msg.header = route_header(&route.prefix)?;
    msg.attributes
        .push(RouteAttribute::Destination(route.prefix.addr().into()));
    match (route.prefix.addr(), route.next_hop) {
        (IpAddr::V4(_), IpAddr::V6(nh)) => {
            // RFC 9229: an IPv4 route through an IPv6 next hop.
            msg.attributes
                .push(RouteAttribute::Via(RouteVia::Inet6(nh)));
        }
        (_, nh) => msg.attributes.push(RouteAttribute::Gateway(nh.into())),
    }
    msg.attributes.push(RouteAttribute::Oif(route.oif));
    msg.attributes
        .push(RouteAttribute::Priority(KERNEL_PRIORITY));
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_via_v6_uses_rta_via() {
        let r = KernelRoute {
            prefix: "10.9.0.0/24".parse().unwrap(),
            next_hop: "fe80::1".parse().unwrap(),
            oif: 7,
        };
        let m = route_message(&r).unwrap();
        assert!(m
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Via(RouteVia::Inet6(_)))));
        assert_eq!(m.header.protocol, RouteProtocol::Other(RTPROT_HYPHA));
        let r6 = KernelRoute {
            prefix: "2001:db8:1::/48".parse().unwrap(),
            next_hop: "fe80::1".parse().unwrap(),
            oif: 7,
        };
        let m6 = route_message(&r6).unwrap();
        assert!(m6
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Gateway(RouteAddress::Inet6(_)))));
    }
}
