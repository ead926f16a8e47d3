//! The control thread of `hypha-dp`: the single writer of the published tables.
//!
//! It applies the control plane's records from the shm down-ring (or a [`StaticConfig`]) to the
//! FIB, the peer table and the session table, each published with `arc-swap` so the workers
//! never wait (DESIGN.md Principle 3); sends the control plane's packets; publishes counters up
//! the ring; and serves the counters as JSON for `hypha stats --json` and tests.
//!
//! **Sessions from shm.** The ABI installs one key per direction ([`SessionKey`] with
//! [`KeyDirection`]); a dataplane [`Session`] needs both. Keys are paired per remote /64: when a
//! Receive and a Send key for the same peer address are both present, they become one session
//! (receiver index = the Receive key's, remote index = the Send key's) and the sending one for
//! that peer. A lone key waits for its partner.
//!
//! **Hitless restart** (DESIGN.md Principle 4). Between `Resync::Begin` and `Resync::End` of one
//! generation, records are applied as they come (so forwarding never pauses) and remembered;
//! at `End`, every route, peer and session the replay did not mention is removed. A control plane
//! that restarts therefore leaves the dataplane forwarding on its last state until its replay is
//! complete.
//!
//! **PacketToSend.** `SendTo::Peer`: the bytes are a complete underlay datagram (a control frame)
//! sent from the node's port to the peer. `SendTo::Overlay(dst)`: the bytes are a complete DATA
//! frame (48-byte header first). A TRANSPORT frame carries its plaintext (inner type byte first)
//! after the header; the dataplane fills in receiver index and counter from the session to `dst`,
//! seals it and routes it. Any other kind (an E2E handshake) is routed as it is.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use hypha_proto::shm::{self, Consumer, Event, KeyDirection, Record, Resync, SendTo, SessionKey};
use hypha_proto::time::Instant;
use hypha_proto::wire::data::{Kind, Repr, HEADER_LEN};

use crate::config::StaticConfig;
use crate::counters::{Counter, WorkerCounters};
use crate::fib::{FibUpdater, NextHop, PeerId, Prefix, RouteUpdate};
use crate::forward::{data_dst, seal_payload, INITIAL_HOP_LIMIT};
use crate::pool::{BufLayout, PacketPool};
use crate::session::{Cipher, Session, SessionParams};
use crate::state::{upper64, Shared};
use crate::udp;
use crate::xdp::{XdpFastPath, XdpView};

/// How often counters go up the ring and expired sessions are removed.
pub const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// How often static sessions are renewed (well inside REJECT_AFTER_TIME).
pub const STATIC_RENEW: Duration = Duration::from_secs(60);
/// How far a renewed static session's send counter jumps past the old one's: more than the
/// workers can reserve between reading the old counter and publishing the new session, so no
/// nonce is ever used twice under the same key.
pub const STATIC_COUNTER_GAP: u64 = 1 << 24;

#[derive(Debug, Default)]
struct Staging {
    generation: u64,
    routes: HashSet<Prefix>,
    peers: HashSet<u64>,
    sessions: HashSet<u32>,
}

/// The counters and table sizes of a running dataplane, as the stats endpoint and the hand-over
/// socket serve them (`hypha stats --json` shows this under `dataplane`).
pub fn stats_json(shared: &Shared) -> serde_json::Value {
    let c = &shared.counters;
    let workers: Vec<_> = (0..c.rows()).map(|i| c.row_snapshot(i).to_json()).collect();
    let mut counters = c.snapshot().to_json();
    let xdp = match &*shared.xdp.load() {
        Some(view) => {
            let j = view.to_json();
            // The XDP counters also sit among the others (`xdp_` names).
            if let (Some(all), Some(xc)) = (counters.as_object_mut(), j["counters"].as_object()) {
                all.extend(xc.clone());
            }
            j
        }
        None => XdpView::off_json(),
    };
    serde_json::json!({
        "address": shared.addr.to_string(),
        "pid": std::process::id(),
        "counters": counters,
        "per_thread": workers,
        "routes": shared.fib.load().len(),
        "sessions": shared.sessions.load().len(),
        "peers": shared.peers.load().iter().count(),
        "per_peer": per_peer_json(shared),
        "xdp": xdp,
    })
}

