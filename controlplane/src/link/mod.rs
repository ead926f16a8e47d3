//! The link layer: authenticated, encrypted control channels between neighbours, as a sans-IO core.
//!
//! A *link* is an association with one neighbour, identified by the neighbour's static X25519 key,
//! learnt and authenticated by a Noise XX handshake (see `handshake.rs` for why XX). Over a link the
//! control plane exchanges Babel packets and keepalives in LINK_DATA frames protected by the session
//! keys (see `session.rs`). Like `quinn-proto`, [`LinkLayer`] does no I/O and reads no clock: the
//! daemon feeds it datagrams and the time, and drains datagrams, events and the next deadline.
//!
//! Lifecycle rules (WireGuard's constants): a session is rekeyed by a fresh handshake after 120 s or
//! 2^60 frames, and refused after 180 s; the initiator keeps sending on the old session until the new
//! one has carried a frame from the peer, the responder switches on message 3 and confirms at once
//! with a keepalive. Exactly one link exists per peer key and per remote address: a handshake with a
//! known key from the same address rekeys that link, from another address (a restarted peer) it
//! replaces the link. When both sides open at once, both sessions land on the same link and both
//! sides send on the one whose initiator has the lower static key.
//!
//! DoS bounds: LINK_INIT (the only frame that costs the responder DH work and memory) is rate-limited
//! per source (`ratelimit.rs`); at most [`LinkConfig::max_half_open`] responder handshakes are held,
//! the oldest evicted first; links are capped at [`LinkConfig::max_links`]; every queue is bounded.

mod handshake;
mod ratelimit;
mod session;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};

use core::time::Duration;

use hypha_proto::key::SecretKey;
use hypha_proto::time::Instant;
use hypha_proto::wire::control::{ControlType, Packet, Repr, HEADER_LEN};
use hypha_proto::wire::WireError;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use snow::HandshakeState;

use handshake::{Noise, NoiseError, MSG1_PSK_LEN, MSG2_LEN, MSG3_LEN};
use ratelimit::RateLimiter;
use session::{OpenError, ReplayError, Session, REJECT_AFTER_TIME, REKEY_AFTER_TIME, TAG_LEN};

/// Largest UDP payload we produce (IPv4's limit, the smaller one).
const MAX_DATAGRAM: usize = 65_507;

/// A link, as the daemon refers to it. Never reused within one [`LinkLayer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LinkId(pub u32);

/// What travels in a LINK_DATA frame: the first plaintext byte (WIRE.md). [`Channel::Keepalive`]
/// is handled inside the link layer and never surfaced as [`LinkEvent::Received`].
pub use hypha_proto::wire::control::Channel;

/// The envelope fields the link layer works with, from a checked [`Packet`].
#[derive(Clone, Copy, Debug)]
struct Envelope<'a> {
    frame_type: ControlType,
    sender: u32,
    receiver: u32,
    counter: u64,
    /// The 20 envelope bytes (the AAD of LINK_DATA).
    header: &'a [u8],
    body: &'a [u8],
}

impl<'a> Envelope<'a> {
    fn parse(datagram: &'a [u8]) -> Result<Self, WireError> {
        let packet = Packet::new_checked(datagram)?;
        let repr = Repr::parse(&packet)?;
        let (header, body) = datagram
            .split_at_checked(HEADER_LEN)
            .ok_or(WireError::Truncated {
                needed: HEADER_LEN,
                len: datagram.len(),
            })?;
        Ok(Envelope {
            frame_type: repr.frame_type,
            sender: repr.sender_index,
            receiver: repr.receiver_index,
            counter: repr.counter,
            header,
            body,
        })
    }
}

/// Configuration. Build with [`LinkConfig::new`] and adjust fields.
#[derive(Clone)]
pub struct LinkConfig {
    /// This node's static X25519 secret (raw 32 bytes).
    pub static_secret: [u8; 32],
    /// Network key (`--network-key FILE`): with it the handshake is `Noise_XXpsk3_...` and nodes
    /// without the same key cannot become neighbours.
    pub network_key: Option<[u8; 32]>,
    /// Seed for the core's randomness (session indices, retry jitter).
    pub seed: u64,
    /// Send a KEEPALIVE when nothing was sent on a link for this long. Default 5 s.
    pub keepalive_interval: Duration,
    /// A link with nothing received for this long goes down. Default 20 s.
    pub dead_interval: Duration,
    /// Give up a handshake attempt after this long. Default 10 s.
    pub handshake_timeout: Duration,
    /// Retransmit handshake message 1 or 3 after this long (plus up to 25 % jitter). Default 1 s.
    pub handshake_retry: Duration,
    /// LINK_INIT accepted per second from one source (IPv4 address or IPv6 /64). Default 5.
    pub handshake_rate: u32,
    /// Burst of LINK_INIT accepted from one source. Default 10.
    pub handshake_burst: u32,
    /// Sources remembered by the rate limiter. Default 4096.
    pub rate_limit_sources: usize,
    /// Responder handshakes held at once (each a boxed Noise state of under 1 KiB plus its boxed
    /// primitives, a few KiB in all). Default 256.
    pub max_half_open: usize,
    /// Established links at once. Default 1024.
    pub max_links: usize,
    /// Bound of the transmit queue and of the event queue each. Default 4096.
    pub max_queued: usize,
}

impl LinkConfig {
    /// Defaults around `static_secret`: no network key, seed 0.
    pub fn new(static_secret: [u8; 32]) -> Self {
        LinkConfig {
            static_secret,
            network_key: None,
            seed: 0,
            keepalive_interval: Duration::from_secs(5),
            dead_interval: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
            handshake_retry: Duration::from_secs(1),
            handshake_rate: 5,
            handshake_burst: 10,
            rate_limit_sources: 4096,
            max_half_open: 256,
            max_links: 1024,
            max_queued: 4096,
        }
    }
}

impl core::fmt::Debug for LinkConfig {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LinkConfig")
            .field("network_key", &self.network_key.map(|_| "<set>"))
            .field("seed", &self.seed)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("dead_interval", &self.dead_interval)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("handshake_retry", &self.handshake_retry)
            .field("max_half_open", &self.max_half_open)
            .field("max_links", &self.max_links)
            .finish_non_exhaustive()
    }
}

/// Why a link went down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DownReason {
    /// [`LinkLayer::close`] was called.
    #[error("closed locally")]
    Closed,
    /// Nothing was received for the dead interval.
    #[error("nothing received for the dead interval")]
    Dead,
    /// A new handshake from the same key at another address, or another key at the same address,
    /// replaced the link (the peer restarted or moved). The new link's `Up` follows; do not
    /// reconnect the old address because of this (a peer reachable at two configured addresses
    /// would otherwise flap between them).
    #[error("replaced by a new link")]
    Replaced,
    /// The session reached its age limit (180 s) and no rekey succeeded.
    #[error("session expired without rekey")]
    Expired,
}

