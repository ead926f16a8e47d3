//! Interfaces (RFC 8966 §3.2.3): an overlay link to one peer, or a lab-mode NIC shared with any
//! number of Babel speakers. Each has its Hello seqno, its Hello and periodic-Update timers, and the
//! TLVs buffered for it (babeld's `struct buffered`), per destination.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use hypha_proto::babel::{Prefix, SeqnoRequest};
use hypha_proto::time::Instant;

use super::seqno::SeqNo;

/// The caller's name for an interface: an overlay link (one per peer) or a NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InterfaceId(pub u32);

/// What kind of link an interface is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum InterfaceKind {
    /// An overlay link: exactly one neighbour, reached by unicast. [`Destination::Multicast`]
    /// on it means "the neighbour". IHUs are sent with AE 0 (no address).
    ///
    /// [`Destination::Multicast`]: super::Destination::Multicast
    #[default]
    PointToPoint,
    /// A lab-mode NIC: multicast to `ff02::1:6`, any number of neighbours, IHUs addressed to each.
    Broadcast,
}

/// RTT-based link cost (RFC 9616 timestamps, babeld's `enable-timestamps`). The cost added to a
/// link grows linearly from 0 at `min` to `max_penalty` at `max` of smoothed RTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RttConfig {
    /// RTT below which no penalty applies (babeld `rtt-min`, 10 ms).
    pub min: Duration,
    /// RTT at and above which the full penalty applies (babeld `rtt-max`, 120 ms).
    pub max: Duration,
    /// The largest cost added (babeld `max-rtt-penalty`, 150).
    pub max_penalty: u16,
    /// Weight of a new sample in the running average, out of 256 (babeld `rtt-decay`, 42).
    pub decay: u8,
}

impl Default for RttConfig {
    fn default() -> Self {
        RttConfig {
            min: Duration::from_millis(10),
            max: Duration::from_millis(120),
            max_penalty: 150,
            decay: 42,
        }
    }
}

/// Per-interface settings. Defaults are babeld's for wired links; build with
/// `InterfaceConfig { kind: InterfaceKind::Broadcast, ..Default::default() }` or the helpers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    /// Point-to-point overlay link or broadcast NIC.
    pub kind: InterfaceKind,
    /// Multicast Hello interval (§3.4.1; babeld: 4 s). IHUs go out with every Hello.
    pub hello_interval: Duration,
    /// Periodic full Update interval (§3.7.1; babeld: 4 × hello = 16 s). Routes learnt from us
    /// expire after 3.5 times this.
    pub update_interval: Duration,
    /// The link's nominal rxcost (§A.2.1, babeld wired: 96), advertised while 2 of the last 3
    /// Hellos arrived.
    pub rxcost: u16,
    /// RTT-based cost (RFC 9616); `None` disables timestamps.
    pub rtt: Option<RttConfig>,
    /// Do not announce a route on the interface its next hop is on (§3.7.4).
    pub split_horizon: bool,
    /// Largest Babel packet we send (header included).
    pub max_packet_size: usize,
    /// Triggered output is sent after a random delay up to this (babeld's jittered flush), so
    /// that several changes share one packet.
    pub flush_delay: Duration,
    /// Our own addresses on a [`InterfaceKind::Broadcast`] interface: IHUs addressed to one of
    /// them are ours, and the IPv4 one is announced as the Next Hop of IPv4 routes (otherwise they
    /// go out as v4-via-v6, RFC 9229). Ignored on point-to-point links.
    pub local_addrs: Vec<IpAddr>,
}

impl Default for InterfaceConfig {
    fn default() -> Self {
        InterfaceConfig {
            kind: InterfaceKind::PointToPoint,
            hello_interval: Duration::from_secs(4),
            update_interval: Duration::from_secs(16),
            rxcost: 96,
            rtt: Some(RttConfig::default()),
            split_horizon: true,
            max_packet_size: 1232,
            flush_delay: Duration::from_millis(30),
            local_addrs: Vec::new(),
        }
    }
}

