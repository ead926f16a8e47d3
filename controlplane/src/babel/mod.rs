//! A sans-IO Babel router (RFC 8966).
//!
//! One core serves three adapters: the daemon (Babel TLVs inside link-protected control frames to
//! overlay peers), lab mode (standard Babel on UDP 6696 and `ff02::1:6` on real NICs) and the
//! simulator ([`crate::sim`]). It owns no socket, reads no clock and draws randomness only from the
//! seed in its [`RouterConfig`], so a run is reproducible byte for byte.
//!
//! The files follow babeld's map and the RFC's words: `neighbour` (§3.2.4,
//! Appendix A: Hello history, rxcost, txcost, RTT), `source` (§3.2.5: feasibility distances),
//! `route` (§3.2.6, §3.6: the route table and selection), `xroute` (originated prefixes),
//! `resend` (§3.8.2: seqno requests retried through other neighbours, urgent Updates),
//! `interface` (§3.2.3 and the buffered output), `message` (TLVs in, TLVs out), `seqno` (§3.2.1)
//! and `filter` (which prefixes are believed).
//!
//! # Memory
//! Every table is bounded: routes by [`RouterConfig::max_routes`] (about 80 bytes per prefix plus
//! 112 per route), neighbours by [`RouterConfig::max_neighbours`] (168 bytes each, plus a unicast
//! buffer while output to it is pending), sources by the routes we announce (64 bytes each),
//! pending seqno requests by [`MAX_PENDING_REQUESTS`]. Output is buffered per destination as
//! *state*, not bytes: a set of prefixes whose current route is written when the packet is built,
//! so a buffer never holds more than one entry per prefix, and a bounded number of requests and
//! acks (excess is dropped and counted, as a lossy link would). Events are level-triggered: a set
//! of changed prefixes and neighbours, compared with what was last reported.

mod filter;
mod interface;
mod message;
mod neighbour;
mod resend;
mod route;
mod seqno;
mod source;
mod xroute;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

pub use hypha_proto::babel::{InvalidMessage, Prefix, RouterId, INFINITY};
use hypha_proto::time::Instant;

pub use filter::{overlay_address, overlay_subnet, RouteFilter};
pub use interface::{InterfaceConfig, InterfaceId, InterfaceKind, RttConfig};
pub use neighbour::NeighbourKey;
pub use resend::MAX_PENDING_REQUESTS;
pub use seqno::SeqNo;

use interface::Interface;
use neighbour::Neighbour;
use resend::{Recorded, ResendTable};
use route::{find_best_route, route_metric, Candidate, Route, RouteTable, Selected};
use source::SourceTable;
use xroute::{XRoute, XRouteTable};

/// How often routes are checked for expiry and sources for garbage collection.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);
/// A change of the selected route's metric by at least this much triggers an Update (§3.7.2).
const METRIC_TRIGGER: u16 = 128;
/// A link cost change of at least this much makes the routes through the link be re-examined.
const COST_RESELECT_DELTA: u16 = 16;

/// Router-wide settings. Start from [`RouterConfig::new`] and change fields as needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterConfig {
    /// Our router-id (§3.2.2). Build it with [`router_id`]: 4 stable bytes from the node key and 4
    /// random bytes per start, so a restarted node is not held back by the feasibility distances
    /// its previous life left in other routers' source tables.
    pub router_id: RouterId,
    /// Seeds every random choice (jitter, initial seqnos). Give a fresh random value per start.
    pub seed: u64,
    /// Which prefixes we believe.
    pub filter: RouteFilter,
    /// Least time between two increments of our own seqno in answer to seqno requests (§3.8.1.2:
    /// rate-limited); a request arriving sooner is served when the time has come.
    pub seqno_bump_interval: Duration,
    /// How long a seqno request waits for an answer before it is retried through another
    /// neighbour (§3.8.2).
    pub request_timeout: Duration,
    /// Hop count of the seqno requests we originate (§3.8.2.1).
    pub request_hop_count: u8,
    /// Spacing of the repetitions of urgent Updates (retractions, router-id changes).
    pub urgent_interval: Duration,
    /// A source not announced for this long is forgotten (§3.2.5).
    pub source_gc_time: Duration,
    /// Most routes held; further new routes are refused and counted.
    pub max_routes: usize,
    /// Most neighbours held; packets from further ones are refused and counted.
    pub max_neighbours: usize,
}

/// A router-id from the 4 stable bytes the caller derives from the node key and 4 bytes drawn from
/// `seed`. Never the all-zeros or all-ones id that §4.6.7 forbids.
pub fn router_id(stable: [u8; 4], seed: u64) -> RouterId {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x6261_6265_6c5f_6964);
    let random: [u8; 4] = rng.random();
    let mut id = [0u8; 8];
    id[..4].copy_from_slice(&stable);
    id[4..].copy_from_slice(&random);
    if id == [0; 8] || id == [0xff; 8] {
        id[7] ^= 1;
    }
    RouterId(id)
}

impl RouterConfig {
    /// Defaults (overlay filter) with the router-id built by [`router_id`].
    pub fn new(stable_id: [u8; 4], seed: u64) -> Self {
        RouterConfig {
            router_id: router_id(stable_id, seed),
            seed,
            filter: RouteFilter::Overlay,
            seqno_bump_interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(2),
            request_hop_count: 64,
            urgent_interval: Duration::from_millis(500),
            source_gc_time: Duration::from_secs(180),
            max_routes: 100_000,
            max_neighbours: 1024,
        }
    }