/// Why a handshake failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeFailure {
    /// No answer within the handshake timeout.
    #[error("timed out")]
    Timeout,
    /// A handshake message did not authenticate: most often a different network key.
    #[error("peer's handshake message rejected (network key mismatch?)")]
    Rejected,
    /// The peer has our own static key.
    #[error("connected to ourselves")]
    SelfConnection,
    /// [`LinkConfig::max_links`] links exist already.
    #[error("too many links")]
    TooManyLinks,
    /// A local failure setting up the Noise state.
    #[error("local noise setup failed")]
    Internal,
}

/// What the link layer reports; drain with [`LinkLayer::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// A link came up: the handshake finished and the peer proved it holds the keys.
    Up {
        /// The new link.
        link: LinkId,
        /// Where the peer is.
        remote: SocketAddr,
        /// The peer's authenticated static X25519 public key.
        peer_key: [u8; 32],
    },
    /// A link went down; its id is dead.
    Down {
        /// The link.
        link: LinkId,
        /// Why.
        reason: DownReason,
    },
    /// A frame arrived on a link (never [`Channel::Keepalive`]).
    Received {
        /// The link.
        link: LinkId,
        /// Its channel.
        channel: Channel,
        /// The channel's bytes.
        payload: Vec<u8>,
    },
    /// A handshake we started (or one that reached message 3 as responder) failed. Rekeys of an
    /// existing link do not report this; they are retried until the session expires.
    HandshakeFailed {
        /// The peer's address.
        remote: SocketAddr,
        /// Why.
        reason: HandshakeFailure,
    },
}

/// Link state as shown by [`LinkLayer::links`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Established.
    Up,
    /// Established, with a rekey handshake in progress.
    Rekeying,
}

/// A snapshot of one link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkView {
    /// The link.
    pub id: LinkId,
    /// Where the peer is (follows the peer when it roams).
    pub remote: SocketAddr,
    /// The peer's static public key.
    pub peer_key: [u8; 32],
    /// State.
    pub state: LinkState,
    /// Datagram bytes received and authenticated.
    pub rx_bytes: u64,
    /// Datagram bytes sent.
    pub tx_bytes: u64,
    /// Last authenticated frame received.
    pub last_rx: Instant,
    /// When the link came up.
    pub established: Instant,
}

/// A handshake in progress, as shown by [`LinkLayer::handshakes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeView {
    /// The peer's address.
    pub remote: SocketAddr,
    /// Did we send message 1?
    pub initiator: bool,
    /// When it will be given up.
    pub deadline: Instant,
}

/// Sizes of the layer's tables, to check the DoS bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableSizes {
    /// Established links.
    pub links: usize,
    /// Handshakes in progress, either role.
    pub handshakes: usize,
    /// Responder handshakes held (bounded by [`LinkConfig::max_half_open`]).
    pub half_open: usize,
    /// Established sessions (at most two per link).
    pub sessions: usize,
    /// Sources in the rate limiter (bounded by [`LinkConfig::rate_limit_sources`]).
    pub rate_limit_sources: usize,
    /// Datagrams waiting in [`LinkLayer::poll_transmit`].
    pub transmit_queue: usize,
    /// Events waiting in [`LinkLayer::poll_event`].
    pub events: usize,
}

/// Counters; every dropped datagram is counted in exactly one of the `rx_*`/drop fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Datagrams given to [`LinkLayer::handle_datagram`].
    pub rx_datagrams: u64,
    /// Dropped: envelope or handshake message malformed (wrong type, version, length, fields).
    pub malformed: u64,
    /// Dropped: no session or handshake with that receiver index.
    pub unknown_index: u64,
    /// Dropped: LINK_DATA counter seen before.
    pub replay_duplicate: u64,
    /// Dropped: LINK_DATA counter behind the replay window (or exhausted).
    pub replay_too_old: u64,
    /// Dropped: LINK_DATA failed authentication.
    pub auth_failures: u64,
    /// Dropped: LINK_DATA under a session past its age limit.
    pub expired_session: u64,
    /// Dropped after authentication: unknown channel byte.
    pub unknown_channel: u64,
    /// Dropped: LINK_INIT over the per-source rate.
    pub handshake_rate_limited: u64,
    /// Dropped: a handshake message that does not fit the handshake's state (e.g. a duplicate).
    pub handshake_unexpected: u64,
    /// Handshakes we started (initial and rekeys).
    pub handshakes_initiated: u64,
    /// Handshakes that produced a session, either role.
    pub handshakes_completed: u64,
    /// Handshakes whose messages did not authenticate or that were refused.
    pub handshakes_failed: u64,
    /// Handshakes given up for lack of an answer.
    pub handshake_timeouts: u64,
    /// Handshake messages retransmitted (message 1, 2 on duplicate INIT, 3).
    pub handshake_retransmits: u64,
    /// Responder handshakes evicted because the half-open table was full.
    pub half_open_evicted: u64,
    /// Handshakes completed onto an existing link: rekeys, and the second handshake of a
    /// simultaneous open or of a peer restarted at the same address.
    pub rekeys: u64,
    /// KEEPALIVE frames sent.
    pub keepalives_sent: u64,
    /// Frames not queued because the transmit queue was full.
    pub tx_queue_full: u64,
    /// Received events dropped because the event queue was full.
    pub events_dropped: u64,
}

