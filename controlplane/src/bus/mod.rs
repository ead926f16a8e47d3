//! The message bus: reliable, chunked messages between overlay nodes, carried as bus frames
//! ([`frame`]) inside E2E TRANSPORT payloads of inner type 0x01, so relays can't tell them from IP
//! traffic.
//!
//! Why a protocol of its own and not TCP over the overlay: messages are addressed to a node, not a
//! socket; they must survive the sender's application going away (status is queryable later), and
//! their memory must be bounded and accounted per peer. So the bus is a small selective-repeat ARQ:
//! a message is cut into chunks that fit the path MTU, every chunk is acknowledged (cumulative +
//! selective bitmap), lost chunks are retransmitted after an RTT-based timeout (RFC 6298) with
//! exponential backoff until the receiver confirms the whole message (checksum verified) or the
//! message's deadline passes, which aborts it explicitly.
//!
//! [`Bus`] is a sans-IO core in quinn-proto's shape. Inputs: [`Bus::push`] (a command),
//! [`Bus::handle_frame`], [`Bus::handle_timeout`], [`Bus::handle_path_up`]. After every input the caller drains, in this
//! order, [`Bus::poll_transmit`] (until `None`), then [`Bus::poll_event`], then sleeps until
//! [`Bus::poll_timeout`]. Getters: [`Bus::status`], [`Bus::counters`]. Time always comes in as
//! `now`; inputs must carry non-decreasing times; a spurious `handle_timeout` does nothing.
//!
//! Memory: every byte the bus holds is counted ([`Counters::outbound_bytes`],
//! [`Counters::inbound_bytes`]) against per-peer and total limits. A push that doesn't fit fails with
//! a [`PushError`]; a chunk of a new inbound message that doesn't fit is dropped unacknowledged, so
//! the sender retries later (backpressure, never a silent loss of something already accepted).

pub mod api;
pub mod client;
pub mod frame;
mod rtt;
pub mod shared;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use hypha_proto::addr::OverlayAddr;
use hypha_proto::time::Instant;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use thiserror::Error;

use frame::{Ack, DataChunk, Frame, FrameError, CHECKSUM_LEN, MAX_ACK_BITMAP, MAX_TOPIC_LEN};
use rtt::RttEstimator;

/// Bytes charged per message on top of its payload, so that many empty messages are bounded too.
pub const MESSAGE_OVERHEAD: usize = 256;

/// A message id: 64 random bits, shown as 16 hex digits (Mycelium's format).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub u64);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A string that is not 16 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid message id {0:?} (expected 16 hex digits)")]
pub struct InvalidMessageId(pub String);

impl FromStr for MessageId {
    type Err = InvalidMessageId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(InvalidMessageId(s.to_owned()));
        }
        u64::from_str_radix(s, 16)
            .map(MessageId)
            .map_err(|_| InvalidMessageId(s.to_owned()))
    }
}

/// Limits and timers of the bus.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// Largest message payload accepted, in either direction.
    pub max_message_size: usize,
    /// Payload bytes per chunk (the path MTU minus the data header, AEAD tag and bus header).
    pub chunk_size: usize,
    /// Deadline of a push that gives none.
    pub default_deadline: Duration,
    /// Bytes held for outbound messages not yet delivered, all destinations.
    pub max_outbound_total: usize,
    /// Bytes held for outbound messages not yet delivered, per destination.
    pub max_outbound_per_dst: usize,
    /// Bytes held for inbound messages being reassembled or received but unread, all sources.
    pub max_inbound_total: usize,
    /// The same per source.
    pub max_inbound_per_src: usize,
    /// Chunks of one message sent and not yet acknowledged.
    pub window: u32,
    /// RTO before the first RTT sample.
    pub initial_rto: Duration,
    /// Lower bound on the RTO.
    pub min_rto: Duration,
    /// Upper bound on the RTO, also after backoff.
    pub max_rto: Duration,
    /// How long a receiver remembers completed message ids (to suppress duplicates and re-confirm).
    /// Keep it longer than senders' deadlines.
    pub completed_ttl: Duration,
    /// How many completed ids are remembered at most (oldest forgotten first).
    pub max_completed: usize,
    /// How long the status of a finished message (delivered, read, aborted) stays queryable.
    pub status_ttl: Duration,
    /// How many finished statuses are kept at most (oldest forgotten first).
    pub max_status: usize,
    /// A reassembly that gets no chunk for this long is dropped (its sender gave up).
    pub reassembly_timeout: Duration,
    /// Seed of the message-id generator (tests pass a fixed one; the daemon a random one).
    pub rng_seed: u64,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            max_message_size: 1 << 20,
            chunk_size: 1200,
            default_deadline: Duration::from_secs(300),
            max_outbound_total: 32 << 20,
            max_outbound_per_dst: 4 << 20,
            max_inbound_total: 32 << 20,
            max_inbound_per_src: 4 << 20,
            window: 128,
            initial_rto: Duration::from_millis(500),
            min_rto: Duration::from_millis(100),
            max_rto: Duration::from_secs(10),
            completed_ttl: Duration::from_secs(600),
            max_completed: 16_384,
            status_ttl: Duration::from_secs(3600),
            max_status: 16_384,
            reassembly_timeout: Duration::from_secs(120),
            rng_seed: 0,
        }
    }
}