    /// Sets the route filter.
    pub fn with_filter(mut self, filter: RouteFilter) -> Self {
        self.filter = filter;
        self
    }
}

/// Where a packet from [`Router::poll_transmit`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// Every neighbour on the interface: `ff02::1:6` on a NIC, the peer on an overlay link.
    Multicast,
    /// One neighbour.
    Unicast(IpAddr),
}

/// A packet to send, written into the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// The interface to send it on.
    pub iface: InterfaceId,
    /// To whom.
    pub dst: Destination,
}

/// Something the caller must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Route `prefix` through `next_hop` on `iface` (replacing any previous route for it).
    Install {
        /// The destination prefix.
        prefix: Prefix,
        /// The interface the next hop is on.
        iface: InterfaceId,
        /// The next hop's address.
        next_hop: IpAddr,
        /// The route's metric when selected (informational; metric changes alone are not
        /// reported).
        metric: u16,
    },
    /// Remove the route for `prefix` previously installed through `next_hop` on `iface`.
    Uninstall {
        /// The destination prefix.
        prefix: Prefix,
        /// The interface of the removed route.
        iface: InterfaceId,
        /// The next hop of the removed route.
        next_hop: IpAddr,
    },
    /// The link to a neighbour works both ways (finite cost).
    NeighbourUp {
        /// The interface.
        iface: InterfaceId,
        /// The neighbour's address.
        addr: IpAddr,
    },
    /// A neighbour reported up is unreachable or gone.
    NeighbourDown {
        /// The interface.
        iface: InterfaceId,
        /// The neighbour's address.
        addr: IpAddr,
    },
}

/// Good bytes, forbidden content: the neighbour is misbehaving (or misconfigured).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerMisbehaved {
    /// A prefix the filter does not allow at all (overlay: not a /64 inside `400::/7`).
    #[error("forbidden prefix {prefix}")]
    ForbiddenPrefix {
        /// The prefix.
        prefix: Prefix,
    },
    /// An overlay Update without the origin-key sub-TLV.
    #[error("update for {prefix} without origin key")]
    MissingOriginKey {
        /// The prefix.
        prefix: Prefix,
    },
    /// An overlay Update whose origin key does not own the prefix.
    #[error("origin key does not own {prefix}")]
    KeyDoesNotOwnPrefix {
        /// The prefix.
        prefix: Prefix,
    },
    /// An Update whose next hop cannot be determined (an IPv4 route with no IPv4 next hop).
    #[error("update for {prefix} without a usable next hop")]
    NoNextHop {
        /// The prefix.
        prefix: Prefix,
    },
}

/// Errors from [`Router::handle_packet`]. The valid parts of a packet are processed even when
/// another part is bad; the first error is returned and every one is counted in [`Counters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Malformed bytes.
    #[error(transparent)]
    InvalidMessage(#[from] InvalidMessage),
    /// Well-formed but not allowed.
    #[error(transparent)]
    PeerMisbehaved(#[from] PeerMisbehaved),
    /// The interface was never added (or was removed).
    #[error("unknown interface {0:?}")]
    UnknownInterface(InterfaceId),
    /// The neighbour table is full; the packet was dropped.
    #[error("neighbour table full")]
    TooManyNeighbours,
}

/// What the router has seen and done; every error and every drop has a counter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counters {
    /// Packets given to `handle_packet`.
    pub packets_received: u64,
    /// Packets dropped for a bad header ([`InvalidMessage`]).
    pub packets_invalid: u64,
    /// Packets produced by `poll_transmit`.
    pub packets_sent: u64,
    /// TLVs parsed.
    pub tlvs_received: u64,
    /// Malformed TLVs ([`InvalidMessage`]).
    pub tlvs_invalid: u64,
    /// TLVs of unknown type, skipped (§4.3).
    pub tlvs_unknown: u64,
    /// TLVs ignored for an unknown mandatory sub-TLV (§4.4).
    pub tlvs_ignored: u64,
    /// Updates received.
    pub updates_received: u64,
    /// Updates refused by the route filter ([`PeerMisbehaved`]).
    pub updates_filtered: u64,
    /// Updates without a usable next hop ([`PeerMisbehaved::NoNextHop`]).
    pub updates_no_next_hop: u64,
    /// Unfeasible Updates (§3.5.1): a normal outcome, counted for insight.
    pub updates_unfeasible: u64,
    /// Updates for prefixes we originate, ignored.
    pub updates_for_own_prefix: u64,
    /// IHUs addressed to someone else.
    pub ihus_not_for_us: u64,
    /// Route requests received.
    pub route_requests_received: u64,
    /// Seqno requests received.
    pub seqno_requests_received: u64,
    /// Seqno requests forwarded (§3.8.1.2).
    pub seqno_requests_forwarded: u64,
    /// Seqno requests we originated, first sends and retries (§3.8.2).
    pub seqno_requests_sent: u64,
    /// Seqno requests dropped as duplicates of a pending one.
    pub seqno_requests_duplicate: u64,
    /// Increments of our own seqno.
    pub seqno_bumps: u64,
    /// New routes refused because the route table is full.
    pub routes_refused: u64,
    /// Packets refused because the neighbour table is full.
    pub neighbours_refused: u64,
    /// Requests or acks dropped because a buffer or the resend table was full.
    pub output_dropped: u64,
}

