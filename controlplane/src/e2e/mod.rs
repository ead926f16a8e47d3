//! End-to-end sessions: the Noise IK handshakes between source and destination node, as a sans-IO
//! core.
//!
//! Data is encrypted end to end by the dataplane; this module only makes the keys. A handshake runs
//! between the two endpoints through the overlay, in DATA packets of kind E2E_HANDSHAKE_INIT and
//! E2E_HANDSHAKE_RESP that transit nodes forward like any other (the private `handshake` module
//! has the messages, `docs/e2e.md` the byte layouts). Why IK: the initiator learns the responder's static key from the
//! route itself (the origin's key travels with its Babel update and the address must derive from
//! it), so one round trip authenticates both ends and no directory is needed.
//!
//! The lifecycle follows WireGuard's (whitepaper §6): the initiator rekeys after
//! [`REKEY_AFTER_TIME`], nobody uses a session after [`REJECT_AFTER_TIME`], handshakes are retried
//! after [`REKEY_TIMEOUT`] (here with exponential backoff and jitter) and given up after
//! [`REKEY_ATTEMPT_TIME`]. A replaced session stays installed until the new one has carried traffic,
//! then for [`PREVIOUS_SESSION_GRACE`] more for packets still in flight.
//!
//! Like `quinn-proto`, [`SessionManager`] does no I/O and reads no clock. Memory is bounded: pending
//! handshakes, sessions (and unconfirmed responder sessions separately), the replay table, the
//! per-destination rate-limit table and both output queues all have caps ([`E2eLimits`]).

mod handshake;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};

use core::time::Duration;

use hypha_proto::addr::{OverlayAddr, Subnet};
use hypha_proto::key::{PublicKey, SecretKey};
use hypha_proto::time::Instant;
use hypha_proto::wire::data::{Kind, Packet, Repr, HEADER_LEN};
use hypha_proto::wire::WireError;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use snow::HandshakeState;

use handshake::{InitPayload, NoiseError, Timestamp, INIT_LEN, RESP_LEN};

/// The initiator of a session starts a new handshake once the session is this old (WireGuard).
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
/// A session this old is removed (WireGuard).
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// A handshake that has not completed after this long is given up (WireGuard).
pub const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
/// First retry interval of a handshake, and the minimum interval between two initiations to one
/// destination (WireGuard).
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// Up to this much random delay is added to every retry (WireGuard's 333 ms).
pub const REKEY_TIMEOUT_JITTER_MAX: Duration = Duration::from_millis(333);
/// Retry intervals double from [`REKEY_TIMEOUT`] up to this.
pub const MAX_RETRY_INTERVAL: Duration = Duration::from_secs(30);
/// A session superseded by a newer confirmed one is removed this much later (packets in flight).
pub const PREVIOUS_SESSION_GRACE: Duration = REKEY_TIMEOUT;
/// Hop limit of the handshake packets we send.
pub const DEFAULT_HOP_LIMIT: u8 = 64;

/// The transport AEAD of a session. A node setting: the initiator names its own in message 1 and the
/// responder follows it, so both ends of a session always agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cipher {
    /// ChaCha20-Poly1305 (RFC 8439). Wire byte 1.
    ChaCha20Poly1305,
    /// AES-256-GCM. Wire byte 2.
    Aes256Gcm,
}

impl Cipher {
    /// The byte in message 1's payload (the same numbering as the shm session-key record).
    pub const fn to_byte(self) -> u8 {
        match self {
            Cipher::ChaCha20Poly1305 => 1,
            Cipher::Aes256Gcm => 2,
        }
    }

    /// From the byte in message 1's payload.
    pub const fn from_byte(b: u8) -> Option<Cipher> {
        match b {
            1 => Some(Cipher::ChaCha20Poly1305),
            2 => Some(Cipher::Aes256Gcm),
            _ => None,
        }
    }
}

/// Which end of the handshake we were.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// We sent message 1. The dataplane may send on the session at once.
    Initiator,
    /// We answered message 1. The dataplane receives on the session at once but sends on it only
    /// after the first packet under it authenticated (the initiator then has the keys).
    Responder,
}

/// Caps that bound the manager's memory. [`E2eLimits::default`] suits a node with thousands of
/// peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E2eLimits {
    /// Sessions held at once (each ~100 bytes here plus its keys in the dataplane). Default 4096.
    pub max_sessions: usize,
    /// Responder sessions not yet confirmed by traffic (anyone with a fresh key can make one).
    /// Default 256.
    pub max_unconfirmed: usize,
    /// Sessions per peer (rekeys and glare leave at most three in practice). Default 4.
    pub max_sessions_per_peer: usize,
    /// Handshakes we initiate at once (each a boxed Noise state, ~1 KiB). Default 1024.
    pub max_handshakes: usize,
    /// Initiator keys whose last timestamp is remembered (replay protection). Default 8192.
    pub max_replay_entries: usize,
    /// Destinations whose last initiation time is remembered (rate limit). Default 4096.
    pub max_rate_entries: usize,
    /// Handshake initiations answered per second, all sources together (each costs two DH
    /// operations). Default 500.
    pub init_rate: u32,
    /// Burst of initiations answered. Default 1000.
    pub init_burst: u32,
    /// Bound of the transmit queue and of the event queue each. Default 8192.
    pub max_queued: usize,
}