/// Packets and bytes per neighbour (ids are the dataplane's dense peer ids).
fn per_peer_json(shared: &Shared) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let peers = shared.peers.load();
    peers
        .iter()
        .map(|(id, a)| {
            let st = peers.stats(id);
            let get = |f: fn(&crate::state::PeerStats) -> &std::sync::atomic::AtomicU64| {
                st.map_or(0, |s| f(s).load(Relaxed))
            };
            serde_json::json!({
                "id": id,
                "endpoint": a.addr.to_string(),
                "tx_packets": get(|s| &s.tx_packets),
                "tx_bytes": get(|s| &s.tx_bytes),
                "rx_packets": get(|s| &s.rx_packets),
                "rx_bytes": get(|s| &s.rx_bytes),
            })
        })
        .collect()
}

/// The control thread's state.
pub struct Control {
    shared: Arc<Shared>,
    fib: FibUpdater,
    send_fd: OwnedFd,
    row: usize,
    peer_ids: HashMap<u64, PeerId>,
    next_peer: PeerId,
    pending_keys: HashMap<u64, (Option<SessionKey>, Option<SessionKey>)>,
    installed: HashSet<u32>,
    staging: Option<Staging>,
    scratch: PacketPool,
    batch: Vec<RouteUpdate>,
    stats: Option<TcpListener>,
    /// Static sessions to renew, and when they were last renewed.
    static_sessions: Vec<SessionParams>,
    renewed: Instant,
    xdp: Option<XdpFastPath>,
    /// The FIB or peer set changed since the XDP maps were last synced.
    xdp_dirty: bool,
}

impl core::fmt::Debug for Control {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Control")
            .field("peers", &self.peer_ids.len())
            .field("sessions", &self.installed.len())
            .finish_non_exhaustive()
    }
}

fn cipher(c: shm::Cipher) -> Cipher {
    match c {
        shm::Cipher::ChaCha20Poly1305 => Cipher::ChaCha20Poly1305,
        shm::Cipher::Aes256Gcm => Cipher::Aes256Gcm,
    }
}

impl Control {
    /// A control thread writing through `fib` into `shared`; control-plane packets leave through
    /// `send_fd` (a duplicate of a worker's socket, so they come from the node's port); counters
    /// use counter row `row`.
    pub fn new(shared: Arc<Shared>, fib: FibUpdater, send_fd: OwnedFd, row: usize) -> Self {
        Control {
            shared,
            fib,
            send_fd,
            row,
            peer_ids: HashMap::new(),
            next_peer: 1,
            pending_keys: HashMap::new(),
            installed: HashSet::new(),
            staging: None,
            // One buffer to seal overlay packets from the control plane in.
            scratch: PacketPool::new(1, BufLayout::MTU).unwrap_or_else(|_| {
                // A pool of one buffer cannot exceed u32::MAX buffers.
                unreachable!("a one-buffer pool always fits")
            }),
            batch: Vec::new(),
            stats: None,
            static_sessions: Vec::new(),
            renewed: Instant::from_micros(0),
            xdp: None,
            xdp_dirty: false,
        }
    }

    /// Hands the XDP fast path to the control thread, which keeps its maps in step with the FIB
    /// and peer set from now on (synced once right away).
    pub fn set_xdp(&mut self, xdp: XdpFastPath) {
        self.xdp = Some(xdp);
        self.xdp_dirty = true;
        self.sync_xdp();
        self.publish_xdp();
    }

    /// Republishes what the stats readers see of the fast path.
    fn publish_xdp(&self) {
        self.shared
            .xdp
            .store(self.xdp.as_ref().map(|x| Arc::new(x.view())));
    }

    /// The XDP fast path, if one is loaded.
    pub fn xdp(&self) -> Option<&XdpFastPath> {
        self.xdp.as_ref()
    }

