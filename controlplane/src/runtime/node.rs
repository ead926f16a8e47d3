//! The node: the glue between the link layer, the Babel router, the peer table and the FIB, as one
//! more sans-IO state machine.
//!
//! Why its own core: the mio loop then only moves datagrams and time, and everything the daemon
//! decides (which link becomes which Babel interface, when to reconnect, what the API shows) can be
//! tested in-process with two or more `Node`s wired together, without sockets.
//!
//! Call order, as for the cores it drives: after every input (`handle_datagram`, `handle_timeout`)
//! drain [`Node::poll_transmit`] and send each datagram, then sleep until [`Node::poll_timeout`].
//! The glue runs inside the inputs: link events become router calls (Up → a point-to-point Babel
//! interface whose neighbour is the peer's overlay address; Down → the interface goes and the peer
//! is retried; Received(Babel) → `Router::handle_packet`), router output becomes LINK_DATA on the
//! interface's link, and router install/uninstall events go to the [`FibSink`].
//!
//! With a dataplane the node also runs the E2E [`SessionManager`] and speaks to the dataplane in
//! [`DataplaneCommand`]s (drain [`Node::poll_dataplane`] after every input too): links up/down
//! become PeerUp/PeerDown, route installs RouteAdd/RouteRemove (next hop: the neighbour's
//! endpoint), E2E installs SessionInstall/SessionRemove, handshake packets SendOverlay. Its inputs
//! from the dataplane are [`Node::handle_no_session`] (start a handshake with the key that came
//! with the route), [`Node::handle_no_route`] (a Babel route request) and
//! [`Node::handle_local_packet`] (E2E handshakes; message-bus frames, which wait in
//! [`Node::poll_bus_frame`]; [`Node::send_bus_frame`] is the way out, and
//! [`Node::poll_session_up`] tells the bus when a destination got its first session).
//!
//! Peers can change at run time: [`Node::add_peer`] and [`Node::remove_peer`] (the API's
//! `POST`/`DELETE /api/v1/admin/peers`, through the event loop's command channel).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hypha_proto::addr::OverlayAddr;
use hypha_proto::key::{PublicKey, SecretKey};

use hypha_proto::babel::Prefix;
use hypha_proto::time::Instant;
use hypha_proto::wire::FrameType;

use super::peers::{PeerError, PeerTable};
use crate::api::{AdminInfo, Metric, RouteInfo, Snapshot, Stats};
use crate::babel::{
    Event as RouterEvent, InterfaceConfig, InterfaceId, RouteFilter, Router, RouterConfig,
};
use crate::config::RunConfig;
use crate::e2e::{self, E2eConfig, Role, SessionManager};
use crate::fib::{FibEntry, FibSink, FibTable, NextHop};
use crate::link::{Channel, LinkConfig, LinkEvent, LinkId, LinkLayer};

/// Who this node is.
#[derive(Clone)]
pub struct Identity {
    /// The static X25519 secret.
    pub secret: [u8; 32],
    /// Its public key.
    pub public: [u8; 32],
    /// The overlay address derived from the public key.
    pub addr: Ipv6Addr,
    /// The /64 the key owns.
    pub subnet: Prefix,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("public", &hex::encode(self.public))
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Timers and seeds of a node (from [`RunConfig`] in the daemon, chosen freely in tests).
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Babel hello interval; link keepalives use it too.
    pub hello_interval: Duration,
    /// Babel periodic update interval.
    pub update_interval: Duration,
    /// Network key for the link handshake.
    pub network_key: Option<[u8; 32]>,
    /// Configured peers.
    pub peers: Vec<SocketAddr>,
    /// Seed of every RNG in the node.
    pub seed: u64,
    /// Whether a dataplane carries the data: then the node runs E2E handshakes and emits
    /// [`DataplaneCommand`]s.
    pub dataplane: bool,
    /// Wall-clock time since the Unix epoch at the node's creation (E2E handshake timestamps).
    pub wall_clock: Duration,
}

/// What the node asks of the dataplane (routes, neighbours, session keys, packets into the
/// overlay); the runtime's dataplane adapter turns these into shm records.
#[derive(Clone, PartialEq, Eq)]
pub enum DataplaneCommand {
    /// A neighbour is up at `endpoint` with static key `key`.
    PeerUp {
        /// Its underlay address.
        endpoint: SocketAddr,
        /// Its static public key.
        key: [u8; 32],
    },
    /// The neighbour at `endpoint` is gone.
    PeerDown {
        /// Its underlay address.
        endpoint: SocketAddr,
    },
    /// `prefix` is reached through the neighbour at `endpoint`.
    RouteAdd {
        /// The destination.
        prefix: Prefix,
        /// The next hop's underlay address.
        endpoint: SocketAddr,
        /// The route's metric.
        metric: u16,
    },
    /// `prefix` has no route any more.
    RouteRemove {
        /// The destination.
        prefix: Prefix,
    },
    /// An E2E session to install (see [`e2e::Event::Install`]).
    SessionInstall {
        /// The remote end.
        peer: Ipv6Addr,
        /// Our receiver index.
        local_index: u32,
        /// The peer's receiver index.
        remote_index: u32,
        /// Seals what we send.
        tx_key: [u8; 32],
        /// Opens what we receive.
        rx_key: [u8; 32],
        /// The AEAD.
        cipher: e2e::Cipher,
    },
    /// Remove the session with this receiver index.
    SessionRemove {
        /// The remote end.
        peer: Ipv6Addr,
        /// Our receiver index.
        local_index: u32,
    },
    /// Route a complete DATA packet (header first) towards `dst`.
    SendOverlay {
        /// The overlay destination.
        dst: Ipv6Addr,
        /// The packet.
        packet: Vec<u8>,
    },
}