impl Default for E2eLimits {
    fn default() -> Self {
        E2eLimits {
            max_sessions: 4096,
            max_unconfirmed: 256,
            max_sessions_per_peer: 4,
            max_handshakes: 1024,
            max_replay_entries: 8192,
            max_rate_entries: 4096,
            init_rate: 500,
            init_burst: 1000,
            max_queued: 8192,
        }
    }
}

/// Configuration of a [`SessionManager`].
#[derive(Clone)]
pub struct E2eConfig {
    /// This node's static key; our source address is its address.
    pub secret: SecretKey,
    /// Seed of the core's randomness (session indices, retry jitter). Noise ephemerals come from the
    /// OS RNG regardless.
    pub seed: u64,
    /// The transport cipher we ask for when we initiate.
    pub cipher: Cipher,
    /// Wall-clock time (since the Unix epoch) at the `now` given to [`SessionManager::new`]. Message
    /// 1 carries a timestamp derived from it so that a responder can refuse a replayed message 1
    /// even after we restart (the daemon passes `SystemTime::now()`).
    pub wall_clock: Duration,
    /// Hop limit of our handshake packets. Default [`DEFAULT_HOP_LIMIT`].
    pub hop_limit: u8,
    /// Memory caps.
    pub limits: E2eLimits,
}

impl E2eConfig {
    /// Defaults around `secret`: ChaCha20-Poly1305, seed 0, wall clock 0, default limits.
    pub fn new(secret: SecretKey) -> Self {
        E2eConfig {
            secret,
            seed: 0,
            cipher: Cipher::ChaCha20Poly1305,
            wall_clock: Duration::ZERO,
            hop_limit: DEFAULT_HOP_LIMIT,
            limits: E2eLimits::default(),
        }
    }
}

impl core::fmt::Debug for E2eConfig {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("E2eConfig")
            .field("public_key", &self.secret.public_key())
            .field("seed", &self.seed)
            .field("cipher", &self.cipher)
            .field("wall_clock", &self.wall_clock)
            .field("hop_limit", &self.hop_limit)
            .field("limits", &self.limits)
            .finish()
    }
}

/// What the manager asks of the daemon and the dataplane.
#[derive(Clone, PartialEq, Eq)]
pub enum Event {
    /// Install a session in the dataplane. Packets to `peer` carry `remote_index`; packets carrying
    /// `local_index` are opened with `rx_key`. Nonces: 4 zero bytes ‖ 64-bit big-endian counter,
    /// starting at 0 in each direction; AAD: the data header with the hop limit zeroed.
    Install {
        /// The remote end's overlay address.
        peer: OverlayAddr,
        /// The remote end's static key (authenticated by the handshake).
        peer_key: PublicKey,
        /// Our receiver index (unique among our live sessions).
        local_index: u32,
        /// The peer's receiver index: the header index of packets we send.
        remote_index: u32,
        /// Seals what we send.
        tx_key: [u8; 32],
        /// Opens what we receive.
        rx_key: [u8; 32],
        /// The AEAD (the initiator's choice).
        cipher: Cipher,
        /// Which end we were; see [`Role`] for when the dataplane may send.
        role: Role,
        /// When the session was made (its REKEY/REJECT clock starts here).
        created: Instant,
    },
    /// Remove the session with this receiver index (expired, superseded, or evicted).
    Remove {
        /// Our receiver index of the session.
        local_index: u32,
    },
    /// A handshake towards `dst` gave up (or could not start): the dataplane answers what it queued
    /// for `dst`'s /64 with ICMPv6 destination unreachable. `dst` is the peer node's address (or,
    /// for a refused `connect`, the address given). Sessions that still exist are not affected.
    Failed {
        /// The destination.
        dst: OverlayAddr,
    },
    /// [`SessionManager::connect`] had no key for `dst`: ask Babel for a route (a route request),
    /// then call `connect` again with the origin's key.
    NeedRoute {
        /// The destination.
        dst: OverlayAddr,
    },
}

impl core::fmt::Debug for Event {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Event::Install {
                peer,
                peer_key,
                local_index,
                remote_index,
                cipher,
                role,
                created,
                ..
            } => f
                .debug_struct("Install")
                .field("peer", peer)
                .field("peer_key", peer_key)
                .field("local_index", local_index)
                .field("remote_index", remote_index)
                .field("cipher", cipher)
                .field("role", role)
                .field("created", created)
                .finish_non_exhaustive(),
            Event::Remove { local_index } => f
                .debug_struct("Remove")
                .field("local_index", local_index)
                .finish(),
            Event::Failed { dst } => f.debug_struct("Failed").field("dst", dst).finish(),
            Event::NeedRoute { dst } => f.debug_struct("NeedRoute").field("dst", dst).finish(),
        }
    }
}