/// A route as [`Router::routes`] shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteView<'a> {
    /// The destination.
    pub prefix: Prefix,
    /// The neighbour that announced it.
    pub neighbour: NeighbourKey,
    /// The next hop (the neighbour's address unless it sent a Next Hop TLV).
    pub next_hop: IpAddr,
    /// The originating router.
    pub router_id: RouterId,
    /// The source's seqno.
    pub seqno: SeqNo,
    /// The metric the neighbour announced.
    pub refmetric: u16,
    /// Our metric: refmetric plus link cost.
    pub metric: u16,
    /// Whether the route satisfies the feasibility condition (§3.5.1).
    pub feasible: bool,
    /// Whether it is the selected route for its prefix.
    pub selected: bool,
    /// The originating node's public key, if announced.
    pub origin_key: Option<&'a [u8; 32]>,
    /// When it expires unless refreshed.
    pub expires: Instant,
}

/// A neighbour as [`Router::neighbours`] shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeighbourView {
    /// Interface and address.
    pub key: NeighbourKey,
    /// Multicast Hello history, newest in the top bit.
    pub reach: u16,
    /// What we advertise for hearing it.
    pub rxcost: u16,
    /// What it advertises for hearing us.
    pub txcost: u16,
    /// The link cost used for routes through it.
    pub cost: u16,
    /// Smoothed RTT, if measured.
    pub rtt: Option<Duration>,
}

/// A source-table entry (feasibility distance) as [`Router::sources`] shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceView {
    /// The prefix.
    pub prefix: Prefix,
    /// The originating router.
    pub router_id: RouterId,
    /// The seqno of the feasibility distance.
    pub seqno: SeqNo,
    /// The metric of the feasibility distance.
    pub metric: u16,
}

/// An originated prefix as [`Router::xroutes`] shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XRouteView<'a> {
    /// The prefix.
    pub prefix: Prefix,
    /// The metric it is announced with.
    pub metric: u16,
    /// The key announced with it.
    pub origin_key: Option<&'a [u8; 32]>,
}

/// What the caller was last told about a prefix's route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Installed {
    iface: InterfaceId,
    next_hop: IpAddr,
}

/// A Babel router: the tables of RFC 8966 §3.2 and the rules that maintain them.
///
/// # Driving it (quinn style)
/// - Inputs: [`handle_packet`](Self::handle_packet) for every Babel packet received,
///   [`handle_timeout`](Self::handle_timeout) when the deadline from
///   [`poll_timeout`](Self::poll_timeout) has passed (a spurious call does nothing).
/// - Commands: [`add_interface`](Self::add_interface), [`remove_interface`](Self::remove_interface),
///   [`originate`](Self::originate), [`withdraw`](Self::withdraw).
/// - Outputs: after every input or command, call in this order
///   1. [`poll_transmit`](Self::poll_transmit) until it returns `None`, sending each packet;
///   2. [`poll_event`](Self::poll_event) until `None`, applying FIB and neighbour changes;
///   3. [`poll_timeout`](Self::poll_timeout), and sleep until that instant or the next input.
/// - Getters: [`routes`](Self::routes), [`neighbours`](Self::neighbours),
///   [`sources`](Self::sources), [`xroutes`](Self::xroutes), [`counters`](Self::counters).
///
/// `now` must never go backwards between calls.
#[derive(Debug)]
pub struct Router {
    config: RouterConfig,
    rng: SmallRng,
    /// Our seqno (§3.2.1), shared by all originated prefixes as in babeld.
    seqno: SeqNo,
    last_bump: Option<Instant>,
    bump_at: Option<Instant>,
    interfaces: BTreeMap<InterfaceId, Interface>,
    neighbours: BTreeMap<NeighbourKey, Neighbour>,
    sources: SourceTable,
    routes: RouteTable,
    xroutes: XRouteTable,
    resend: ResendTable,
    expire_at: Instant,
    installed: BTreeMap<Prefix, Installed>,
    fib_dirty: BTreeSet<Prefix>,
    /// Neighbours reported up.
    announced_up: BTreeSet<NeighbourKey>,
    neighbour_dirty: BTreeSet<NeighbourKey>,
    counters: Counters,
}

impl Router {
    /// A router with no interfaces and no prefixes.
    pub fn new(config: RouterConfig, now: Instant) -> Router {
        let mut rng = SmallRng::seed_from_u64(config.seed);
        let seqno = SeqNo(rng.random());
        Router {
            config,
            rng,
            seqno,
            last_bump: None,
            bump_at: None,
            interfaces: BTreeMap::new(),
            neighbours: BTreeMap::new(),
            sources: SourceTable::default(),
            routes: RouteTable::default(),
            xroutes: XRouteTable::default(),
            resend: ResendTable::default(),
            expire_at: now + EXPIRY_INTERVAL,
            installed: BTreeMap::new(),
            fib_dirty: BTreeSet::new(),
            announced_up: BTreeSet::new(),
            neighbour_dirty: BTreeSet::new(),
            counters: Counters::default(),
        }
    }

