//! A worker: one thread, one io_uring, one TUN queue, one UDP socket, one buffer pool
//! (thread-per-core, as in monoio; DESIGN.md "Dataplane").
//!
//! The loop: submit and wait for completions (at most [`WAIT`]), load the published tables once,
//! handle the batch of completions, flush packets that were waiting for a session, then refill:
//! provided buffers for the multishot UDP receive, the read on the TUN queue. Everything queued
//! in an iteration is submitted by the next iteration's wait: one `io_uring_enter` per turn.
//!
//! Buffer accounting (STYLE.md, dataplane): every pool index is in exactly one place — the pool's
//! free list, `inflight` (owned by the kernel: a TUN read, a provided buffer, or the target of
//! `refs[i]` sends/writes), the no-session queue, or the local variable of the handler working
//! on it. A received UDP buffer can feed several operations at once (one per GRO segment), hence
//! the reference counts; it goes back to the free list when the last one completes. The
//! `unsafe` blocks here are the calls into [`crate::ring`], whose contract is exactly this rule.

#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::mem::size_of;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use hypha_proto::shm::{Event, PuntReason, Record};
use hypha_proto::time::Instant;
use io_uring::types::RecvMsgOut;

use crate::counters::{Counter, WorkerCounters};
use crate::forward::{
    inbound, outbound, route, seal_slice, Inbound, Outbound, Tables, INITIAL_HOP_LIMIT,
};
use crate::gso;
use crate::icmp;
use crate::pool::{BufLayout, PacketBuf, PacketPool, HEADROOM, TAILROOM};
use crate::ring::{self, BufRing, Completion, Op, Ring};
use crate::session::TAG_LEN;
use crate::state::{upper64, PeerAddr, Shared};
use crate::tun::VNET_HDR_LEN;
use crate::udp::{from_sockaddr, gro_segment_size};
use crate::vnet;
use hypha_proto::wire::data::{Kind, PayloadType, Repr, HEADER_LEN};

/// Longest wait for completions before the loop looks at the stop flag and the queue again.
pub const WAIT: Duration = Duration::from_millis(100);
/// Submission queue entries per ring.
const RING_ENTRIES: u32 = 1024;
/// Buffers kept in the provided-buffer ring for the multishot receive.
const PROVIDED: u16 = 128;
/// Reads kept in flight on the TUN queue: one. A TUN queue has no `FMODE_NOWAIT`, so io_uring
/// waits for it with an internal poll on the queue's wait queue; every packet wakes every armed
/// read, all but one find nothing, and a read that loses 128 times in a row (`APOLL_MAX_RETRY`)
/// is handed to an io-wq thread that blocks in `tun_do_read` — with 64 reads in flight the worker
/// grew a herd of `iou-wrk` threads that were all woken per packet (bench/RESULTS.md, "Profile
/// and fix"). One read never loses: it completes inline at submit when the queue holds a packet,
/// else on the poll wakeup, in the worker's own context. A TSO read carries up to 64 KiB, so one
/// read per loop iteration is not the limit.
const TUN_READS: usize = 1;
/// Send/write slots (each holds a `msghdr` for one in-flight send or write). One GRO receive
/// can turn into ~45 TUN writes, so there are many more slots than send buffers.
const SLOTS: usize = 2048;
/// Pool buffers for sends in flight (sealed TUN packets, GSO batches).
const SEND_BUFFERS: usize = 512;
/// Packets queued per destination while its session is set up.
const QUEUE_PER_DEST: usize = 32;
/// Packets queued in total (per worker).
const QUEUE_TOTAL: usize = 256;
/// Destinations with queued packets (per worker).
const QUEUE_DESTS: usize = 64;
/// How long a packet waits for a session before it is answered with ICMPv6 unreachable.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(3);
/// Events (no route, no session) sent up per second per worker at most.
const EVENTS_PER_SECOND: u32 = 100;
/// Buffer group id of the provided-buffer ring.
const BUFFER_GROUP: u16 = 0;
/// Bytes reserved for the source address in each received buffer.
const RECV_NAME_LEN: usize = size_of::<libc::sockaddr_in6>();
/// Bytes reserved for control messages (the UDP_GRO segment size) in each received buffer.
const RECV_CONTROL_LEN: usize = 64;
/// The `io_uring_recvmsg_out` header in front of each received buffer.
const RECVMSG_OUT_LEN: usize = 16;
/// Where the datagram starts in a received buffer.
const RECV_PAYLOAD_OFFSET: usize = RECVMSG_OUT_LEN + RECV_NAME_LEN + RECV_CONTROL_LEN;

/// virtio_net_hdr flag: the checksums are known good (we authenticated the packet).
const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;

/// Buffers per worker: every provided buffer, TUN read and queued packet, and the send buffers.
pub const POOL_BUFFERS: usize = PROVIDED as usize + TUN_READS + SEND_BUFFERS + QUEUE_TOTAL;

/// What a worker needs to start.
#[derive(Debug)]
pub struct WorkerSetup {
    /// Its index (counter row).
    pub index: usize,
    /// Its UDP socket.
    pub udp: OwnedFd,
    /// Its TUN queue (`None` with `--no-tun`).
    pub tun: Option<File>,
    /// The shared tables.
    pub shared: Arc<Shared>,
    /// Whether the UDP socket takes `UDP_SEGMENT` (GSO) sends.
    pub udp_gso: bool,
}

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// Setting up the ring, the buffer ring or the pool failed.
    #[error("worker setup: {0}")]
    Setup(String),
    /// io_uring submission failed.
    #[error("io_uring: {0}")]
    Ring(#[from] io::Error),
}