impl std::fmt::Debug for DataplaneCommand {
    /// Never prints keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataplaneCommand::PeerUp { endpoint, .. } => write!(f, "PeerUp({endpoint})"),
            DataplaneCommand::PeerDown { endpoint } => write!(f, "PeerDown({endpoint})"),
            DataplaneCommand::RouteAdd {
                prefix, endpoint, ..
            } => write!(f, "RouteAdd({prefix} via {endpoint})"),
            DataplaneCommand::RouteRemove { prefix } => write!(f, "RouteRemove({prefix})"),
            DataplaneCommand::SessionInstall {
                peer, local_index, ..
            } => write!(f, "SessionInstall({peer}, {local_index})"),
            DataplaneCommand::SessionRemove { peer, local_index } => {
                write!(f, "SessionRemove({peer}, {local_index})")
            }
            DataplaneCommand::SendOverlay { dst, packet } => {
                write!(f, "SendOverlay({dst}, {} bytes)", packet.len())
            }
        }
    }
}

impl NodeConfig {
    /// The node part of a daemon configuration.
    pub fn from_run(cfg: &RunConfig, seed: u64) -> Self {
        NodeConfig {
            hello_interval: cfg.hello_interval,
            update_interval: cfg.update_interval,
            network_key: cfg.network_key,
            peers: cfg.peers.iter().map(|p| p.0).collect(),
            seed,
            dataplane: !cfg.no_dataplane,
            wall_clock: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        }
    }
}

/// Counters of the glue and the loop around it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeCounters {
    /// Datagrams received on the socket.
    pub rx_datagrams: u64,
    /// Datagrams sent.
    pub tx_datagrams: u64,
    /// DATA frames dropped because there is no dataplane (`--no-dataplane`).
    pub data_without_dataplane: u64,
    /// Datagrams whose first byte is no known frame type (or empty).
    pub unknown_frame_type: u64,
    /// Datagrams the link layer dropped (it counts why).
    pub link_dropped: u64,
    /// Babel packets that could not be sent on their link.
    pub babel_send_failed: u64,
    /// Router transmits for an interface without a link (raced with a Down).
    pub babel_no_link: u64,
    /// Send errors on the socket other than "would block".
    pub socket_send_errors: u64,
    /// Receive errors on the socket other than "would block".
    pub socket_recv_errors: u64,
    /// Links that came up.
    pub links_up: u64,
    /// Links that went down.
    pub links_down: u64,
    /// "No session" reports from the dataplane.
    pub dp_no_session: u64,
    /// "No route" reports from the dataplane.
    pub dp_no_route: u64,
    /// Punted local packets that were neither an E2E handshake nor a bus frame.
    pub dp_local_unknown: u64,
    /// Message-bus frames received (queued for the bus).
    pub bus_frames_received: u64,
    /// Message-bus frames dropped because the bus queue was full.
    pub bus_frames_dropped: u64,
    /// Message-bus frames handed to the dataplane for sealing and sending.
    pub bus_frames_sent: u64,
    /// Message-bus frames that could not go (no dataplane); the bus retransmits them.
    pub bus_frames_unsendable: u64,
    /// Peers added at run time (API).
    pub peers_added: u64,
    /// Peers removed at run time (API).
    pub peers_removed: u64,
}

/// Bus frames received and not yet taken by the bus.
const BUS_QUEUE: usize = 1024;

struct Attached {
    iface: InterfaceId,
    neighbour: IpAddr,
    endpoint: SocketAddr,
}

/// A node's control plane without I/O.
pub struct Node<F: FibSink = FibTable> {
    identity: Identity,
    link: LinkLayer,
    router: Router,
    peers: PeerTable<LinkId>,
    fib: F,
    attached: BTreeMap<LinkId, Attached>,
    by_iface: BTreeMap<InterfaceId, LinkId>,
    next_iface: u32,
    babel_buf: Vec<u8>,
    counters: RuntimeCounters,
    changed: bool,
    hello_interval: Duration,
    update_interval: Duration,
    e2e: Option<SessionManager>,
    dp: VecDeque<DataplaneCommand>,
    session_peers: HashMap<u32, Ipv6Addr>,
    e2e_buf: Vec<u8>,
    bus_rx: VecDeque<(Ipv6Addr, Vec<u8>)>,
    sessions_up: VecDeque<Ipv6Addr>,
}

impl<F: FibSink> Node<F> {
    /// A node that originates its own /64 and will connect to its configured peers.
    pub fn new(identity: Identity, cfg: &NodeConfig, fib: F, now: Instant) -> Self {
        let mut lc = LinkConfig::new(identity.secret);
        lc.network_key = cfg.network_key;
        lc.seed = cfg.seed;
        // Keepalives at the hello rate; a link is dead after about four missed hellos (never
        // sooner than 2 s, so a short hello interval in tests does not make links flap).
        lc.keepalive_interval = cfg.hello_interval;
        lc.dead_interval = (cfg.hello_interval * 4).max(Duration::from_secs(2));
        lc.handshake_timeout = lc.handshake_timeout.min(lc.dead_interval * 2);
        let link = LinkLayer::new(lc, now);

        // Router-id: 4 stable bytes from the key, 4 random per start (RouterConfig::new).
        let stable = [
            identity.public[0],
            identity.public[1],
            identity.public[2],
            identity.public[3],
        ];
        let rc = RouterConfig::new(stable, cfg.seed ^ 0x9e37_79b9_7f4a_7c15)
            .with_filter(RouteFilter::Overlay);
        let mut router = Router::new(rc, now);
        router.originate(now, identity.subnet, Some(identity.public));
        let e2e = cfg.dataplane.then(|| {
            let mut ec = E2eConfig::new(SecretKey::from_bytes(identity.secret));
            ec.seed = cfg.seed ^ 0x2545_f491_4f6c_dd1d;
            ec.wall_clock = cfg.wall_clock;
            SessionManager::new(ec, now)
        });

        Node {
            peers: PeerTable::new(now, &cfg.peers, cfg.seed.rotate_left(17)),
            identity,
            link,
            router,
            fib,
            attached: BTreeMap::new(),
            by_iface: BTreeMap::new(),
            next_iface: 1,
            babel_buf: Vec::with_capacity(2048),
            counters: RuntimeCounters::default(),
            changed: true,
            hello_interval: cfg.hello_interval,
            update_interval: cfg.update_interval,
            e2e,
            dp: VecDeque::new(),
            session_peers: HashMap::new(),
            e2e_buf: Vec::with_capacity(256),
            bus_rx: VecDeque::new(),
            sessions_up: VecDeque::new(),
        }
    }

