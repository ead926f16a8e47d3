//! The lab-mode runtime: one mio loop driving the sans-IO Babel [`Router`] with the socket, netlink
//! and MAC adapters (babeld.c's main loop, with `now` passed explicitly).
//!
//! After every input (a datagram, a timeout) the router's outputs are drained in the documented
//! order: `poll_transmit` (signed when the interface has MAC keys, then sent), `poll_event` (kernel
//! route changes), then the loop sleeps until `poll_timeout`. Every few seconds the interfaces'
//! addresses are rescanned so that redistribution follows them. SIGTERM and SIGINT arrive through a
//! signalfd in the same loop; on exit every route we installed is removed.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use hypha_proto::babel::Prefix;
use hypha_proto::time::Clock;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::babel::{
    Destination, Event, InterfaceConfig, InterfaceId, RouteFilter, Router, RouterConfig,
};

use super::config::{InterfaceSettings, LabConfig};
use super::dump::{Dump, InterfaceDump, NeighbourDump, RouteDump, SocketCounters, SourceDump};
use super::mac::{MacState, Verdict};
use super::netlink::{InterfaceAddress, KernelRoute, Netlink, NetlinkError};
use super::redistribute::redistributable;
use super::socket::{BabelSocket, BABEL_GROUP, BABEL_PORT};

const SOCKET: Token = Token(0);
const SIGNALS: Token = Token(1);
const MONITOR: Token = Token(2);

/// How often local addresses are rescanned for redistribution.
const RESCAN_INTERVAL: Duration = Duration::from_secs(5);
/// Largest datagram we accept (Babel packets are bounded by the link MTU; this is generous).
const RX_BUF: usize = 65536;

/// Why lab mode could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// An interface does not exist.
    #[error("no interface named {0}")]
    NoSuchInterface(String),
    /// An interface never got a usable IPv6 link-local address.
    #[error("interface {name} has no usable IPv6 link-local address after {waited:?} (is it up? IPv6 enabled?)")]
    NoLinkLocal {
        /// The interface.
        name: String,
        /// How long we waited.
        waited: Duration,
    },
    /// Talking to the kernel's routing table failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A socket, signal or poll operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// Why it failed.
        source: io::Error,
    },
    /// A MAC key is unusable.
    #[error("MAC keys of {iface}: {source}")]
    Mac {
        /// The interface.
        iface: String,
        /// Why.
        source: super::mac::MacError,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> LabError {
    move |source| LabError::Io { what, source }
}

/// One interface we run on.
struct Iface {
    settings: InterfaceSettings,
    ifindex: u32,
    id: InterfaceId,
    link_local: Ipv6Addr,
    mac: Option<MacState>,
    /// Known to the router and joined to the group. False while the interface is gone (deleted,
    /// or without a link-local address); [`Lab::refresh_interfaces`] brings it back.
    present: bool,
}

impl Iface {
    /// Joins the group on `self.ifindex` and adds the interface to the router, with a fresh MAC
    /// state.
    fn bring_up(
        &mut self,
        now: hypha_proto::time::Instant,
        router: &mut Router,
        socket: &BabelSocket,
        addresses: &[InterfaceAddress],
    ) -> Result<(), LabError> {
        let s = &self.settings;
        socket
            .join(self.ifindex)
            .map_err(io_err("joining ff02::1:6"))?;
        // Our addresses on the link: IHUs to them are ours, and an IPv4 one is announced as the
        // next hop of IPv4 routes (RFC 9229 v4-via-v6 otherwise).
        let ll = IpAddr::V6(self.link_local);
        let mut local: Vec<IpAddr> = vec![ll];
        local.extend(
            addresses
                .iter()
                .filter(|a| a.ifindex == self.ifindex && !a.tentative && a.addr != ll)
                .map(|a| a.addr),
        );
        let mut ic =
            InterfaceConfig::broadcast(local).with_intervals(s.hello_interval, s.update_interval);
        // Leave room for RFC 8967's PC TLV (2 + 4 + 8) and one 34-byte MAC TLV per key.
        if !s.mac_keys.is_empty() {
            ic.max_packet_size = ic
                .max_packet_size
                .saturating_sub(14 + 34 * s.mac_keys.len());
        }
        self.mac = if s.mac_keys.is_empty() {
            None
        } else {
            // Not from `seed`: RFC 8967 §4.2 needs a fresh Index at every start, or neighbours
            // that remember our last (Index, PC) would take the restarted counter for a replay.
            // `--seed` fixes jitter, never this.
            Some(
                MacState::new(&s.mac_keys, rand::random()).map_err(|source| LabError::Mac {
                    iface: s.name.clone(),
                    source,
                })?,
            )
        };
        self.id = InterfaceId(self.ifindex);
        router.add_interface(now, self.id, ic);
        self.present = true;
        tracing::info!(iface = %s.name, ifindex = self.ifindex, link_local = %self.link_local,
            mac = self.mac.is_some(), "interface up");
        Ok(())
    }

    /// Removes the interface from the router (its routes are uninstalled) and leaves the group.
    fn take_down(
        &mut self,
        now: hypha_proto::time::Instant,
        router: &mut Router,
        socket: &BabelSocket,
    ) {
        router.remove_interface(now, self.id);
        // The group is gone already if the device is.
        let _ = socket.leave(self.ifindex);
        self.present = false;
        self.mac = None;
        tracing::info!(iface = %self.settings.name, "interface down");
    }
}

/// The running lab router and its adapters.
pub struct Lab {
    clock: Clock,
    router: Router,
    socket: BabelSocket,
    netlink: Netlink,
    ifaces: Vec<Iface>,
    redistribute: Vec<Prefix>,
    /// What we originate, from local addresses.
    xroutes: BTreeSet<Prefix>,
    /// What we installed in the kernel, by prefix.
    installed: BTreeMap<Prefix, KernelRoute>,
    /// Installs the kernel refused (e.g. while an interface was down), retried periodically: the
    /// router reports a route once, not again until it changes.
    unapplied: BTreeMap<Prefix, KernelRoute>,
    counters: SocketCounters,
    tx: Vec<u8>,
    rx: Vec<u8>,
    router_id: String,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("router_id", &self.router_id)
            .field("installed", &self.installed.len())
            .finish()
    }
}