    /// Our router-id.
    pub fn router_id(&self) -> RouterId {
        self.config.router_id
    }

    /// Our current seqno.
    pub fn seqno(&self) -> SeqNo {
        self.seqno
    }

    /// The configuration.
    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// Starts Babel on an interface (replacing it if it exists): a Hello and a wildcard Route
    /// Request go out at once, so that neighbours answer with their tables.
    pub fn add_interface(&mut self, now: Instant, id: InterfaceId, cfg: InterfaceConfig) {
        if self.interfaces.contains_key(&id) {
            self.remove_interface(now, id);
        }
        let hello_seqno = self.rng.random();
        let update_interval = cfg.update_interval;
        let mut ifc = Interface::new(cfg, now, hello_seqno);
        ifc.update_at = now + update_interval;
        ifc.mcast.hello = true;
        ifc.mcast.route_requests.insert(None);
        ifc.mcast.schedule(now);
        self.interfaces.insert(id, ifc);
        let hello = self.jitter(self.interfaces[&id].cfg.hello_interval);
        if let Some(ifc) = self.interfaces.get_mut(&id) {
            ifc.hello_at = now + hello;
        }
    }

    /// Stops Babel on an interface: its neighbours and the routes through them are flushed.
    pub fn remove_interface(&mut self, now: Instant, id: InterfaceId) {
        let keys: Vec<NeighbourKey> = self
            .neighbours
            .keys()
            .filter(|k| k.iface == id)
            .copied()
            .collect();
        for k in keys {
            self.flush_neighbour(now, k);
        }
        self.interfaces.remove(&id);
    }

    /// Originates `prefix` (babeld's xroute): our /64 in overlay mode with our public key,
    /// redistributed prefixes in lab mode. Announced at once on every interface.
    pub fn originate(&mut self, now: Instant, prefix: Prefix, origin_key: Option<[u8; 32]>) {
        self.xroutes.routes.insert(
            prefix,
            XRoute {
                metric: 0,
                origin_key,
            },
        );
        self.reselect(now, prefix);
        self.send_update_all(now, prefix, false);
    }

    /// Stops originating `prefix`; a retraction goes out (unless another router's route to it
    /// takes over, which is then announced instead).
    pub fn withdraw(&mut self, now: Instant, prefix: Prefix) {
        if self.xroutes.routes.remove(&prefix).is_some() {
            self.reselect(now, prefix);
            self.send_update_all(now, prefix, true);
        }
    }

    /// Asks every neighbour for a route to `prefix` (a multicast Route Request on every
    /// interface, §3.8.1.1), e.g. before opening a session to a destination not yet in the table.
    /// Answers arrive as ordinary Updates.
    pub fn request_route(&mut self, now: Instant, prefix: Prefix) {
        let ids: Vec<InterfaceId> = self.interfaces.keys().copied().collect();
        for id in ids {
            self.send_route_request(now, id, Destination::Multicast, Some(prefix));
        }
    }