/// Why a push was refused. Nothing was queued.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PushError {
    /// The payload exceeds [`BusConfig::max_message_size`].
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The topic is longer than 255 bytes.
    #[error("topic of {0} bytes exceeds 255 bytes")]
    TopicTooLong(usize),
    /// The deadline is zero.
    #[error("deadline must be positive")]
    InvalidDeadline,
    /// The destination already has [`BusConfig::max_outbound_per_dst`] bytes in flight.
    #[error("too many bytes in flight to {0}; retry later")]
    DestinationFull(OverlayAddr),
    /// All destinations together have [`BusConfig::max_outbound_total`] bytes in flight.
    #[error("too many bytes in flight in total; retry later")]
    TotalFull,
}

/// Why a received frame was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BusError {
    /// The bytes are not a bus frame.
    #[error("malformed bus frame: {0}")]
    InvalidMessage(#[from] FrameError),
    /// A well-formed chunk that contradicts earlier chunks of the same message (total, count,
    /// checksum, reply-to), or a message larger than our limit.
    #[error("peer misbehaved: {0}")]
    PeerMisbehaved(&'static str),
}

/// Something the application may want to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Our message reached its destination whole.
    Delivered {
        /// The message.
        id: MessageId,
    },
    /// A message arrived and waits in the inbox.
    Received {
        /// The message.
        id: MessageId,
    },
    /// Our message's deadline passed before it was delivered; its memory is released.
    Aborted {
        /// The message.
        id: MessageId,
    },
}

/// Where a message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageState {
    /// Outbound, accepted, no chunk sent yet.
    Pending,
    /// Outbound, chunks on their way (counts of chunks).
    Sending {
        /// Never sent.
        pending: u32,
        /// Sent, not acknowledged.
        sent: u32,
        /// Acknowledged.
        acked: u32,
    },
    /// Outbound, the receiver confirmed the whole message.
    Delivered,
    /// Outbound, the deadline passed first.
    Aborted,
    /// Inbound, waiting in the inbox.
    Received,
    /// Inbound, taken from the inbox by the application.
    Read,
}

/// Which way a message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// We send it.
    Outbound,
    /// We received it.
    Inbound,
}

/// What [`Bus::status`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageStatus {
    /// Which way.
    pub direction: Direction,
    /// The other end (destination of an outbound message, source of an inbound one).
    pub peer: OverlayAddr,
    /// State.
    pub state: MessageState,
    /// When it was pushed or fully received.
    pub created: Instant,
    /// When an outbound message is aborted if still undelivered (inbound: equals `created`).
    pub deadline: Instant,
    /// Payload length.
    pub len: usize,
}

/// A message in the inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    /// Its id (chosen by the sender).
    pub id: MessageId,
    /// The sender.
    pub src: OverlayAddr,
    /// Topic (empty when none).
    pub topic: Vec<u8>,
    /// The message.
    pub payload: Vec<u8>,
    /// The message this one answers.
    pub reply_to: Option<MessageId>,
    /// When its last chunk arrived.
    pub received_at: Instant,
}

/// Counters, and the bytes held now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes held for outbound messages not yet finished (payload + [`MESSAGE_OVERHEAD`] each).
    pub outbound_bytes: usize,
    /// Bytes held for inbound messages in reassembly or unread (full length + overhead each).
    pub inbound_bytes: usize,
    /// Outbound messages not yet finished.
    pub outbound_active: usize,
    /// Inbound reassemblies in progress.
    pub reassemblies: usize,
    /// Messages waiting in the inbox.
    pub inbox_len: usize,
    /// Messages accepted by `push`.
    pub pushed: u64,
    /// Pushes refused.
    pub push_refused: u64,
    /// Outbound messages confirmed delivered.
    pub delivered: u64,
    /// Outbound messages aborted at their deadline.
    pub aborted: u64,
    /// Inbound messages completed (checksum verified) and put in the inbox.
    pub received: u64,
    /// Inbound messages taken from the inbox.
    pub read: u64,
    /// Data chunks sent, first transmissions.
    pub chunks_sent: u64,
    /// Data chunks sent again.
    pub chunks_retransmitted: u64,
    /// Data chunks received (including duplicates).
    pub chunks_received: u64,
    /// Received chunks we already had, or of messages already completed.
    pub duplicate_chunks: u64,
    /// Chunks of new messages dropped because the inbound limits were reached (sender will retry).
    pub chunks_refused_full: u64,
    /// Acks sent.
    pub acks_sent: u64,
    /// Acks received.
    pub acks_received: u64,
    /// Acks for messages we don't (or no longer) know.
    pub acks_unknown: u64,
    /// Reassembled messages whose checksum failed.
    pub checksum_failures: u64,
    /// Frames that didn't parse.
    pub malformed_frames: u64,
    /// Well-formed frames that contradicted earlier ones or our limits.
    pub misbehaving_frames: u64,
    /// Reassemblies dropped after [`BusConfig::reassembly_timeout`] without chunks.
    pub reassemblies_expired: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct ChunkState {
    acked: bool,
    /// Waiting in the send queue.
    queued: bool,
    /// Counted against the window (queued or sent, not acked).
    in_window: bool,
    transmissions: u32,
    /// Doublings of the RTO for this chunk's next retransmission: one per transmission, back to
    /// one when the path shows progress again (an ack for new chunks), as TCP resets its backoff.
    backoff: u32,
    sent_at: Option<Instant>,
    retransmit_at: Option<Instant>,
}