    /// The dataplane reports a packet to `dst` without a session: start an E2E handshake with
    /// the key that came with the route to `dst` (or ask for a route first).
    pub fn handle_no_session(&mut self, now: Instant, dst: Ipv6Addr) {
        self.counters.dp_no_session += 1;
        let key = self
            .router
            .selected_route(&subnet_of(dst))
            .and_then(|r| r.origin_key.copied())
            .map(PublicKey::from_bytes);
        if let (Some(e2e), Ok(dst)) = (&mut self.e2e, OverlayAddr::new(dst)) {
            if let Err(e) = e2e.connect(now, dst, key) {
                tracing::debug!(%dst, error = %e, "no E2E handshake");
            }
        }
        self.process(now);
    }

    /// The dataplane reports a packet to `dst` without a route: ask the neighbours for one.
    pub fn handle_no_route(&mut self, now: Instant, dst: Ipv6Addr) {
        self.counters.dp_no_route += 1;
        if dst.segments()[0] & 0xfe00 == 0x0400 {
            self.router.request_route(now, subnet_of(dst));
        }
        self.process(now);
    }

    /// A DATA packet for this node punted by the dataplane: an E2E handshake (whole packet), or a
    /// decrypted TRANSPORT packet whose payload is a message-bus frame.
    pub fn handle_local_packet(&mut self, now: Instant, packet: &[u8]) {
        use hypha_proto::wire::data::{Kind, Packet, PayloadType, HEADER_LEN};
        // Not `new_checked`: a decrypted TRANSPORT packet has no tag any more, so its payload may
        // be shorter than a ciphertext's minimum. The header is all we read here.
        if packet.len() < HEADER_LEN || packet.first() != Some(&(FrameType::Data as u8)) {
            self.counters.dp_local_unknown += 1;
            return;
        }
        let view = Packet::new_unchecked(packet);
        match view.kind() {
            Ok(Kind::Transport) => {
                let src = view.src_addr();
                let body = packet.get(HEADER_LEN..).unwrap_or_default();
                match body.split_first() {
                    Some((&t, frame)) if t == PayloadType::Message as u8 => {
                        if self.bus_rx.len() >= BUS_QUEUE {
                            self.counters.bus_frames_dropped += 1;
                        } else {
                            self.counters.bus_frames_received += 1;
                            self.bus_rx.push_back((src, frame.to_vec()));
                        }
                    }
                    _ => self.counters.dp_local_unknown += 1,
                }
            }
            Ok(_) => {
                if let Some(e2e) = &mut self.e2e {
                    if let Err(e) = e2e.handle_packet(now, packet) {
                        tracing::debug!(error = %e, "E2E handshake packet dropped");
                    }
                }
            }
            Err(_) => self.counters.dp_local_unknown += 1,
        }
        self.process(now);
    }

    /// Bus hook: the next destination that got its first E2E session (no session to it before),
    /// so the bus can resend at once what it sent (and the dataplane dropped) before.
    pub fn poll_session_up(&mut self) -> Option<Ipv6Addr> {
        self.sessions_up.pop_front()
    }

    /// Bus hook, inbound: the next message-bus frame received, with its source overlay address.
    pub fn poll_bus_frame(&mut self) -> Option<(Ipv6Addr, Vec<u8>)> {
        self.bus_rx.pop_front()
    }

    /// Bus hook, outbound: sends one message-bus frame to `dst` through the dataplane (which
    /// seals it under the E2E session to `dst`; without one it reports "no session" and the
    /// frame is lost, so the bus retransmits). Returns false without a dataplane.
    pub fn send_bus_frame(&mut self, dst: Ipv6Addr, frame: &[u8]) -> bool {
        use hypha_proto::wire::data::{Kind, PayloadType, Repr, HEADER_LEN};
        if self.e2e.is_none() {
            self.counters.bus_frames_unsendable += 1;
            return false;
        }
        self.counters.bus_frames_sent += 1;
        let repr = Repr {
            hop_limit: e2e::DEFAULT_HOP_LIMIT,
            kind: Kind::Transport,
            receiver_index: 0,
            counter: 0,
            src: self.identity.addr,
            dst,
        };
        let mut packet = vec![0u8; HEADER_LEN + 1 + frame.len()];
        let mut view = hypha_proto::wire::data::Packet::new_unchecked(&mut packet[..]);
        repr.emit(&mut view);
        if let Some(b) = packet.get_mut(HEADER_LEN) {
            *b = PayloadType::Message as u8;
        }
        if let Some(body) = packet.get_mut(HEADER_LEN + 1..) {
            body.copy_from_slice(frame);
        }
        self.dp
            .push_back(DataplaneCommand::SendOverlay { dst, packet });
        true
    }

    /// Adds a configured peer at run time (the API's `POST /api/v1/admin/peers`); the first
    /// connect attempt is made at once.
    pub fn add_peer(&mut self, now: Instant, endpoint: SocketAddr) -> Result<(), PeerError> {
        self.peers.add(now, endpoint)?;
        tracing::info!(%endpoint, "peer added");
        self.counters.peers_added += 1;
        self.changed = true;
        self.process(now);
        Ok(())
    }

    /// Removes a peer at run time (`DELETE /api/v1/admin/peers/{endpoint}`): it is no longer
    /// retried and its links are torn down, so routes through it are retracted.
    pub fn remove_peer(&mut self, now: Instant, endpoint: SocketAddr) -> Result<(), PeerError> {
        let links = self.peers.remove(endpoint)?;
        tracing::info!(%endpoint, links = links.len(), "peer removed");
        self.counters.peers_removed += 1;
        for link in links {
            self.link.close(now, link);
        }
        self.changed = true;
        self.process(now);
        Ok(())
    }

    /// The next command for the dataplane (nothing without one).
    pub fn poll_dataplane(&mut self) -> Option<DataplaneCommand> {
        self.dp.pop_front()
    }

    /// The dataplane restarted and lost its sessions: forget ours (installing the same keys again
    /// would reuse nonces); the next packet to each destination makes a new handshake.
    pub fn dataplane_restarted(&mut self) {
        if let Some(e2e) = &mut self.e2e {
            e2e.forget_sessions();
        }
        self.session_peers.clear();
    }