/// One in-flight send or write: the `sendmsg` header and its address and iovec, kept at a stable
/// address until the completion.
struct Slot {
    msg: libc::msghdr,
    iov: libc::iovec,
    addr: libc::sockaddr_in6,
    /// A `UDP_SEGMENT` control message (CMSG_SPACE(2) = 24 bytes, 8-aligned).
    control: [u64; 3],
    buf: u32,
    /// The iovec set a gathered TUN write uses ([`NO_IOV_SET`]: none).
    iov_set: u32,
}

/// [`Slot::iov_set`] of a slot without one.
const NO_IOV_SET: u32 = u32::MAX;
/// iovec sets for gathered TUN writes (one per coalesced super-packet in flight). TUN writes
/// complete at submission, so few are ever in flight; without a free set the run is copied.
const IOV_SETS: usize = 64;
/// One iovec set: the head (virtio header and first segment), then one payload per segment.
type IovSet = [libc::iovec; gso::MAX_COALESCED_SEGMENTS];

/// Datagrams per GSO send at most (the kernel's UDP_MAX_SEGMENTS is at least 64).
const GSO_MAX_SEGMENTS: usize = 64;
/// Bytes per GSO send at most (one UDP datagram's worth, less headers).
const GSO_MAX_BYTES: usize = 65_000;

/// What [`Worker::write_run_gathered`] did.
enum Gathered {
    /// The write is in flight.
    Submitted,
    /// Nothing was touched (no free slot or iovec set): copy the run instead.
    NotTried,
    /// The run's head was rewritten but the write could not be submitted: drop the run.
    Failed,
}

/// Transit datagrams of one received buffer going to one next hop, back to back.
struct FwdBatch {
    peer: PeerAddr,
    start: usize,
    end: usize,
    /// Size of each datagram but the last.
    seg: usize,
    count: usize,
}

struct Pending {
    prefix: u64,
    dst: Ipv6Addr,
    since: Instant,
    bufs: VecDeque<PacketBuf>,
}

struct EventLimiter {
    window: Instant,
    count: u32,
}

impl EventLimiter {
    fn allow(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.count = 0;
        }
        self.count += 1;
        self.count <= EVENTS_PER_SECOND
    }
}

struct Worker {
    index: usize,
    shared: Arc<Shared>,
    udp: RawFd,
    tun: Option<RawFd>,
    // Field order matters for Drop: the ring (and the kernel's use of our memory) goes before the
    // buffer ring, the slots and the pool. `run` cancels and reaps before dropping anything.
    ring: Ring,
    buf_ring: BufRing,
    slots: Box<[Slot]>,
    free_slots: Vec<u32>,
    iov_sets: Box<[IovSet]>,
    free_iov_sets: Vec<u32>,
    recv_msg: Box<libc::msghdr>,
    inflight: Vec<Option<PacketBuf>>,
    refs: Vec<u32>,
    pool: PacketPool,
    recv_armed: bool,
    provided: usize,
    tun_reads: usize,
    queue: Vec<Pending>,
    queued: usize,
    events: EventLimiter,
    completions: Vec<Completion>,
    udp_gso: bool,
    /// Decrypted packets of the buffer being handled, waiting to be written to the TUN.
    to_tun: Vec<(usize, usize)>,
}

/// Runs a worker until `shared.stop` is set. Blocks the calling thread.
pub fn run(setup: WorkerSetup) -> Result<(), WorkerError> {
    let WorkerSetup {
        index,
        udp,
        tun,
        shared,
        udp_gso,
    } = setup;
    let ring = Ring::new(RING_ENTRIES)?;
    let buf_ring = BufRing::new(&ring, PROVIDED, BUFFER_GROUP)?;
    let pool = PacketPool::new(POOL_BUFFERS, BufLayout::LARGE)
        .map_err(|e| WorkerError::Setup(e.to_string()))?;
    // Every slot field is set before the slot is submitted.
    let slots = (0..SLOTS)
        .map(|_| Slot {
            msg: zeroed_msghdr(),
            iov: libc::iovec {
                iov_base: core::ptr::null_mut(),
                iov_len: 0,
            },
            addr: crate::udp::to_sockaddr(&SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::UNSPECIFIED,
                0,
                0,
                0,
            ))),
            control: [0; 3],
            buf: 0,
            iov_set: NO_IOV_SET,
        })
        .collect::<Vec<_>>()
        .into_boxed_slice();
    let mut recv_msg = Box::new(zeroed_msghdr());
    recv_msg.msg_namelen = RECV_NAME_LEN as libc::socklen_t;
    recv_msg.msg_controllen = RECV_CONTROL_LEN;
    let now = shared.clock.now();
    let mut w = Worker {
        index,
        udp: udp.as_raw_fd(),
        tun: tun.as_ref().map(AsRawFd::as_raw_fd),
        ring,
        buf_ring,
        slots,
        free_slots: (0..SLOTS as u32).rev().collect(),
        iov_sets: (0..IOV_SETS)
            .map(|_| {
                [libc::iovec {
                    iov_base: core::ptr::null_mut(),
                    iov_len: 0,
                }; gso::MAX_COALESCED_SEGMENTS]
            })
            .collect::<Vec<_>>()
            .into_boxed_slice(),
        free_iov_sets: (0..IOV_SETS as u32).rev().collect(),
        recv_msg,
        inflight: (0..POOL_BUFFERS).map(|_| None).collect(),
        refs: vec![0; POOL_BUFFERS],
        pool,
        recv_armed: false,
        provided: 0,
        tun_reads: 0,
        queue: Vec::with_capacity(QUEUE_DESTS),
        queued: 0,
        events: EventLimiter {
            window: now,
            count: 0,
        },
        completions: Vec::with_capacity(4 * RING_ENTRIES as usize),
        shared,
        udp_gso,
        to_tun: Vec::with_capacity(GSO_MAX_SEGMENTS * 2),
    };
    tracing::debug!(worker = index, "worker running");
    let result = w.run_loop();
    w.shutdown();
    // `udp` and `tun` are closed here, after every operation on them was reaped.
    drop(udp);
    drop(tun);
    result
}