impl Lab {
    /// Sets everything up: flushes stale routes of ours, waits for link-local addresses, binds the
    /// socket, joins the group on every interface and creates the router.
    pub fn start(config: &LabConfig) -> Result<Self, LabError> {
        let clock = Clock::new();
        let mut netlink = Netlink::open()?;
        let stale = netlink.flush_own_routes()?;
        if stale > 0 {
            tracing::info!(stale, "removed routes left by a previous run");
        }
        let socket = BabelSocket::bind(BABEL_PORT).map_err(io_err("binding UDP port 6696"))?;

        let seed = config.seed.unwrap_or_else(rand::random);

        // Resolve every interface and wait for its link-local address before anything is sent.
        let mut found = Vec::new();
        for s in &config.interfaces {
            let ifindex = nix::net::if_::if_nametoindex(s.name.as_str())
                .map_err(|_| LabError::NoSuchInterface(s.name.clone()))?;
            let link_local =
                wait_link_local(&mut netlink, ifindex, &s.name, config.link_local_wait)?;
            found.push((s, ifindex, link_local));
        }
        // The router-id's stable half comes from the first interface's link-local address (its
        // interface identifier, usually derived from the MAC address, as babeld's is); the other
        // half is random per start (§3.2.2 / controlplane::babel::router_id).
        let stable = found
            .first()
            .map(|(_, _, ll)| {
                let o = ll.octets();
                [o[12], o[13], o[14], o[15]]
            })
            .unwrap_or_default();
        let now = clock.now();
        let mut router = Router::new(
            RouterConfig::new(stable, seed).with_filter(RouteFilter::Any),
            now,
        );
        let router_id = router.router_id().to_string();
        let addresses = netlink.addresses()?;

        let mut ifaces = Vec::new();
        for (s, ifindex, link_local) in found {
            let mut iface = Iface {
                settings: s.clone(),
                ifindex,
                id: InterfaceId(ifindex),
                link_local,
                mac: None,
                present: false,
            };
            iface.bring_up(now, &mut router, &socket, &addresses)?;
            ifaces.push(iface);
        }
        let mut lab = Lab {
            clock,
            router,
            socket,
            netlink,
            ifaces,
            redistribute: config.redistribute.clone(),
            xroutes: BTreeSet::new(),
            installed: BTreeMap::new(),
            unapplied: BTreeMap::new(),
            counters: SocketCounters::default(),
            tx: Vec::with_capacity(2048),
            rx: vec![0u8; RX_BUF],
            router_id,
        };
        lab.rescan()?;
        Ok(lab)
    }