/// Why a datagram was dropped or a command refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The envelope is malformed (type, version, length).
    #[error("malformed control frame: {0}")]
    Wire(#[from] WireError),
    /// The envelope is well-formed but its fields or body do not fit its frame type.
    #[error("malformed control frame: {0}")]
    Malformed(#[from] MalformedFrame),
    /// No session or handshake has this receiver index.
    #[error("unknown receiver index {0:#010x}")]
    UnknownIndex(u32),
    /// This LINK_DATA counter was accepted before.
    #[error("replayed frame (counter {0})")]
    Replay(u64),
    /// This LINK_DATA counter is behind the replay window.
    #[error("frame too old (counter {0})")]
    TooOld(u64),
    /// The AEAD tag did not verify.
    #[error("authentication failed")]
    Authentication,
    /// The session is past its age or count limit.
    #[error("session expired")]
    SessionExpired,
    /// LINK_INIT over the per-source rate.
    #[error("handshake initiation from {0} rate-limited")]
    RateLimited(IpAddr),
    /// A handshake message that does not fit the handshake's state.
    #[error("unexpected handshake message")]
    UnexpectedHandshake,
    /// The handshake failed.
    #[error("handshake failed: {0}")]
    Handshake(HandshakeFailure),
    /// No such link.
    #[error("no link {0:?}")]
    UnknownLink(LinkId),
    /// The payload does not fit a datagram.
    #[error("payload of {0} bytes too large")]
    PayloadTooLarge(usize),
    /// The transmit queue is full (the caller is not draining [`LinkLayer::poll_transmit`]).
    #[error("transmit queue full")]
    QueueFull,
}

/// How a well-formed envelope does not fit its frame type (WIRE.md's per-type field rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MalformedFrame {
    /// An index or counter that must be zero (or non-zero) for this frame type is not.
    #[error("envelope field out of place")]
    Field,
    /// A handshake body of the wrong size for its message.
    #[error("handshake message length")]
    HandshakeLength,
}

/// Bounded queue of outgoing datagrams with recycled buffers.
struct TxQueue {
    queue: VecDeque<(SocketAddr, Vec<u8>)>,
    pool: Vec<Vec<u8>>,
    cap: usize,
}

impl TxQueue {
    fn buffer(&mut self) -> Option<Vec<u8>> {
        if self.queue.len() >= self.cap {
            return None;
        }
        let mut b = self.pool.pop().unwrap_or_default();
        b.clear();
        Some(b)
    }

    /// Queues a handshake frame (envelope + body).
    fn control(
        &mut self,
        counters: &mut LinkCounters,
        to: SocketAddr,
        frame_type: ControlType,
        sender: u32,
        receiver: u32,
        body: &[u8],
    ) {
        // Handshake bodies are at most 96 bytes.
        let Ok(body_len) = u16::try_from(body.len()) else {
            return;
        };
        let Some(mut b) = self.buffer() else {
            counters.tx_queue_full += 1;
            return;
        };
        let repr = Repr {
            frame_type,
            sender_index: sender,
            receiver_index: receiver,
            counter: 0,
            body_len,
        };
        b.resize(repr.buffer_len(), 0);
        let mut packet = Packet::new_unchecked(&mut b[..]);
        repr.emit(&mut packet);
        let out = packet.body_mut();
        if out.len() == body.len() {
            out.copy_from_slice(body);
        }
        self.queue.push_back((to, b));
    }
}

/// Bounded event queue: Up/Down are never dropped (there are at most two per link and handshake).
struct Events {
    queue: VecDeque<LinkEvent>,
    cap: usize,
}

impl Events {
    fn push(&mut self, counters: &mut LinkCounters, ev: LinkEvent) {
        let droppable = matches!(
            ev,
            LinkEvent::Received { .. } | LinkEvent::HandshakeFailed { .. }
        );
        if droppable && self.queue.len() >= self.cap {
            counters.events_dropped += 1;
            return;
        }
        self.queue.push_back(ev);
    }
}

/// Where a handshake stands.
enum Step {
    /// Initiator: message 1 sent, waiting for message 2.
    Initiated {
        hs: Box<HandshakeState>,
        msg1: [u8; MSG1_PSK_LEN],
    },
    /// Initiator: message 3 sent, session derived, waiting for the first frame from the peer.
    Finished {
        session: Box<Session>,
        peer_key: [u8; 32],
        /// The responder's index (LINK_FINISH's receiver index).
        peer_index: u32,
        msg3: [u8; MSG3_LEN],
    },
    /// Responder: message 2 sent, waiting for message 3.
    Responded {
        hs: Box<HandshakeState>,
        /// The initiator's index.
        peer_index: u32,
        msg2: [u8; MSG2_LEN],
    },
}

struct Handshake {
    remote: SocketAddr,
    started: Instant,
    deadline: Instant,
    /// Initiator only: when to retransmit.
    next_retry: Option<Instant>,
    /// A rekey of this link (failures are not reported as events).
    for_link: Option<LinkId>,
    step: Step,
}

impl Handshake {
    fn is_responder(&self) -> bool {
        matches!(self.step, Step::Responded { .. })
    }
}

struct Link {
    id: LinkId,
    remote: SocketAddr,
    peer_key: [u8; 32],
    /// Sends go here.
    current: Session,
    /// Still accepted on receive until it expires or is rotated out.
    previous: Option<Session>,
    /// Local index of our rekey handshake in progress.
    rekey: Option<u32>,
    /// Do not start a rekey before this (after a failed attempt).
    rekey_not_before: Instant,
    established: Instant,
    last_rx: Instant,
    last_tx: Instant,
    rx_bytes: u64,
    tx_bytes: u64,
}

impl Link {
    fn session_mut(&mut self, index: u32) -> Option<&mut Session> {
        if self.current.local_index == index {
            return Some(&mut self.current);
        }
        self.previous.as_mut().filter(|s| s.local_index == index)
    }

    /// When this link wants a rekey handshake: the initiator of the current session after 120 s,
    /// the responder a handshake timeout later in case the initiator does not.
    fn rekey_due(&self, handshake_timeout: Duration) -> Instant {
        let after = if self.current.we_initiated {
            REKEY_AFTER_TIME
        } else {
            REKEY_AFTER_TIME.saturating_add(handshake_timeout)
        };
        (self.current.created + after).max(self.rekey_not_before)
    }
}

/// The link layer. A sans-IO core: no sockets, no clock.
///
/// Four kinds of method, as in quinn-proto: getters ([`links`](Self::links),
/// [`counters`](Self::counters), [`table_sizes`](Self::table_sizes)); inputs
/// ([`handle_datagram`](Self::handle_datagram), [`handle_timeout`](Self::handle_timeout));
/// commands ([`connect`](Self::connect), [`send`](Self::send), [`close`](Self::close)); outputs
/// ([`poll_transmit`](Self::poll_transmit), [`poll_event`](Self::poll_event),
/// [`poll_timeout`](Self::poll_timeout)).
///
/// Call order: after every input or command, drain `poll_transmit` until `None` (send each datagram
/// to the returned address), drain `poll_event` until `None`, then sleep until `poll_timeout()` (or
/// the next datagram) and call `handle_timeout(now)` when it passes. `now` must not go backwards; a
/// spurious `handle_timeout` does nothing.
pub struct LinkLayer {
    cfg: LinkConfig,
    noise: Noise,
    public_key: [u8; 32],
    rng: StdRng,
    handshakes: BTreeMap<u32, Handshake>,
    /// (initiator address, initiator index) -> our index, to answer retransmitted LINK_INITs.
    responders: HashMap<(SocketAddr, u32), u32>,
    half_open: usize,
    links: BTreeMap<LinkId, Link>,
    /// Local index of every established session -> its link.
    sessions: BTreeMap<u32, LinkId>,
    next_link: u32,
    ratelimit: RateLimiter,
    tx: TxQueue,
    events: Events,
    counters: LinkCounters,
    scratch: Vec<u8>,
}