/// Why a handshake packet or a command was refused. Each is also counted in [`E2eCounters`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum E2eError {
    /// The data header is malformed.
    #[error("malformed data packet: {0}")]
    Malformed(#[from] WireError),
    /// A TRANSPORT packet: not a handshake, not ours to handle.
    #[error("not a handshake packet")]
    NotHandshake,
    /// The destination address is not ours.
    #[error("handshake packet for {0}, not for us")]
    NotForUs(core::net::Ipv6Addr),
    /// A handshake init with a non-zero receiver index, or a zero sender index in a payload.
    #[error("bad session index")]
    BadIndex,
    /// The Noise message has the wrong length for its kind.
    #[error("handshake message of {0} bytes has the wrong length")]
    BadLength(usize),
    /// The Noise message did not decrypt or authenticate.
    #[error("handshake message rejected: {0}")]
    AuthFailed(snow::Error),
    /// Message 1's source address does not derive from the static key it carries: the packet is
    /// spoofed or the sender lies about its address.
    #[error("source address {src} does not belong to the initiator's key")]
    PeerMisbehaved {
        /// The packet's source address.
        src: core::net::Ipv6Addr,
    },
    /// Message 1's timestamp is not newer than the last one accepted from that key.
    #[error("replayed handshake initiation")]
    Replay,
    /// Message 1 names a cipher we don't know.
    #[error("unknown cipher 0x{0:02x}")]
    UnknownCipher(u8),
    /// A response for no handshake of ours (or from the wrong address).
    #[error("response for unknown session index {0}")]
    UnknownIndex(u32),
    /// Too many initiations arrive; this one was not answered.
    #[error("handshake initiation rate limit")]
    RateLimited,
    /// Both ends initiated at once and ours wins (our key is the lower): theirs is not answered,
    /// they answer ours.
    #[error("simultaneous initiation: ours takes precedence")]
    Glare,
    /// `connect` with a key whose address is not the destination.
    #[error("key {key} does not own destination {dst}")]
    KeyMismatch {
        /// The destination asked for.
        dst: OverlayAddr,
        /// The key given for it.
        key: PublicKey,
    },
    /// `connect` to an address in our own /64.
    #[error("no session to ourselves")]
    OwnAddress,
    /// A local Noise failure (RNG, snow setup).
    #[error("local handshake failure: {0}")]
    Local(snow::Error),
}

/// What happened, for `hypha stats` and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct E2eCounters {
    /// Handshake initiations sent (first attempts and retries).
    pub inits_sent: u64,
    /// Of which retries.
    pub init_retries: u64,
    /// Handshake responses sent.
    pub resps_sent: u64,
    /// Sessions installed (both roles).
    pub sessions_installed: u64,
    /// Sessions removed (all reasons).
    pub sessions_removed: u64,
    /// Sessions removed to make room.
    pub sessions_evicted: u64,
    /// Sessions confirmed by traffic.
    pub sessions_confirmed: u64,
    /// Handshakes given up after REKEY_ATTEMPT_TIME.
    pub handshakes_failed: u64,
    /// Pending handshakes dropped to make room.
    pub handshakes_evicted: u64,
    /// Packets with a malformed header, bad length or bad index.
    pub malformed: u64,
    /// Packets not addressed to us or not a handshake.
    pub not_for_us: u64,
    /// Noise messages that did not authenticate.
    pub auth_failed: u64,
    /// Initiations whose source address is not the initiator key's.
    pub peer_misbehaved: u64,
    /// Replayed initiations.
    pub replayed: u64,
    /// Initiations naming an unknown cipher.
    pub unknown_cipher: u64,
    /// Responses matching no handshake of ours.
    pub unknown_index: u64,
    /// Initiations dropped by the rate limit.
    pub rate_limited: u64,
    /// Initiations not answered because ours takes precedence.
    pub glare: u64,
    /// `connect` calls refused because the key does not own the destination.
    pub key_mismatch: u64,
    /// Transmits or events dropped because a queue was full (the caller isn't polling).
    pub queue_overflow: u64,
}

/// A session as `hypha sessions` shows it (no keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionView {
    /// The remote end.
    pub peer: OverlayAddr,
    /// Its static key.
    pub peer_key: PublicKey,
    /// Our receiver index.
    pub local_index: u32,
    /// The peer's receiver index.
    pub remote_index: u32,
    /// Which end we were.
    pub role: Role,
    /// The AEAD.
    pub cipher: Cipher,
    /// When it was made.
    pub created: Instant,
    /// Whether traffic under it has been received.
    pub confirmed: bool,
    /// When it will be removed early because a newer session replaced it.
    pub retiring: Option<Instant>,
}

struct Session {
    peer: OverlayAddr,
    peer_key: PublicKey,
    remote_index: u32,
    role: Role,
    cipher: Cipher,
    created: Instant,
    /// Creation order (ties in `created` are common in tests and simultaneous handshakes).
    seq: u64,
    confirmed: bool,
    retire_at: Option<Instant>,
    /// A rekey was started for this session (once only).
    rekeyed: bool,
}

impl Session {
    fn expires(&self) -> Instant {
        self.created + REJECT_AFTER_TIME
    }

    /// Whether the dataplane sends on it (or will, for an initiator's session).
    fn sendable(&self) -> bool {
        self.retire_at.is_none() && (self.role == Role::Initiator || self.confirmed)
    }
}

struct Pending {
    dst: OverlayAddr,
    key: PublicKey,
    started: Instant,
    next_send: Instant,
    /// Initiations sent so far.
    attempts: u32,
    /// The Noise state of the last initiation sent.
    hs: Option<Box<HandshakeState>>,
}