    /// Handles due timers: Hellos, periodic Updates, missed Hellos and IHU expiry, route expiry and
    /// source GC, deferred seqno bumps and resends. Spurious calls do nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        let ids: Vec<InterfaceId> = self.interfaces.keys().copied().collect();
        for id in ids {
            let Some(ifc) = self.interfaces.get(&id) else {
                continue;
            };
            let (hello_due, update_due) = (ifc.hello_at <= now, ifc.update_at <= now);
            let (hi, ui) = (ifc.cfg.hello_interval, ifc.cfg.update_interval);
            if hello_due {
                self.send_hello(now, id);
                let j = self.jitter(hi);
                if let Some(ifc) = self.interfaces.get_mut(&id) {
                    ifc.hello_at = now + j;
                }
            }
            if update_due {
                self.send_full_update(now, id);
                let j = self.jitter(ui);
                if let Some(ifc) = self.interfaces.get_mut(&id) {
                    ifc.update_at = now + j;
                }
            }
        }
        let due: Vec<NeighbourKey> = self
            .neighbours
            .iter()
            .filter(|(_, n)| n.next_timeout().is_some_and(|t| t <= now))
            .map(|(k, _)| *k)
            .collect();
        for k in due {
            let Some(n) = self.neighbours.get_mut(&k) else {
                continue;
            };
            n.check(now);
            if n.is_dead() {
                self.flush_neighbour(now, k);
            } else {
                self.neighbour_changed(now, k);
            }
        }
        if self.expire_at <= now {
            // Neighbours heard from without a Hello (a stray request, say) have no timer of their
            // own: sweep them here.
            let dead: Vec<NeighbourKey> = self
                .neighbours
                .iter()
                .filter(|(_, n)| n.is_dead())
                .map(|(k, _)| *k)
                .collect();
            for k in dead {
                self.flush_neighbour(now, k);
            }
            self.expire_routes(now);
            self.sources.expire_sources(now, self.config.source_gc_time);
            self.expire_at = now + EXPIRY_INTERVAL;
        }
        if self.bump_at.is_some_and(|t| t <= now) {
            self.bump_at = None;
            self.bump_seqno(now);
        }
        self.process_resends(now);
    }

    /// The next instant [`handle_timeout`](Self::handle_timeout) has work to do (or a packet is
    /// due from [`poll_transmit`](Self::poll_transmit)).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = Some(self.expire_at);
        let mut min = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t: Instant| t.min(x)));
            }
        };
        for ifc in self.interfaces.values() {
            min(Some(ifc.next_timeout()));
        }
        for n in self.neighbours.values() {
            min(n.next_timeout());
        }
        min(self.bump_at);
        min(self.resend.next_timeout());
        t
    }

    /// The next FIB or neighbour change, if any. Events are level-triggered and coalesced: a route
    /// that changed twice since the last call is reported once, in its current state.
    pub fn poll_event(&mut self) -> Option<Event> {
        while let Some(k) = self.neighbour_dirty.pop_first() {
            let up = self.neighbours.get(&k).is_some_and(|n| n.cost < INFINITY);
            let was = self.announced_up.contains(&k);
            if up && !was {
                self.announced_up.insert(k);
                return Some(Event::NeighbourUp {
                    iface: k.iface,
                    addr: k.addr,
                });
            }
            if !up && was {
                self.announced_up.remove(&k);
                return Some(Event::NeighbourDown {
                    iface: k.iface,
                    addr: k.addr,
                });
            }
        }
        while let Some(prefix) = self.fib_dirty.pop_first() {
            let want = if self.xroutes.find(&prefix).is_some() {
                None
            } else {
                self.routes.find_selected(&prefix).map(|r| {
                    (
                        Installed {
                            iface: r.neighbour.iface,
                            next_hop: r.next_hop,
                        },
                        self.metric_of(r),
                    )
                })
            };
            let have = self.installed.get(&prefix).copied();
            match (have, want) {
                (h, Some((w, metric))) if h != Some(w) => {
                    self.installed.insert(prefix, w);
                    return Some(Event::Install {
                        prefix,
                        iface: w.iface,
                        next_hop: w.next_hop,
                        metric,
                    });
                }
                (Some(h), None) => {
                    self.installed.remove(&prefix);
                    return Some(Event::Uninstall {
                        prefix,
                        iface: h.iface,
                        next_hop: h.next_hop,
                    });
                }
                _ => {}
            }
        }
        None
    }

    /// All routes, selected or not, in prefix order.
    pub fn routes(&self) -> impl Iterator<Item = RouteView<'_>> + '_ {
        self.routes
            .prefixes
            .iter()
            .flat_map(move |(p, e)| e.routes.iter().map(move |r| self.view(*p, r)))
    }

    /// The selected route for `prefix`, if any.
    pub fn selected_route(&self, prefix: &Prefix) -> Option<RouteView<'_>> {
        self.routes
            .find_selected(prefix)
            .map(|r| self.view(*prefix, r))
    }

    /// All neighbours.
    pub fn neighbours(&self) -> impl Iterator<Item = NeighbourView> + '_ {
        self.neighbours.iter().map(|(k, n)| NeighbourView {
            key: *k,
            reach: n.hello.reach,
            rxcost: n.rxcost,
            txcost: n.txcost,
            cost: n.cost,
            rtt: n.rtt.map(|us| Duration::from_micros(u64::from(us))),
        })
    }

    /// The source table (feasibility distances).
    pub fn sources(&self) -> impl Iterator<Item = SourceView> + '_ {
        self.sources
            .sources
            .iter()
            .map(|((prefix, router_id), s)| SourceView {
                prefix: *prefix,
                router_id: *router_id,
                seqno: s.seqno,
                metric: s.metric,
            })
    }

    /// The prefixes we originate.
    pub fn xroutes(&self) -> impl Iterator<Item = XRouteView<'_>> + '_ {
        self.xroutes.routes.iter().map(|(p, x)| XRouteView {
            prefix: *p,
            metric: x.metric,
            origin_key: x.origin_key.as_ref(),
        })
    }

    /// Counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    // ----- internals -----

    fn view<'a>(&'a self, prefix: Prefix, r: &'a Route) -> RouteView<'a> {
        RouteView {
            prefix,
            neighbour: r.neighbour,
            next_hop: r.next_hop,
            router_id: r.router_id,
            seqno: r.seqno,
            refmetric: r.refmetric,
            metric: self.metric_of(r),
            feasible: self
                .sources
                .is_feasible(&prefix, &r.router_id, r.seqno, r.refmetric),
            selected: r.selected,
            origin_key: r.origin_key.as_ref(),
            expires: r.expires,
        }
    }

    fn cost_of(&self, key: &NeighbourKey) -> u16 {
        self.neighbours.get(key).map_or(INFINITY, |n| n.cost)
    }

    fn metric_of(&self, r: &Route) -> u16 {
        route_metric(r.refmetric, self.cost_of(&r.neighbour))
    }

    /// `d` minus up to 1/8 of it, at random, so that routers started together drift apart.
    fn jitter(&mut self, d: Duration) -> Duration {
        let max = u64::try_from(d.as_micros() / 8).unwrap_or(u64::MAX);
        let j = if max == 0 {
            0
        } else {
            self.rng.random_range(0..max)
        };
        d.saturating_sub(Duration::from_micros(j))
    }

    /// When buffered output on `iface` should go: soon, after a random part of the flush delay
    /// (a quarter of it when urgent).
    fn flush_time(&mut self, now: Instant, iface: InterfaceId, urgent: bool) -> Instant {
        let d = self
            .interfaces
            .get(&iface)
            .map_or(Duration::ZERO, |i| i.cfg.flush_delay);
        let d = if urgent { d / 4 } else { d };
        let max = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let j = if max == 0 {
            0
        } else {
            self.rng.random_range(0..=max)
        };
        now + Duration::from_micros(j)
    }

    fn send_hello(&mut self, now: Instant, iface: InterfaceId) {
        let at = self.flush_time(now, iface, true);
        if let Some(ifc) = self.interfaces.get_mut(&iface) {
            ifc.mcast.hello = true;
            ifc.mcast.ihu = true;
            ifc.mcast.schedule(at);
        }
    }

    fn send_update(&mut self, now: Instant, iface: InterfaceId, prefix: Prefix, urgent: bool) {
        let at = self.flush_time(now, iface, urgent);
        if let Some(ifc) = self.interfaces.get_mut(&iface) {
            ifc.mcast.updates.insert(prefix);
            ifc.mcast.schedule(at);
        }
    }

    /// A triggered Update for `prefix` on every interface (§3.7.2); urgent ones are repeated.
    fn send_update_all(&mut self, now: Instant, prefix: Prefix, urgent: bool) {
        let ids: Vec<InterfaceId> = self.interfaces.keys().copied().collect();
        for id in ids {
            self.send_update(now, id, prefix, urgent);
        }
        if urgent {
            self.resend
                .record_urgent(prefix, now + self.config.urgent_interval);
        }
    }

    /// A full dump of our routes on `iface` (§3.7.1).
    fn send_full_update(&mut self, now: Instant, iface: InterfaceId) {
        let at = self.flush_time(now, iface, false);
        let Some(ifc) = self.interfaces.get_mut(&iface) else {
            return;
        };
        ifc.mcast
            .updates
            .extend(self.xroutes.routes.keys().copied());
        ifc.mcast.updates.extend(
            self.routes
                .prefixes
                .iter()
                .filter(|(_, e)| e.selected().is_some())
                .map(|(p, _)| *p),
        );
        ifc.last_full_update = Some(now);
        ifc.mcast.schedule(at);
    }

    /// Queues a seqno request to one neighbour, unicast.
    fn send_seqno_request(
        &mut self,
        now: Instant,
        to: NeighbourKey,
        req: hypha_proto::babel::SeqnoRequest,
    ) {
        let at = self.flush_time(now, to.iface, true);
        let Some(ifc) = self.interfaces.get_mut(&to.iface) else {
            return;
        };
        let b = ifc.ucast.entry(to.addr).or_default();
        if let Some(q) = b
            .seqno_requests
            .iter_mut()
            .find(|q| q.prefix == req.prefix && q.router_id == req.router_id)
        {
            *q = req;
        } else if b.seqno_requests.len() < interface::MAX_BUFFERED_REQUESTS {
            b.seqno_requests.push(req);
        } else {
            self.counters.output_dropped += 1;
            return;
        }
        b.schedule(at);
    }

    fn send_ack(&mut self, now: Instant, to: NeighbourKey, opaque: u16) {
        let at = self.flush_time(now, to.iface, true);
        let Some(ifc) = self.interfaces.get_mut(&to.iface) else {
            return;
        };
        let b = ifc.ucast.entry(to.addr).or_default();
        if b.acks.len() < interface::MAX_BUFFERED_ACKS {
            b.acks.push(opaque);
            b.schedule(at);
        } else {
            self.counters.output_dropped += 1;
        }
    }

    /// Recomputes a neighbour's rxcost and link cost after its state changed, and everything that
    /// depends on them.
    fn neighbour_changed(&mut self, now: Instant, key: NeighbourKey) {
        let Some(ifc) = self.interfaces.get(&key.iface) else {
            return;
        };
        let (nominal, rtt) = (ifc.cfg.rxcost, ifc.cfg.rtt);
        let Some(n) = self.neighbours.get_mut(&key) else {
            return;
        };
        let rx = n.compute_rxcost(nominal);
        let rx_flipped = (rx == INFINITY) != (n.rxcost == INFINITY);
        n.rxcost = rx;
        let cost = n.compute_cost(now, nominal, rtt.as_ref());
        let old = n.cost;
        n.cost = cost;
        // Routes are re-examined when the cost moves by COST_RESELECT_DELTA or more since they last
        // were (or the link goes up or down): RTT smoothing nudges the cost after every IHU, and a
        // nudge smaller than the selection hysteresis cannot change the choice on its own. Every
        // prefix is re-examined anyway when its next Update arrives.
        let reference = n.cost_reselected;
        let significant = (cost == INFINITY) != (reference == INFINITY)
            || cost.abs_diff(reference) >= COST_RESELECT_DELTA;
        if significant {
            n.cost_reselected = cost;
        }
        if rx_flipped {
            // Tell it at once that we hear it (or no longer do), with a Hello so that it can count
            // ours too: a new neighbour comes up within a few flush delays, not hello intervals.
            self.send_hello(now, key.iface);
        }
        if cost == old {
            return;
        }
        if (cost < INFINITY) != (old < INFINITY) {
            self.neighbour_dirty.insert(key);
            if cost < INFINITY {
                self.send_full_update(now, key.iface);
            }
        }
        if !significant {
            return;
        }
        // Only routes through this neighbour change. A cheaper unselected route may now win; a
        // dearer one cannot, unless it is the selected one.
        let cheaper = cost < reference;
        let prefixes: Vec<Prefix> = self
            .routes
            .prefixes
            .iter()
            .filter(|(_, e)| {
                e.routes
                    .iter()
                    .any(|r| r.neighbour == key && (cheaper || r.selected))
            })
            .map(|(p, _)| *p)
            .collect();
        for p in prefixes {
            self.reselect(now, p);
        }
    }

    /// Forgets a neighbour and every route through it (babeld `flush_neighbour`).
    fn flush_neighbour(&mut self, now: Instant, key: NeighbourKey) {
        self.neighbours.remove(&key);
        self.neighbour_dirty.insert(key);
        self.resend.flush_neighbour(&key);
        if let Some(ifc) = self.interfaces.get_mut(&key.iface) {
            ifc.ucast.remove(&key.addr);
        }
        let mut touched = Vec::new();
        for (p, e) in self.routes.prefixes.iter_mut() {
            let before = e.routes.len();
            e.routes.retain(|r| r.neighbour != key);
            if e.routes.len() != before {
                self.routes.count -= before - e.routes.len();
                touched.push(*p);
            }
        }
        for p in touched {
            self.reselect(now, p);
        }
    }

    /// Route expiry (§3.5.3): a route not refreshed in 3.5 update intervals is retracted; a
    /// retracted one is removed after the same time again.
    ///
    /// A selected route not refreshed for 2.5 of its intervals (one before expiry) is asked for
    /// with a unicast Route Request to its neighbour, as babeld does, so that a lost periodic Update
    /// does not cost the route.
    fn expire_routes(&mut self, now: Instant) {
        let mut touched = Vec::new();
        let mut refresh = Vec::new();
        for (p, e) in self.routes.prefixes.iter_mut() {
            let mut changed = false;
            let before = e.routes.len();
            e.routes.retain_mut(|r| {
                if r.expires > now {
                    if r.selected
                        && !r.refresh_requested
                        && r.refmetric < INFINITY
                        && r.expires - now <= r.interval
                    {
                        r.refresh_requested = true;
                        refresh.push((r.neighbour, *p));
                    }
                    return true;
                }
                changed = true;
                if r.refmetric < INFINITY {
                    r.refmetric = INFINITY;
                    r.expires = now + r.interval.mul_f32(3.5);
                    true
                } else {
                    false
                }
            });
            self.routes.count -= before - e.routes.len();
            if changed {
                touched.push(*p);
            }
        }
        for p in touched {
            self.reselect(now, p);
        }
        for (to, p) in refresh {
            self.send_route_request(now, to.iface, Destination::Unicast(to.addr), Some(p));
        }
    }

    /// Queues a Route Request (§3.8.1.1); `None` asks for everything.
    fn send_route_request(
        &mut self,
        now: Instant,
        iface: InterfaceId,
        dst: Destination,
        prefix: Option<Prefix>,
    ) {
        let at = self.flush_time(now, iface, true);
        let Some(ifc) = self.interfaces.get_mut(&iface) else {
            return;
        };
        let b = match dst {
            Destination::Multicast => &mut ifc.mcast,
            Destination::Unicast(a) => ifc.ucast.entry(a).or_default(),
        };
        if b.route_requests.len() < interface::MAX_BUFFERED_REQUESTS {
            b.route_requests.insert(prefix);
            b.schedule(at);
        } else {
            self.counters.output_dropped += 1;
        }
    }

    /// Route selection for one prefix (§3.6), then what follows from a change: FIB events,
    /// triggered Updates (§3.7.2) and, when only unfeasible routes are left, a seqno request
    /// (§3.8.2.1).
    fn reselect(&mut self, now: Instant, prefix: Prefix) {
        self.fib_dirty.insert(prefix);
        let own = self.xroutes.find(&prefix).is_some();
        let Some(entry) = self.routes.prefixes.get(&prefix) else {
            return;
        };
        let cands: Vec<Candidate> = entry
            .routes
            .iter()
            .map(|r| Candidate {
                metric: self.metric_of(r),
                feasible: self
                    .sources
                    .is_feasible(&prefix, &r.router_id, r.seqno, r.refmetric),
            })
            .collect();
        let current = entry.routes.iter().position(|r| r.selected);
        let best = if own {
            None
        } else {
            find_best_route(&cands, current)
        };
        let Some(entry) = self.routes.prefixes.get_mut(&prefix) else {
            return;
        };
        for (i, r) in entry.routes.iter_mut().enumerate() {
            r.selected = Some(i) == best;
        }
        let new = best.and_then(|i| {
            let r = entry.routes.get(i)?;
            Some(Selected {
                neighbour: r.neighbour,
                router_id: r.router_id,
                seqno: r.seqno,
                metric: cands.get(i)?.metric,
            })
        });
        let old = std::mem::replace(&mut entry.last, new);
        // Unfeasible routes with a finite metric: the best of them is what a new seqno would
        // make usable.
        let starving = if best.is_none() && !own {
            entry
                .routes
                .iter()
                .zip(&cands)
                .filter(|(_, c)| c.metric < INFINITY && !c.feasible)
                .min_by_key(|(_, c)| c.metric)
                .map(|(r, _)| (r.neighbour, r.router_id))
        } else {
            None
        };
        if entry.routes.is_empty() {
            self.routes.prefixes.remove(&prefix);
        }
        if own {
            return;
        }
        match (old, new) {
            (None, None) => {}
            (Some(_), None) => self.send_update_all(now, prefix, true),
            (None, Some(_)) => self.send_update_all(now, prefix, false),
            (Some(o), Some(n)) => {
                if o.router_id != n.router_id {
                    self.send_update_all(now, prefix, true);
                } else if o.seqno != n.seqno
                    || o.neighbour != n.neighbour
                    || o.metric.abs_diff(n.metric) >= METRIC_TRIGGER
                {
                    self.send_update_all(now, prefix, false);
                }
            }
        }
        if let Some((neighbour, router_id)) = starving {
            self.request_seqno(now, neighbour, prefix, router_id);
        }
    }

    /// Asks `neighbour` for a seqno of `router_id`'s `prefix` newer than our feasibility distance
    /// (§3.8.2.1), so that an unfeasible route becomes feasible.
    fn request_seqno(
        &mut self,
        now: Instant,
        neighbour: NeighbourKey,
        prefix: Prefix,
        router_id: RouterId,
    ) {
        let Some(src) = self.sources.find(&prefix, &router_id) else {
            return;
        };
        let seqno = src.seqno.plus(1);
        let hop_count = self.config.request_hop_count;
        match self.resend.record_request(
            prefix,
            router_id,
            seqno,
            hop_count,
            None,
            neighbour,
            now + self.config.request_timeout,
        ) {
            Recorded::Send => {
                self.counters.seqno_requests_sent += 1;
                self.send_seqno_request(
                    now,
                    neighbour,
                    hypha_proto::babel::SeqnoRequest {
                        prefix,
                        seqno: seqno.0,
                        hop_count,
                        router_id,
                    },
                );
            }
            Recorded::Duplicate => {}
            Recorded::Full => self.counters.output_dropped += 1,
        }
    }

    /// Increments our seqno, at most once per `seqno_bump_interval` (later if asked sooner), and
    /// announces every originated prefix with it.
    fn bump_seqno(&mut self, now: Instant) {
        if let Some(last) = self.last_bump {
            let next = last + self.config.seqno_bump_interval;
            if next > now {
                self.bump_at = Some(self.bump_at.map_or(next, |b| b.min(next)));
                return;
            }
        }
        self.seqno = self.seqno.plus(1);
        self.last_bump = Some(now);
        self.counters.seqno_bumps += 1;
        let prefixes: Vec<Prefix> = self.xroutes.routes.keys().copied().collect();
        for p in prefixes {
            self.send_update_all(now, p, false);
        }
    }

    /// Retries due seqno requests through the next neighbour that has a route (§3.8.2), and
    /// repeats due urgent Updates.
    fn process_resends(&mut self, now: Instant) {
        let due: Vec<(Prefix, RouterId)> = self
            .resend
            .requests
            .iter()
            .filter(|(_, p)| p.next_at <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            let Some(p) = self.resend.requests.get(&key) else {
                continue;
            };
            if p.tried.len() >= resend::MAX_REQUEST_TRIES {
                self.resend.requests.remove(&key);
                continue;
            }
            let (prefix, router_id) = key;
            let next = self.routes.prefixes.get(&prefix).and_then(|e| {
                e.routes
                    .iter()
                    .filter(|r| {
                        r.refmetric < INFINITY
                            && !p.tried.contains(&r.neighbour)
                            && p.requester != Some(r.neighbour)
                            && self.cost_of(&r.neighbour) < INFINITY
                    })
                    .min_by_key(|r| self.metric_of(r))
                    .map(|r| r.neighbour)
            });
            // No other neighbour: ask the last one again (the request may have been lost).
            let Some(to) = next.or_else(|| p.tried.last().copied()) else {
                self.resend.requests.remove(&key);
                continue;
            };
            let req = hypha_proto::babel::SeqnoRequest {
                prefix,
                seqno: p.seqno.0,
                hop_count: p.hop_count,
                router_id,
            };
            if let Some(p) = self.resend.requests.get_mut(&key) {
                p.tried.push(to);
                p.next_at = now + self.config.request_timeout;
            }
            self.counters.seqno_requests_sent += 1;
            self.send_seqno_request(now, to, req);
        }
        let urgent: Vec<Prefix> = self
            .resend
            .urgent
            .iter()
            .filter(|(_, u)| u.next_at <= now)
            .map(|(p, _)| *p)
            .collect();
        for prefix in urgent {
            let ids: Vec<InterfaceId> = self.interfaces.keys().copied().collect();
            for id in ids {
                self.send_update(now, id, prefix, true);
            }
            let interval = self.config.urgent_interval;
            if let Some(u) = self.resend.urgent.get_mut(&prefix) {
                u.remaining = u.remaining.saturating_sub(1);
                if u.remaining == 0 {
                    self.resend.urgent.remove(&prefix);
                } else {
                    u.next_at = now + interval;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