impl core::fmt::Debug for LinkLayer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LinkLayer")
            .field("public_key", &hex::encode(self.public_key))
            .field("tables", &self.table_sizes())
            .finish_non_exhaustive()
    }
}

impl LinkLayer {
    /// A layer for the node with `cfg.static_secret`.
    pub fn new(cfg: LinkConfig, now: Instant) -> Self {
        let _ = now;
        let public_key = *SecretKey::from_bytes(cfg.static_secret)
            .public_key()
            .as_bytes();
        LinkLayer {
            noise: Noise::new(cfg.static_secret, cfg.network_key),
            public_key,
            rng: StdRng::seed_from_u64(cfg.seed),
            handshakes: BTreeMap::new(),
            responders: HashMap::new(),
            half_open: 0,
            links: BTreeMap::new(),
            sessions: BTreeMap::new(),
            next_link: 1,
            ratelimit: RateLimiter::new(
                cfg.handshake_rate,
                cfg.handshake_burst,
                cfg.rate_limit_sources,
            ),
            tx: TxQueue {
                queue: VecDeque::new(),
                pool: Vec::new(),
                cap: cfg.max_queued.max(1),
            },
            events: Events {
                queue: VecDeque::new(),
                cap: cfg.max_queued.max(1),
            },
            counters: LinkCounters::default(),
            scratch: Vec::new(),
            cfg,
        }
    }