/// The E2E session manager: one per node.
///
/// Call order (as quinn-proto's `Connection`):
/// 1. Inputs: [`connect`](Self::connect) when the dataplane reports "no session" (or a session due
///    for rekey), [`handle_packet`](Self::handle_packet) for each punted E2E_HANDSHAKE_INIT/RESP
///    packet, [`handle_traffic`](Self::handle_traffic) when the dataplane first authenticates a packet
///    under a session, [`handle_timeout`](Self::handle_timeout) when the deadline from
///    [`poll_timeout`](Self::poll_timeout) passes. Every input carries `now`, never decreasing; a
///    spurious `handle_timeout` does nothing.
/// 2. After each input, drain [`poll_transmit`](Self::poll_transmit) (complete DATA packets to route
///    towards the returned address) until `None`, then [`poll_event`](Self::poll_event) until `None`
///    (install/remove keys, flush or fail queues, ask for routes), then re-arm the timer with
///    [`poll_timeout`](Self::poll_timeout).
///
/// Getters: [`sessions`](Self::sessions), [`counters`](Self::counters),
/// [`public_key`](Self::public_key), [`address`](Self::address).
pub struct SessionManager {
    secret: SecretKey,
    public_key: PublicKey,
    address: OverlayAddr,
    cipher: Cipher,
    hop_limit: u8,
    limits: E2eLimits,
    rng: StdRng,
    /// Wall-clock time at `epoch`.
    wall_clock: Duration,
    epoch: Instant,
    last_timestamp: Timestamp,
    sessions: HashMap<u32, Session>,
    /// Sessions and handshakes are per peer node, i.e. per /64 (a node owns the /64 around its
    /// address, and the dataplane asks for any address in it).
    by_peer: HashMap<Subnet, Vec<u32>>,
    next_seq: u64,
    pending: HashMap<u32, Pending>,
    pending_by_dst: HashMap<Subnet, u32>,
    /// Last initiation sent per destination (rate limit), and when a route was last asked for.
    last_init: HashMap<Subnet, Instant>,
    last_need_route: HashMap<Subnet, Instant>,
    /// Greatest accepted timestamp per initiator key, with its place in `replay_order`.
    replay: HashMap<PublicKey, (Timestamp, u64)>,
    replay_order: BTreeMap<u64, PublicKey>,
    replay_seq: u64,
    /// Token bucket for answered initiations, in micro-tokens.
    init_tokens: u64,
    init_tokens_at: Instant,
    transmits: VecDeque<(OverlayAddr, Vec<u8>)>,
    events: VecDeque<Event>,
    counters: E2eCounters,
}

const TOKEN: u64 = 1_000_000;