    /// Detaches and unpins the XDP fast path (clean exit).
    pub fn shutdown_xdp(&mut self) {
        self.shared.xdp.store(None);
        if let Some(x) = self.xdp.take() {
            x.shutdown();
        }
    }

    /// Writes FIB and peer changes into the XDP maps. A failure unloads nothing: it is logged,
    /// and retried at the next change.
    fn sync_xdp(&mut self) {
        if !self.xdp_dirty {
            return;
        }
        self.xdp_dirty = false;
        let Some(x) = &mut self.xdp else {
            return;
        };
        let fib = self.shared.fib.load();
        let peers = self.shared.peers.load();
        match x.sync(&fib, &peers) {
            Ok((written, removed)) if written + removed > 0 => {
                tracing::debug!(written, removed, "XDP maps updated");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("updating the XDP maps: {e}");
                self.xdp_dirty = true;
            }
        }
        // Attachments (new peers' interfaces) and map sizes may have changed.
        self.publish_xdp();
    }

    /// Serves the counters as JSON to every TCP connection on `listener` (HTTP/1.0 response).
    pub fn serve_stats(&mut self, listener: TcpListener) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        self.stats = Some(listener);
        Ok(())
    }

    fn counters(&self) -> &WorkerCounters {
        self.shared.counters.row(self.row)
    }

    /// Installs a static configuration (see [`crate::config`]).
    pub fn apply_static(&mut self, cfg: &StaticConfig) -> Result<(), crate::session::SessionError> {
        {
            let mut peers = (**self.shared.peers.load()).clone();
            for (id, addr) in &cfg.peers {
                peers.set(*id, Some(*addr));
            }
            self.shared.peers.store(Arc::new(peers));
        }
        self.fib.replace(cfg.routes.iter().copied());
        let now = self.shared.clock.now();
        for params in &cfg.sessions {
            let s = Session::new(params, now)?;
            self.shared.sessions.insert(Arc::new(s), true);
            self.installed.insert(params.local_index);
        }
        self.static_sessions = cfg.sessions.clone();
        self.renewed = now;
        self.xdp_dirty = true;
        self.sync_xdp();
        tracing::info!(
            peers = cfg.peers.len(),
            routes = cfg.routes.len(),
            sessions = cfg.sessions.len(),
            "static configuration installed"
        );
        Ok(())
    }

    fn dense_peer(&mut self, id: shm::PeerId) -> PeerId {
        if let Some(p) = self.peer_ids.get(&id.0) {
            return *p;
        }
        let p = self.next_peer;
        self.next_peer += 1;
        self.peer_ids.insert(id.0, p);
        p
    }

    /// Applies one record from the down-ring.
    pub fn apply(&mut self, record: &Record<'_>) {
        if matches!(
            record,
            Record::RouteAdd(_)
                | Record::RouteRemove(_)
                | Record::PeerUp(_)
                | Record::PeerDown(_)
                | Record::Resync(Resync::End { .. })
        ) {
            self.xdp_dirty = true;
        }
        match record {
            Record::RouteAdd(entries) => {
                self.batch.clear();
                for e in entries.iter() {
                    let Ok(prefix) = Prefix::new(e.prefix(), e.prefix_len()) else {
                        continue;
                    };
                    let peer = self.dense_peer(e.next_hop());
                    let metric = e.metric();
                    self.batch
                        .push(RouteUpdate::Add(prefix, NextHop { peer, metric }));
                    if let Some(s) = &mut self.staging {
                        s.routes.insert(prefix);
                    }
                }
                let batch = std::mem::take(&mut self.batch);
                self.fib.apply(&batch);
                self.batch = batch;
            }
            Record::RouteRemove(entries) => {
                self.batch.clear();
                for e in entries.iter() {
                    if let Ok(prefix) = Prefix::new(e.prefix(), e.prefix_len()) {
                        self.batch.push(RouteUpdate::Remove(prefix));
                    }
                }
                let batch = std::mem::take(&mut self.batch);
                self.fib.apply(&batch);
                self.batch = batch;
            }
            Record::PeerUp(up) => {
                let p = self.dense_peer(up.peer);
                let mut peers = (**self.shared.peers.load()).clone();
                peers.set(p, Some(up.underlay));
                self.shared.peers.store(Arc::new(peers));
                if let Some(s) = &mut self.staging {
                    s.peers.insert(up.peer.0);
                }
            }
            Record::PeerDown(id) => {
                if let Some(p) = self.peer_ids.get(&id.0).copied() {
                    let mut peers = (**self.shared.peers.load()).clone();
                    peers.set(p, None);
                    self.shared.peers.store(Arc::new(peers));
                }
            }
            Record::SessionKeyInstall(key) => self.install_key(key),
            Record::SessionKeyRemove(id) => match id.direction {
                KeyDirection::Receive => {
                    self.shared.sessions.remove(id.index);
                    self.installed.remove(&id.index);
                }
                KeyDirection::Send => {
                    let current = self
                        .shared
                        .sessions
                        .load()
                        .for_dest(upper64(&id.peer))
                        .filter(|s| s.remote_index() == id.index)
                        .map(|s| s.local_index());
                    if let Some(local) = current {
                        self.shared.sessions.remove(local);
                        self.installed.remove(&local);
                    }
                }
            },
            Record::PacketToSend { to, bytes } => self.send(*to, bytes),
            Record::Resync(Resync::Begin { generation }) => {
                tracing::info!(generation, "control plane resync started");
                self.staging = Some(Staging {
                    generation: *generation,
                    ..Staging::default()
                });
            }
            Record::Resync(Resync::End { generation }) => self.finish_resync(*generation),
            // Up-ring records arriving on the down-ring: ignore.
            Record::PuntedPacket { .. } | Record::Event(_) => {
                self.counters().inc(Counter::dropped_malformed);
            }
        }
    }

    fn install_key(&mut self, key: &SessionKey) {
        let prefix = upper64(&key.peer);
        let entry = self.pending_keys.entry(prefix).or_default();
        match key.direction {
            KeyDirection::Receive => entry.0 = Some(*key),
            KeyDirection::Send => entry.1 = Some(*key),
        }
        let (Some(rx), Some(tx)) = *entry else {
            return;
        };
        self.pending_keys.remove(&prefix);
        if rx.cipher != tx.cipher {
            tracing::warn!(peer = %key.peer, "session keys with different ciphers; ignored");
            return;
        }
        let params = SessionParams {
            local_index: rx.index,
            remote_index: tx.index,
            remote_prefix: prefix,
            cipher: cipher(rx.cipher),
            send_key: tx.key,
            recv_key: rx.key,
            initiator: false,
            // A re-installed key (a restarted dataplane getting a full replay) continues where
            // the control plane says: never reuse a nonce, never accept an old counter again.
            send_counter: tx.counter,
            replay_base: rx.counter,
        };
        match Session::new(&params, self.shared.clock.now()) {
            Ok(s) => {
                self.shared.sessions.insert(Arc::new(s), true);
                self.installed.insert(rx.index);
                if let Some(st) = &mut self.staging {
                    st.sessions.insert(rx.index);
                }
                tracing::debug!(peer = %key.peer, index = rx.index, "session installed");
            }
            Err(e) => tracing::warn!(peer = %key.peer, "session key refused: {e}"),
        }
    }

    fn finish_resync(&mut self, generation: u64) {
        let Some(st) = self.staging.take() else {
            return;
        };
        if st.generation != generation {
            tracing::warn!(
                generation,
                expected = st.generation,
                "resync end for another generation"
            );
            self.staging = Some(st);
            return;
        }
        let stale: Vec<RouteUpdate> = self
            .fib
            .handle()
            .load()
            .routes()
            .filter(|(p, _)| !st.routes.contains(p))
            .map(|(p, _)| RouteUpdate::Remove(p))
            .collect();
        if !stale.is_empty() {
            self.fib.apply(&stale);
        }
        let mut peers = (**self.shared.peers.load()).clone();
        let mut removed_peers = 0;
        for (shm_id, dense) in &self.peer_ids {
            if !st.peers.contains(shm_id) && peers.get(*dense).is_some() {
                peers.set(*dense, None);
                removed_peers += 1;
            }
        }
        self.shared.peers.store(Arc::new(peers));
        let stale_sessions: Vec<u32> = self
            .installed
            .iter()
            .filter(|i| !st.sessions.contains(i))
            .copied()
            .collect();
        for i in &stale_sessions {
            self.shared.sessions.remove(*i);
            self.installed.remove(i);
        }
        tracing::info!(
            generation,
            stale_routes = stale.len(),
            stale_peers = removed_peers,
            stale_sessions = stale_sessions.len(),
            "control plane resync complete"
        );
    }

    fn send(&mut self, to: SendTo, bytes: &[u8]) {
        match to {
            SendTo::Peer(id) => {
                let addr = self
                    .peer_ids
                    .get(&id.0)
                    .and_then(|p| self.shared.peers.load().get(*p).map(|a| a.addr));
                match addr {
                    Some(a) => self.send_to(bytes, &a),
                    None => self.counters().inc(Counter::dropped_no_peer),
                }
            }
            SendTo::Overlay(dst) => self.send_overlay(dst, bytes),
        }
    }

    fn send_to(&self, bytes: &[u8], to: &SocketAddr) {
        match udp::send_to(&self.send_fd, bytes, to) {
            Ok(n) => {
                self.counters().inc(Counter::udp_tx_packets);
                self.counters().add(Counter::udp_tx_bytes, n as u64);
            }
            Err(_) => self.counters().inc(Counter::io_errors),
        }
    }

    fn send_overlay(&mut self, dst: std::net::Ipv6Addr, bytes: &[u8]) {
        let Some((hdr_dst, kind)) = data_dst(bytes) else {
            self.counters().inc(Counter::dropped_malformed);
            return;
        };
        if hdr_dst != dst {
            self.counters().inc(Counter::dropped_malformed);
            return;
        }
        let fib = self.shared.fib.load();
        let Some(hop) = fib.lookup(&dst) else {
            self.counters().inc(Counter::dropped_no_route);
            let e = Record::Event(Event::NoRoute(dst));
            self.shared.punt(self.counters(), &e);
            return;
        };
        let Some(peer) = self.shared.peers.load().get(hop.peer).map(|p| p.addr) else {
            self.counters().inc(Counter::dropped_no_peer);
            return;
        };
        if kind != Kind::Transport {
            self.send_to(bytes, &peer);
            return;
        }
        let sessions = self.shared.sessions.load();
        let Some(session) = sessions.for_dest(upper64(&dst)) else {
            self.counters().inc(Counter::dropped_no_session);
            let e = Record::Event(Event::NoSession(dst));
            self.shared.punt(self.counters(), &e);
            return;
        };
        let Ok(counter) = session.next_counter(self.shared.clock.now()) else {
            self.counters().inc(Counter::dropped_expired);
            return;
        };
        let Some(mut buf) = self.scratch.alloc() else {
            return;
        };
        let plain = bytes.get(HEADER_LEN..).unwrap_or(&[]);
        let fits = buf.tailroom() >= plain.len() + crate::session::TAG_LEN;
        let ok = match buf.extend_tail(plain.len()) {
            Ok(room) if fits => {
                room.copy_from_slice(plain);
                let src = hypha_proto::wire::data::Packet::new_unchecked(bytes).src_addr();
                let repr = Repr {
                    hop_limit: INITIAL_HOP_LIMIT,
                    kind: Kind::Transport,
                    receiver_index: session.remote_index(),
                    counter,
                    src,
                    dst,
                };
                seal_payload(session, &repr, &mut buf).is_ok()
            }
            _ => false,
        };
        if ok {
            self.send_to(buf.data(), &peer);
        } else {
            self.counters().inc(Counter::dropped_malformed);
        }
        let _ = self.scratch.free(buf);
    }

    /// Static mode has no handshakes, so sessions would hit REJECT_AFTER_TIME: every
    /// [`STATIC_RENEW`] each is replaced by a fresh one with the same keys, its send counter
    /// [`STATIC_COUNTER_GAP`] past the old one and its replay window starting above the highest
    /// counter received (so nothing old can be replayed into the new one).
    fn renew_static(&mut self, now: Instant) {
        self.renewed = now;
        let current = self.shared.sessions.load();
        let mut renewed = Vec::with_capacity(self.static_sessions.len());
        for params in &self.static_sessions {
            let mut p = params.clone();
            if let Some(old) = current.get(params.local_index) {
                p.send_counter = old.sent().saturating_add(STATIC_COUNTER_GAP);
                p.replay_base = old.highest_received().map_or(0, |h| h.saturating_add(1));
            }
            if let Ok(s) = Session::new(&p, now) {
                renewed.push(Arc::new(s));
            }
        }
        drop(current);
        for s in renewed {
            self.shared.sessions.insert(s, true);
        }
        tracing::debug!("static sessions renewed");
    }

    /// Periodic work: counters up the ring, expired sessions out, stats requests answered.
    pub fn housekeeping(&mut self, now: Instant, publish: bool) {
        if publish {
            if self.shared.up.is_some() {
                for i in 0..self.shared.counters.rows() {
                    let snap = self.shared.counters.row_snapshot(i);
                    let e = Record::Event(Event::Counters(snap.to_shm(i as u32)));
                    self.shared.punt(self.counters(), &e);
                }
            }
            if !self.static_sessions.is_empty()
                && now.saturating_duration_since(self.renewed) >= STATIC_RENEW
            {
                self.renew_static(now);
            }
            let expired = self.shared.sessions.remove_expired(now);
            if expired > 0 {
                tracing::info!(expired, "expired sessions removed");
            }
        }
        self.answer_stats();
    }

    /// The JSON document the stats endpoint serves (the hand-over socket serves the same).
    pub fn stats_json(&self) -> serde_json::Value {
        stats_json(&self.shared)
    }

    fn answer_stats(&mut self) {
        let Some(listener) = &self.stats else {
            return;
        };
        while let Ok((mut conn, _)) = listener.accept() {
            let _ = conn.set_nonblocking(false);
            let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
            // Read the request (if any) so closing doesn't reset the connection.
            let mut req = [0u8; 1024];
            let mut got = 0;
            while got < req.len() {
                match conn.read(&mut req[got..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        got += n;
                        if req[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                }
            }
            let body = self.stats_json().to_string();
            let _ = write!(
                conn,
                "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
                body.len(),
                body
            );
        }
    }

    /// The control loop: applies down-ring records (or just waits, without a ring), does the
    /// housekeeping, until `shared.stop` is set.
    pub fn run(&mut self, mut down: Option<Consumer>) {
        let mut last = self.shared.clock.now();
        while !self.shared.stopping() {
            match &mut down {
                Some(consumer) => {
                    if let Some(change) = consumer.poll_epoch() {
                        tracing::info!(
                            previous = change.previous,
                            current = change.current,
                            "control plane (re)started; forwarding continues on the current state"
                        );
                    }
                    match consumer.wait(Duration::from_millis(50)) {
                        Ok(true) => {
                            let r = consumer.drain(256, |rec| match rec {
                                Ok(received) => self.apply(&received.record),
                                Err(e) => {
                                    tracing::debug!("bad shm record: {e}");
                                    self.counters().inc(Counter::dropped_malformed);
                                }
                            });
                            if let Err(e) = r {
                                tracing::error!("shm down-ring corrupt: {e}; stopping");
                                self.shared
                                    .stop
                                    .store(true, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!("shm wait failed: {e}; stopping");
                            self.shared
                                .stop
                                .store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
            self.sync_xdp();
            let now = self.shared.clock.now();
            let publish = now.saturating_duration_since(last) >= HOUSEKEEPING;
            if publish {
                last = now;
            }
            self.housekeeping(now, publish);
        }
    }
}