/// A zeroed `msghdr` (all pointers null, all lengths zero).
fn zeroed_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is plain old data (integers and raw pointers, plus private padding on some
    // targets); all-zero is a valid value of every field.
    unsafe { std::mem::zeroed() }
}

impl Worker {
    fn counters(&self) -> &WorkerCounters {
        self.shared.counters.row(self.index)
    }

    fn count(&self, c: Counter) {
        self.counters().inc(c);
    }

    fn run_loop(&mut self) -> Result<(), WorkerError> {
        self.refill()?;
        while !self.shared.stopping() {
            self.ring.submit_and_wait(WAIT)?;
            let mut batch = std::mem::take(&mut self.completions);
            self.ring.reap(&mut batch);
            let fib = self.shared.fib.load();
            let sessions = self.shared.sessions.load();
            let peers = self.shared.peers.load();
            let tables = Tables {
                fib: &fib,
                sessions: &sessions,
                peers: &peers,
                prefix: self.shared.prefix,
                now: self.shared.clock.now(),
            };
            for c in batch.drain(..) {
                self.complete(&tables, c);
            }
            self.completions = batch;
            if self.queued > 0 {
                self.flush_queue(&tables);
            }
            self.refill()?;
            let full = self.ring.sq_full();
            if full > 0 {
                let seen = self.counters().get(Counter::sq_full);
                if full > seen {
                    self.counters().add(Counter::sq_full, full - seen);
                }
            }
        }
        Ok(())
    }

    /// Cancels every operation and reaps until none is in flight (at most two seconds; if the
    /// kernel still holds buffers then, they are leaked rather than freed under it).
    fn shutdown(&mut self) {
        let _ = self.ring.cancel_all();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut batch = Vec::new();
        while self.busy() && std::time::Instant::now() < deadline {
            let _ = self.ring.submit_and_wait(Duration::from_millis(50));
            batch.clear();
            self.ring.reap(&mut batch);
            for c in batch.drain(..) {
                self.settle(c);
            }
        }
        ring::unregister(&self.ring, &self.buf_ring);
        if self.busy() {
            tracing::warn!(
                worker = self.index,
                "operations still in flight at shutdown; leaking their buffers"
            );
            std::mem::forget(std::mem::take(&mut self.inflight));
            let slots = std::mem::take(&mut self.slots);
            std::mem::forget(slots);
            std::mem::forget(std::mem::take(&mut self.iov_sets));
        }
    }

    fn busy(&self) -> bool {
        self.recv_armed || self.tun_reads > 0 || self.free_slots.len() < SLOTS
    }

    /// Shutdown: account for a completion without acting on it.
    fn settle(&mut self, c: Completion) {
        match ring::unpack(c.user_data) {
            Some((Op::TunRead, i)) => {
                self.tun_reads = self.tun_reads.saturating_sub(1);
                self.release(i);
            }
            Some((Op::UdpRecv, _)) if !c.more() => self.recv_armed = false,
            Some((Op::UdpRecv, _)) => {}
            Some((Op::UdpSend | Op::TunWrite, s)) => self.slot_done(s),
            None => {}
        }
    }

    fn release(&mut self, index: u32) {
        if let Some(buf) = self.inflight.get_mut(index as usize).and_then(Option::take) {
            let _ = self.pool.free(buf);
        }
    }

    fn take_inflight(&mut self, index: u32) -> Option<PacketBuf> {
        self.inflight.get_mut(index as usize).and_then(Option::take)
    }

    fn free(&mut self, buf: PacketBuf) {
        let _ = self.pool.free(buf);
    }

    fn complete(&mut self, t: &Tables<'_>, c: Completion) {
        match ring::unpack(c.user_data) {
            Some((Op::TunRead, i)) => {
                self.tun_reads = self.tun_reads.saturating_sub(1);
                let Some(mut buf) = self.take_inflight(i) else {
                    return;
                };
                if c.result <= 0 {
                    if c.result != -libc::ECANCELED {
                        self.count(Counter::io_errors);
                    }
                    self.free(buf);
                    return;
                }
                if buf.set_len(c.result as usize).is_err() {
                    self.free(buf);
                    return;
                }
                self.handle_tun_packet(t, buf);
            }
            Some((Op::UdpRecv, _)) => {
                if !c.more() {
                    self.recv_armed = false;
                }
                let Some(bid) = c.buffer_id() else {
                    if c.result < 0 && c.result != -libc::ENOBUFS && c.result != -libc::ECANCELED {
                        self.count(Counter::io_errors);
                    }
                    return;
                };
                self.provided = self.provided.saturating_sub(1);
                let Some(buf) = self.take_inflight(u32::from(bid)) else {
                    return;
                };
                if c.result <= 0 {
                    self.free(buf);
                    return;
                }
                self.handle_udp_buffer(t, buf, c.result as usize);
            }
            Some((Op::UdpSend, s)) => {
                if c.result < 0 {
                    self.count(Counter::io_errors);
                } else {
                    let counters = self.counters();
                    counters.inc(Counter::udp_tx_packets);
                    counters.add(Counter::udp_tx_bytes, c.result as u64);
                }
                self.slot_done(s);
            }
            Some((Op::TunWrite, s)) => {
                if c.result < 0 {
                    self.count(Counter::io_errors);
                } else {
                    let counters = self.counters();
                    counters.inc(Counter::tun_tx_packets);
                    counters.add(
                        Counter::tun_tx_bytes,
                        (c.result as u64).saturating_sub(VNET_HDR_LEN as u64),
                    );
                }
                self.slot_done(s);
            }
            None => {}
        }
    }