    /// Our static public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public_key
    }

    /// Starts a handshake to `remote`. Does nothing while a handshake we started to `remote` is in
    /// progress, or while a link with `remote` is up; a failure is reported as
    /// [`LinkEvent::HandshakeFailed`].
    pub fn connect(&mut self, now: Instant, remote: SocketAddr) {
        let busy = self
            .handshakes
            .values()
            .any(|h| h.remote == remote && !h.is_responder())
            || self.links.values().any(|l| l.remote == remote);
        if !busy {
            self.start_handshake(now, remote, None);
        }
    }

    /// Processes one datagram whose first byte is a link frame type (0x02..=0x05). Every dropped
    /// datagram is counted in [`LinkCounters`] and returned as an error (for logging; there is
    /// nothing to recover).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Result<(), LinkError> {
        self.counters.rx_datagrams += 1;
        let env = match Envelope::parse(datagram) {
            Ok(env) => env,
            Err(e) => {
                self.counters.malformed += 1;
                return Err(e.into());
            }
        };
        match env.frame_type {
            ControlType::LinkInit => self.on_init(now, from, &env),
            ControlType::LinkResp => self.on_resp(now, from, &env),
            ControlType::LinkFinish => self.on_finish(now, from, &env),
            ControlType::LinkData => self.on_data(now, from, &env, datagram.len()),
        }
    }

    /// Encrypts `payload` on `channel` into a LINK_DATA datagram for `link` (collect it with
    /// [`poll_transmit`](Self::poll_transmit)).
    pub fn send(
        &mut self,
        now: Instant,
        link: LinkId,
        channel: Channel,
        payload: &[u8],
    ) -> Result<(), LinkError> {
        let l = self
            .links
            .get_mut(&link)
            .ok_or(LinkError::UnknownLink(link))?;
        seal_frame(
            &mut self.tx,
            &mut self.counters,
            l,
            None,
            now,
            channel,
            payload,
        )?;
        let wants =
            l.rekey.is_none() && l.current.wants_rekey_by_count() && now >= l.rekey_not_before;
        if wants {
            let remote = l.remote;
            self.start_handshake(now, remote, Some(link));
        }
        Ok(())
    }

    /// Tears `link` down locally (reported as [`DownReason::Closed`]). The peer notices by its dead
    /// interval; there is no close frame.
    pub fn close(&mut self, now: Instant, link: LinkId) {
        let _ = now;
        self.remove_link(link, DownReason::Closed);
    }

    /// Runs the timers due at `now`: handshake retransmits and timeouts, keepalives, dead links,
    /// rekeys, session expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Handshakes.
        let due: Vec<u32> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now || h.next_retry.is_some_and(|t| t <= now))
            .map(|(i, _)| *i)
            .collect();
        for index in due {
            let expired = self
                .handshakes
                .get(&index)
                .is_some_and(|h| h.deadline <= now);
            if expired {
                if let Some(h) = self.remove_handshake(index) {
                    self.counters.handshake_timeouts += 1;
                    // Unconfirmed, but the peer is linked anyway (through the other handshake
                    // of a simultaneous open): nothing to report.
                    let linked = match &h.step {
                        Step::Finished { peer_key, .. } => {
                            self.links.values().find(|l| l.peer_key == *peer_key)
                        }
                        _ => None,
                    };
                    let f = Failed {
                        remote: h.remote,
                        for_link: h.for_link.or(linked.map(|l| l.id)),
                        index: Some(index),
                        responder: h.is_responder(),
                    };
                    self.handshake_failed(now, f, HandshakeFailure::Timeout);
                }
                continue;
            }
            let retry = self.jittered_retry();
            let Some(h) = self.handshakes.get_mut(&index) else {
                continue;
            };
            h.next_retry = Some(now + retry);
            match &h.step {
                Step::Initiated { msg1, .. } => {
                    let len = self.noise.msg1_len();
                    self.tx.control(
                        &mut self.counters,
                        h.remote,
                        ControlType::LinkInit,
                        index,
                        0,
                        msg1.get(..len).unwrap_or(&[]),
                    );
                }
                Step::Finished {
                    msg3, peer_index, ..
                } => {
                    self.tx.control(
                        &mut self.counters,
                        h.remote,
                        ControlType::LinkFinish,
                        0,
                        *peer_index,
                        msg3,
                    );
                }
                Step::Responded { .. } => {
                    h.next_retry = None;
                    continue;
                }
            }
            self.counters.handshake_retransmits += 1;
        }

        // Links.
        let ids: Vec<LinkId> = self.links.keys().copied().collect();
        for id in ids {
            let Some(l) = self.links.get_mut(&id) else {
                continue;
            };
            if l.previous.as_ref().is_some_and(|s| !s.usable(now)) {
                if let Some(old) = l.previous.take() {
                    self.sessions.remove(&old.local_index);
                }
            }
            if now - l.last_rx >= self.cfg.dead_interval {
                self.remove_link(id, DownReason::Dead);
                continue;
            }
            if !l.current.usable(now) {
                self.remove_link(id, DownReason::Expired);
                continue;
            }
            if l.rekey.is_none() && now >= l.rekey_due(self.cfg.handshake_timeout) {
                let remote = l.remote;
                self.start_handshake(now, remote, Some(id));
            }
            let Some(l) = self.links.get_mut(&id) else {
                continue;
            };
            if now - l.last_tx >= self.cfg.keepalive_interval {
                if seal_frame(
                    &mut self.tx,
                    &mut self.counters,
                    l,
                    None,
                    now,
                    Channel::Keepalive,
                    &[],
                )
                .is_ok()
                {
                    self.counters.keepalives_sent += 1;
                } else {
                    // Queue full: try again after another interval rather than spinning.
                    l.last_tx = now;
                }
            }
        }
    }

    /// The earliest deadline of any timer, `None` if there are no links and no handshakes.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let hs = self
            .handshakes
            .values()
            .flat_map(|h| [Some(h.deadline), h.next_retry])
            .flatten();
        let links = self.links.values().flat_map(|l| {
            [
                Some(l.last_tx + self.cfg.keepalive_interval),
                Some(l.last_rx + self.cfg.dead_interval),
                Some(l.current.created + REJECT_AFTER_TIME),
                l.previous.as_ref().map(|s| s.created + REJECT_AFTER_TIME),
                l.rekey
                    .is_none()
                    .then(|| l.rekey_due(self.cfg.handshake_timeout)),
            ]
            .into_iter()
            .flatten()
        });
        hs.chain(links).min()
    }

    /// Moves the next outgoing datagram into `buf` (cleared first) and returns its destination.
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> Option<SocketAddr> {
        let (to, mut b) = self.tx.queue.pop_front()?;
        // Hand over our buffer and keep the caller's old one for reuse: no copy.
        core::mem::swap(buf, &mut b);
        b.clear();
        if self.tx.pool.len() < 64 {
            self.tx.pool.push(b);
        }
        Some(to)
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.queue.pop_front()
    }

    /// The established links, in id order.
    pub fn links(&self) -> impl Iterator<Item = LinkView> + '_ {
        self.links.values().map(|l| LinkView {
            id: l.id,
            remote: l.remote,
            peer_key: l.peer_key,
            state: if l.rekey.is_some() {
                LinkState::Rekeying
            } else {
                LinkState::Up
            },
            rx_bytes: l.rx_bytes,
            tx_bytes: l.tx_bytes,
            last_rx: l.last_rx,
            established: l.established,
        })
    }

    /// The handshakes in progress.
    pub fn handshakes(&self) -> impl Iterator<Item = HandshakeView> + '_ {
        self.handshakes.values().map(|h| HandshakeView {
            remote: h.remote,
            initiator: !h.is_responder(),
            deadline: h.deadline,
        })
    }

    /// The counters.
    pub fn counters(&self) -> &LinkCounters {
        &self.counters
    }

    /// Current table sizes (to check the DoS bounds).
    pub fn table_sizes(&self) -> TableSizes {
        TableSizes {
            links: self.links.len(),
            handshakes: self.handshakes.len(),
            half_open: self.half_open,
            sessions: self.sessions.len(),
            rate_limit_sources: self.ratelimit.len(),
            transmit_queue: self.tx.queue.len(),
            events: self.events.queue.len(),
        }
    }

    // ---- internals -------------------------------------------------------------------------

    fn jittered_retry(&mut self) -> Duration {
        let base = self.cfg.handshake_retry;
        let extra = u64::try_from(base.as_micros() / 4).unwrap_or(u64::MAX);
        let jitter = if extra == 0 {
            0
        } else {
            self.rng.random_range(0..=extra)
        };
        base.saturating_add(Duration::from_micros(jitter))
    }

    /// A fresh random non-zero index not used by any handshake or session.
    fn alloc_index(&mut self) -> Option<u32> {
        for _ in 0..64 {
            let i: u32 = self.rng.random();
            if i != 0 && !self.handshakes.contains_key(&i) && !self.sessions.contains_key(&i) {
                return Some(i);
            }
        }
        None
    }

    fn remove_handshake(&mut self, index: u32) -> Option<Handshake> {
        let h = self.handshakes.remove(&index)?;
        if let Step::Responded { peer_index, .. } = &h.step {
            self.half_open = self.half_open.saturating_sub(1);
            self.responders.remove(&(h.remote, *peer_index));
        }
        if let Some(l) = h.for_link.and_then(|id| self.links.get_mut(&id)) {
            if l.rekey == Some(index) {
                l.rekey = None;
            }
        }
        Some(h)
    }

    /// Reports a failed handshake: rekeys of a live link retry later, others become an event.
    fn handshake_failed(&mut self, now: Instant, f: Failed, reason: HandshakeFailure) {
        if reason != HandshakeFailure::Timeout {
            self.counters.handshakes_failed += 1;
        }
        if let Some(l) = f.for_link.and_then(|id| self.links.get_mut(&id)) {
            if f.index.is_some() && l.rekey == f.index {
                l.rekey = None;
            }
            l.rekey_not_before = now + self.cfg.handshake_retry;
            return;
        }
        if f.responder && reason == HandshakeFailure::Timeout {
            // A responder that never saw message 3: nothing the daemon could act on.
            return;
        }
        self.events.push(
            &mut self.counters,
            LinkEvent::HandshakeFailed {
                remote: f.remote,
                reason,
            },
        );
    }

    fn start_handshake(&mut self, now: Instant, remote: SocketAddr, for_link: Option<LinkId>) {
        self.counters.handshakes_initiated += 1;
        let mut msg1 = [0u8; MSG1_PSK_LEN];
        let started = match self.alloc_index() {
            Some(index) => self.noise.initiate(&mut msg1).map(|hs| (index, hs)),
            None => Err(NoiseError::NoPeerKey),
        };
        let (index, hs) = match started {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(%remote, error = %e, "cannot start link handshake");
                let f = Failed {
                    remote,
                    for_link,
                    index: None,
                    responder: false,
                };
                self.handshake_failed(now, f, HandshakeFailure::Internal);
                return;
            }
        };
        let retry = self.jittered_retry();
        self.handshakes.insert(
            index,
            Handshake {
                remote,
                started: now,
                deadline: now + self.cfg.handshake_timeout,
                next_retry: Some(now + retry),
                for_link,
                step: Step::Initiated { hs, msg1 },
            },
        );
        if let Some(l) = for_link.and_then(|id| self.links.get_mut(&id)) {
            l.rekey = Some(index);
        }
        let len = self.noise.msg1_len();
        self.tx.control(
            &mut self.counters,
            remote,
            ControlType::LinkInit,
            index,
            0,
            msg1.get(..len).unwrap_or(&[]),
        );
    }

    fn malformed(&mut self, e: MalformedFrame) -> Result<(), LinkError> {
        self.counters.malformed += 1;
        Err(e.into())
    }

    fn on_init(
        &mut self,
        now: Instant,
        from: SocketAddr,
        env: &Envelope<'_>,
    ) -> Result<(), LinkError> {
        if env.sender == 0 || env.receiver != 0 || env.counter != 0 {
            return self.malformed(MalformedFrame::Field);
        }
        if env.body.len() != self.noise.msg1_len() {
            return self.malformed(MalformedFrame::HandshakeLength);
        }
        if !self.ratelimit.allow(now, from.ip()) {
            self.counters.handshake_rate_limited += 1;
            return Err(LinkError::RateLimited(from.ip()));
        }
        // A retransmitted message 1: answer with the same message 2.
        if let Some(&index) = self.responders.get(&(from, env.sender)) {
            if let Some(Handshake {
                step: Step::Responded { msg2, .. },
                ..
            }) = self.handshakes.get(&index)
            {
                self.counters.handshake_retransmits += 1;
                self.tx.control(
                    &mut self.counters,
                    from,
                    ControlType::LinkResp,
                    index,
                    env.sender,
                    msg2,
                );
                return Ok(());
            }
        }
        let mut msg2 = [0u8; MSG2_LEN];
        let hs = match self.noise.respond(env.body, &mut msg2) {
            Ok(hs) => hs,
            Err(e) => {
                self.counters.handshakes_failed += 1;
                tracing::debug!(%from, error = %e, "LINK_INIT rejected");
                return Err(LinkError::Handshake(match e {
                    NoiseError::Rejected(_) => HandshakeFailure::Rejected,
                    _ => HandshakeFailure::Internal,
                }));
            }
        };
        // Only a message 1 that Noise accepted may push out an older half-open handshake.
        while self.half_open >= self.cfg.max_half_open.max(1) {
            let oldest = self
                .handshakes
                .iter()
                .filter(|(_, h)| h.is_responder())
                .min_by_key(|(_, h)| h.started)
                .map(|(i, _)| *i);
            match oldest {
                Some(i) => {
                    self.remove_handshake(i);
                    self.counters.half_open_evicted += 1;
                }
                None => break,
            }
        }
        let Some(index) = self.alloc_index() else {
            return Err(LinkError::Handshake(HandshakeFailure::Internal));
        };
        self.handshakes.insert(
            index,
            Handshake {
                remote: from,
                started: now,
                deadline: now + self.cfg.handshake_timeout,
                next_retry: None,
                for_link: None,
                step: Step::Responded {
                    hs,
                    peer_index: env.sender,
                    msg2,
                },
            },
        );
        self.half_open += 1;
        self.responders.insert((from, env.sender), index);
        self.tx.control(
            &mut self.counters,
            from,
            ControlType::LinkResp,
            index,
            env.sender,
            &msg2,
        );
        Ok(())
    }

    fn on_resp(
        &mut self,
        now: Instant,
        from: SocketAddr,
        env: &Envelope<'_>,
    ) -> Result<(), LinkError> {
        if env.sender == 0 || env.receiver == 0 || env.counter != 0 {
            return self.malformed(MalformedFrame::Field);
        }
        if env.body.len() != MSG2_LEN {
            return self.malformed(MalformedFrame::HandshakeLength);
        }
        match self.handshakes.get(&env.receiver) {
            Some(Handshake {
                step: Step::Initiated { .. },
                ..
            }) => {}
            Some(_) => {
                self.counters.handshake_unexpected += 1;
                return Err(LinkError::UnexpectedHandshake);
            }
            None => {
                self.counters.unknown_index += 1;
                return Err(LinkError::UnknownIndex(env.receiver));
            }
        }
        let Some(h) = self.remove_handshake(env.receiver) else {
            return Err(LinkError::UnknownIndex(env.receiver));
        };
        let Handshake {
            remote,
            started,
            deadline,
            for_link,
            step,
            ..
        } = h;
        let Step::Initiated { hs, .. } = step else {
            return Err(LinkError::UnexpectedHandshake);
        };
        let failed = Failed {
            remote,
            for_link,
            index: Some(env.receiver),
            responder: false,
        };
        let mut msg3 = [0u8; MSG3_LEN];
        let fin = match handshake::initiator_finish(hs, env.body, &mut msg3) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(%from, error = %e, "LINK_RESP rejected");
                let reason = failure_of(&e);
                self.handshake_failed(now, failed, reason);
                return Err(LinkError::Handshake(reason));
            }
        };
        if fin.peer_key == self.public_key {
            self.handshake_failed(now, failed, HandshakeFailure::SelfConnection);
            return Err(LinkError::Handshake(HandshakeFailure::SelfConnection));
        }
        let Some(mut session) =
            Session::new(env.receiver, env.sender, true, &fin.k_i2r, &fin.k_r2i, now)
        else {
            self.handshake_failed(now, failed, HandshakeFailure::Internal);
            return Err(LinkError::Handshake(HandshakeFailure::Internal));
        };
        session.handshake_started = started;
        self.tx.control(
            &mut self.counters,
            from,
            ControlType::LinkFinish,
            0,
            env.sender,
            &msg3,
        );
        let retry = self.jittered_retry();
        self.handshakes.insert(
            env.receiver,
            Handshake {
                remote: from,
                started,
                deadline,
                next_retry: Some(now + retry),
                for_link,
                step: Step::Finished {
                    session: Box::new(session),
                    peer_key: fin.peer_key,
                    peer_index: env.sender,
                    msg3,
                },
            },
        );
        // remove_handshake cleared the link's rekey marker; the handshake is still ours.
        if let Some(l) = for_link.and_then(|id| self.links.get_mut(&id)) {
            if l.rekey.is_none() {
                l.rekey = Some(env.receiver);
            }
        }
        Ok(())
    }

    fn on_finish(
        &mut self,
        now: Instant,
        from: SocketAddr,
        env: &Envelope<'_>,
    ) -> Result<(), LinkError> {
        if env.sender != 0 || env.receiver == 0 || env.counter != 0 {
            return self.malformed(MalformedFrame::Field);
        }
        if env.body.len() != MSG3_LEN {
            return self.malformed(MalformedFrame::HandshakeLength);
        }
        match self.handshakes.get(&env.receiver) {
            Some(Handshake {
                step: Step::Responded { .. },
                ..
            }) => {}
            Some(_) => {
                self.counters.handshake_unexpected += 1;
                return Err(LinkError::UnexpectedHandshake);
            }
            None => return self.on_finish_again(now, env.receiver),
        }
        let Some(h) = self.remove_handshake(env.receiver) else {
            return Err(LinkError::UnknownIndex(env.receiver));
        };
        let started = h.started;
        let Step::Responded { hs, peer_index, .. } = h.step else {
            return Err(LinkError::UnexpectedHandshake);
        };
        let failed = Failed {
            remote: from,
            for_link: None,
            index: None,
            responder: true,
        };
        let fin = match handshake::responder_finish(hs, env.body) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(%from, error = %e, "LINK_FINISH rejected");
                let reason = failure_of(&e);
                self.handshake_failed(now, failed, reason);
                return Err(LinkError::Handshake(reason));
            }
        };
        if fin.peer_key == self.public_key {
            self.handshake_failed(now, failed, HandshakeFailure::SelfConnection);
            return Err(LinkError::Handshake(HandshakeFailure::SelfConnection));
        }
        let Some(mut session) =
            Session::new(env.receiver, peer_index, false, &fin.k_i2r, &fin.k_r2i, now)
        else {
            self.handshake_failed(now, failed, HandshakeFailure::Internal);
            return Err(LinkError::Handshake(HandshakeFailure::Internal));
        };
        session.handshake_started = started;
        let id = match self.establish(now, from, fin.peer_key, session) {
            Ok(id) => id,
            Err(reason) => {
                self.handshake_failed(now, failed, reason);
                return Err(LinkError::Handshake(reason));
            }
        };
        // Confirm at once, under the new session even if the old one stays current (simultaneous
        // open): the initiator keeps its old session (or stays down) until it hears from us
        // under the new one.
        self.keepalive(now, id, env.receiver);
        Ok(())
    }

    /// Message 3 for a session we already finished: our confirming keepalive was lost.
    fn on_finish_again(&mut self, now: Instant, index: u32) -> Result<(), LinkError> {
        let Some(&id) = self.sessions.get(&index) else {
            self.counters.unknown_index += 1;
            return Err(LinkError::UnknownIndex(index));
        };
        let ours = self
            .links
            .get_mut(&id)
            .and_then(|l| l.session_mut(index))
            .is_some_and(|s| !s.we_initiated);
        if !ours {
            self.counters.handshake_unexpected += 1;
            return Err(LinkError::UnexpectedHandshake);
        }
        self.counters.handshake_retransmits += 1;
        self.keepalive(now, id, index);
        Ok(())
    }

    /// Sends a KEEPALIVE under the session with our index `index` (current or previous).
    fn keepalive(&mut self, now: Instant, id: LinkId, index: u32) {
        if let Some(l) = self.links.get_mut(&id) {
            let sent = seal_frame(
                &mut self.tx,
                &mut self.counters,
                l,
                Some(index),
                now,
                Channel::Keepalive,
                &[],
            );
            if sent.is_ok() {
                self.counters.keepalives_sent += 1;
            }
        }
    }

    fn on_data(
        &mut self,
        now: Instant,
        from: SocketAddr,
        env: &Envelope<'_>,
        wire_len: usize,
    ) -> Result<(), LinkError> {
        if env.sender != 0 || env.receiver == 0 {
            return self.malformed(MalformedFrame::Field);
        }
        let mut scratch = core::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.extend_from_slice(env.body);
        let result = self.open_data(now, from, env, &mut scratch, wire_len);
        self.scratch = scratch;
        result
    }

    fn open_data(
        &mut self,
        now: Instant,
        from: SocketAddr,
        env: &Envelope<'_>,
        buf: &mut [u8],
        wire_len: usize,
    ) -> Result<(), LinkError> {
        let index = env.receiver;
        let (id, plain_len) = if let Some(&id) = self.sessions.get(&index) {
            let Some(session) = self.links.get_mut(&id).and_then(|l| l.session_mut(index)) else {
                self.counters.unknown_index += 1;
                return Err(LinkError::UnknownIndex(index));
            };
            if !session.usable(now) {
                self.counters.expired_session += 1;
                return Err(LinkError::SessionExpired);
            }
            let n = open(&mut self.counters, session, env, buf)?;
            (id, n)
        } else if let Some(Handshake {
            step: Step::Finished { session, .. },
            ..
        }) = self.handshakes.get_mut(&index)
        {
            // The first frame under a session we initiated: the responder has the keys.
            let n = open(&mut self.counters, session, env, buf)?;
            let Some(Handshake {
                step: Step::Finished {
                    session, peer_key, ..
                },
                for_link,
                ..
            }) = self.remove_handshake(index)
            else {
                return Err(LinkError::UnknownIndex(index));
            };
            let id = match self.establish(now, from, peer_key, *session) {
                Ok(id) => id,
                Err(reason) => {
                    let f = Failed {
                        remote: from,
                        for_link,
                        index: Some(index),
                        responder: false,
                    };
                    self.handshake_failed(now, f, reason);
                    return Err(LinkError::Handshake(reason));
                }
            };
            (id, n)
        } else {
            self.counters.unknown_index += 1;
            return Err(LinkError::UnknownIndex(index));
        };
        let Some(l) = self.links.get_mut(&id) else {
            return Err(LinkError::UnknownIndex(index));
        };
        l.last_rx = now;
        l.rx_bytes += wire_len as u64;
        // Roam (follow a NAT rebinding) only on the current session, so an old process still
        // holding the previous session cannot pull the link away.
        if l.remote != from && l.current.local_index == index {
            tracing::debug!(link = id.0, old = %l.remote, new = %from, "peer roamed");
            l.remote = from;
        }
        let plain = buf.get(..plain_len).unwrap_or(&[]);
        let Some((&ch, payload)) = plain.split_first() else {
            self.counters.unknown_channel += 1;
            return Ok(());
        };
        match Channel::try_from(ch) {
            Ok(Channel::Keepalive) => {}
            Ok(channel) => self.events.push(
                &mut self.counters,
                LinkEvent::Received {
                    link: id,
                    channel,
                    payload: payload.to_vec(),
                },
            ),
            Err(_) => self.counters.unknown_channel += 1,
        }
        Ok(())
    }

    /// A handshake finished with `peer_key` at `remote`: attach `session` to that peer's link or
    /// create one (replacing links this one supersedes).
    fn establish(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        peer_key: [u8; 32],
        session: Session,
    ) -> Result<LinkId, HandshakeFailure> {
        self.counters.handshakes_completed += 1;
        let same_key = self
            .links
            .values()
            .find(|l| l.peer_key == peer_key)
            .map(|l| (l.id, l.remote));
        if let Some((id, old_remote)) = same_key {
            if old_remote == remote {
                self.install(id, session);
                self.counters.rekeys += 1;
                return Ok(id);
            }
            self.remove_link(id, DownReason::Replaced);
        }
        let same_addr: Vec<LinkId> = self
            .links
            .values()
            .filter(|l| l.remote == remote)
            .map(|l| l.id)
            .collect();
        for id in same_addr {
            self.remove_link(id, DownReason::Replaced);
        }
        if self.links.len() >= self.cfg.max_links {
            return Err(HandshakeFailure::TooManyLinks);
        }
        let id = LinkId(self.next_link);
        self.next_link = self.next_link.wrapping_add(1).max(1);
        self.sessions.insert(session.local_index, id);
        self.links.insert(
            id,
            Link {
                id,
                remote,
                peer_key,
                current: session,
                previous: None,
                rekey: None,
                rekey_not_before: now,
                established: now,
                last_rx: now,
                last_tx: now,
                rx_bytes: 0,
                tx_bytes: 0,
            },
        );
        self.events.push(
            &mut self.counters,
            LinkEvent::Up {
                link: id,
                remote,
                peer_key,
            },
        );
        Ok(id)
    }

    /// Adds a new session to a link. Normally it becomes current and the old current stays as
    /// previous (still accepted). If the two handshakes overlapped (both sides opened at once),
    /// the session whose initiator has the lower static key is kept for sending, so both ends
    /// agree; the other stays acceptable as previous either way.
    fn install(&mut self, id: LinkId, session: Session) {
        let our_key = self.public_key;
        let Some(l) = self.links.get_mut(&id) else {
            return;
        };
        let initiator_key = |s: &Session| if s.we_initiated { our_key } else { l.peer_key };
        // Both handshakes were in flight together (the new one began before the current one
        // finished, here): a simultaneous open or rekey. Otherwise the new one simply supersedes.
        let overlapped = session.handshake_started <= l.current.created;
        let keep_current = overlapped && initiator_key(&l.current) < initiator_key(&session);
        self.sessions.insert(session.local_index, id);
        let dropped = if keep_current {
            l.previous.replace(session)
        } else {
            let old = core::mem::replace(&mut l.current, session);
            l.previous.replace(old)
        };
        if let Some(d) = dropped {
            self.sessions.remove(&d.local_index);
        }
    }

    /// Removes a link, its sessions and its rekey handshake; reports Down. Reconnecting is the
    /// daemon's decision.
    fn remove_link(&mut self, id: LinkId, reason: DownReason) {
        let Some(l) = self.links.remove(&id) else {
            return;
        };
        if let Some(index) = l.rekey {
            self.remove_handshake(index);
        }
        self.sessions.remove(&l.current.local_index);
        if let Some(p) = &l.previous {
            self.sessions.remove(&p.local_index);
        }
        self.events
            .push(&mut self.counters, LinkEvent::Down { link: id, reason });
    }
}