impl InterfaceConfig {
    /// A point-to-point (overlay) interface with default timers.
    pub fn point_to_point() -> Self {
        InterfaceConfig::default()
    }

    /// A broadcast (lab) interface with default timers and the given local addresses.
    pub fn broadcast(local_addrs: Vec<IpAddr>) -> Self {
        InterfaceConfig {
            kind: InterfaceKind::Broadcast,
            local_addrs,
            ..InterfaceConfig::default()
        }
    }

    /// Sets the Hello and Update intervals.
    pub fn with_intervals(mut self, hello: Duration, update: Duration) -> Self {
        self.hello_interval = hello;
        self.update_interval = update;
        self
    }

    /// Sets (or disables) RTT-based cost.
    pub fn with_rtt(mut self, rtt: Option<RttConfig>) -> Self {
        self.rtt = rtt;
        self
    }
}

/// Upper bounds on what one buffer holds: what does not fit is dropped and counted, since a
/// request or an ack lost here is no worse than one lost on the wire.
pub(crate) const MAX_BUFFERED_REQUESTS: usize = 64;
pub(crate) const MAX_BUFFERED_ACKS: usize = 16;

/// TLVs waiting to go to one destination (babeld's `struct buffered`). Updates are a set of
/// prefixes, not TLVs: what goes out is the state at flush time, and a prefix queued twice is sent
/// once, so the buffer is bounded by the route table.
#[derive(Debug, Default)]
pub(crate) struct Buffered {
    pub(crate) flush_at: Option<Instant>,
    pub(crate) hello: bool,
    pub(crate) ihu: bool,
    /// Where the IHUs continue when the last packet could not hold them all.
    pub(crate) ihu_from: Option<IpAddr>,
    pub(crate) acks: Vec<u16>,
    pub(crate) seqno_requests: Vec<SeqnoRequest>,
    /// `None` is a wildcard request.
    pub(crate) route_requests: BTreeSet<Option<Prefix>>,
    pub(crate) updates: BTreeSet<Prefix>,
}

impl Buffered {
    pub(crate) fn is_empty(&self) -> bool {
        !self.hello
            && !self.ihu
            && self.acks.is_empty()
            && self.seqno_requests.is_empty()
            && self.route_requests.is_empty()
            && self.updates.is_empty()
    }

    /// Flush no later than `at`.
    pub(crate) fn schedule(&mut self, at: Instant) {
        self.flush_at = Some(self.flush_at.map_or(at, |f| f.min(at)));
    }
}

/// An interface's state.
#[derive(Debug)]
pub(crate) struct Interface {
    pub(crate) cfg: InterfaceConfig,
    /// Seqno of our next multicast Hello (§3.4.1).
    pub(crate) hello_seqno: SeqNo,
    pub(crate) hello_at: Instant,
    pub(crate) update_at: Instant,
    pub(crate) last_full_update: Option<Instant>,
    /// To all neighbours on the link.
    pub(crate) mcast: Buffered,
    /// To one neighbour; bounded by the neighbour table.
    pub(crate) ucast: BTreeMap<IpAddr, Buffered>,
}

impl Interface {
    pub(crate) fn new(cfg: InterfaceConfig, now: Instant, hello_seqno: u16) -> Self {
        Interface {
            cfg,
            hello_seqno: SeqNo(hello_seqno),
            hello_at: now,
            update_at: now,
            last_full_update: None,
            mcast: Buffered::default(),
            ucast: BTreeMap::new(),
        }
    }

    /// The next instant this interface needs attention.
    pub(crate) fn next_timeout(&self) -> Instant {
        let mut t = self.hello_at.min(self.update_at);
        for b in std::iter::once(&self.mcast).chain(self.ucast.values()) {
            if let Some(f) = b.flush_at {
                t = t.min(f);
            }
        }
        t
    }

    /// Centiseconds, saturating, as the wire wants intervals.
    pub(crate) fn centis(d: Duration) -> u16 {
        u16::try_from(d.as_millis() / 10).unwrap_or(u16::MAX)
    }
}