    fn slot_done(&mut self, s: u32) {
        let Some(slot) = self.slots.get(s as usize) else {
            return;
        };
        let b = slot.buf;
        if slot.iov_set != NO_IOV_SET {
            self.free_iov_sets.push(slot.iov_set);
            if let Some(slot) = self.slots.get_mut(s as usize) {
                slot.iov_set = NO_IOV_SET;
            }
        }
        self.free_slots.push(s);
        if let Some(r) = self.refs.get_mut(b as usize) {
            *r = r.saturating_sub(1);
            if *r == 0 {
                self.release(b);
            }
        }
    }

    /// A packet from the TUN: virtio header, then routing, sealing and sending.
    fn handle_tun_packet(&mut self, t: &Tables<'_>, mut buf: PacketBuf) {
        let hdr = match vnet::VnetHdr::parse(buf.data()) {
            Ok(h) if buf.pull_header(vnet::LEN).is_ok() => h,
            _ => {
                self.count(Counter::dropped_malformed);
                return self.free(buf);
            }
        };
        let counters = self.counters();
        counters.inc(Counter::tun_rx_packets);
        counters.add(Counter::tun_rx_bytes, buf.len() as u64);
        if hdr.is_gso() {
            return self.segment_and_send(t, buf, &hdr);
        }
        if vnet::complete_checksum(&hdr, buf.data_mut()).is_err() {
            self.count(Counter::dropped_malformed);
            return self.free(buf);
        }
        self.route_local(t, buf);
    }

    /// Cuts a TCP or UDP super-packet from the TUN into MTU-sized segments ([`vnet::Segments`]),
    /// each written and sealed in its own datagram slot of a send buffer, and sends the slots
    /// with UDP GSO: one TUN read and one send for ~45 packets.
    fn segment_and_send(&mut self, t: &Tables<'_>, buf: PacketBuf, hdr: &vnet::VnetHdr) {
        // TCP segments leave with the partial checksum: the receiving dataplane hands them to
        // its TUN with NEEDS_CSUM (`write_to_tun`), so summing every payload here is wasted.
        let (Ok(mut sup), Some((src, dst))) = (
            vnet::Segments::new(hdr, buf.data()).map(vnet::Segments::partial_tcp_checksum),
            crate::icmp::ipv6_addrs(buf.data()),
        ) else {
            self.count(Counter::dropped_malformed);
            return self.free(buf);
        };
        let (peer, session) = match route(t, &dst) {
            Ok(r) => r,
            Err(Outbound::NoRoute(dst)) => {
                self.count(Counter::dropped_no_route);
                if is_overlay(&dst) {
                    self.event(t.now, Event::NoRoute(dst));
                }
                return self.icmp_to_tun(buf, icmp::TYPE_DEST_UNREACHABLE, icmp::CODE_NO_ROUTE);
            }
            Err(Outbound::NoSession(dst)) => {
                // A super-packet is not queued (it would need segmenting later); TCP resends.
                self.count(Counter::dropped_no_session);
                self.event(t.now, Event::NoSession(dst));
                return self.free(buf);
            }
            Err(Outbound::Drop(c)) => {
                self.count(c);
                return self.free(buf);
            }
            Err(Outbound::Send(_)) => {
                // `route` never answers Send; treat it as malformed if it ever did.
                self.count(Counter::dropped_malformed);
                return self.free(buf);
            }
        };
        let n = sup.count();
        let Ok(counters) = session.reserve_counters(t.now, n as u64) else {
            self.count(Counter::dropped_expired);
            return self.free(buf);
        };
        let stride = HEADER_LEN + 1 + sup.max_segment_len() + TAG_LEN;
        let per_send = if self.udp_gso {
            (GSO_MAX_BYTES / stride).clamp(1, GSO_MAX_SEGMENTS)
        } else {
            1
        };
        let mut i = 0;
        while i < n {
            let Some(mut out) = self.pool.alloc() else {
                self.counters()
                    .add(Counter::dropped_backpressure, (n - i) as u64);
                break;
            };
            out.reset(0);
            let end = (i + per_send).min(n);
            let mut total = 0;
            let mut sealed = 0;
            {
                let area = out.read_target();
                for k in i..end {
                    let Some(d) = area.get_mut(total..) else {
                        break;
                    };
                    let Some(Ok(seg_len)) = d
                        .get_mut(HEADER_LEN + 1..)
                        .and_then(|body| sup.next_into(body))
                    else {
                        break;
                    };
                    if let Some(b) = d.get_mut(HEADER_LEN) {
                        *b = PayloadType::Ipv6 as u8;
                    }
                    let repr = Repr {
                        hop_limit: INITIAL_HOP_LIMIT,
                        kind: Kind::Transport,
                        receiver_index: session.remote_index(),
                        counter: counters.start + k as u64,
                        src,
                        dst,
                    };
                    let Some(len) = seal_slice(session, &repr, d, 1 + seg_len) else {
                        break;
                    };
                    total += len;
                    sealed += 1;
                }
            }
            if sealed < end - i || out.set_len(total).is_err() {
                self.count(Counter::dropped_malformed);
                self.free(out);
                break;
            }
            let gso = if sealed > 1 { stride as u16 } else { 0 };
            self.send_buf_gso(t, out, &peer, gso);
            i = end;
        }
        self.free(buf);
    }

    /// Routes a locally originated IPv6 packet (from the TUN, or dequeued).
    fn route_local(&mut self, t: &Tables<'_>, mut buf: PacketBuf) {
        match outbound(t, &mut buf) {
            Outbound::Send(peer) => self.send_buf_gso(t, buf, &peer, 0),
            Outbound::NoRoute(dst) => {
                self.count(Counter::dropped_no_route);
                // Only overlay destinations are worth a route request (not, say, MLD reports).
                if is_overlay(&dst) {
                    self.event(t.now, Event::NoRoute(dst));
                }
                self.icmp_to_tun(buf, icmp::TYPE_DEST_UNREACHABLE, icmp::CODE_NO_ROUTE);
            }
            Outbound::NoSession(dst) => self.enqueue(t.now, dst, buf),
            Outbound::Drop(c) => {
                self.count(c);
                self.free(buf);
            }
        }
    }