impl core::fmt::Debug for SessionManager {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SessionManager")
            .field("address", &self.address)
            .field("sessions", &self.sessions.len())
            .field("pending", &self.pending.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl SessionManager {
    /// A manager for `cfg.secret`'s node, starting at `now`.
    pub fn new(cfg: E2eConfig, now: Instant) -> Self {
        let public_key = cfg.secret.public_key();
        let mut limits = cfg.limits;
        limits.max_sessions = limits.max_sessions.max(1);
        limits.max_unconfirmed = limits.max_unconfirmed.max(1);
        limits.max_sessions_per_peer = limits.max_sessions_per_peer.max(2);
        limits.max_handshakes = limits.max_handshakes.max(1);
        limits.max_replay_entries = limits.max_replay_entries.max(1);
        limits.max_rate_entries = limits.max_rate_entries.max(1);
        limits.init_burst = limits.init_burst.max(1);
        limits.max_queued = limits.max_queued.max(4);
        SessionManager {
            secret: cfg.secret,
            public_key,
            address: public_key.address(),
            cipher: cfg.cipher,
            hop_limit: cfg.hop_limit,
            limits,
            rng: StdRng::seed_from_u64(cfg.seed),
            wall_clock: cfg.wall_clock,
            epoch: now,
            last_timestamp: Timestamp::default(),
            sessions: HashMap::new(),
            by_peer: HashMap::new(),
            next_seq: 0,
            pending: HashMap::new(),
            pending_by_dst: HashMap::new(),
            last_init: HashMap::new(),
            last_need_route: HashMap::new(),
            replay: HashMap::new(),
            replay_order: BTreeMap::new(),
            replay_seq: 0,
            init_tokens: u64::from(limits.init_burst) * TOKEN,
            init_tokens_at: now,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            counters: E2eCounters::default(),
        }
    }

    /// Our static public key.
    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    /// Our overlay address (the source of our handshake packets).
    pub fn address(&self) -> OverlayAddr {
        self.address
    }

    /// The counters.
    pub fn counters(&self) -> &E2eCounters {
        &self.counters
    }

    /// The live sessions, in no particular order.
    pub fn sessions(&self) -> impl Iterator<Item = SessionView> + '_ {
        self.sessions.iter().map(|(&local_index, s)| SessionView {
            peer: s.peer,
            peer_key: s.peer_key,
            local_index,
            remote_index: s.remote_index,
            role: s.role,
            cipher: s.cipher,
            created: s.created,
            confirmed: s.confirmed,
            retiring: s.retire_at,
        })
    }

    /// Handshakes we are running (initiator side).
    pub fn pending_handshakes(&self) -> usize {
        self.pending.len()
    }

    /// The dataplane has no usable session to `dst` (or its session is due for rekey): make one.
    ///
    /// Sessions are per peer node, and a node owns the /64 around its address: `dst` may be any
    /// address in that /64, the handshake goes to the node's own address (`dst_key.address()`).
    /// `dst_key` is the static key that travelled with the route to `dst`; `None` (no route yet)
    /// emits [`Event::NeedRoute`] (at most once per [`REKEY_TIMEOUT`] per /64). A key that does not
    /// own `dst`'s /64 is refused ([`E2eError::KeyMismatch`], and [`Event::Failed`] for `dst`). Nothing
    /// happens if a handshake to `dst` is running or a session to `dst` the dataplane can send on
    /// is younger than [`REKEY_AFTER_TIME`]. Initiations to one destination are at least
    /// [`REKEY_TIMEOUT`] apart: a handshake asked for sooner starts when that time is up.
    pub fn connect(
        &mut self,
        now: Instant,
        dst: OverlayAddr,
        dst_key: Option<PublicKey>,
    ) -> Result<(), E2eError> {
        if dst.subnet() == self.address.subnet() {
            return Err(E2eError::OwnAddress);
        }
        let net = dst.subnet();
        if let Some(key) = dst_key {
            if key.subnet() != net {
                self.counters.key_mismatch += 1;
                self.push_event(Event::Failed { dst });
                return Err(E2eError::KeyMismatch { dst, key });
            }
        }
        if self.pending_by_dst.contains_key(&net) || self.has_fresh_session(now, net) {
            return Ok(());
        }
        let Some(key) = dst_key else {
            let due = self
                .last_need_route
                .get(&net)
                .is_none_or(|&t| now >= t + REKEY_TIMEOUT);
            if due {
                prune(&mut self.last_need_route, now, self.limits.max_rate_entries);
                self.last_need_route.insert(net, now);
                self.push_event(Event::NeedRoute { dst });
            }
            return Ok(());
        };
        self.start_handshake(now, key.address(), key);
        Ok(())
    }

    /// Forgets every session without events, for a restarted dataplane: it lost its keys and send
    /// counters, and installing the same keys again would reuse nonces, so sessions are made anew
    /// (the next `connect` per destination runs a handshake). Pending handshakes and the replay
    /// table are kept.
    pub fn forget_sessions(&mut self) {
        self.sessions.clear();
        self.by_peer.clear();
    }

    /// The dataplane authenticated the first packet received under `local_index`: the peer has the
    /// keys and sends with them. Older sessions with that peer are removed after
    /// [`PREVIOUS_SESSION_GRACE`]. Unknown indices and repeated reports are ignored.
    pub fn handle_traffic(&mut self, now: Instant, local_index: u32) {
        let Some(s) = self.sessions.get_mut(&local_index) else {
            return;
        };
        if s.confirmed {
            return;
        }
        s.confirmed = true;
        self.counters.sessions_confirmed += 1;
        let (peer, seq, role) = (s.peer, s.seq, s.role);
        for idx in self
            .by_peer
            .get(&peer.subnet())
            .cloned()
            .unwrap_or_default()
        {
            if let Some(other) = self.sessions.get_mut(&idx) {
                if other.seq < seq && other.retire_at.is_none() {
                    other.retire_at = Some(now + PREVIOUS_SESSION_GRACE);
                }
            }
        }
        // A responder session the peer sends on makes our own pending handshake pointless.
        if role == Role::Responder {
            self.cancel_pending(peer.subnet());
        }
    }

    /// A punted DATA packet of kind E2E_HANDSHAKE_INIT or E2E_HANDSHAKE_RESP (the whole packet,
    /// header included). Every error is counted; the caller may log it at debug level and drop.
    pub fn handle_packet(&mut self, now: Instant, packet: &[u8]) -> Result<(), E2eError> {
        let result = self.handle_packet_inner(now, packet);
        if let Err(e) = &result {
            let c = &mut self.counters;
            match e {
                E2eError::Malformed(_) | E2eError::BadIndex | E2eError::BadLength(_) => {
                    c.malformed += 1
                }
                E2eError::NotHandshake | E2eError::NotForUs(_) => c.not_for_us += 1,
                E2eError::AuthFailed(_) => c.auth_failed += 1,
                E2eError::PeerMisbehaved { .. } => c.peer_misbehaved += 1,
                E2eError::Replay => c.replayed += 1,
                E2eError::UnknownCipher(_) => c.unknown_cipher += 1,
                E2eError::UnknownIndex(_) => c.unknown_index += 1,
                E2eError::RateLimited => c.rate_limited += 1,
                E2eError::Glare => c.glare += 1,
                E2eError::KeyMismatch { .. } | E2eError::OwnAddress | E2eError::Local(_) => {}
            }
            tracing::debug!(error = %e, "e2e handshake packet dropped");
        }
        result
    }

    fn handle_packet_inner(&mut self, now: Instant, packet: &[u8]) -> Result<(), E2eError> {
        let packet = Packet::new_checked(packet)?;
        let repr = Repr::parse(&packet)?;
        if repr.dst != self.address.ip() {
            return Err(E2eError::NotForUs(repr.dst));
        }
        match repr.kind {
            Kind::Transport => Err(E2eError::NotHandshake),
            Kind::HandshakeInit => self.handle_init(now, &repr, packet.payload()),
            Kind::HandshakeResp => self.handle_resp(now, &repr, packet.payload()),
        }
    }

    fn handle_init(&mut self, now: Instant, repr: &Repr, msg: &[u8]) -> Result<(), E2eError> {
        if repr.receiver_index != 0 {
            return Err(E2eError::BadIndex);
        }
        if msg.len() != INIT_LEN {
            return Err(E2eError::BadLength(msg.len()));
        }
        self.take_init_token(now)?;
        let prologue = handshake::prologue(repr.src.octets(), self.address.octets());
        let read = handshake::read_init(self.secret.as_bytes(), &prologue, msg).map_err(noise)?;
        let peer_key = read.peer_key;
        let peer = peer_key.address();
        if peer.ip() != repr.src {
            return Err(E2eError::PeerMisbehaved { src: repr.src });
        }
        let payload = read.payload;
        if payload.sender_index == 0 {
            return Err(E2eError::BadIndex);
        }
        let cipher =
            Cipher::from_byte(payload.cipher).ok_or(E2eError::UnknownCipher(payload.cipher))?;
        if self
            .replay
            .get(&peer_key)
            .is_some_and(|(seen, _)| payload.timestamp <= *seen)
        {
            return Err(E2eError::Replay);
        }
        self.remember_timestamp(peer_key, payload.timestamp);
        // Glare: both ends initiated. The lower static key's handshake wins; the loser answers and
        // drops its own, the winner ignores the loser's (the loser will answer ours).
        if let Some(&idx) = self.pending_by_dst.get(&peer.subnet()) {
            let sent = self.pending.get(&idx).is_some_and(|p| p.hs.is_some());
            if sent {
                if self.public_key < peer_key {
                    // Our earlier init may have been lost: send it again as soon as the rate
                    // limit allows rather than at the backed-off retry time.
                    let earliest = self
                        .last_init
                        .get(&peer.subnet())
                        .map_or(now, |&t| (t + REKEY_TIMEOUT).max(now));
                    if let Some(p) = self.pending.get_mut(&idx) {
                        p.next_send = p.next_send.min(earliest);
                    }
                    if earliest <= now {
                        self.send_init(now, idx);
                    }
                    return Err(E2eError::Glare);
                }
                self.cancel_pending(peer.subnet());
            }
        }
        let local_index = self.fresh_index();
        let (resp, keys) = read.respond(local_index).map_err(noise)?;
        self.add_session(
            now,
            local_index,
            Session {
                peer,
                peer_key,
                remote_index: payload.sender_index,
                role: Role::Responder,
                cipher,
                created: now,
                seq: 0,
                confirmed: false,
                retire_at: None,
                rekeyed: false,
            },
            keys.r2i,
            keys.i2r,
        );
        self.queue_transmit(peer, Kind::HandshakeResp, payload.sender_index, &resp);
        self.counters.resps_sent += 1;
        Ok(())
    }

    fn handle_resp(&mut self, now: Instant, repr: &Repr, msg: &[u8]) -> Result<(), E2eError> {
        if msg.len() != RESP_LEN {
            return Err(E2eError::BadLength(msg.len()));
        }
        let index = repr.receiver_index;
        let hs = match self.pending.get_mut(&index) {
            Some(p) if p.dst.ip() == repr.src => p.hs.take(),
            _ => None,
        };
        let Some(hs) = hs else {
            return Err(E2eError::UnknownIndex(index));
        };
        // A failed read consumed the state: the next retry starts afresh.
        let (remote_index, keys) = handshake::read_resp(hs, msg).map_err(noise)?;
        if remote_index == 0 {
            return Err(E2eError::BadIndex);
        }
        let Some(p) = self.pending.remove(&index) else {
            return Err(E2eError::UnknownIndex(index));
        };
        self.pending_by_dst.remove(&p.dst.subnet());
        self.add_session(
            now,
            index,
            Session {
                peer: p.dst,
                peer_key: p.key,
                remote_index,
                role: Role::Initiator,
                cipher: self.cipher,
                created: now,
                seq: 0,
                confirmed: false,
                retire_at: None,
                rekeyed: false,
            },
            keys.i2r,
            keys.r2i,
        );
        Ok(())
    }

    /// Runs the timers due at `now`: handshake retries and give-ups, session expiry and retirement,
    /// rekeys.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut failed = Vec::new();
        let mut resend = Vec::new();
        for (&idx, p) in &self.pending {
            if now >= p.started + REKEY_ATTEMPT_TIME {
                failed.push(idx);
            } else if now >= p.next_send {
                resend.push(idx);
            }
        }
        failed.sort_unstable();
        resend.sort_unstable();
        for idx in failed {
            if let Some(p) = self.pending.remove(&idx) {
                self.pending_by_dst.remove(&p.dst.subnet());
                self.counters.handshakes_failed += 1;
                tracing::debug!(dst = %p.dst, "e2e handshake gave up");
                self.push_event(Event::Failed { dst: p.dst });
            }
        }
        for idx in resend {
            self.send_init(now, idx);
        }
        let mut remove: Vec<u32> = self
            .sessions
            .iter()
            .filter(|(_, s)| now >= s.expires() || s.retire_at.is_some_and(|t| now >= t))
            .map(|(&i, _)| i)
            .collect();
        remove.sort_unstable();
        for idx in remove {
            self.remove_session(idx);
        }
        // After the removals: a removed newer session can make an older one due for rekey.
        let mut rekey: Vec<u32> = self
            .sessions
            .iter()
            .filter(|(_, s)| self.rekey_due(s).is_some_and(|t| now >= t))
            .map(|(&i, _)| i)
            .collect();
        rekey.sort_unstable();
        for idx in rekey {
            if let Some(s) = self.sessions.get_mut(&idx) {
                s.rekeyed = true;
                let (peer, key) = (s.peer, s.peer_key);
                tracing::debug!(%peer, "e2e rekey");
                self.start_handshake(now, peer, key);
            }
        }
    }