#[derive(Debug)]
enum OutPhase {
    Sending,
    Delivered,
    Aborted,
}

#[derive(Debug)]
struct Outbound {
    dst: OverlayAddr,
    topic: Vec<u8>,
    /// Emptied (and its memory released) when the message finishes.
    payload: Vec<u8>,
    len: usize,
    reply_to: Option<MessageId>,
    checksum: [u8; CHECKSUM_LEN],
    chunks: Vec<ChunkState>,
    /// Chunk sizes: every chunk but the last has `chunk_size` bytes.
    chunk_size: usize,
    acked: u32,
    in_window: u32,
    /// Lowest chunk index never queued.
    next_new: u32,
    /// When every chunk is acked but no COMPLETE came: when to probe again with the last chunk.
    probe_at: Option<Instant>,
    probes: u32,
    created: Instant,
    deadline: Instant,
    phase: OutPhase,
    finished_at: Option<Instant>,
}

impl Outbound {
    fn count(&self) -> u32 {
        self.chunks.len() as u32
    }

    fn chunk_bounds(&self, index: u32) -> (usize, usize) {
        let start = index as usize * self.chunk_size;
        let end = (start + self.chunk_size).min(self.len);
        (start, end)
    }

    fn held(&self) -> usize {
        self.len + MESSAGE_OVERHEAD
    }
}

#[derive(Debug)]
struct Reassembly {
    buf: Vec<u8>,
    have: Vec<bool>,
    received: u32,
    cumulative: u32,
    topic: Option<Vec<u8>>,
    total_len: u32,
    checksum: [u8; CHECKSUM_LEN],
    reply_to: Option<u64>,
    last_activity: Instant,
}