/// Who to blame for a failed handshake.
struct Failed {
    remote: SocketAddr,
    for_link: Option<LinkId>,
    index: Option<u32>,
    responder: bool,
}

fn failure_of(e: &NoiseError) -> HandshakeFailure {
    match e {
        NoiseError::Rejected(_) | NoiseError::NoPeerKey => HandshakeFailure::Rejected,
        NoiseError::Setup(_) => HandshakeFailure::Internal,
    }
}

/// Authenticates a LINK_DATA body in place, counting failures.
fn open(
    counters: &mut LinkCounters,
    session: &mut Session,
    env: &Envelope<'_>,
    buf: &mut [u8],
) -> Result<usize, LinkError> {
    match session.open(env.counter, env.header, buf) {
        Ok(n) => Ok(n),
        Err(OpenError::Auth) => {
            counters.auth_failures += 1;
            Err(LinkError::Authentication)
        }
        Err(OpenError::Replay(ReplayError::Duplicate)) => {
            counters.replay_duplicate += 1;
            Err(LinkError::Replay(env.counter))
        }
        Err(OpenError::Replay(_)) => {
            counters.replay_too_old += 1;
            Err(LinkError::TooOld(env.counter))
        }
    }
}

/// Seals one LINK_DATA frame into the transmit queue, under the link's current session or, with
/// `index`, under the session with that local index.
fn seal_frame(
    tx: &mut TxQueue,
    counters: &mut LinkCounters,
    l: &mut Link,
    index: Option<u32>,
    now: Instant,
    channel: Channel,
    payload: &[u8],
) -> Result<(), LinkError> {
    let body_len = 1 + payload.len() + TAG_LEN;
    let body_len16 = u16::try_from(body_len)
        .ok()
        .filter(|_| HEADER_LEN + body_len <= MAX_DATAGRAM)
        .ok_or(LinkError::PayloadTooLarge(payload.len()))?;
    let remote = l.remote;
    let s = match index {
        None => &mut l.current,
        Some(i) => l.session_mut(i).ok_or(LinkError::UnknownIndex(i))?,
    };
    if !s.usable(now) {
        return Err(LinkError::SessionExpired);
    }
    let Some(mut b) = tx.buffer() else {
        counters.tx_queue_full += 1;
        return Err(LinkError::QueueFull);
    };
    let repr = Repr {
        frame_type: ControlType::LinkData,
        sender_index: 0,
        receiver_index: s.remote_index,
        counter: s.next_counter(),
        body_len: body_len16,
    };
    b.resize(repr.buffer_len(), 0);
    let mut packet = Packet::new_unchecked(&mut b[..]);
    repr.emit(&mut packet);
    let (aad, body) = packet.aad_and_body_mut();
    let sealed = match body.split_at_mut_checked(body_len - TAG_LEN) {
        Some((plain, tag_out)) => {
            if let Some((ch, rest)) = plain.split_first_mut() {
                *ch = channel as u8;
                rest.copy_from_slice(payload);
            }
            s.seal(aad, plain)
                .map(|(_, tag)| tag_out.copy_from_slice(&tag))
        }
        None => Err(session::CryptoError::Auth),
    };
    if sealed.is_err() {
        tx.pool.push(b);
        return Err(LinkError::SessionExpired);
    }
    l.last_tx = now;
    l.tx_bytes += b.len() as u64;
    tx.queue.push_back((remote, b));
    Ok(())
}