    /// The next deadline at which [`handle_timeout`](Self::handle_timeout) has work, if any. It may
    /// lie in the past after an input other than `handle_timeout` (e.g. an eviction made an older
    /// session due for rekey): call `handle_timeout` at once then.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let pending = self
            .pending
            .values()
            .map(|p| p.next_send.min(p.started + REKEY_ATTEMPT_TIME));
        let sessions = self.sessions.values().map(|s| {
            let mut t = s.expires();
            if let Some(r) = s.retire_at {
                t = t.min(r);
            }
            if let Some(r) = self.rekey_due(s) {
                t = t.min(r);
            }
            t
        });
        pending.chain(sessions).min()
    }

    /// The next handshake packet: writes a complete DATA packet (header and Noise message) into
    /// `buf` (cleared first) and returns the overlay destination to route it towards.
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> Option<OverlayAddr> {
        let (dst, bytes) = self.transmits.pop_front()?;
        buf.clear();
        buf.extend_from_slice(&bytes);
        Some(dst)
    }

    /// The next event for the daemon and dataplane.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When `s` should be rekeyed: the newest sendable initiator session of its peer, confirmed by
    /// traffic, not rekeyed yet. Idle sessions are not rekeyed; the dataplane asks again with
    /// `connect` when it has something to send.
    fn rekey_due(&self, s: &Session) -> Option<Instant> {
        if s.role != Role::Initiator || !s.confirmed || s.rekeyed || s.retire_at.is_some() {
            return None;
        }
        let newest = self
            .by_peer
            .get(&s.peer.subnet())
            .into_iter()
            .flatten()
            .filter_map(|i| self.sessions.get(i))
            .all(|o| o.seq <= s.seq);
        newest.then(|| s.created + REKEY_AFTER_TIME)
    }

    fn has_fresh_session(&self, now: Instant, net: Subnet) -> bool {
        self.by_peer
            .get(&net)
            .into_iter()
            .flatten()
            .filter_map(|i| self.sessions.get(i))
            .any(|s| s.sendable() && now < s.created + REKEY_AFTER_TIME)
    }

    fn start_handshake(&mut self, now: Instant, dst: OverlayAddr, key: PublicKey) {
        let net = dst.subnet();
        if self.pending_by_dst.contains_key(&net) {
            return;
        }
        while self.pending.len() >= self.limits.max_handshakes {
            let oldest = self
                .pending
                .iter()
                .min_by_key(|(&i, p)| (p.started, i))
                .map(|(&i, _)| i);
            let Some(idx) = oldest else { break };
            if let Some(p) = self.pending.remove(&idx) {
                self.pending_by_dst.remove(&p.dst.subnet());
                self.counters.handshakes_evicted += 1;
                self.push_event(Event::Failed { dst: p.dst });
            }
        }
        let next_send = match self.last_init.get(&net) {
            Some(&t) => (t + REKEY_TIMEOUT).max(now),
            None => now,
        };
        let index = self.fresh_index();
        self.pending.insert(
            index,
            Pending {
                dst,
                key,
                started: now,
                next_send,
                attempts: 0,
                hs: None,
            },
        );
        self.pending_by_dst.insert(net, index);
        if next_send <= now {
            self.send_init(now, index);
        }
    }

    fn send_init(&mut self, now: Instant, index: u32) {
        let timestamp = self.next_timestamp(now);
        let Some(p) = self.pending.get(&index) else {
            return;
        };
        let (dst, key) = (p.dst, p.key);
        let payload = InitPayload {
            sender_index: index,
            timestamp,
            cipher: self.cipher.to_byte(),
        };
        let prologue = handshake::prologue(self.address.octets(), dst.octets());
        let sent = handshake::initiate(self.secret.as_bytes(), &key, &prologue, &payload);
        let attempts = p.attempts;
        let backoff = REKEY_TIMEOUT
            .saturating_mul(1u32 << attempts.min(5))
            .min(MAX_RETRY_INTERVAL);
        let jitter_max = u64::try_from(REKEY_TIMEOUT_JITTER_MAX.as_micros()).unwrap_or(0);
        let jitter = Duration::from_micros(self.rng.random_range(0..=jitter_max));
        let Some(p) = self.pending.get_mut(&index) else {
            return;
        };
        p.next_send = now + backoff + jitter;
        match sent {
            Ok((hs, msg)) => {
                p.hs = Some(hs);
                p.attempts += 1;
                if attempts > 0 {
                    self.counters.init_retries += 1;
                }
                self.counters.inits_sent += 1;
                prune(&mut self.last_init, now, self.limits.max_rate_entries);
                self.last_init.insert(dst.subnet(), now);
                self.queue_transmit(dst, Kind::HandshakeInit, 0, &msg);
            }
            Err(e) => tracing::warn!(error = %e, "e2e handshake initiation failed locally"),
        }
    }

    fn next_timestamp(&mut self, now: Instant) -> Timestamp {
        let wall = self.wall_clock + now.saturating_duration_since(self.epoch);
        let mut t = Timestamp::from_unix(wall);
        if t <= self.last_timestamp {
            t = self.last_timestamp.succ();
        }
        self.last_timestamp = t;
        t
    }

    fn remember_timestamp(&mut self, key: PublicKey, t: Timestamp) {
        let seq = self.replay_seq;
        self.replay_seq += 1;
        if let Some((_, old)) = self.replay.insert(key, (t, seq)) {
            self.replay_order.remove(&old);
        }
        self.replay_order.insert(seq, key);
        while self.replay.len() > self.limits.max_replay_entries {
            let Some((_, oldest)) = self.replay_order.pop_first() else {
                break;
            };
            self.replay.remove(&oldest);
        }
    }

    fn take_init_token(&mut self, now: Instant) -> Result<(), E2eError> {
        let elapsed = now.saturating_duration_since(self.init_tokens_at);
        self.init_tokens_at = now;
        let earned = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .saturating_mul(u64::from(self.limits.init_rate));
        let burst = u64::from(self.limits.init_burst) * TOKEN;
        self.init_tokens = self.init_tokens.saturating_add(earned).min(burst);
        if self.init_tokens < TOKEN {
            return Err(E2eError::RateLimited);
        }
        self.init_tokens -= TOKEN;
        Ok(())
    }

    fn cancel_pending(&mut self, net: Subnet) {
        if let Some(idx) = self.pending_by_dst.remove(&net) {
            self.pending.remove(&idx);
        }
    }

    fn fresh_index(&mut self) -> u32 {
        loop {
            let i: u32 = self.rng.random();
            if i != 0 && !self.sessions.contains_key(&i) && !self.pending.contains_key(&i) {
                return i;
            }
        }
    }

    fn add_session(
        &mut self,
        now: Instant,
        local_index: u32,
        mut s: Session,
        tx_key: [u8; 32],
        rx_key: [u8; 32],
    ) {
        let peer = s.peer;
        // Make room: per peer, then unconfirmed responder sessions, then overall. Unconfirmed
        // sessions go first, oldest first.
        let peer_count = self.by_peer.get(&peer.subnet()).map_or(0, Vec::len);
        if peer_count >= self.limits.max_sessions_per_peer {
            let list = self
                .by_peer
                .get(&peer.subnet())
                .cloned()
                .unwrap_or_default();
            self.evict_one(list.into_iter(), |_| true);
        }
        if s.role == Role::Responder {
            let unconfirmed = self
                .sessions
                .values()
                .filter(|o| o.role == Role::Responder && !o.confirmed)
                .count();
            if unconfirmed >= self.limits.max_unconfirmed {
                let all: Vec<u32> = self.sessions.keys().copied().collect();
                self.evict_one(all.into_iter(), |o| {
                    o.role == Role::Responder && !o.confirmed
                });
            }
        }
        if self.sessions.len() >= self.limits.max_sessions {
            let all: Vec<u32> = self.sessions.keys().copied().collect();
            self.evict_one(all.into_iter(), |_| true);
        }
        s.seq = self.next_seq;
        self.next_seq += 1;
        let event = Event::Install {
            peer,
            peer_key: s.peer_key,
            local_index,
            remote_index: s.remote_index,
            tx_key,
            rx_key,
            cipher: s.cipher,
            role: s.role,
            created: now,
        };
        tracing::debug!(%peer, local_index, role = ?s.role, "e2e session installed");
        self.sessions.insert(local_index, s);
        self.by_peer
            .entry(peer.subnet())
            .or_default()
            .push(local_index);
        self.counters.sessions_installed += 1;
        self.push_event(event);
    }

    /// Evicts the oldest session among `candidates`, preferring unconfirmed ones, restricted to those
    /// matching `filter`.
    fn evict_one(
        &mut self,
        candidates: impl Iterator<Item = u32>,
        filter: impl Fn(&Session) -> bool,
    ) {
        let victim = candidates
            .filter_map(|i| self.sessions.get(&i).map(|s| (i, s)))
            .filter(|(_, s)| filter(s))
            .min_by_key(|(_, s)| (s.confirmed, s.seq))
            .map(|(i, _)| i);
        if let Some(idx) = victim {
            self.counters.sessions_evicted += 1;
            self.remove_session(idx);
        }
    }

    fn remove_session(&mut self, local_index: u32) {
        let Some(s) = self.sessions.remove(&local_index) else {
            return;
        };
        if let Some(list) = self.by_peer.get_mut(&s.peer.subnet()) {
            list.retain(|&i| i != local_index);
            if list.is_empty() {
                self.by_peer.remove(&s.peer.subnet());
            }
        }
        self.counters.sessions_removed += 1;
        self.push_event(Event::Remove { local_index });
    }

    fn queue_transmit(&mut self, dst: OverlayAddr, kind: Kind, receiver_index: u32, msg: &[u8]) {
        if self.transmits.len() >= self.limits.max_queued {
            self.counters.queue_overflow += 1;
            return;
        }
        let mut bytes = vec![0u8; HEADER_LEN + msg.len()];
        let mut packet = Packet::new_unchecked(&mut bytes[..]);
        Repr {
            hop_limit: self.hop_limit,
            kind,
            receiver_index,
            counter: 0,
            src: self.address.ip(),
            dst: dst.ip(),
        }
        .emit(&mut packet);
        packet.payload_mut().copy_from_slice(msg);
        self.transmits.push_back((dst, bytes));
    }

    fn push_event(&mut self, event: Event) {
        if self.events.len() >= self.limits.max_queued {
            self.counters.queue_overflow += 1;
            return;
        }
        self.events.push_back(event);
    }
}

fn noise(e: NoiseError) -> E2eError {
    match e {
        NoiseError::Setup(e) => E2eError::Local(e),
        NoiseError::Rejected(e) => E2eError::AuthFailed(e),
        NoiseError::Length(n) => E2eError::BadLength(n),
        NoiseError::NoPeerKey => E2eError::AuthFailed(snow::Error::Input),
    }
}

/// Drops entries older than [`REKEY_TIMEOUT`] (they no longer limit anything) once the table is
/// full, and the oldest ones if it is still full.
fn prune(map: &mut HashMap<Subnet, Instant>, now: Instant, cap: usize) {
    if map.len() < cap {
        return;
    }
    map.retain(|_, &mut t| now < t + REKEY_TIMEOUT);
    while map.len() >= cap {
        let Some(oldest) = map.iter().min_by_key(|(a, &t)| (t, **a)).map(|(a, _)| *a) else {
            break;
        };
        map.remove(&oldest);
    }
}