    /// The E2E session manager (with a dataplane).
    pub fn e2e(&self) -> Option<&SessionManager> {
        self.e2e.as_ref()
    }

    /// One datagram from `from` (IPv4 not v4-mapped).
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        self.counters.rx_datagrams += 1;
        self.peers.count_rx(from, datagram.len());
        match FrameType::of(datagram) {
            Ok(t) if t.is_control() => {
                if let Err(e) = self.link.handle_datagram(now, from, datagram) {
                    self.counters.link_dropped += 1;
                    tracing::trace!(%from, error = %e, "link frame dropped");
                }
            }
            Ok(_) => self.counters.data_without_dataplane += 1,
            Err(_) => self.counters.unknown_frame_type += 1,
        }
        self.process(now);
    }

    /// Runs the timers due at `now` (a spurious call does nothing).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.link.handle_timeout(now);
        self.router.handle_timeout(now);
        self.peers.handle_timeout(now);
        if let Some(e2e) = &mut self.e2e {
            if e2e.poll_timeout().is_some_and(|t| t <= now) {
                e2e.handle_timeout(now);
            }
        }
        self.process(now);
    }

    /// The next datagram to send, written into `buf`.
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> Option<SocketAddr> {
        let to = self.link.poll_transmit(buf)?;
        self.counters.tx_datagrams += 1;
        self.peers.count_tx(to, buf.len());
        Some(to)
    }

    /// When [`Node::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.link.poll_timeout(),
            self.router.poll_timeout(),
            self.peers.poll_timeout(),
            self.e2e.as_ref().and_then(SessionManager::poll_timeout),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Moves events between the cores until none of them has anything left.
    fn process(&mut self, now: Instant) {
        loop {
            let mut progress = false;
            while let Some(remote) = self.peers.poll_connect(now) {
                tracing::debug!(%remote, "connecting");
                self.link.connect(now, remote);
                progress = true;
            }
            while let Some(ev) = self.link.poll_event() {
                self.on_link_event(now, ev);
                progress = true;
            }
            while let Some(t) = self.router.poll_transmit(now, &mut self.babel_buf) {
                progress = true;
                let Some(&link) = self.by_iface.get(&t.iface) else {
                    self.counters.babel_no_link += 1;
                    continue;
                };
                if let Err(e) = self.link.send(now, link, Channel::Babel, &self.babel_buf) {
                    self.counters.babel_send_failed += 1;
                    tracing::debug!(?link, error = %e, "cannot send Babel packet");
                }
            }
            while let Some(ev) = self.router.poll_event() {
                self.on_router_event(ev);
                progress = true;
            }
            if let Some(e2e) = &mut self.e2e {
                while let Some(dst) = e2e.poll_transmit(&mut self.e2e_buf) {
                    self.dp.push_back(DataplaneCommand::SendOverlay {
                        dst: dst.into(),
                        packet: self.e2e_buf.clone(),
                    });
                    progress = true;
                }
            }
            while let Some(ev) = self.e2e.as_mut().and_then(SessionManager::poll_event) {
                self.on_e2e_event(now, ev);
                progress = true;
            }
            if !progress {
                break;
            }
        }
    }

    fn on_link_event(&mut self, now: Instant, ev: LinkEvent) {
        match ev {
            LinkEvent::Up {
                link,
                remote,
                peer_key,
            } => {
                self.counters.links_up += 1;
                let neighbour = IpAddr::V6(overlay_addr(&peer_key));
                tracing::info!(%remote, %neighbour, "link up");
                let iface = InterfaceId(self.next_iface);
                self.next_iface = self.next_iface.wrapping_add(1);
                self.router.add_interface(
                    now,
                    iface,
                    InterfaceConfig::point_to_point()
                        .with_intervals(self.hello_interval, self.update_interval),
                );
                self.attached.insert(
                    link,
                    Attached {
                        iface,
                        neighbour,
                        endpoint: remote,
                    },
                );
                self.by_iface.insert(iface, link);
                self.peers
                    .on_up(link, remote, (hex::encode(peer_key), neighbour.to_string()));
                if self.e2e.is_some() {
                    self.dp.push_back(DataplaneCommand::PeerUp {
                        endpoint: remote,
                        key: peer_key,
                    });
                }
                self.changed = true;
            }
            LinkEvent::Down { link, reason } => {
                self.counters.links_down += 1;
                if let Some(a) = self.attached.remove(&link) {
                    tracing::info!(remote = %a.endpoint, %reason, "link down");
                    if self.e2e.is_some() {
                        self.dp.push_back(DataplaneCommand::PeerDown {
                            endpoint: a.endpoint,
                        });
                    }
                    self.by_iface.remove(&a.iface);
                    self.router.remove_interface(now, a.iface);
                }
                self.peers.on_down(now, link);
                self.changed = true;
            }
            LinkEvent::Received {
                link,
                channel: Channel::Babel,
                payload,
            } => {
                if let Some(a) = self.attached.get(&link) {
                    // Errors are counted by the router; the valid parts were processed.
                    if let Err(e) = self
                        .router
                        .handle_packet(now, a.iface, a.neighbour, &payload)
                    {
                        tracing::debug!(neighbour = %a.neighbour, error = %e, "Babel packet");
                    }
                }
            }
            LinkEvent::Received { .. } => {}
            LinkEvent::HandshakeFailed { remote, reason } => {
                tracing::info!(%remote, %reason, "handshake failed");
                self.peers.on_handshake_failed(now, remote);
                self.changed = true;
            }
        }
    }

    fn on_e2e_event(&mut self, now: Instant, ev: e2e::Event) {
        match ev {
            e2e::Event::Install {
                peer,
                local_index,
                remote_index,
                tx_key,
                rx_key,
                cipher,
                role,
                ..
            } => {
                let peer: Ipv6Addr = peer.into();
                tracing::debug!(%peer, local_index, ?role, "E2E session up");
                // Only a first session tells the bus (a rekey replaces a working one).
                let first = !self.session_peers.values().any(|p| *p == peer);
                self.session_peers.insert(local_index, peer);
                if first && !self.sessions_up.contains(&peer) && self.sessions_up.len() < BUS_QUEUE
                {
                    self.sessions_up.push_back(peer);
                }
                self.dp.push_back(DataplaneCommand::SessionInstall {
                    peer,
                    local_index,
                    remote_index,
                    tx_key,
                    rx_key,
                    cipher,
                });
                // The initiator holds the response: the responder has the keys, so the session is
                // confirmed (it may rekey and retire older ones). A responder's session is
                // confirmed by its first received packet, which the shm ABI does not report yet.
                if role == Role::Initiator {
                    if let Some(e2e) = &mut self.e2e {
                        e2e.handle_traffic(now, local_index);
                    }
                }
                self.changed = true;
            }
            e2e::Event::Remove { local_index } => {
                if let Some(peer) = self.session_peers.remove(&local_index) {
                    self.dp
                        .push_back(DataplaneCommand::SessionRemove { peer, local_index });
                }
                self.changed = true;
            }
            e2e::Event::Failed { dst } => {
                tracing::info!(%dst, "E2E handshake failed");
            }
            e2e::Event::NeedRoute { dst } => {
                self.router.request_route(now, subnet_of(dst.into()));
            }
        }
    }

    fn on_router_event(&mut self, ev: RouterEvent) {
        match ev {
            RouterEvent::Install {
                prefix,
                iface,
                next_hop,
                metric,
            } => {
                let Some(endpoint) = self.endpoint_of_iface(iface) else {
                    return;
                };
                let seqno = self.router.selected_route(&prefix).map_or(0, |r| r.seqno.0);
                if self.e2e.is_some() {
                    self.dp.push_back(DataplaneCommand::RouteAdd {
                        prefix,
                        endpoint,
                        metric,
                    });
                }
                self.fib.install(
                    prefix,
                    FibEntry {
                        next_hop: NextHop {
                            endpoint,
                            neighbour: next_hop,
                        },
                        metric,
                        seqno,
                    },
                );
                self.changed = true;
            }
            RouterEvent::Uninstall { prefix, .. } => {
                if self.e2e.is_some() {
                    self.dp.push_back(DataplaneCommand::RouteRemove { prefix });
                }
                self.fib.uninstall(prefix);
                self.changed = true;
            }
            _ => {}
        }
    }

    /// Whether the API's view changed since [`Node::clear_changed`] (counters aside).
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// Marks the current state as published.
    pub fn clear_changed(&mut self) {
        self.changed = false;
    }

    /// The FIB sink.
    pub fn fib(&self) -> &F {
        &self.fib
    }

    /// The node's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Runtime counters (the loop adds its socket errors through [`Node::counters_mut`]).
    pub fn counters(&self) -> &RuntimeCounters {
        &self.counters
    }

    /// Runtime counters, for the loop.
    pub fn counters_mut(&mut self) -> &mut RuntimeCounters {
        &mut self.counters
    }

    /// Number of peers with a live link.
    pub fn alive_peers(&self) -> usize {
        self.peers.alive()
    }

    fn endpoint_of_iface(&self, iface: InterfaceId) -> Option<SocketAddr> {
        let link = self.by_iface.get(&iface)?;
        self.attached.get(link).map(|a| a.endpoint)
    }

    /// Everything the API serves. `start_time` is the Unix time the node started.
    pub fn snapshot(&self, start_time: u64) -> Snapshot {
        let admin = AdminInfo {
            node_subnet: self.identity.subnet.to_string(),
            node_ip: self.identity.addr.to_string(),
            node_pubkey: hex::encode(self.identity.public),
            node_start_time: start_time,
        };
        let mut selected = Vec::new();
        let mut fallback = Vec::new();
        for r in self.router.routes() {
            let endpoint = self.endpoint_of_iface(r.neighbour.iface);
            let info = RouteInfo {
                subnet: r.prefix.to_string(),
                next_hop: endpoint.map_or_else(|| r.next_hop.to_string(), |e| format!("udp://{e}")),
                metric: Metric::from_babel(r.metric),
                seqno: r.seqno.0,
                next_hop_ip: Some(r.next_hop.to_string()),
            };
            if r.selected {
                selected.push(info);
            } else {
                fallback.push(info);
            }
        }
        // Every routed destination's key (RFC 8966 update sub-TLV 112), so the API can name the
        // key of any reachable node, not only of neighbours.
        let origin_keys = self
            .router
            .routes()
            .filter(|r| r.selected)
            .filter_map(|r| match (r.prefix.addr(), r.origin_key) {
                (IpAddr::V6(net), Some(k)) => Some((net, *k)),
                _ => None,
            })
            .collect();
        Snapshot {
            admin,
            peers: self.peers.infos(),
            selected,
            fallback,
            stats: self.stats(),
            origin_keys,
        }
    }

    fn stats(&self) -> Stats {
        let mut s = Stats::new();
        let l = self.link.counters();
        let link = s.entry("link".into()).or_default();
        for (k, v) in [
            ("rx_datagrams", l.rx_datagrams),
            ("malformed", l.malformed),
            ("unknown_index", l.unknown_index),
            ("replay_duplicate", l.replay_duplicate),
            ("replay_too_old", l.replay_too_old),
            ("auth_failures", l.auth_failures),
            ("expired_session", l.expired_session),
            ("unknown_channel", l.unknown_channel),
            ("handshake_rate_limited", l.handshake_rate_limited),
            ("handshake_unexpected", l.handshake_unexpected),
            ("handshakes_initiated", l.handshakes_initiated),
            ("handshakes_completed", l.handshakes_completed),
            ("handshakes_failed", l.handshakes_failed),
            ("handshake_timeouts", l.handshake_timeouts),
            ("handshake_retransmits", l.handshake_retransmits),
            ("half_open_evicted", l.half_open_evicted),
            ("rekeys", l.rekeys),
            ("keepalives_sent", l.keepalives_sent),
            ("tx_queue_full", l.tx_queue_full),
            ("events_dropped", l.events_dropped),
        ] {
            link.insert(k.into(), v);
        }
        let b = self.router.counters();
        let babel = s.entry("babel".into()).or_default();
        for (k, v) in [
            ("packets_received", b.packets_received),
            ("packets_invalid", b.packets_invalid),
            ("packets_sent", b.packets_sent),
            ("tlvs_received", b.tlvs_received),
            ("tlvs_invalid", b.tlvs_invalid),
            ("tlvs_unknown", b.tlvs_unknown),
            ("tlvs_ignored", b.tlvs_ignored),
            ("updates_received", b.updates_received),
            ("updates_filtered", b.updates_filtered),
            ("updates_no_next_hop", b.updates_no_next_hop),
            ("updates_unfeasible", b.updates_unfeasible),
            ("updates_for_own_prefix", b.updates_for_own_prefix),
            ("ihus_not_for_us", b.ihus_not_for_us),
            ("route_requests_received", b.route_requests_received),
            ("seqno_requests_received", b.seqno_requests_received),
            ("seqno_requests_forwarded", b.seqno_requests_forwarded),
            ("seqno_requests_sent", b.seqno_requests_sent),
            ("seqno_requests_duplicate", b.seqno_requests_duplicate),
            ("seqno_bumps", b.seqno_bumps),
            ("routes_refused", b.routes_refused),
            ("neighbours_refused", b.neighbours_refused),
            ("output_dropped", b.output_dropped),
        ] {
            babel.insert(k.into(), v);
        }
        if let Some(e2e) = &self.e2e {
            let e = e2e.counters();
            let g = s.entry("e2e".into()).or_default();
            for (k, v) in [
                ("inits_sent", e.inits_sent),
                ("init_retries", e.init_retries),
                ("resps_sent", e.resps_sent),
                ("sessions_installed", e.sessions_installed),
                ("sessions_removed", e.sessions_removed),
                ("sessions_confirmed", e.sessions_confirmed),
                ("handshakes_failed", e.handshakes_failed),
                ("malformed", e.malformed),
                ("not_for_us", e.not_for_us),
                ("auth_failed", e.auth_failed),
                ("peer_misbehaved", e.peer_misbehaved),
                ("replayed", e.replayed),
                ("unknown_index", e.unknown_index),
                ("rate_limited", e.rate_limited),
                ("glare", e.glare),
                ("key_mismatch", e.key_mismatch),
                ("queue_overflow", e.queue_overflow),
            ] {
                g.insert(k.into(), v);
            }
        }
        let c = &self.counters;
        let rt = s.entry("runtime".into()).or_default();
        for (k, v) in [
            ("rx_datagrams", c.rx_datagrams),
            ("tx_datagrams", c.tx_datagrams),
            ("data_without_dataplane", c.data_without_dataplane),
            ("unknown_frame_type", c.unknown_frame_type),
            ("link_dropped", c.link_dropped),
            ("babel_send_failed", c.babel_send_failed),
            ("babel_no_link", c.babel_no_link),
            ("socket_send_errors", c.socket_send_errors),
            ("socket_recv_errors", c.socket_recv_errors),
            ("links_up", c.links_up),
            ("links_down", c.links_down),
            ("peers_alive", self.peers.alive() as u64),
            ("dp_no_session", c.dp_no_session),
            ("dp_no_route", c.dp_no_route),
            ("dp_local_unknown", c.dp_local_unknown),
            ("bus_frames_received", c.bus_frames_received),
            ("bus_frames_dropped", c.bus_frames_dropped),
            ("bus_frames_sent", c.bus_frames_sent),
            ("bus_frames_unsendable", c.bus_frames_unsendable),
            ("peers_added", c.peers_added),
            ("peers_removed", c.peers_removed),
        ] {
            rt.insert(k.into(), v);
        }
        s
    }
}