    /// Runs until SIGTERM or SIGINT, then removes our kernel routes.
    pub fn run(mut self, monitor: std::net::TcpListener) -> Result<(), LabError> {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGTERM);
        mask.add(Signal::SIGINT);
        mask.thread_block().map_err(|e| LabError::Io {
            what: "blocking signals",
            source: io::Error::from_raw_os_error(e as i32),
        })?;
        let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|e| LabError::Io {
                what: "signalfd",
                source: io::Error::from_raw_os_error(e as i32),
            })?;
        monitor
            .set_nonblocking(true)
            .map_err(io_err("monitor socket"))?;

        let mut poll = Poll::new().map_err(io_err("epoll"))?;
        let reg = poll.registry();
        reg.register(
            &mut SourceFd(&self.socket.as_raw_fd()),
            SOCKET,
            Interest::READABLE,
        )
        .map_err(io_err("registering the Babel socket"))?;
        reg.register(&mut SourceFd(&sfd.as_raw_fd()), SIGNALS, Interest::READABLE)
            .map_err(io_err("registering the signalfd"))?;
        reg.register(
            &mut SourceFd(&monitor.as_raw_fd()),
            MONITOR,
            Interest::READABLE,
        )
        .map_err(io_err("registering the monitor"))?;

        let mut events = Events::with_capacity(64);
        let mut next_rescan = self.clock.now() + RESCAN_INTERVAL;
        let result = loop {
            self.flush();
            let now = self.clock.now();
            let deadline = self
                .router
                .poll_timeout()
                .map_or(next_rescan, |t| t.min(next_rescan));
            let timeout = deadline.saturating_duration_since(now);
            if let Err(e) = poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break Err(LabError::Io {
                    what: "epoll_wait",
                    source: e,
                });
            }
            let mut stop = false;
            for ev in events.iter() {
                match ev.token() {
                    SOCKET => self.receive_all(),
                    SIGNALS => {
                        while let Ok(Some(info)) = sfd.read_signal() {
                            tracing::info!(signal = info.ssi_signo, "stopping");
                            stop = true;
                        }
                    }
                    MONITOR => self.serve_monitor(&monitor),
                    _ => {}
                }
            }
            if stop {
                break Ok(());
            }
            let now = self.clock.now();
            self.router.handle_timeout(now);
            if now >= next_rescan {
                next_rescan = now + RESCAN_INTERVAL;
                if let Err(e) = self.refresh_interfaces() {
                    tracing::warn!(error = %e, "checking interfaces");
                }
                if let Err(e) = self.rescan() {
                    tracing::warn!(error = %e, "rescanning local addresses");
                }
                self.retry_unapplied();
            }
        };
        self.shutdown();
        result
    }

    /// Reads every pending datagram and hands the authentic ones to the router.
    fn receive_all(&mut self) {
        loop {
            let r = match self.socket.recv(&mut self.rx) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    self.counters.received += 1;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "receiving");
                    return;
                }
            };
            self.counters.received += 1;
            let now = self.clock.now();
            if r.len > self.rx.len() {
                self.counters.truncated += 1;
                continue;
            }
            let from = *r.from.ip();
            if !from.is_unicast_link_local() {
                // RFC 8966 §4: Babel packets come from link-local addresses.
                self.counters.not_link_local += 1;
                continue;
            }
            let Some(iface) = self
                .ifaces
                .iter_mut()
                .find(|i| i.present && i.ifindex == r.ifindex)
            else {
                self.counters.foreign_interface += 1;
                continue;
            };
            let Some(packet) = self.rx.get(..r.len) else {
                continue;
            };
            let packet = match &mut iface.mac {
                None => packet,
                Some(mac) => match mac.verify(now, packet, from, r.dst) {
                    Verdict::Accept { len } => packet.get(..len).unwrap_or(packet),
                    Verdict::Drop(_) => {
                        self.counters.mac_dropped += 1;
                        continue;
                    }
                },
            };
            // Malformed input is counted by the router (`Counters`); nothing else to do here.
            if let Err(e) = self
                .router
                .handle_packet(now, iface.id, IpAddr::V6(from), packet)
            {
                tracing::debug!(%from, error = %e, "bad Babel packet");
            }
        }
    }

    /// Drains the router's (and the MAC layers') outputs: packets, then route changes.
    fn flush(&mut self) {
        let now = self.clock.now();
        while let Some(t) = self.router.poll_transmit(now, &mut self.tx) {
            let Some(iface) = self
                .ifaces
                .iter_mut()
                .find(|i| i.present && i.id == t.iface)
            else {
                continue;
            };
            let dst = match t.dst {
                Destination::Multicast => BABEL_GROUP,
                Destination::Unicast(IpAddr::V6(a)) => a,
                Destination::Unicast(IpAddr::V4(_)) => continue,
            };
            send(&self.socket, &mut self.counters, iface, &mut self.tx, dst);
        }
        for iface in &mut self.ifaces {
            let mut buf = Vec::new();
            while let Some(dst) = iface.mac.as_mut().and_then(|m| m.poll_transmit(&mut buf)) {
                send(&self.socket, &mut self.counters, iface, &mut buf, dst);
            }
        }
        while let Some(ev) = self.router.poll_event() {
            self.apply(ev);
        }
    }

    fn apply(&mut self, ev: Event) {
        match ev {
            Event::Install {
                prefix,
                iface,
                next_hop,
                ..
            } => {
                let kp = prefix;
                let Some(i) = self.ifaces.iter().find(|i| i.id == iface) else {
                    return;
                };
                let route = KernelRoute {
                    prefix: kp,
                    next_hop,
                    oif: i.ifindex,
                };
                tracing::debug!(%kp, %next_hop, iface = %i.settings.name, "install");
                self.install(route);
            }
            Event::Uninstall { prefix, .. } => {
                let kp = prefix;
                self.unapplied.remove(&kp);
                if self.installed.remove(&kp).is_some() {
                    if let Err(e) = self.netlink.delete_route(&kp) {
                        self.counters.netlink_errors += 1;
                        tracing::warn!(%kp, error = %e, "removing route");
                    }
                }
            }
            Event::NeighbourDown { addr, iface } => {
                if let (IpAddr::V6(a), Some(i)) =
                    (addr, self.ifaces.iter_mut().find(|i| i.id == iface))
                {
                    if let Some(m) = &mut i.mac {
                        m.forget(&a);
                    }
                }
            }
            _ => {}
        }
        self.counters.installed_routes = self.installed.len() as u64;
    }

    /// Puts `route` into the kernel, or remembers it for [`Lab::retry_unapplied`].
    fn install(&mut self, route: KernelRoute) {
        match self.netlink.replace_route(&route) {
            Ok(()) => {
                self.unapplied.remove(&route.prefix);
                self.installed.insert(route.prefix, route);
            }
            Err(e) => {
                self.counters.netlink_errors += 1;
                tracing::warn!(prefix = %route.prefix, error = %e, "installing route (will retry)");
                self.unapplied.insert(route.prefix, route);
            }
        }
        self.counters.installed_routes = self.installed.len() as u64;
    }

    /// Retries the installs the kernel refused earlier.
    fn retry_unapplied(&mut self) {
        let pending: Vec<KernelRoute> = self.unapplied.values().copied().collect();
        for route in pending {
            self.install(route);
        }
    }

    /// Follows interfaces that were deleted and re-created, or lost or changed their link-local
    /// address: such an interface leaves the router (its routes go away) and rejoins once it is
    /// usable again, under its new index and address.
    fn refresh_interfaces(&mut self) -> Result<(), LabError> {
        let now = self.clock.now();
        let addresses = self.netlink.addresses()?;
        for iface in &mut self.ifaces {
            let ifindex = nix::net::if_::if_nametoindex(iface.settings.name.as_str()).ok();
            let ll = ifindex.and_then(|ix| {
                addresses.iter().find_map(|a| match a.addr {
                    IpAddr::V6(v6)
                        if a.ifindex == ix && !a.tentative && v6.is_unicast_link_local() =>
                    {
                        Some(v6)
                    }
                    _ => None,
                })
            });
            let same = ifindex == Some(iface.ifindex) && ll == Some(iface.link_local);
            if iface.present && !same {
                iface.take_down(now, &mut self.router, &self.socket);
            }
            if let (false, Some(ix), Some(ll)) = (iface.present, ifindex, ll) {
                iface.ifindex = ix;
                iface.link_local = ll;
                if let Err(e) = iface.bring_up(now, &mut self.router, &self.socket, &addresses) {
                    tracing::warn!(iface = %iface.settings.name, error = %e, "interface back, but");
                    iface.present = false;
                }
            }
        }
        Ok(())
    }

    /// Originates local prefixes inside the redistribution filters and withdraws vanished ones.
    fn rescan(&mut self) -> Result<(), LabError> {
        if self.redistribute.is_empty() {
            return Ok(());
        }
        let now = self.clock.now();
        let want = redistributable(&self.netlink.addresses()?, &self.redistribute);
        for p in want.difference(&self.xroutes) {
            tracing::info!(prefix = %p, "redistributing");
            self.router.originate(now, *p, None);
        }
        for p in self.xroutes.difference(&want) {
            tracing::info!(prefix = %p, "no longer redistributing");
            self.router.withdraw(now, *p);
        }
        self.xroutes = want;
        Ok(())
    }

    fn serve_monitor(&mut self, listener: &std::net::TcpListener) {
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    let dump = self.dump();
                    if let Err(e) = super::dump::serve(&dump, stream) {
                        tracing::debug!(error = %e, "monitor client");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "monitor accept");
                    return;
                }
            }
        }
    }

    /// A snapshot of the router's tables and our counters.
    pub fn dump(&self) -> Dump {
        let name = |id: InterfaceId| {
            self.ifaces
                .iter()
                .find(|i| i.id == id)
                .map(|i| i.settings.name.clone())
                .unwrap_or_default()
        };
        let mut counters = self.counters;
        counters.installed_routes = self.installed.len() as u64;
        Dump {
            router_id: self.router_id.clone(),
            interfaces: self
                .ifaces
                .iter()
                .map(|i| InterfaceDump {
                    name: i.settings.name.clone(),
                    ifindex: i.ifindex,
                    link_local: i.link_local.to_string(),
                    up: i.present,
                    hello_interval_ms: i.settings.hello_interval.as_millis() as u64,
                    update_interval_ms: i.settings.update_interval.as_millis() as u64,
                    mac: i.mac.as_ref().map(|m| m.counters()),
                })
                .collect(),
            neighbours: self
                .router
                .neighbours()
                .map(|n| NeighbourDump {
                    address: n.key.addr.to_string(),
                    iface: name(n.key.iface),
                    reach: n.reach,
                    rxcost: n.rxcost,
                    txcost: n.txcost,
                    cost: n.cost,
                    rtt_ms: n.rtt.map(|d| d.as_secs_f64() * 1000.0),
                })
                .collect(),
            routes: self
                .router
                .routes()
                .map(|r| RouteDump {
                    prefix: r.prefix.to_string(),
                    router_id: r.router_id.to_string(),
                    seqno: r.seqno.0,
                    refmetric: r.refmetric,
                    metric: r.metric,
                    next_hop: r.next_hop.to_string(),
                    iface: name(r.neighbour.iface),
                    selected: r.selected,
                    feasible: r.feasible,
                })
                .collect(),
            sources: self
                .router
                .sources()
                .map(|s| SourceDump {
                    prefix: s.prefix.to_string(),
                    router_id: s.router_id.to_string(),
                    seqno: s.seqno.0,
                    metric: s.metric,
                })
                .collect(),
            xroutes: self
                .router
                .xroutes()
                .map(|x| x.prefix.to_string())
                .collect(),
            router_counters: router_counters(self.router.counters()),
            socket: counters,
        }
    }

    /// Removes every route we installed (on exit).
    fn shutdown(&mut self) {
        let mut removed = 0usize;
        for kp in self.installed.keys() {
            match self.netlink.delete_route(kp) {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!(%kp, error = %e, "removing route on exit"),
            }
        }
        // Anything else of ours (e.g. a route whose uninstall failed earlier).
        let _ = self.netlink.flush_own_routes();
        for i in self.ifaces.iter().filter(|i| i.present) {
            let _ = self.socket.leave(i.ifindex);
        }
        tracing::info!(removed, "kernel routes removed");
        self.installed.clear();
    }
}