    fn event(&mut self, now: Instant, e: Event) {
        if self.events.allow(now) {
            self.shared
                .punt(self.shared.counters.row(self.index), &Record::Event(e));
        }
    }

    fn icmp_to_tun(&mut self, mut buf: PacketBuf, icmp_type: u8, code: u8) {
        if self.tun.is_none()
            || icmp::error_in_place(&mut buf, self.shared.addr, icmp_type, code).is_err()
        {
            return self.free(buf);
        }
        match buf.push_header(VNET_HDR_LEN) {
            Ok(h) => h.fill(0),
            Err(_) => return self.free(buf),
        }
        self.count(Counter::icmp_sent);
        self.write_buf(buf);
    }

    fn enqueue(&mut self, now: Instant, dst: Ipv6Addr, buf: PacketBuf) {
        let prefix = upper64(&dst);
        let pos = self.queue.iter().position(|p| p.prefix == prefix);
        let pos = match pos {
            Some(p) => p,
            None if self.queue.len() < QUEUE_DESTS => {
                self.queue.push(Pending {
                    prefix,
                    dst,
                    since: now,
                    bufs: VecDeque::with_capacity(QUEUE_PER_DEST),
                });
                self.event(now, Event::NoSession(dst));
                self.queue.len() - 1
            }
            None => {
                self.count(Counter::dropped_no_session);
                return self.free(buf);
            }
        };
        let full = self.queued >= QUEUE_TOTAL
            || self
                .queue
                .get(pos)
                .is_none_or(|p| p.bufs.len() >= QUEUE_PER_DEST);
        if full {
            self.count(Counter::dropped_no_session);
            return self.free(buf);
        }
        if let Some(p) = self.queue.get_mut(pos) {
            p.bufs.push_back(buf);
            self.queued += 1;
            self.count(Counter::queued_no_session);
        }
    }

    /// Sends what waited for a session that now exists; answers what waited too long.
    fn flush_queue(&mut self, t: &Tables<'_>) {
        let mut i = 0;
        while i < self.queue.len() {
            let (ready, expired) = match self.queue.get(i) {
                Some(p) => (
                    t.sessions.for_dest(p.prefix).is_some(),
                    t.now.saturating_duration_since(p.since) >= QUEUE_TIMEOUT,
                ),
                None => break,
            };
            if !ready && !expired {
                i += 1;
                continue;
            }
            let mut p = self.queue.swap_remove(i);
            self.queued = self.queued.saturating_sub(p.bufs.len());
            while let Some(buf) = p.bufs.pop_front() {
                if ready {
                    self.route_local(t, buf);
                } else {
                    self.count(Counter::dropped_no_session);
                    self.icmp_to_tun(
                        buf,
                        icmp::TYPE_DEST_UNREACHABLE,
                        icmp::CODE_ADDRESS_UNREACHABLE,
                    );
                }
            }
            tracing::trace!(dst = %p.dst, ready, "no-session queue flushed");
        }
    }