/// The /64 around an overlay address (the prefix a node owns, and the route that reaches it).
fn subnet_of(addr: Ipv6Addr) -> Prefix {
    let s = addr.segments();
    let net = Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
    // Invariant: 64 ≤ 128, the only thing Prefix::new checks.
    #[allow(clippy::expect_used)]
    Prefix::new(IpAddr::V6(net), 64).expect("a /64 is a valid prefix")
}

/// The overlay address of a public key.
fn overlay_addr(key: &[u8; 32]) -> Ipv6Addr {
    hypha_proto::key::PublicKey::from_bytes(*key)
        .address()
        .into()
}

#[cfg(test)]
mod tests {
    //! Nodes wired together in memory on virtual time: the glue is tested without sockets.

    use super::*;
    use std::collections::HashSet;

    use hypha_proto::key::SecretKey;

    /// A zero-latency network of nodes; `cut` pairs drop everything between them.
    struct Net {
        nodes: Vec<Node>,
        addrs: Vec<SocketAddr>,
        cut: HashSet<(usize, usize)>,
        now: Instant,
    }

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::new(
            IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, i as u8 + 1)),
            9651,
        )
    }

    impl Net {
        /// `links` are (dialled, dialler) pairs.
        fn new(n: usize, links: &[(usize, usize)], keys: &[Option<[u8; 32]>]) -> Net {
            Net::build(n, links, keys, false)
        }

        fn build(
            n: usize,
            links: &[(usize, usize)],
            keys: &[Option<[u8; 32]>],
            dataplane: bool,
        ) -> Net {
            let now = Instant::from_secs(1);
            let nodes = (0..n)
                .map(|i| {
                    let id = crate::daemon::identity(&SecretKey::from_bytes([i as u8 + 1; 32]));
                    let cfg = NodeConfig {
                        hello_interval: Duration::from_millis(500),
                        update_interval: Duration::from_secs(2),
                        network_key: keys.get(i).copied().flatten(),
                        peers: links
                            .iter()
                            .filter(|(_, d)| *d == i)
                            .map(|(t, _)| addr(*t))
                            .collect(),
                        seed: i as u64,
                        dataplane,
                        wall_clock: Duration::ZERO,
                    };
                    Node::new(id, &cfg, FibTable::new(), now)
                })
                .collect();
            Net {
                nodes,
                addrs: (0..n).map(addr).collect(),
                cut: HashSet::new(),
                now,
            }
        }

        fn deliver(&mut self) {
            let mut buf = Vec::new();
            for _ in 0..10_000 {
                let mut moved = false;
                for i in 0..self.nodes.len() {
                    while let Some(to) = self.nodes[i].poll_transmit(&mut buf) {
                        moved = true;
                        let Some(j) = self.addrs.iter().position(|a| *a == to) else {
                            continue;
                        };
                        if self.cut.contains(&(i.min(j), i.max(j))) {
                            continue;
                        }
                        let (now, from) = (self.now, self.addrs[i]);
                        self.nodes[j].handle_datagram(now, from, &buf);
                    }
                }
                if !moved {
                    return;
                }
            }
            panic!("the network never went quiet");
        }

        /// Runs until `done` holds or `limit` of virtual time passed; returns the time taken.
        fn run_until(&mut self, limit: Duration, done: impl Fn(&Net) -> bool) -> Option<Duration> {
            let start = self.now;
            loop {
                self.deliver();
                if done(self) {
                    return Some(self.now - start);
                }
                let next = self.nodes.iter().filter_map(|n| n.poll_timeout()).min()?;
                if next - start > limit {
                    return None;
                }
                self.now = self.now.max(next);
                for n in &mut self.nodes {
                    if n.poll_timeout().is_some_and(|t| t <= self.now) {
                        n.handle_timeout(self.now);
                    }
                }
            }
        }

        fn converged(&self) -> bool {
            self.nodes.iter().enumerate().all(|(i, n)| {
                self.nodes
                    .iter()
                    .enumerate()
                    .all(|(j, m)| i == j || n.fib().get(&m.identity().subnet).is_some())
            })
        }
    }

    #[test]
    fn a_line_converges_and_the_api_shows_it() {
        let mut net = Net::new(3, &[(0, 1), (1, 2)], &[]);
        let t = net
            .run_until(Duration::from_secs(30), Net::converged)
            .expect("three nodes converge");
        eprintln!("3-node line converged in {t:?} virtual");
        let snap = net.nodes[0].snapshot(42);
        assert_eq!(snap.admin.node_start_time, 42);
        assert_eq!(
            snap.admin.node_subnet,
            net.nodes[0].identity().subnet.to_string()
        );
        let others = snap
            .selected
            .iter()
            .filter(|r| r.subnet != snap.admin.node_subnet)
            .count();
        assert_eq!(others, 2, "{:?}", snap.selected);
        let to_c = net.nodes[2].identity().subnet.to_string();
        let r = snap
            .selected
            .iter()
            .find(|r| r.subnet == to_c)
            .expect("route a→c");
        assert_eq!(r.next_hop, format!("udp://{}", addr(1)));
        // The FIB sink saw exactly the selected routes, with the same next hops.
        let fib = net.nodes[0].fib();
        assert_eq!(fib.len(), snap.selected.len());
        for r in &snap.selected {
            let (_, e) = fib
                .iter()
                .find(|(p, _)| p.to_string() == r.subnet)
                .expect("selected route in the FIB");
            assert_eq!(format!("udp://{}", e.next_hop.endpoint), r.next_hop);
        }
        assert_eq!(snap.peers.len(), 1);
        assert_eq!(
            snap.peers[0].connection_state,
            crate::api::ConnectionState::Alive
        );
        assert!(snap.stats["link"]["handshakes_completed"] >= 1);
        // The middle node dialled one peer and was dialled by the other.
        let kinds: Vec<_> = net.nodes[1]
            .snapshot(0)
            .peers
            .iter()
            .map(|p| p.kind)
            .collect();
        assert!(kinds.contains(&crate::api::PeerType::Static));
        assert!(kinds.contains(&crate::api::PeerType::Inbound));
    }

    #[test]
    fn a_dead_link_is_retried_and_comes_back() {
        let mut net = Net::new(2, &[(0, 1)], &[]);
        net.run_until(Duration::from_secs(30), Net::converged)
            .expect("converge");
        net.cut.insert((0, 1));
        net.run_until(Duration::from_secs(60), |n| {
            n.nodes[1].alive_peers() == 0 && n.nodes[0].alive_peers() == 0
        })
        .expect("the link dies");
        assert!(net.nodes[1].fib().is_empty(), "no route over a dead link");
        // Node 1 keeps retrying with backoff; once the cut heals the link comes back.
        net.run_until(Duration::from_secs(20), |_| false);
        net.cut.clear();
        let t = net
            .run_until(Duration::from_secs(60), |n| {
                n.converged() && n.nodes[1].alive_peers() == 1
            })
            .expect("reconnect after the cut heals");
        eprintln!("reconnected {t:?} after the heal");
        assert!(net.nodes[1].counters().links_up >= 2);
    }

    #[test]
    fn a_node_without_the_network_key_is_refused() {
        let key = Some([9u8; 32]);
        let mut net = Net::new(3, &[(0, 1), (1, 2)], &[key, key, None]);
        net.run_until(Duration::from_secs(30), |n| {
            n.nodes[0]
                .fib()
                .get(&n.nodes[1].identity().subnet)
                .is_some()
        })
        .expect("the two keyed nodes converge");
        net.run_until(Duration::from_secs(30), |_| false);
        assert_eq!(net.nodes[2].alive_peers(), 0);
        assert!(net.nodes[2].fib().is_empty());
        assert_eq!(net.nodes[1].alive_peers(), 1);
        // The keyed node refuses the keyless one's handshakes (with a network key, message 1
        // carries a tag, so a keyless LINK_INIT does not even parse); the keyless node times out.
        let s = net.nodes[1].snapshot(0).stats;
        assert!(
            s["link"]["malformed"] + s["link"]["handshakes_failed"] > 0,
            "{s:?}"
        );
        let s = net.nodes[2].snapshot(0).stats;
        assert!(
            s["link"]["handshake_timeouts"] + s["link"]["handshakes_failed"] > 0,
            "{s:?}"
        );
        assert_eq!(
            net.nodes[2].snapshot(0).peers[0].connection_state,
            crate::api::ConnectionState::Dead
        );
    }

    #[test]
    fn peers_removed_and_added_at_run_time() {
        let mut net = Net::new(3, &[(0, 1), (1, 2)], &[]);
        net.run_until(Duration::from_secs(30), Net::converged)
            .expect("converge");
        let s0 = net.nodes[0].identity().subnet;
        let now = net.now;
        assert_eq!(net.nodes[1].remove_peer(now, addr(0)), Ok(()));
        assert_eq!(
            net.nodes[1].remove_peer(now, addr(0)),
            Err(PeerError::NotFound)
        );
        // The link is gone at once on node 1; node 0 notices by its dead interval.
        assert!(net.nodes[1].fib().get(&s0).is_none());
        net.run_until(Duration::from_secs(30), |n| {
            n.nodes[2].fib().get(&s0).is_none() && n.nodes[0].alive_peers() == 0
        })
        .expect("routes through the removed peer are retracted");
        // Not retried: it stays gone.
        net.run_until(Duration::from_secs(10), |_| false);
        assert!(net.nodes[1]
            .snapshot(0)
            .peers
            .iter()
            .all(|p| p.endpoint.socket_addr != addr(0).to_string()));
        assert!(net.nodes[0].fib().is_empty());

        let now = net.now;
        assert_eq!(net.nodes[1].add_peer(now, addr(0)), Ok(()));
        assert_eq!(
            net.nodes[1].add_peer(now, addr(0)),
            Err(PeerError::AlreadyExists)
        );
        net.run_until(Duration::from_secs(30), Net::converged)
            .expect("converge again");
        let c = net.nodes[1].counters();
        assert_eq!((c.peers_added, c.peers_removed), (1, 1));
    }

    #[test]
    fn peers_that_dial_each_other_share_one_link() {
        let mut net = Net::new(2, &[(0, 1), (1, 0)], &[]);
        net.run_until(Duration::from_secs(30), Net::converged)
            .expect("converge");
        net.run_until(Duration::from_secs(5), |_| false);
        for n in &net.nodes {
            let snap = n.snapshot(0);
            assert_eq!(snap.peers.len(), 1, "{:?}", snap.peers);
            assert_eq!(snap.peers[0].kind, crate::api::PeerType::Static);
            assert_eq!(
                snap.peers[0].connection_state,
                crate::api::ConnectionState::Alive
            );
            assert_eq!(snap.selected.len(), 1, "{:?}", snap.selected);
        }
    }

    /// Drains a node's dataplane commands.
    fn commands(n: &mut Node) -> Vec<DataplaneCommand> {
        std::iter::from_fn(|| n.poll_dataplane()).collect()
    }

    #[test]
    fn dataplane_glue_peers_routes_and_an_e2e_session() {
        let mut net = Net::build(3, &[(0, 1), (1, 2)], &[], true);
        net.run_until(Duration::from_secs(30), Net::converged)
            .expect("converge");
        // Node 0: one neighbour (node 1) and routes to both others, next hop node 1's endpoint.
        let cmds = commands(&mut net.nodes[0]);
        let ups: Vec<_> = cmds
            .iter()
            .filter_map(|c| match c {
                DataplaneCommand::PeerUp { endpoint, key } => Some((*endpoint, *key)),
                _ => None,
            })
            .collect();
        assert_eq!(ups, vec![(addr(1), net.nodes[1].identity().public)]);
        let c_subnet = net.nodes[2].identity().subnet;
        assert!(cmds.iter().any(|c| matches!(c,
            DataplaneCommand::RouteAdd { prefix, endpoint, .. }
                if *prefix == c_subnet && *endpoint == addr(1))));

        // The dataplane of node 0 has no session to node 2: a handshake through the overlay.
        let (a, c) = (net.nodes[0].identity().addr, net.nodes[2].identity().addr);
        let now = net.now;
        net.nodes[0].handle_no_session(now, c);
        let init = commands(&mut net.nodes[0])
            .into_iter()
            .find_map(|cmd| match cmd {
                DataplaneCommand::SendOverlay { dst, packet } if dst == c => Some(packet),
                _ => None,
            })
            .expect("handshake init towards c");
        net.nodes[2].handle_local_packet(now, &init);
        let c_cmds = commands(&mut net.nodes[2]);
        let resp = c_cmds
            .iter()
            .find_map(|cmd| match cmd {
                DataplaneCommand::SendOverlay { dst, packet } if *dst == a => Some(packet.clone()),
                _ => None,
            })
            .expect("handshake response towards a");
        net.nodes[0].handle_local_packet(now, &resp);
        let a_cmds = commands(&mut net.nodes[0]);
        let install = |cmds: &[DataplaneCommand]| {
            cmds.iter().find_map(|cmd| match cmd {
                DataplaneCommand::SessionInstall {
                    peer,
                    local_index,
                    remote_index,
                    tx_key,
                    rx_key,
                    ..
                } => Some((*peer, *local_index, *remote_index, *tx_key, *rx_key)),
                _ => None,
            })
        };
        let (pa, la, ra, txa, rxa) = install(&a_cmds).expect("a installs");
        let (pc, lc, rc, txc, rxc) = install(&c_cmds).expect("c installs");
        assert_eq!((pa, pc), (c, a));
        assert_eq!((la, ra), (rc, lc), "indices pair up");
        assert_eq!((txa, rxa), (rxc, txc), "keys pair up");
        // A bus frame inside a decrypted transport packet reaches the bus hook.
        assert!(net.nodes[0].send_bus_frame(c, b"hello"));
        let bus = commands(&mut net.nodes[0])
            .into_iter()
            .find_map(|cmd| match cmd {
                DataplaneCommand::SendOverlay { packet, .. } => Some(packet),
                _ => None,
            })
            .expect("bus frame out");
        net.nodes[2].handle_local_packet(now, &bus);
        assert_eq!(net.nodes[2].poll_bus_frame(), Some((a, b"hello".to_vec())));
    }

    #[test]
    fn garbage_is_counted_not_fatal() {
        let mut net = Net::new(1, &[], &[]);
        let now = net.now;
        let n = &mut net.nodes[0];
        for d in [
            &b""[..],
            &[0x01, 0, 0],
            &[0x05; 30],
            &[0x02; 3],
            &[0xff, 1, 2],
        ] {
            n.handle_datagram(now, addr(7), d);
        }
        let c = n.counters();
        assert_eq!(c.rx_datagrams, 5);
        assert_eq!(c.data_without_dataplane, 1);
        assert_eq!(c.unknown_frame_type, 2);
        assert_eq!(c.link_dropped, 2);
    }
}