impl Reassembly {
    fn held(&self) -> usize {
        self.total_len as usize + MESSAGE_OVERHEAD
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckKind {
    Progress,
    Complete,
    Failed,
}

#[derive(Debug, Clone, Copy)]
struct PendingAck {
    kind: AckKind,
    echo: u32,
}

#[derive(Debug)]
struct InboundRecord {
    src: OverlayAddr,
    created: Instant,
    len: usize,
    read_at: Option<Instant>,
}

type InKey = (OverlayAddr, u64);

/// The message bus core. See the module documentation for the call order.
#[derive(Debug)]
pub struct Bus {
    cfg: BusConfig,
    rng: StdRng,
    outbound: HashMap<MessageId, Outbound>,
    /// Finished outbound ids in finishing order (for status expiry).
    finished_out: VecDeque<MessageId>,
    outbound_per_dst: HashMap<OverlayAddr, usize>,
    rtt: HashMap<OverlayAddr, RttEstimator>,
    send_queue: VecDeque<MessageId>,
    reassembly: HashMap<InKey, Reassembly>,
    completed: HashMap<InKey, Instant>,
    completed_order: VecDeque<(InKey, Instant)>,
    inbound_per_src: HashMap<OverlayAddr, usize>,
    inbox: VecDeque<InboundMessage>,
    inbound_status: HashMap<MessageId, InboundRecord>,
    read_order: VecDeque<MessageId>,
    acks: HashMap<InKey, PendingAck>,
    ack_queue: VecDeque<InKey>,
    events: VecDeque<Event>,
    counters: Counters,
    scratch_bitmap: Vec<u8>,
}

impl Bus {
    /// A bus with no messages.
    pub fn new(cfg: BusConfig, _now: Instant) -> Bus {
        let chunk_size = cfg.chunk_size.clamp(1, u16::MAX as usize);
        let cfg = BusConfig { chunk_size, ..cfg };
        Bus {
            rng: StdRng::seed_from_u64(cfg.rng_seed),
            cfg,
            outbound: HashMap::new(),
            finished_out: VecDeque::new(),
            outbound_per_dst: HashMap::new(),
            rtt: HashMap::new(),
            send_queue: VecDeque::new(),
            reassembly: HashMap::new(),
            completed: HashMap::new(),
            completed_order: VecDeque::new(),
            inbound_per_src: HashMap::new(),
            inbox: VecDeque::new(),
            inbound_status: HashMap::new(),
            read_order: VecDeque::new(),
            acks: HashMap::new(),
            ack_queue: VecDeque::new(),
            events: VecDeque::new(),
            counters: Counters::default(),
            scratch_bitmap: Vec::with_capacity(MAX_ACK_BITMAP),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &BusConfig {
        &self.cfg
    }

    /// Queues a message to `dst`. `deadline` is relative to `now` (default
    /// [`BusConfig::default_deadline`]); `reply_to` marks it as the answer to an inbound message.
    pub fn push(
        &mut self,
        now: Instant,
        dst: OverlayAddr,
        topic: &[u8],
        payload: Vec<u8>,
        deadline: Option<Duration>,
        reply_to: Option<MessageId>,
    ) -> Result<MessageId, PushError> {
        let r = self.try_push(now, dst, topic, payload, deadline, reply_to);
        match r {
            Ok(_) => self.counters.pushed += 1,
            Err(_) => self.counters.push_refused += 1,
        }
        r
    }

    fn try_push(
        &mut self,
        now: Instant,
        dst: OverlayAddr,
        topic: &[u8],
        payload: Vec<u8>,
        deadline: Option<Duration>,
        reply_to: Option<MessageId>,
    ) -> Result<MessageId, PushError> {
        let len = payload.len();
        if len > self.cfg.max_message_size || len > u32::MAX as usize {
            return Err(PushError::TooLarge {
                len,
                max: self.cfg.max_message_size,
            });
        }
        if topic.len() > MAX_TOPIC_LEN {
            return Err(PushError::TopicTooLong(topic.len()));
        }
        let deadline = deadline.unwrap_or(self.cfg.default_deadline);
        if deadline.is_zero() {
            return Err(PushError::InvalidDeadline);
        }
        let held = len + MESSAGE_OVERHEAD;
        let per_dst = self.outbound_per_dst.get(&dst).copied().unwrap_or(0);
        if per_dst + held > self.cfg.max_outbound_per_dst {
            return Err(PushError::DestinationFull(dst));
        }
        if self.counters.outbound_bytes + held > self.cfg.max_outbound_total {
            return Err(PushError::TotalFull);
        }
        let id = loop {
            let id = MessageId(self.rng.next_u64());
            // 0 means "no reply-to" on the wire; skip it and (astronomically unlikely) collisions.
            if id.0 != 0 && !self.outbound.contains_key(&id) {
                break id;
            }
        };
        let count = len.div_ceil(self.cfg.chunk_size).max(1);
        let msg = Outbound {
            dst,
            topic: topic.to_vec(),
            checksum: frame::checksum(&payload),
            payload,
            len,
            reply_to,
            chunks: vec![ChunkState::default(); count],
            chunk_size: self.cfg.chunk_size,
            acked: 0,
            in_window: 0,
            next_new: 0,
            probe_at: None,
            probes: 0,
            created: now,
            deadline: now + deadline,
            phase: OutPhase::Sending,
            finished_at: None,
        };
        *self.outbound_per_dst.entry(dst).or_insert(0) += held;
        self.counters.outbound_bytes += held;
        self.counters.outbound_active += 1;
        self.outbound.insert(id, msg);
        self.fill_window(id);
        Ok(id)
    }

    /// Queues never-sent chunks of `id` while its window has room.
    fn fill_window(&mut self, id: MessageId) {
        let window = self.cfg.window.max(1);
        let Some(m) = self.outbound.get_mut(&id) else {
            return;
        };
        let mut queued_any = false;
        while m.in_window < window && m.next_new < m.count() {
            if let Some(c) = m.chunks.get_mut(m.next_new as usize) {
                if !c.acked && !c.in_window {
                    c.in_window = true;
                    if !c.queued {
                        c.queued = true;
                        queued_any = true;
                    }
                    m.in_window += 1;
                }
            }
            m.next_new += 1;
        }
        if queued_any {
            self.send_queue.push_back(id);
        }
    }

    /// Processes one bus frame from `src` (already decrypted and authenticated by the E2E layer).
    pub fn handle_frame(
        &mut self,
        now: Instant,
        src: OverlayAddr,
        bytes: &[u8],
    ) -> Result<(), BusError> {
        let frame = match Frame::parse(bytes) {
            Ok(f) => f,
            Err(e) => {
                self.counters.malformed_frames += 1;
                return Err(e.into());
            }
        };
        let r = match frame {
            Frame::Data(chunk) => self.on_chunk(now, src, &chunk),
            Frame::Ack(ack) => {
                self.on_ack(now, src, &ack);
                Ok(())
            }
        };
        if r.is_err() {
            self.counters.misbehaving_frames += 1;
        }
        r
    }

    fn queue_ack(&mut self, key: InKey, kind: AckKind, echo: u32) {
        match self.acks.get_mut(&key) {
            Some(p) => {
                p.echo = echo;
                // A verdict (complete/failed) wins over progress.
                if kind != AckKind::Progress || p.kind == AckKind::Progress {
                    p.kind = kind;
                }
            }
            None => {
                self.acks.insert(key, PendingAck { kind, echo });
                self.ack_queue.push_back(key);
            }
        }
    }

    fn on_chunk(
        &mut self,
        now: Instant,
        src: OverlayAddr,
        c: &DataChunk<'_>,
    ) -> Result<(), BusError> {
        self.counters.chunks_received += 1;
        let key = (src, c.id);
        if self.completed.contains_key(&key) {
            self.counters.duplicate_chunks += 1;
            self.queue_ack(key, AckKind::Complete, c.index);
            return Ok(());
        }
        if !self.reassembly.contains_key(&key) {
            let total = c.total_len as usize;
            if total > self.cfg.max_message_size {
                return Err(BusError::PeerMisbehaved("message larger than our limit"));
            }
            let held = total + MESSAGE_OVERHEAD;
            let per_src = self.inbound_per_src.get(&src).copied().unwrap_or(0);
            if per_src + held > self.cfg.max_inbound_per_src
                || self.counters.inbound_bytes + held > self.cfg.max_inbound_total
            {
                // Not accepted, not acked: the sender retries with backoff until space frees up.
                self.counters.chunks_refused_full += 1;
                return Ok(());
            }
            *self.inbound_per_src.entry(src).or_insert(0) += held;
            self.counters.inbound_bytes += held;
            self.counters.reassemblies += 1;
            self.reassembly.insert(
                key,
                Reassembly {
                    buf: vec![0; total],
                    have: vec![false; c.count as usize],
                    received: 0,
                    cumulative: 0,
                    topic: None,
                    total_len: c.total_len,
                    checksum: c.checksum,
                    reply_to: c.reply_to,
                    last_activity: now,
                },
            );
        }
        let Some(r) = self.reassembly.get_mut(&key) else {
            return Ok(());
        };
        if r.total_len != c.total_len
            || r.have.len() != c.count as usize
            || r.checksum != c.checksum
            || r.reply_to != c.reply_to
        {
            return Err(BusError::PeerMisbehaved(
                "chunk contradicts earlier chunks of its message",
            ));
        }
        r.last_activity = now;
        let idx = c.index as usize;
        match r.have.get(idx) {
            Some(true) => {
                self.counters.duplicate_chunks += 1;
            }
            Some(false) => {
                let start = c.offset as usize;
                let Some(dst) = r.buf.get_mut(start..start + c.data.len()) else {
                    return Err(BusError::PeerMisbehaved("chunk outside its message"));
                };
                dst.copy_from_slice(c.data);
                if let Some(h) = r.have.get_mut(idx) {
                    *h = true;
                }
                if idx == 0 {
                    r.topic = Some(c.topic.to_vec());
                }
                r.received += 1;
                while r.have.get(r.cumulative as usize).copied().unwrap_or(false) {
                    r.cumulative += 1;
                }
            }
            None => return Err(BusError::PeerMisbehaved("chunk index past count")),
        }
        if r.received as usize == r.have.len() {
            self.complete_reassembly(now, key, c.index);
        } else {
            self.queue_ack(key, AckKind::Progress, c.index);
        }
        Ok(())
    }

    fn release_inbound(&mut self, src: OverlayAddr, held: usize) {
        self.counters.inbound_bytes = self.counters.inbound_bytes.saturating_sub(held);
        if let Some(v) = self.inbound_per_src.get_mut(&src) {
            *v = v.saturating_sub(held);
            if *v == 0 {
                self.inbound_per_src.remove(&src);
            }
        }
    }

    fn complete_reassembly(&mut self, now: Instant, key: InKey, echo: u32) {
        let Some(r) = self.reassembly.remove(&key) else {
            return;
        };
        self.counters.reassemblies = self.counters.reassemblies.saturating_sub(1);
        let (src, raw_id) = key;
        if frame::checksum(&r.buf) != r.checksum {
            self.counters.checksum_failures += 1;
            self.release_inbound(src, r.held());
            self.queue_ack(key, AckKind::Failed, echo);
            return;
        }
        let id = MessageId(raw_id);
        let len = r.buf.len();
        // The bytes stay charged to the source until the application reads the message.
        self.inbox.push_back(InboundMessage {
            id,
            src,
            topic: r.topic.unwrap_or_default(),
            payload: r.buf,
            reply_to: r.reply_to.map(MessageId),
            received_at: now,
        });
        self.inbound_status.insert(
            id,
            InboundRecord {
                src,
                created: now,
                len,
                read_at: None,
            },
        );
        self.remember_completed(key, now);
        self.counters.received += 1;
        self.counters.inbox_len = self.inbox.len();
        self.events.push_back(Event::Received { id });
        self.queue_ack(key, AckKind::Complete, echo);
    }

    fn remember_completed(&mut self, key: InKey, now: Instant) {
        let until = now + self.cfg.completed_ttl;
        self.completed.insert(key, until);
        self.completed_order.push_back((key, until));
        while self.completed_order.len() > self.cfg.max_completed {
            if let Some((k, t)) = self.completed_order.pop_front() {
                if self.completed.get(&k) == Some(&t) {
                    self.completed.remove(&k);
                }
            }
        }
    }

    fn on_ack(&mut self, now: Instant, src: OverlayAddr, ack: &Ack<'_>) {
        self.counters.acks_received += 1;
        let id = MessageId(ack.id);
        let Some(m) = self.outbound.get_mut(&id) else {
            self.counters.acks_unknown += 1;
            return;
        };
        if m.dst != src || !matches!(m.phase, OutPhase::Sending) {
            self.counters.acks_unknown += 1;
            return;
        }
        if ack.complete {
            self.finish(now, id, true);
            return;
        }
        // An answer to a probe (the last chunk, sent again while everything was acked) that is not
        // COMPLETE means the receiver no longer has the message.
        let probe_answer = m.acked == m.count() && m.probes > 0 && ack.echo + 1 == m.count();
        if ack.failed || probe_answer {
            // The receiver lost or discarded what we thought it had (checksum failure, or it
            // forgot a reassembly): take its view as the truth and send what it lacks.
            for (i, c) in m.chunks.iter_mut().enumerate() {
                if c.acked && (ack.failed || !ack.acks(i as u32)) {
                    c.acked = false;
                    c.transmissions = 0;
                    c.backoff = 0;
                    c.sent_at = None;
                    c.retransmit_at = None;
                    m.acked -= 1;
                }
            }
            m.in_window = m.chunks.iter().filter(|c| c.in_window).count() as u32;
            m.next_new = m
                .chunks
                .iter()
                .position(|c| !c.acked && !c.in_window)
                .map(|p| p as u32)
                .unwrap_or(m.count());
            m.probe_at = None;
            m.probes = 0;
            self.fill_window(id);
            return;
        }
        // Selective-repeat bookkeeping over the part of the message the ack can describe.
        let hi = (ack.cumulative as u64 + 1 + (ack.bitmap.len() as u64) * 8).min(m.next_new as u64);
        let acked_before = m.acked;
        let mut sample = None;
        for i in 0..hi as u32 {
            let Some(c) = m.chunks.get_mut(i as usize) else {
                break;
            };
            if !c.acked && ack.acks(i) {
                c.acked = true;
                c.retransmit_at = None;
                if c.in_window {
                    c.in_window = false;
                    m.in_window -= 1;
                }
                m.acked += 1;
                if i == ack.echo && c.transmissions == 1 {
                    sample = c.sent_at.map(|t| now.saturating_duration_since(t));
                }
            }
        }
        let progress = m.acked > acked_before;
        if let Some(s) = sample {
            self.rtt_mut(src).on_sample(s);
        }
        let rto = self.rtt_mut(src).rto();
        let Some(m) = self.outbound.get_mut(&id) else {
            return;
        };
        if progress {
            // The path works (again): chunks backed off while it didn't (no E2E session yet, a
            // link down) are due one plain RTO from now instead of up to `max_rto`.
            for c in m.chunks.iter_mut().filter(|c| !c.acked && c.backoff > 1) {
                c.backoff = 1;
                c.retransmit_at = c.retransmit_at.map(|t| t.min(now + rto));
            }
        }
        if m.acked == m.count() && m.probe_at.is_none() {
            // Everything acked; the COMPLETE may have been lost. Probe after an RTO.
            let rto = self
                .rtt
                .get(&src)
                .map(|r| r.rto())
                .unwrap_or(self.cfg.initial_rto);
            m.probe_at = Some(now + rto);
        }
        self.fill_window(id);
    }

    fn rtt_mut(&mut self, dst: OverlayAddr) -> &mut RttEstimator {
        let (i, mi, ma) = (self.cfg.initial_rto, self.cfg.min_rto, self.cfg.max_rto);
        self.rtt
            .entry(dst)
            .or_insert_with(|| RttEstimator::new(i, mi, ma))
    }

    /// Finishes an outbound message: releases its payload and emits the event.
    fn finish(&mut self, now: Instant, id: MessageId, delivered: bool) {
        let Some(m) = self.outbound.get_mut(&id) else {
            return;
        };
        if !matches!(m.phase, OutPhase::Sending) {
            return;
        }
        m.phase = if delivered {
            OutPhase::Delivered
        } else {
            OutPhase::Aborted
        };
        m.finished_at = Some(now);
        m.payload = Vec::new();
        m.topic = Vec::new();
        m.probe_at = None;
        // Only the status stays: drop the per-chunk state too (a finished 1 MiB message would
        // otherwise keep ~900 chunk records for its status lifetime).
        m.chunks = Vec::new();
        m.in_window = 0;
        let held = m.held();
        let dst = m.dst;
        self.counters.outbound_bytes = self.counters.outbound_bytes.saturating_sub(held);
        self.counters.outbound_active = self.counters.outbound_active.saturating_sub(1);
        if let Some(v) = self.outbound_per_dst.get_mut(&dst) {
            *v = v.saturating_sub(held);
            if *v == 0 {
                self.outbound_per_dst.remove(&dst);
            }
        }
        if delivered {
            self.counters.delivered += 1;
            self.events.push_back(Event::Delivered { id });
        } else {
            self.counters.aborted += 1;
            self.events.push_back(Event::Aborted { id });
        }
        self.finished_out.push_back(id);
        self.trim_finished(now);
    }

    fn trim_finished(&mut self, now: Instant) {
        let (ttl, max) = (self.cfg.status_ttl, self.cfg.max_status);
        trim_statuses(
            &mut self.finished_out,
            &mut self.outbound,
            now,
            ttl,
            max,
            |m| m.finished_at,
        );
        trim_statuses(
            &mut self.read_order,
            &mut self.inbound_status,
            now,
            ttl,
            max,
            |r| r.read_at,
        );
    }

    /// The runtime learned that frames to `dst` can go now where they could not before (its first
    /// E2E session came up): every unacknowledged chunk to it that was sent (and so was dropped
    /// for want of the session) becomes due at once, with its backoff reset, instead of waiting
    /// out an RTO that may have backed off to `max_rto`. Call it only on such a transition: chunks
    /// in flight on a working path would be sent twice.
    pub fn handle_path_up(&mut self, now: Instant, dst: OverlayAddr) {
        for m in self
            .outbound
            .values_mut()
            .filter(|m| m.dst == dst && matches!(m.phase, OutPhase::Sending))
        {
            for c in m.chunks.iter_mut().filter(|c| !c.acked && c.backoff > 0) {
                c.backoff = 0;
                c.retransmit_at = c.retransmit_at.map(|t| t.min(now));
            }
        }
    }

    /// Fires every timer due at `now`: retransmissions, probes, deadlines, expiries.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut due_deadline = Vec::new();
        let mut requeue = Vec::new();
        for (&id, m) in &mut self.outbound {
            if !matches!(m.phase, OutPhase::Sending) {
                continue;
            }
            if m.deadline <= now {
                due_deadline.push(id);
                continue;
            }
            let mut any = false;
            for c in &mut m.chunks {
                if let Some(t) = c.retransmit_at {
                    if t <= now && !c.acked && !c.queued {
                        c.queued = true;
                        c.retransmit_at = None;
                        any = true;
                    }
                }
            }
            if let Some(t) = m.probe_at {
                if t <= now {
                    m.probe_at = None;
                    if let Some(last) = m.chunks.last_mut() {
                        if !last.queued {
                            last.queued = true;
                            any = true;
                        }
                    }
                }
            }
            if any {
                requeue.push(id);
            }
        }
        for id in due_deadline {
            self.finish(now, id, false);
        }
        self.send_queue.extend(requeue);

        // Reassemblies whose sender went quiet.
        let stale: Vec<InKey> = self
            .reassembly
            .iter()
            .filter(|(_, r)| r.last_activity + self.cfg.reassembly_timeout <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            if let Some(r) = self.reassembly.remove(&key) {
                self.counters.reassemblies = self.counters.reassemblies.saturating_sub(1);
                self.counters.reassemblies_expired += 1;
                self.release_inbound(key.0, r.held());
            }
        }
        while let Some(&(k, t)) = self.completed_order.front() {
            if t > now {
                break;
            }
            self.completed_order.pop_front();
            if self.completed.get(&k) == Some(&t) {
                self.completed.remove(&k);
            }
        }
        self.trim_finished(now);
    }

    /// The earliest time [`Bus::handle_timeout`] has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut min = |x: Instant| t = Some(t.map_or(x, |y| y.min(x)));
        for m in self.outbound.values() {
            match m.phase {
                OutPhase::Sending => {
                    min(m.deadline);
                    if let Some(p) = m.probe_at {
                        min(p);
                    }
                    for c in &m.chunks {
                        if let Some(r) = c.retransmit_at {
                            min(r);
                        }
                    }
                }
                OutPhase::Delivered | OutPhase::Aborted => {}
            }
        }
        for r in self.reassembly.values() {
            min(r.last_activity + self.cfg.reassembly_timeout);
        }
        if let Some(&(_, until)) = self.completed_order.front() {
            min(until);
        }
        if let Some(m) = self
            .finished_out
            .front()
            .and_then(|id| self.outbound.get(id))
        {
            if let Some(f) = m.finished_at {
                min(f + self.cfg.status_ttl);
            }
        }
        if let Some(r) = self
            .read_order
            .front()
            .and_then(|id| self.inbound_status.get(id))
        {
            if let Some(f) = r.read_at {
                min(f + self.cfg.status_ttl);
            }
        }
        t
    }

    /// Writes the next bus frame into `buf` and returns its destination; `None` when there is
    /// nothing to send. Acks go first, then data chunks in queue order.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<OverlayAddr> {
        while let Some(key) = self.ack_queue.pop_front() {
            let Some(p) = self.acks.remove(&key) else {
                continue;
            };
            let (src, raw_id) = key;
            self.scratch_bitmap.clear();
            let mut cumulative = 0;
            if p.kind == AckKind::Progress {
                let Some(r) = self.reassembly.get(&key) else {
                    continue;
                };
                cumulative = r.cumulative;
                let base = r.cumulative as usize + 1;
                let end = r.have.len().min(base + MAX_ACK_BITMAP * 8);
                for i in base..end {
                    if r.have.get(i).copied().unwrap_or(false) {
                        let rel = i - base;
                        let byte = rel / 8;
                        if self.scratch_bitmap.len() <= byte {
                            self.scratch_bitmap.resize(byte + 1, 0);
                        }
                        if let Some(b) = self.scratch_bitmap.get_mut(byte) {
                            *b |= 1 << (rel % 8);
                        }
                    }
                }
            }
            Ack {
                id: raw_id,
                complete: p.kind == AckKind::Complete,
                failed: p.kind == AckKind::Failed,
                cumulative,
                echo: p.echo,
                bitmap: &self.scratch_bitmap,
            }
            .emit(buf);
            self.counters.acks_sent += 1;
            return Some(src);
        }
        while let Some(&id) = self.send_queue.front() {
            let rto_base = {
                let Some(m) = self.outbound.get(&id) else {
                    self.send_queue.pop_front();
                    continue;
                };
                self.rtt.get(&m.dst).cloned()
            };
            let rto_base = rto_base.unwrap_or_else(|| {
                RttEstimator::new(self.cfg.initial_rto, self.cfg.min_rto, self.cfg.max_rto)
            });
            let Some(m) = self.outbound.get_mut(&id) else {
                self.send_queue.pop_front();
                continue;
            };
            let next = m.chunks.iter().position(|c| c.queued);
            let Some(i) = next else {
                self.send_queue.pop_front();
                continue;
            };
            let (start, end) = m.chunk_bounds(i as u32);
            let count = m.count();
            let Some(data) = m.payload.get(start..end) else {
                // Finished messages have no payload; nothing left to send for them.
                self.send_queue.pop_front();
                continue;
            };
            let Some(c) = m.chunks.get_mut(i) else {
                self.send_queue.pop_front();
                continue;
            };
            c.queued = false;
            if c.transmissions == 0 {
                self.counters.chunks_sent += 1;
            } else {
                self.counters.chunks_retransmitted += 1;
            }
            c.transmissions += 1;
            c.sent_at = Some(now);
            if c.acked {
                // A probe of an acked chunk: the probe timer, not the chunk's, watches for the answer.
                m.probes += 1;
                m.probe_at = Some(now + rto_base.backed_off(m.probes));
            } else {
                c.retransmit_at = Some(now + rto_base.backed_off(c.backoff));
                c.backoff += 1;
            }
            let topic: &[u8] = if i == 0 { &m.topic } else { &[] };
            DataChunk {
                id: id.0,
                reply_to: m.reply_to.map(|r| r.0),
                total_len: m.len as u32,
                index: i as u32,
                count,
                offset: start as u32,
                topic,
                checksum: m.checksum,
                data,
            }
            .emit(buf);
            let dst = m.dst;
            // Round robin: a message with more queued chunks goes to the back.
            self.send_queue.pop_front();
            if m.chunks.iter().any(|c| c.queued) {
                self.send_queue.push_back(id);
            }
            return Some(dst);
        }
        None
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Where message `id` stands, if we know it (statuses of finished messages expire after
    /// [`BusConfig::status_ttl`]).
    pub fn status(&self, id: MessageId) -> Option<MessageStatus> {
        if let Some(m) = self.outbound.get(&id) {
            let state = match m.phase {
                OutPhase::Delivered => MessageState::Delivered,
                OutPhase::Aborted => MessageState::Aborted,
                OutPhase::Sending => {
                    let sent = m
                        .chunks
                        .iter()
                        .filter(|c| !c.acked && c.transmissions > 0)
                        .count() as u32;
                    if sent == 0 && m.acked == 0 {
                        MessageState::Pending
                    } else {
                        MessageState::Sending {
                            pending: m.count() - sent - m.acked,
                            sent,
                            acked: m.acked,
                        }
                    }
                }
            };
            return Some(MessageStatus {
                direction: Direction::Outbound,
                peer: m.dst,
                state,
                created: m.created,
                deadline: m.deadline,
                len: m.len,
            });
        }
        self.inbound_status.get(&id).map(|r| MessageStatus {
            direction: Direction::Inbound,
            peer: r.src,
            state: if r.read_at.is_some() {
                MessageState::Read
            } else {
                MessageState::Received
            },
            created: r.created,
            deadline: r.created,
            len: r.len,
        })
    }

    /// Whether an inbound message with this id was received (for validating replies).
    pub fn knows_inbound(&self, id: MessageId) -> Option<OverlayAddr> {
        self.inbound_status.get(&id).map(|r| r.src)
    }

    /// Takes (or with `peek`, copies) the oldest inbox message whose topic equals `topic` (any
    /// topic when `None`).
    pub fn pop_inbound(
        &mut self,
        now: Instant,
        topic: Option<&[u8]>,
        peek: bool,
    ) -> Option<InboundMessage> {
        let pos = self
            .inbox
            .iter()
            .position(|m| topic.is_none_or(|t| m.topic == t))?;
        self.take_at(now, pos, peek)
    }

    /// Takes the reply to our message `id`, if it arrived.
    pub fn take_reply(&mut self, now: Instant, id: MessageId) -> Option<InboundMessage> {
        let pos = self.inbox.iter().position(|m| m.reply_to == Some(id))?;
        self.take_at(now, pos, false)
    }

    fn take_at(&mut self, now: Instant, pos: usize, peek: bool) -> Option<InboundMessage> {
        if peek {
            return self.inbox.get(pos).cloned();
        }
        let m = self.inbox.remove(pos)?;
        self.release_inbound(m.src, m.payload.len() + MESSAGE_OVERHEAD);
        if let Some(r) = self.inbound_status.get_mut(&m.id) {
            r.read_at = Some(now);
            self.read_order.push_back(m.id);
        }
        self.counters.read += 1;
        self.counters.inbox_len = self.inbox.len();
        self.trim_finished(now);
        Some(m)
    }

    /// Counters and bytes held.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The smoothed RTT to `dst`, once measured.
    pub fn srtt(&self, dst: OverlayAddr) -> Option<Duration> {
        self.rtt.get(&dst).and_then(|r| r.srtt())
    }
}

/// Forgets the oldest finished records in `order` (oldest first) whose status has been kept for
/// `ttl` since `done_at`, or beyond `max` of them: finished messages stay queryable for a while,
/// in bounded memory.
fn trim_statuses<T>(
    order: &mut VecDeque<MessageId>,
    records: &mut HashMap<MessageId, T>,
    now: Instant,
    ttl: Duration,
    max: usize,
    done_at: impl Fn(&T) -> Option<Instant>,
) {
    while let Some(&id) = order.front() {
        let expired = records
            .get(&id)
            .and_then(&done_at)
            .is_none_or(|t| t + ttl <= now);
        if expired || order.len() > max {
            order.pop_front();
            records.remove(&id);
        } else {
            break;
        }
    }
}