fn send(
    socket: &BabelSocket,
    counters: &mut SocketCounters,
    iface: &mut Iface,
    buf: &mut Vec<u8>,
    dst: Ipv6Addr,
) {
    if let Some(mac) = &mut iface.mac {
        if let Err(e) = mac.sign(buf, iface.link_local, dst) {
            tracing::warn!(error = %e, "signing");
            counters.send_errors += 1;
            return;
        }
    }
    match socket.send(buf, iface.ifindex, iface.link_local, dst, BABEL_PORT) {
        Ok(()) => counters.sent += 1,
        Err(e) => {
            counters.send_errors += 1;
            tracing::debug!(error = %e, iface = %iface.settings.name, "send");
        }
    }
}

fn wait_link_local(
    netlink: &mut Netlink,
    ifindex: u32,
    name: &str,
    wait: Duration,
) -> Result<Ipv6Addr, LabError> {
    let start = std::time::Instant::now();
    loop {
        if let Some(a) = netlink.link_local(ifindex)? {
            return Ok(a);
        }
        if start.elapsed() >= wait {
            return Err(LabError::NoLinkLocal {
                name: name.to_string(),
                waited: wait,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The core's counters by name, for the dump.
fn router_counters(c: &crate::babel::Counters) -> BTreeMap<String, u64> {
    [
        ("packets_received", c.packets_received),
        ("packets_invalid", c.packets_invalid),
        ("packets_sent", c.packets_sent),
        ("tlvs_received", c.tlvs_received),
        ("tlvs_invalid", c.tlvs_invalid),
        ("tlvs_unknown", c.tlvs_unknown),
        ("tlvs_ignored", c.tlvs_ignored),
        ("updates_received", c.updates_received),
        ("updates_filtered", c.updates_filtered),
        ("updates_no_next_hop", c.updates_no_next_hop),
        ("updates_unfeasible", c.updates_unfeasible),
        ("updates_for_own_prefix", c.updates_for_own_prefix),
        ("ihus_not_for_us", c.ihus_not_for_us),
        ("route_requests_received", c.route_requests_received),
        ("seqno_requests_received", c.seqno_requests_received),
        ("seqno_requests_forwarded", c.seqno_requests_forwarded),
        ("seqno_requests_sent", c.seqno_requests_sent),
        ("seqno_requests_duplicate", c.seqno_requests_duplicate),
        ("seqno_bumps", c.seqno_bumps),
        ("routes_refused", c.routes_refused),
        ("neighbours_refused", c.neighbours_refused),
        ("output_dropped", c.output_dropped),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}
