//! A deterministic network simulator for the Babel core: quinn's two-endpoint `Pair`, stretched to
//! N nodes.
//!
//! Nodes are [`Router`]s, each owning the overlay /64 of a key drawn from the seed; links are
//! point-to-point interfaces with a delay, a loss rate and an up/down switch. Time is virtual: a
//! queue of packets ordered by (delivery time, sequence number), so ties break the same way every
//! run, plus each node's next wakeup; [`Sim::step`] jumps to the earliest of them. Every random
//! choice comes from the seed — each router's from its own derived seed, each link's losses from
//! its own RNG — so a failing run replays exactly from the seed it prints.
//!
//! Routers never go idle (Hellos are periodic), so driving is by time or by predicate:
//! [`Sim::drive`] for a duration, [`Sim::drive_until`] until a condition holds, and
//! [`Sim::drive_bounded`] for a number of steps.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::IpAddr;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use hypha_proto::time::Instant;

use crate::babel::{
    overlay_address, overlay_subnet, Event, InterfaceConfig, InterfaceId, Prefix, Router,
    RouterConfig,
};

/// A node's index in the simulation.
pub type NodeId = usize;
/// A link's index in the simulation.
pub type LinkId = usize;

/// How a link behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkConfig {
    /// One-way delay.
    pub delay: Duration,
    /// Probability that a packet is lost, 0.0 to 1.0.
    pub loss: f64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            delay: Duration::from_millis(5),
            loss: 0.0,
        }
    }
}

/// One simulated node.
#[derive(Debug)]
pub struct Node {
    /// Its router.
    pub router: Router,
    /// Its public key (random, from the seed).
    pub key: [u8; 32],
    /// Its overlay address, which its neighbours see packets come from.
    pub addr: IpAddr,
    /// The /64 it originates.
    pub prefix: Prefix,
    /// Its FIB, as built from [`Event::Install`] and [`Event::Uninstall`].
    pub fib: BTreeMap<Prefix, (InterfaceId, IpAddr)>,
    /// Which link each interface is.
    pub ifaces: BTreeMap<InterfaceId, LinkId>,
    /// Neighbour up/down events seen.
    pub neighbour_events: u64,
    alive: bool,
    restarts: u64,
    next_wake: Option<Instant>,
}

/// One simulated link between two nodes.
#[derive(Debug)]
pub struct Link {
    /// The two ends.
    pub ends: [(NodeId, InterfaceId); 2],
    /// Delay and loss.
    pub cfg: LinkConfig,
    /// False while cut: everything sent is lost, including what is in flight.
    pub up: bool,
    rng: SmallRng,
}

/// A packet in flight.
#[derive(Debug, PartialEq, Eq)]
struct InFlight {
    at: Instant,
    seq: u64,
    link: LinkId,
    to: NodeId,
    iface: InterfaceId,
    from: IpAddr,
    bytes: Vec<u8>,
}

