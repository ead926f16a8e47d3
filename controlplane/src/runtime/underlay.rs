//! How the node's datagrams reach the underlay: one small interface, two implementations.
//!
//! With `--no-dataplane` the control plane owns the UDP socket ([`SocketUnderlay`]); with a
//! dataplane, `hypha-dp` owns it and control frames travel over shared memory
//! ([`super::dataplane::ShmUnderlay`]: PacketToSend down, PuntedPacket up). The event loop is
//! written once against [`Underlay`], so the two send paths share every line above this trait.

use std::io;
use std::net::{Ipv6Addr, SocketAddr};

use hypha_proto::time::Instant;
use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};

use super::node::{DataplaneCommand, Node};
use super::udp;
use crate::api::Stats;
use crate::fib::FibSink;

/// One input from the underlay, its bytes (if any) in the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// A datagram from a neighbour (a control frame, or anything with no dataplane).
    Datagram {
        /// Its underlay source.
        from: SocketAddr,
        /// Bytes in the buffer.
        len: usize,
    },
    /// A DATA packet for this node handed up by the dataplane (E2E handshake, bus frame).
    Local {
        /// Bytes in the buffer.
        len: usize,
    },
    /// The dataplane has no session to this destination.
    NoSession(Ipv6Addr),
    /// The dataplane has no route to this destination.
    NoRoute(Ipv6Addr),
    /// Something was consumed that the node need not see (counters, a bad record).
    Consumed,
}

/// The node's way to the underlay.
pub trait Underlay {
    /// Registers the readiness source with `registry` under `token` (readable interest).
    fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()>;
    /// Asks for writable interest too (`true`) or not, after a send would block.
    fn set_writable_interest(
        &mut self,
        registry: &Registry,
        token: Token,
        writable: bool,
    ) -> io::Result<()>;
    /// Sends one underlay datagram (a link frame) to `to`. `WouldBlock`: try again when writable.
    fn send_to(&mut self, to: SocketAddr, datagram: &[u8]) -> io::Result<()>;
    /// Reads the next input into `buf`; `None` when nothing is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<Input>>;
    /// Applies a dataplane command (the socket has no dataplane: ignored).
    fn apply(&mut self, cmd: DataplaneCommand) -> io::Result<()>;
    /// Call before sleeping; `false` means input is already waiting (don't sleep).
    fn prepare_sleep(&mut self) -> io::Result<bool>;
    /// Call after waking.
    fn woke(&mut self);
    /// Periodic housekeeping (dataplane supervision); may tell the node the dataplane restarted.
    fn handle_timeout<F: FibSink>(
        &mut self,
        now: Instant,
        node: &mut Node<F>,
        registry: &Registry,
    ) -> io::Result<()>;
    /// When [`Underlay::handle_timeout`] must next run.
    fn poll_timeout(&self) -> Option<Instant>;
    /// Adds the underlay's counters to the API's stats.
    fn stats(&self, out: &mut Stats);
    /// Clean shutdown (SIGINT/SIGTERM).
    fn shutdown(&mut self);
}

/// `--no-dataplane`: the control plane's own dual-stack UDP socket.
#[derive(Debug)]
pub struct SocketUnderlay {
    socket: UdpSocket,
    dual_stack: bool,
}

impl SocketUnderlay {
    /// Binds the node's port (see [`udp::bind`]).
    pub fn bind(port: u16) -> io::Result<SocketUnderlay> {
        let (socket, dual_stack) = udp::bind(port)?;
        Ok(SocketUnderlay { socket, dual_stack })
    }
}

impl Underlay for SocketUnderlay {
    fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(&mut self.socket, token, Interest::READABLE)
    }

    fn set_writable_interest(
        &mut self,
        registry: &Registry,
        token: Token,
        writable: bool,
    ) -> io::Result<()> {
        let interest = if writable {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        registry.reregister(&mut self.socket, token, interest)
    }

    fn send_to(&mut self, to: SocketAddr, datagram: &[u8]) -> io::Result<()> {
        self.socket
            .send_to(datagram, udp::for_socket(to, self.dual_stack))
            .map(drop)
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<Input>> {
        match self.socket.recv_from(buf) {
            Ok((len, from)) => Ok(Some(Input::Datagram {
                from: udp::canonical(from),
                len,
            })),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn apply(&mut self, _cmd: DataplaneCommand) -> io::Result<()> {
        Ok(())
    }

    fn prepare_sleep(&mut self) -> io::Result<bool> {
        Ok(true)
    }

    fn woke(&mut self) {}

    fn handle_timeout<F: FibSink>(
        &mut self,
        _now: Instant,
        _node: &mut Node<F>,
        _registry: &Registry,
    ) -> io::Result<()> {
        Ok(())
    }

    fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    fn stats(&self, _out: &mut Stats) {}

    fn shutdown(&mut self) {}
}