    /// A buffer from the multishot receive: `len` bytes of `recvmsg` output (header, source
    /// address, control messages, datagram or GRO-coalesced datagrams).
    fn handle_udp_buffer(&mut self, t: &Tables<'_>, mut buf: PacketBuf, len: usize) {
        self.to_tun.clear();
        buf.reset(0);
        if buf.set_len(len).is_err() {
            return self.free(buf);
        }
        let (from, gso, payload_len) = match RecvMsgOut::parse(buf.data(), &self.recv_msg) {
            Ok(out) if !out.is_payload_truncated() && !out.is_name_data_truncated() => (
                from_sockaddr(out.name_data()),
                gro_segment_size(out.control_data()),
                out.payload_data().len(),
            ),
            _ => {
                self.count(Counter::dropped_malformed);
                return self.free(buf);
            }
        };
        let from = from.unwrap_or(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::UNSPECIFIED,
            0,
            0,
            0,
        )));
        let seg_size = gso.unwrap_or(payload_len).max(1);
        if let Some(st) = t.peers.by_addr(&from).and_then(|p| t.peers.stats(p)) {
            st.rx(payload_len.div_ceil(seg_size) as u64, payload_len as u64);
        }
        let mut fwd: Option<FwdBatch> = None;
        let mut off = RECV_PAYLOAD_OFFSET;
        let end = RECV_PAYLOAD_OFFSET + payload_len;
        while off < end {
            let seg_len = seg_size.min(end - off);
            {
                let counters = self.counters();
                counters.inc(Counter::udp_rx_packets);
                counters.add(Counter::udp_rx_bytes, seg_len as u64);
            }
            let Some(seg) = buf.data_mut().get_mut(off..off + seg_len) else {
                break;
            };
            match inbound(t, seg) {
                Inbound::ToTun { start, len } => {
                    if self.tun.is_some() {
                        self.count(Counter::delivered);
                        self.to_tun.push((off + start, len));
                    } else {
                        self.count(Counter::dropped_no_route);
                    }
                }
                Inbound::PuntDecrypted { len } => {
                    self.count(Counter::delivered);
                    let bytes = seg.get(..len).unwrap_or(&[]);
                    self.shared.punt(
                        self.shared.counters.row(self.index),
                        &Record::PuntedPacket {
                            from,
                            reason: PuntReason::LocalDelivery,
                            bytes,
                        },
                    );
                }
                Inbound::Punt(reason) => {
                    self.shared.punt(
                        self.shared.counters.row(self.index),
                        &Record::PuntedPacket {
                            from,
                            reason,
                            bytes: seg,
                        },
                    );
                }
                Inbound::Forward(peer) => {
                    // Consecutive GRO segments to one next hop leave as one GSO send: they are
                    // already contiguous, equal-sized and rewritten in place.
                    match &mut fwd {
                        Some(f) if f.peer == peer && f.end == off && f.seg == seg_len => {
                            f.end += seg_len;
                            f.count += 1;
                        }
                        Some(f) if f.peer == peer && f.end == off && seg_len < f.seg => {
                            // A shorter last segment ends the batch.
                            f.end += seg_len;
                            f.count += 1;
                            let done = fwd.take();
                            self.forward_batch(t, &buf, done);
                        }
                        _ => {
                            let done = fwd.take();
                            self.forward_batch(t, &buf, done);
                            fwd = Some(FwdBatch {
                                peer,
                                start: off,
                                end: off + seg_len,
                                seg: seg_len,
                                count: 1,
                            });
                        }
                    }
                }
                Inbound::Drop(c) => self.count(c),
            }
            off += seg_len;
        }
        let done = fwd.take();
        self.forward_batch(t, &buf, done);
        if !self.to_tun.is_empty() {
            self.write_to_tun(&mut buf);
        }
        self.park(buf);
    }

    /// Sends a batch of transit datagrams lying back to back in `buf` (one GSO send).
    fn forward_batch(&mut self, t: &Tables<'_>, buf: &PacketBuf, batch: Option<FwdBatch>) {
        let Some(f) = batch else {
            return;
        };
        let Some(bytes) = buf.data().get(f.start..f.end) else {
            return;
        };
        let gso = if f.count > 1 && self.udp_gso {
            u16::try_from(f.seg).unwrap_or(0)
        } else {
            0
        };
        let sent = if gso > 0 || f.count == 1 {
            self.submit_slot_gso(
                Op::UdpSend,
                self.udp,
                buf.index(),
                bytes.as_ptr(),
                bytes.len(),
                Some(&f.peer),
                gso,
            )
        } else {
            // No GSO: one send per datagram.
            let mut all = true;
            for chunk in bytes.chunks(f.seg) {
                all &= self.submit_slot(
                    Op::UdpSend,
                    self.udp,
                    buf.index(),
                    chunk.as_ptr(),
                    chunk.len(),
                    Some(&f.peer),
                );
            }
            all
        };
        if sent {
            if let Some(st) = t.peers.stats(f.peer.id) {
                st.tx(f.count as u64, (f.end - f.start) as u64);
            }
            self.counters().add(Counter::forwarded, f.count as u64);
        } else {
            self.counters()
                .add(Counter::dropped_backpressure, f.count as u64);
        }
    }

    /// Writes the decrypted packets listed in `to_tun` (offsets into `buf`): runs of one TCP
    /// flow are merged into one super-packet in a fresh buffer (see [`gso::TcpRun`]); the rest
    /// are written in place, each behind a virtio header in the bytes its data header used.
    fn write_to_tun(&mut self, buf: &mut PacketBuf) {
        let Some(fd) = self.tun else {
            self.to_tun.clear();
            return;
        };
        let list = std::mem::take(&mut self.to_tun);
        let index = buf.index();
        let mut i = 0;
        while i < list.len() {
            let data = buf.data();
            let pkt = |k: usize| -> &[u8] {
                list.get(k)
                    .and_then(|(s, l)| data.get(*s..*s + *l))
                    .unwrap_or(&[])
            };
            let first = pkt(i);
            let mut j = i + 1;
            let mut run = gso::TcpRun::start(first);
            if let Some(r) = &mut run {
                while j < list.len() && r.try_push(first, pkt(j)) {
                    j += 1;
                }
            }
            if let Some(r) = run.filter(|r| r.count() >= 2) {
                match self.write_run_gathered(fd, buf, &r, list.get(i..j).unwrap_or(&[])) {
                    Gathered::Submitted => {
                        self.counters().add(Counter::coalesced, r.count() as u64);
                        i = j;
                        continue;
                    }
                    Gathered::Failed => {
                        self.counters()
                            .add(Counter::dropped_backpressure, r.count() as u64);
                        i = j;
                        continue;
                    }
                    Gathered::NotTried => {}
                }
                let data = buf.data();
                let pkt = |k: usize| -> &[u8] {
                    list.get(k)
                        .and_then(|(s, l)| data.get(*s..*s + *l))
                        .unwrap_or(&[])
                };
                if let Some(mut out) = self.pool.alloc() {
                    out.reset(0);
                    let n = r.write((i..j).map(pkt), out.read_target());
                    if let Some(n) = n.filter(|n| out.set_len(*n).is_ok()) {
                        let _ = n;
                        self.counters().add(Counter::coalesced, r.count() as u64);
                        self.write_buf(out);
                        i = j;
                        continue;
                    }
                    self.free(out);
                }
            }
            for k in i..j {
                let Some(&(start, len)) = list.get(k) else {
                    break;
                };
                let vstart = start - VNET_HDR_LEN;
                let Some(pkt) = buf.data_mut().get_mut(vstart..start + len) else {
                    continue;
                };
                let (v, pkt) = pkt.split_at_mut(VNET_HDR_LEN);
                // TCP goes with a partial checksum and NEEDS_CSUM (senders leave it partial,
                // `segment_and_send`); anything else was authenticated, its checksum known good.
                let hdr = if vnet::set_partial_tcp_checksum(pkt) {
                    vnet::VnetHdr {
                        flags: vnet::F_NEEDS_CSUM,
                        csum_start: vnet::TCP_CSUM_START,
                        csum_offset: vnet::TCP_CSUM_OFFSET,
                        ..vnet::VnetHdr::default()
                    }
                } else {
                    vnet::VnetHdr {
                        flags: VIRTIO_NET_HDR_F_DATA_VALID,
                        ..vnet::VnetHdr::default()
                    }
                };
                if hdr.emit(v).is_err() {
                    continue;
                }
                let ptr = buf.data()[vstart..].as_ptr();
                if !self.submit_slot(Op::TunWrite, fd, index, ptr, len + VNET_HDR_LEN, None) {
                    self.count(Counter::dropped_backpressure);
                }
            }
            i = j;
        }
        self.to_tun = list;
        self.to_tun.clear();
    }

    /// Writes a coalesced run (`segs`: offsets and lengths of its segments in `buf`) to the TUN
    /// as one gathered write: the first segment becomes the super-packet's head in place (virtio
    /// header in the bytes its data header used), the others contribute their payloads where
    /// they lie — no copy in user space. [`Gathered::NotTried`] (nothing touched) if no iovec
    /// set or slot is free: the caller copies the run instead.
    fn write_run_gathered(
        &mut self,
        fd: RawFd,
        buf: &mut PacketBuf,
        run: &gso::TcpRun,
        segs: &[(usize, usize)],
    ) -> Gathered {
        let (Some(&(first, first_len)), Some(&(last, last_len))) = (segs.first(), segs.last())
        else {
            return Gathered::NotTried;
        };
        let data_len = buf.data().len();
        let in_bounds = segs
            .iter()
            .all(|&(s, l)| l >= run.hdr_len() && s + l <= data_len);
        if segs.len() > gso::MAX_COALESCED_SEGMENTS || first < VNET_HDR_LEN || !in_bounds {
            return Gathered::NotTried;
        }
        let Some(last_flags) = buf
            .data()
            .get(last..last + last_len)
            .and_then(gso::TcpRun::flags_of)
        else {
            return Gathered::NotTried;
        };
        if self.free_slots.is_empty() || self.free_iov_sets.is_empty() {
            return Gathered::NotTried;
        }
        let head_start = first - VNET_HDR_LEN;
        let prepared = buf
            .data_mut()
            .get_mut(head_start..first + first_len)
            .and_then(|head| run.write_head(head, last_flags));
        if prepared.is_none() {
            return Gathered::NotTried;
        }
        // From here on the first segment's headers are the super-packet's.
        let (Some(s), Some(set)) = (self.free_slots.pop(), self.free_iov_sets.pop()) else {
            return Gathered::Failed;
        };
        let Some(iovs) = self.iov_sets.get_mut(set as usize) else {
            self.free_slots.push(s);
            self.free_iov_sets.push(set);
            return Gathered::Failed;
        };
        let data = buf.data();
        let hdr_len = run.hdr_len();
        for (k, (iov, &(start, len))) in iovs.iter_mut().zip(segs).enumerate() {
            let from = if k == 0 { head_start } else { start + hdr_len };
            let piece = data.get(from..start + len).unwrap_or(&[]);
            *iov = libc::iovec {
                iov_base: piece.as_ptr().cast_mut().cast(),
                iov_len: piece.len(),
            };
        }
        let iov_ptr = iovs.as_ptr();
        // SAFETY: the iovec set lives in `self.iov_sets`, a boxed slice that never moves, and
        // is not reused before this write's completion (`slot_done` frees it); the bytes lie in
        // pool buffer `buf`, whose reference count we raise below, so it stays in `inflight`
        // until the completion.
        let pushed = unsafe {
            self.ring
                .writev(fd, iov_ptr, segs.len() as u32, ring::pack(Op::TunWrite, s))
        };
        if pushed.is_err() {
            self.free_slots.push(s);
            self.free_iov_sets.push(set);
            return Gathered::Failed;
        }
        if let Some(slot) = self.slots.get_mut(s as usize) {
            slot.buf = buf.index();
            slot.iov_set = set;
        }
        if let Some(r) = self.refs.get_mut(buf.index() as usize) {
            *r += 1;
        }
        Gathered::Submitted
    }

    /// After a handler submitted operations on `buf`: keep it until they complete, or free it.
    fn park(&mut self, buf: PacketBuf) {
        let i = buf.index() as usize;
        if self.refs.get(i).copied().unwrap_or(0) > 0 {
            if let Some(slot) = self.inflight.get_mut(i) {
                *slot = Some(buf);
                return;
            }
        }
        self.free(buf);
    }

    /// Sends `buf` to `peer`; with `gso` > 0 as datagrams of `gso` bytes (the last may be
    /// shorter) in one `UDP_SEGMENT` send.
    fn send_buf_gso(&mut self, t: &Tables<'_>, buf: PacketBuf, peer: &PeerAddr, gso: u16) {
        let (ptr, len, index) = (buf.data().as_ptr(), buf.len(), buf.index());
        if self.submit_slot_gso(Op::UdpSend, self.udp, index, ptr, len, Some(peer), gso) {
            if let Some(st) = t.peers.stats(peer.id) {
                let n = if gso > 0 {
                    len.div_ceil(usize::from(gso))
                } else {
                    1
                };
                st.tx(n as u64, len as u64);
            }
        } else {
            self.count(Counter::dropped_backpressure);
        }
        self.park(buf);
    }

    fn write_buf(&mut self, buf: PacketBuf) {
        let Some(fd) = self.tun else {
            return self.free(buf);
        };
        let (ptr, len, index) = (buf.data().as_ptr(), buf.len(), buf.index());
        if !self.submit_slot(Op::TunWrite, fd, index, ptr, len, None) {
            self.count(Counter::dropped_backpressure);
        }
        self.park(buf);
    }

    /// Submits a send (with `peer`) or a write of `len` bytes at `ptr`, which lie in pool buffer
    /// `index`; the caller then [`Worker::park`]s that buffer. False if no slot was free or the
    /// ring refused the entry (the buffer's reference count is unchanged then).
    fn submit_slot(
        &mut self,
        op: Op,
        fd: RawFd,
        index: u32,
        ptr: *const u8,
        len: usize,
        peer: Option<&PeerAddr>,
    ) -> bool {
        self.submit_slot_gso(op, fd, index, ptr, len, peer, 0)
    }

    /// [`Worker::submit_slot`] with a GSO segment size for sends (0: one datagram).
    #[allow(clippy::too_many_arguments)]
    fn submit_slot_gso(
        &mut self,
        op: Op,
        fd: RawFd,
        index: u32,
        ptr: *const u8,
        len: usize,
        peer: Option<&PeerAddr>,
        gso: u16,
    ) -> bool {
        let Some(s) = self.free_slots.pop() else {
            return false;
        };
        let Some(slot) = self.slots.get_mut(s as usize) else {
            return false;
        };
        slot.buf = index;
        let ok = match (op, peer) {
            (Op::UdpSend, Some(peer)) => {
                slot.addr = peer.raw;
                slot.iov = libc::iovec {
                    iov_base: ptr.cast_mut().cast(),
                    iov_len: len,
                };
                slot.msg.msg_name = (&mut slot.addr as *mut libc::sockaddr_in6).cast();
                slot.msg.msg_namelen = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
                slot.msg.msg_iov = &mut slot.iov;
                slot.msg.msg_iovlen = 1;
                if gso > 0 {
                    write_segment_cmsg(&mut slot.control, gso);
                    slot.msg.msg_control = slot.control.as_mut_ptr().cast();
                    slot.msg.msg_controllen = size_of::<[u64; 3]>();
                } else {
                    slot.msg.msg_control = core::ptr::null_mut();
                    slot.msg.msg_controllen = 0;
                }
                let msg: *const libc::msghdr = &slot.msg;
                // SAFETY: the slot (msghdr, iovec, address) sits in `self.slots`, a boxed slice
                // that never moves, and is not reused before its completion (`slot_done`); the
                // bytes lie in pool buffer `index`, whose reference count we raise below, so it
                // stays in `inflight` until the completion.
                unsafe { self.ring.send_msg(fd, msg, ring::pack(Op::UdpSend, s)) }.is_ok()
            }
            (Op::TunWrite, None) => {
                // SAFETY: as for the send: pool buffer `index` is kept in `inflight` by its
                // reference count until this write's completion.
                unsafe {
                    self.ring
                        .write(fd, ptr, len as u32, ring::pack(Op::TunWrite, s))
                }
                .is_ok()
            }
            _ => false,
        };
        if !ok {
            self.free_slots.push(s);
            return false;
        }
        if let Some(r) = self.refs.get_mut(index as usize) {
            *r += 1;
        }
        true
    }

    /// Keeps the receive armed and its buffer ring full, and the TUN reads in flight.
    fn refill(&mut self) -> Result<(), WorkerError> {
        let mut added = false;
        while self.provided < PROVIDED as usize {
            let Some(mut buf) = self.pool.alloc() else {
                break;
            };
            buf.reset(0);
            let target = buf.read_target();
            let (ptr, len) = (target.as_mut_ptr(), target.len() as u32);
            let index = buf.index();
            // SAFETY: the buffer goes into `inflight` right below and leaves it only when a
            // receive completion names its id (or at shutdown, after the ring is unregistered).
            // Pool indices are below POOL_BUFFERS < 65536, so the id is the index.
            unsafe { self.buf_ring.add(ptr, len, index as u16) };
            if let Some(slot) = self.inflight.get_mut(index as usize) {
                *slot = Some(buf);
            }
            self.provided += 1;
            added = true;
        }
        if added {
            self.buf_ring.publish();
        }
        if !self.recv_armed && self.provided > 0 {
            let msg: *const libc::msghdr = &*self.recv_msg;
            // SAFETY: `recv_msg` is boxed in the worker and outlives the ring's operations
            // (shutdown reaps before drop); the provided buffers follow the ownership rule.
            unsafe {
                self.ring.recv_msg_multi(
                    self.udp,
                    msg,
                    self.buf_ring.group(),
                    ring::pack(Op::UdpRecv, 0),
                )
            }?;
            self.recv_armed = true;
        }
        if let Some(fd) = self.tun {
            while self.tun_reads < TUN_READS {
                let Some(mut buf) = self.pool.alloc() else {
                    break;
                };
                buf.reset(HEADROOM);
                let target = buf.read_target();
                let len = target.len().saturating_sub(TAILROOM) as u32;
                let ptr = target.as_mut_ptr();
                let index = buf.index();
                // SAFETY: the buffer goes into `inflight` right after a successful push (moving
                // the `PacketBuf` does not move its memory) and stays there until this read's
                // completion.
                let pushed =
                    unsafe { self.ring.read(fd, ptr, len, ring::pack(Op::TunRead, index)) };
                if let Err(e) = pushed {
                    self.free(buf);
                    return Err(e.into());
                }
                if let Some(slot) = self.inflight.get_mut(index as usize) {
                    *slot = Some(buf);
                }
                self.tun_reads += 1;
            }
        }
        // No submit here: the loop's next `submit_and_wait` submits and waits in one syscall.
        Ok(())
    }
}

/// Writes a `UDP_SEGMENT` control message with segment size `gso` into `control`.
fn write_segment_cmsg(control: &mut [u64; 3], gso: u16) {
    let hdr = size_of::<libc::cmsghdr>();
    let mut bytes = [0u8; 24];
    let cmsg_len = hdr + size_of::<u16>();
    bytes[..size_of::<usize>()].copy_from_slice(&cmsg_len.to_ne_bytes());
    bytes[8..12].copy_from_slice(&libc::SOL_UDP.to_ne_bytes());
    bytes[12..16].copy_from_slice(&crate::udp::UDP_SEGMENT.to_ne_bytes());
    bytes[hdr..hdr + 2].copy_from_slice(&gso.to_ne_bytes());
    for (w, c) in control.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        *w = u64::from_ne_bytes(a);
    }
}

/// Whether `addr` is in the overlay's 400::/7.
fn is_overlay(addr: &Ipv6Addr) -> bool {
    addr.octets()[0] & 0xfe == 0x04
}