impl Ord for InFlight {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// SplitMix64: derives independent seeds for routers and links from the simulation seed.
fn derive(seed: u64, a: u64, b: u64) -> u64 {
    let mut z =
        seed ^ a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ b.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The simulated network.
#[derive(Debug)]
pub struct Sim {
    /// The seed everything derives from.
    pub seed: u64,
    now: Instant,
    /// The nodes.
    pub nodes: Vec<Node>,
    /// The links.
    pub links: Vec<Link>,
    /// Interface settings every new interface gets.
    pub iface_config: InterfaceConfig,
    queue: BinaryHeap<Reverse<InFlight>>,
    wake: BinaryHeap<Reverse<(Instant, NodeId)>>,
    seq: u64,
    buf: Vec<u8>,
    /// Packets delivered so far.
    pub delivered: u64,
    /// Packets lost (loss or cut links).
    pub lost: u64,
}

impl Sim {
    /// An empty network; new interfaces get `iface_config`.
    pub fn new(seed: u64, iface_config: InterfaceConfig) -> Sim {
        Sim {
            seed,
            now: Instant::ZERO,
            nodes: Vec::new(),
            links: Vec::new(),
            iface_config,
            queue: BinaryHeap::new(),
            wake: BinaryHeap::new(),
            seq: 0,
            buf: Vec::with_capacity(2048),
            delivered: 0,
            lost: 0,
        }
    }

    /// Virtual time now.
    pub fn now(&self) -> Instant {
        self.now
    }

    fn new_router(&self, id: NodeId, key: &[u8; 32], restarts: u64) -> Router {
        let seed = derive(self.seed, id as u64, restarts + 1);
        let mut stable = [0u8; 4];
        stable.copy_from_slice(&key[..4]);
        Router::new(RouterConfig::new(stable, seed), self.now)
    }

    /// Adds a node with a fresh key; it originates its /64 at once.
    pub fn add_node(&mut self) -> NodeId {
        let id = self.nodes.len();
        let mut rng = SmallRng::seed_from_u64(derive(self.seed, id as u64, 0));
        let key: [u8; 32] = rng.random();
        let mut router = self.new_router(id, &key, 0);
        let prefix = overlay_subnet(&key);
        router.originate(self.now, prefix, Some(key));
        self.nodes.push(Node {
            router,
            key,
            addr: IpAddr::V6(overlay_address(&key)),
            prefix,
            fib: BTreeMap::new(),
            ifaces: BTreeMap::new(),
            neighbour_events: 0,
            alive: true,
            restarts: 0,
            next_wake: None,
        });
        self.flush(id);
        id
    }

    /// Connects two nodes with a point-to-point link.
    pub fn connect(&mut self, a: NodeId, b: NodeId, cfg: LinkConfig) -> LinkId {
        let id = self.links.len();
        let ia = InterfaceId(self.nodes[a].ifaces.len() as u32);
        let ib = InterfaceId(self.nodes[b].ifaces.len() as u32);
        self.links.push(Link {
            ends: [(a, ia), (b, ib)],
            cfg,
            up: true,
            rng: SmallRng::seed_from_u64(derive(self.seed, 1 << 40, id as u64)),
        });
        for (n, i) in [(a, ia), (b, ib)] {
            self.nodes[n].ifaces.insert(i, id);
            let cfg = self.iface_config.clone();
            self.nodes[n].router.add_interface(self.now, i, cfg);
            self.flush(n);
        }
        id
    }

    /// Cuts (`false`) or restores (`true`) a link.
    pub fn set_link_up(&mut self, link: LinkId, up: bool) {
        self.links[link].up = up;
    }

    /// Restarts a node: a new router with a new seed (so a new router-id random part and new
    /// seqnos), the same key, interfaces and prefix; the FIB starts empty.
    pub fn restart(&mut self, id: NodeId) {
        let node = &self.nodes[id];
        let restarts = node.restarts + 1;
        let mut router = self.new_router(id, &node.key, restarts);
        for i in node.ifaces.keys() {
            router.add_interface(self.now, *i, self.iface_config.clone());
        }
        router.originate(self.now, node.prefix, Some(node.key));
        let node = &mut self.nodes[id];
        node.router = router;
        node.restarts = restarts;
        node.fib.clear();
        node.alive = true;
        self.flush(id);
    }

    /// Stops a node: it neither receives nor sends until [`Sim::restart`].
    pub fn kill(&mut self, id: NodeId) {
        self.nodes[id].alive = false;
        self.nodes[id].next_wake = None;
    }

    /// Delivers everything due at the earliest pending instant and runs the timers due then.
    /// Returns false if nothing is pending at all.
    pub fn step(&mut self) -> bool {
        let next_packet = self.queue.peek().map(|Reverse(p)| p.at);
        let next_wake = self.wake.peek().map(|Reverse((t, _))| *t);
        let Some(t) = next_packet.into_iter().chain(next_wake).min() else {
            return false;
        };
        self.now = self.now.max(t);
        let mut touched = BTreeSet::new();
        while self.queue.peek().is_some_and(|Reverse(p)| p.at <= self.now) {
            let Some(Reverse(p)) = self.queue.pop() else {
                break;
            };
            let link_up = self.links.get(p.link).is_some_and(|l| l.up);
            let Some(node) = self.nodes.get_mut(p.to) else {
                continue;
            };
            if !link_up || !node.alive {
                self.lost += 1;
                continue;
            }
            self.delivered += 1;
            // Errors are counted by the router; the simulator has nothing to add.
            let _ = node
                .router
                .handle_packet(self.now, p.iface, p.from, &p.bytes);
            touched.insert(p.to);
        }
        while self
            .wake
            .peek()
            .is_some_and(|Reverse((t, _))| *t <= self.now)
        {
            let Some(Reverse((t, n))) = self.wake.pop() else {
                break;
            };
            let Some(node) = self.nodes.get_mut(n) else {
                continue;
            };
            // Stale entries (the node re-armed since) are skipped.
            if node.alive && node.next_wake == Some(t) {
                node.next_wake = None;
                node.router.handle_timeout(self.now);
                touched.insert(n);
            }
        }
        for n in touched {
            self.flush(n);
        }
        true
    }

    /// Drains a node's output: packets onto links, events into its FIB; re-arms its wakeup.
    fn flush(&mut self, n: NodeId) {
        let now = self.now;
        loop {
            let Some(node) = self.nodes.get_mut(n) else {
                return;
            };
            let Some(t) = node.router.poll_transmit(now, &mut self.buf) else {
                break;
            };
            let Some(&link_id) = node.ifaces.get(&t.iface) else {
                continue;
            };
            let from = node.addr;
            let link = &mut self.links[link_id];
            let (to, iface) = if link.ends[0].0 == n {
                link.ends[1]
            } else {
                link.ends[0]
            };
            if !link.up || (link.cfg.loss > 0.0 && link.rng.random_bool(link.cfg.loss.min(1.0))) {
                self.lost += 1;
                continue;
            }
            self.seq += 1;
            self.queue.push(Reverse(InFlight {
                at: now + link.cfg.delay,
                seq: self.seq,
                link: link_id,
                to,
                iface,
                from,
                bytes: self.buf.clone(),
            }));
        }
        let node = &mut self.nodes[n];
        while let Some(e) = node.router.poll_event() {
            match e {
                Event::Install {
                    prefix,
                    iface,
                    next_hop,
                    ..
                } => {
                    node.fib.insert(prefix, (iface, next_hop));
                }
                Event::Uninstall { prefix, .. } => {
                    node.fib.remove(&prefix);
                }
                Event::NeighbourUp { .. } | Event::NeighbourDown { .. } => {
                    node.neighbour_events += 1;
                }
            }
        }
        let next = node
            .router
            .poll_timeout()
            .filter(|_| node.alive)
            .map(|t| t.max(now));
        if next != node.next_wake {
            node.next_wake = next;
            if let Some(t) = next {
                self.wake.push(Reverse((t, n)));
            }
        }
    }

    /// Runs for `d` of virtual time.
    pub fn drive(&mut self, d: Duration) {
        let end = self.now + d;
        while self.next_instant().is_some_and(|t| t <= end) {
            self.step();
        }
        self.now = self.now.max(end);
    }

    /// Runs `n` steps at most; returns how many ran.
    pub fn drive_bounded(&mut self, n: usize) -> usize {
        (0..n).take_while(|_| self.step()).count()
    }

    /// Runs until `pred` holds (checked every `check_every` of virtual time) or `timeout` has
    /// passed. Returns the virtual time it took, or `None` on timeout.
    pub fn drive_until(
        &mut self,
        timeout: Duration,
        check_every: Duration,
        mut pred: impl FnMut(&Sim) -> bool,
    ) -> Option<Duration> {
        let start = self.now;
        let end = start + timeout;
        loop {
            if pred(self) {
                return Some(self.now - start);
            }
            if self.now >= end {
                return None;
            }
            let next = (self.now + check_every).min(end);
            self.drive(next - self.now);
        }
    }

    fn next_instant(&self) -> Option<Instant> {
        let p = self.queue.peek().map(|Reverse(p)| p.at);
        let w = self.wake.peek().map(|Reverse((t, _))| *t);
        p.into_iter().chain(w).min()
    }

    /// Connected components of live nodes over links that are up.
    pub fn components(&self) -> Vec<usize> {
        let mut comp = vec![usize::MAX; self.nodes.len()];
        let mut adj = vec![Vec::new(); self.nodes.len()];
        for l in self.links.iter().filter(|l| l.up) {
            let (a, b) = (l.ends[0].0, l.ends[1].0);
            if self.nodes[a].alive && self.nodes[b].alive {
                adj[a].push(b);
                adj[b].push(a);
            }
        }
        let mut c = 0;
        for s in 0..self.nodes.len() {
            if comp[s] != usize::MAX || !self.nodes[s].alive {
                continue;
            }
            let mut stack = vec![s];
            comp[s] = c;
            while let Some(x) = stack.pop() {
                for &y in &adj[x] {
                    if comp[y] == usize::MAX {
                        comp[y] = c;
                        stack.push(y);
                    }
                }
            }
            c += 1;
        }
        comp
    }

    /// Follows FIB next hops from `from` towards `to`'s prefix. Returns the path (node ids,
    /// starting with `from`), or an error saying where it broke (no route, a next hop that is not
    /// the neighbour on that link, a loop).
    pub fn trace(&self, from: NodeId, to: NodeId) -> Result<Vec<NodeId>, String> {
        let prefix = self.nodes[to].prefix;
        let mut path = vec![from];
        let mut at = from;
        while at != to {
            let node = &self.nodes[at];
            let (iface, nh) = node
                .fib
                .get(&prefix)
                .ok_or_else(|| format!("node {at} has no route to {to} ({prefix})"))?;
            let link = node
                .ifaces
                .get(iface)
                .and_then(|l| self.links.get(*l))
                .ok_or_else(|| format!("node {at}: route via unknown interface {iface:?}"))?;
            let next = if link.ends[0].0 == at {
                link.ends[1].0
            } else {
                link.ends[0].0
            };
            if !link.up {
                return Err(format!(
                    "node {at}: route to {to} over a cut link to {next}"
                ));
            }
            if self.nodes[next].addr != *nh {
                return Err(format!("node {at}: next hop {nh} is not node {next}"));
            }
            if path.contains(&next) {
                path.push(next);
                return Err(format!("loop towards {to}: {path:?}"));
            }
            path.push(next);
            at = next;
        }
        Ok(path)
    }

    /// Every live node has a loop-free path to every other live node of its component, and no
    /// route to a node outside it.
    pub fn check_routes(&self) -> Result<(), String> {
        let comp = self.components();
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.alive {
                continue;
            }
            for (j, m) in self.nodes.iter().enumerate() {
                if i == j || !m.alive {
                    continue;
                }
                if comp[i] == comp[j] {
                    self.trace(i, j)?;
                } else if n.fib.contains_key(&m.prefix) {
                    return Err(format!("node {i} still routes to unreachable node {j}"));
                }
            }
        }
        Ok(())
    }

    /// True when [`Sim::check_routes`] passes.
    pub fn converged(&self) -> bool {
        self.check_routes().is_ok()
    }
}
