//! TLVs in and TLVs out (babeld's message.c, split as STYLE.md asks): parsing is
//! `hypha_proto::babel`'s job; here each parsed TLV becomes a table call (§3.4–§3.8), and buffered
//! output becomes packets at flush time.

use std::net::IpAddr;
use std::time::Duration;

use hypha_proto::babel::{
    Hello, Ihu, Packet, PacketBuilder, Prefix, SeqnoRequest, Tlv, Update, HELLO_FLAG_UNICAST,
    INFINITY,
};
use hypha_proto::time::Instant;

use super::interface::{Buffered, Interface, InterfaceKind};
use super::neighbour::{Neighbour, NeighbourKey};
use super::resend::Recorded;
use super::route::{route_metric, Route};
use super::seqno::SeqNo;
use super::{Destination, Error, InterfaceId, PeerMisbehaved, Router, Transmit};

/// Wire intervals are centiseconds.
fn centis(cs: u16) -> Duration {
    Duration::from_millis(u64::from(cs) * 10)
}

/// RFC 9616 timestamps: our clock in microseconds, modulo 2^32.
fn timestamp(now: Instant) -> u32 {
    now.as_micros() as u32
}

impl Router {
    /// Handles one Babel packet (header and body; the trailer is left to the caller's RFC 8967
    /// check) received on `iface` from `from`. Unknown sources become neighbours (up to
    /// [`RouterConfig::max_neighbours`](super::RouterConfig::max_neighbours)). Malformed TLVs and
    /// forbidden Updates are counted and skipped; the rest of the packet is still processed, and
    /// the first error is returned.
    pub fn handle_packet(
        &mut self,
        now: Instant,
        iface: InterfaceId,
        from: IpAddr,
        packet: &[u8],
    ) -> Result<(), Error> {
        if !self.interfaces.contains_key(&iface) {
            return Err(Error::UnknownInterface(iface));
        }
        self.counters.packets_received += 1;
        let packet = match Packet::new_checked(packet) {
            Ok(p) => p,
            Err(e) => {
                self.counters.packets_invalid += 1;
                return Err(e.into());
            }
        };
        let key = NeighbourKey { iface, addr: from };
        if !self.neighbours.contains_key(&key) {
            if self.neighbours.len() >= self.config.max_neighbours {
                self.counters.neighbours_refused += 1;
                return Err(Error::TooManyNeighbours);
            }
            self.neighbours.insert(key, Neighbour::new());
            // Say hello back right away rather than at the next Hello interval.
            self.send_hello(now, iface);
        }
        // RFC 9616 §3.3: an IHU's timestamps are only usable with the Hello timestamp of the same
        // packet, wherever in the packet it is; so the RTT sample is taken after the loop.
        let mut hello_ts = None;
        let mut ihu_ts = None;
        let mut first_err = None;
        let mut changed = false;
        for tlv in packet.tlvs() {
            self.counters.tlvs_received += 1;
            let r = match tlv {
                Err(e) => {
                    self.counters.tlvs_invalid += 1;
                    Err(Error::from(e))
                }
                Ok(Tlv::Hello(h)) => {
                    hello_ts = hello_ts.or(h.timestamp);
                    changed |= self.handle_hello(now, key, &h);
                    Ok(())
                }
                Ok(Tlv::Ihu(i)) => {
                    if self.handle_ihu(now, key, &i) {
                        changed = true;
                        ihu_ts = ihu_ts.or(i.timestamp);
                    }
                    Ok(())
                }
                Ok(Tlv::Update(u)) => self.handle_update(now, key, &u),
                Ok(Tlv::RouteRequest(r)) => {
                    self.handle_route_request(now, key, r.prefix);
                    Ok(())
                }
                Ok(Tlv::SeqnoRequest(r)) => {
                    self.handle_seqno_request(now, key, &r);
                    Ok(())
                }
                Ok(Tlv::AckReq(a)) => {
                    self.send_ack(now, key, a.opaque);
                    Ok(())
                }
                Ok(Tlv::Unknown { .. }) => {
                    self.counters.tlvs_unknown += 1;
                    Ok(())
                }
                Ok(Tlv::Ignored { .. }) => {
                    self.counters.tlvs_ignored += 1;
                    Ok(())
                }
                // Pad1, PadN, Ack (we never request acks), and the Router-Id and Next Hop state
                // TLVs, already folded into the Updates by the parser.
                Ok(_) => Ok(()),
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        if let (Some(ts), Some(t3)) = (ihu_ts, hello_ts) {
            self.rtt_sample(now, key, ts, t3);
        }
        if changed {
            self.neighbour_changed(now, key);
        }
        first_err.map_or(Ok(()), Err)
    }

    /// §3.4.1 / §A.1: a Hello updates the neighbour's history (multicast and unicast apart).
    fn handle_hello(&mut self, now: Instant, key: NeighbourKey, h: &Hello) -> bool {
        let Some(n) = self.neighbours.get_mut(&key) else {
            return false;
        };
        let hist = if h.flags & HELLO_FLAG_UNICAST != 0 {
            &mut n.uhello
        } else {
            &mut n.hello
        };
        hist.update(now, SeqNo(h.seqno), centis(h.interval));
        if let Some(ts) = h.timestamp {
            n.hello_ts = Some((ts, timestamp(now)));
        }
        true
    }

    /// §3.4.2: an IHU addressed to us sets the neighbour's txcost. Returns whether it was ours.
    fn handle_ihu(&mut self, now: Instant, key: NeighbourKey, ihu: &Ihu) -> bool {
        let Some(ifc) = self.interfaces.get(&key.iface) else {
            return false;
        };
        let for_us = match ihu.addr {
            None => true,
            Some(a) => {
                ifc.cfg.kind == InterfaceKind::PointToPoint
                    || ifc.cfg.local_addrs.is_empty()
                    || ifc.cfg.local_addrs.contains(&a)
            }
        };
        if !for_us {
            self.counters.ihus_not_for_us += 1;
            return false;
        }
        let hello_interval = ifc.cfg.hello_interval;
        let Some(n) = self.neighbours.get_mut(&key) else {
            return false;
        };
        n.txcost = ihu.rxcost;
        let interval = if ihu.interval == 0 {
            hello_interval * 3
        } else {
            centis(ihu.interval)
        };
        n.ihu_expires = Some(now + interval.mul_f32(3.5));
        true
    }

    /// An RTT sample from an IHU's (origin, receive) timestamps and the same packet's Hello
    /// timestamp t3 (RFC 9616 §3.3: RTT = (t4 − t1) − (t3 − t2), all wrapping microseconds, with
    /// babeld's sanity window of 10 minutes).
    fn rtt_sample(
        &mut self,
        now: Instant,
        key: NeighbourKey,
        (origin, receive): (u32, u32),
        t3: u32,
    ) {
        let Some(cfg) = self.interfaces.get(&key.iface).and_then(|i| i.cfg.rtt) else {
            return;
        };
        let Some(n) = self.neighbours.get_mut(&key) else {
            return;
        };
        let local = timestamp(now).wrapping_sub(origin) as i32;
        let remote = t3.wrapping_sub(receive) as i32;
        if origin != 0 && (0..600_000_000).contains(&local) && (0..600_000_000).contains(&remote) {
            let sample = (local - remote).max(0) as u32;
            n.add_rtt_sample(now, sample, cfg.decay);
        }
    }

    /// §3.5.3: an Update (or retraction) from a neighbour.
    fn handle_update(&mut self, now: Instant, key: NeighbourKey, u: &Update) -> Result<(), Error> {
        self.counters.updates_received += 1;
        let Some(prefix) = u.prefix else {
            // AE 0: retract every route through this neighbour (§4.6.9).
            self.retract_neighbour_routes(now, key);
            return Ok(());
        };
        let retraction = u.metric == INFINITY;
        if let Err(e) = self
            .config
            .filter
            .check(&prefix, u.origin_key.as_ref(), retraction)
        {
            self.counters.updates_filtered += 1;
            return Err(e.into());
        }
        // The next hop: a Next Hop TLV of the right family, else the sender (§4.5).
        let v6_nh = !prefix.is_ipv4() || u.v4_via_v6;
        let next_hop = match (u.next_hop, key.addr) {
            (Some(nh), _) => Some(nh),
            (None, IpAddr::V6(a)) if v6_nh => Some(IpAddr::V6(a)),
            (None, IpAddr::V4(a)) if !v6_nh => Some(IpAddr::V4(a)),
            _ => None,
        };
        let Some(next_hop) = next_hop else {
            if retraction {
                return Ok(());
            }
            self.counters.updates_no_next_hop += 1;
            return Err(PeerMisbehaved::NoNextHop { prefix }.into());
        };
        if self.xroutes.find(&prefix).is_some() {
            self.counters.updates_for_own_prefix += 1;
            return Ok(());
        }
        let interval = if u.interval == 0 {
            Duration::from_secs(16)
        } else {
            centis(u.interval)
        };
        let expires = now + interval.mul_f32(3.5);
        let seqno = SeqNo(u.seqno);
        let router_id = u.router_id;
        if let (false, Some(rid)) = (retraction, router_id) {
            self.resend.satisfy_request(&prefix, &rid, seqno);
        }
        let feasible = match router_id {
            Some(rid) => self.sources.is_feasible(&prefix, &rid, seqno, u.metric),
            None => true,
        };
        if !feasible {
            self.counters.updates_unfeasible += 1;
        }
        let entry = self.routes.prefixes.get(&prefix);
        let existing = entry.and_then(|e| e.routes.iter().position(|r| r.neighbour == key));
        match existing {
            None => {
                if retraction {
                    return Ok(());
                }
                let Some(rid) = router_id else {
                    return Ok(());
                };
                if !feasible {
                    self.unfeasible_update(now, key, prefix, rid, u.metric);
                    return Ok(());
                }
                if self.routes.count >= self.config.max_routes {
                    self.counters.routes_refused += 1;
                    return Ok(());
                }
                self.routes.count += 1;
                self.routes
                    .prefixes
                    .entry(prefix)
                    .or_default()
                    .routes
                    .push(Route {
                        neighbour: key,
                        router_id: rid,
                        seqno,
                        refmetric: u.metric,
                        next_hop,
                        origin_key: u.origin_key,
                        interval,
                        expires,
                        selected: false,
                        refresh_requested: false,
                    });
            }
            Some(i) => {
                let Some(r) = self
                    .routes
                    .prefixes
                    .get_mut(&prefix)
                    .and_then(|e| e.routes.get_mut(i))
                else {
                    return Ok(());
                };
                r.interval = interval;
                r.expires = expires;
                r.refresh_requested = false;
                if retraction {
                    r.refmetric = INFINITY;
                } else if let Some(rid) = router_id {
                    r.router_id = rid;
                    r.seqno = seqno;
                    r.refmetric = u.metric;
                    r.next_hop = next_hop;
                    r.origin_key = u.origin_key;
                    if !feasible {
                        self.unfeasible_update(now, key, prefix, rid, u.metric);
                    }
                }
            }
        }
        self.reselect(now, prefix);
        Ok(())
    }

    /// An unfeasible Update (§3.8.2.2, babeld `send_unfeasible_request`): if it would be much better
    /// than what we have, ask its sender for a newer seqno so that it becomes feasible.
    fn unfeasible_update(
        &mut self,
        now: Instant,
        key: NeighbourKey,
        prefix: Prefix,
        router_id: super::RouterId,
        refmetric: u16,
    ) {
        let metric = route_metric(refmetric, self.cost_of(&key));
        let current = self
            .routes
            .find_selected(&prefix)
            .map(|r| self.metric_of(r));
        if current.is_none_or(|c| u32::from(c) >= u32::from(metric) + 256) {
            self.request_seqno(now, key, prefix, router_id);
        }
    }

    /// A wildcard retraction: every route through `key` becomes a retraction.
    fn retract_neighbour_routes(&mut self, now: Instant, key: NeighbourKey) {
        let mut touched = Vec::new();
        for (p, e) in self.routes.prefixes.iter_mut() {
            for r in e.routes.iter_mut().filter(|r| r.neighbour == key) {
                r.refmetric = INFINITY;
                touched.push(*p);
            }
        }
        for p in touched {
            self.reselect(now, p);
        }
    }

    /// §3.8.1.1: a wildcard request gets a full dump (unless one went out within a Hello interval,
    /// as babeld avoids update storms at boot); a specific one an Update for that prefix, which is
    /// a retraction if we have no route.
    fn handle_route_request(&mut self, now: Instant, key: NeighbourKey, prefix: Option<Prefix>) {
        self.counters.route_requests_received += 1;
        match prefix {
            None => {
                let recent = self.interfaces.get(&key.iface).is_some_and(|i| {
                    i.last_full_update
                        .is_some_and(|t| now - t < i.cfg.hello_interval)
                });
                if !recent {
                    self.send_full_update(now, key.iface);
                }
            }
            Some(p) => {
                // Known prefixes are bounded by our tables; answers about unknown ones (which are
                // retractions) are bounded here, so a neighbour asking about many cannot grow the
                // buffer.
                let known =
                    self.xroutes.find(&p).is_some() || self.routes.prefixes.contains_key(&p);
                let room = self.interfaces.get(&key.iface).is_some_and(|i| {
                    i.mcast.updates.len() < super::interface::MAX_BUFFERED_REQUESTS
                });
                if known || room {
                    self.send_update(now, key.iface, p, true);
                } else {
                    self.counters.output_dropped += 1;
                }
            }
        }
    }

    /// §3.8.1.2: answer a seqno request if we can, else forward it along our selected route.
    fn handle_seqno_request(&mut self, now: Instant, key: NeighbourKey, req: &SeqnoRequest) {
        self.counters.seqno_requests_received += 1;
        let prefix = req.prefix;
        let seqno = SeqNo(req.seqno);
        if self.xroutes.find(&prefix).is_some() {
            if req.router_id == self.config.router_id && seqno.is_newer_than(self.seqno) {
                // Bumps our seqno (rate-limited) and announces every xroute.
                self.bump_seqno(now);
            }
            self.send_update(now, key.iface, prefix, true);
            return;
        }
        let Some(route) = self.routes.find_selected(&prefix) else {
            return;
        };
        if self.metric_of(route) == INFINITY {
            return;
        }
        if route.router_id != req.router_id || route.seqno.is_at_least(seqno) {
            self.send_update(now, key.iface, prefix, true);
            return;
        }
        let to = route.neighbour;
        if req.hop_count < 2 || to == key {
            return;
        }
        let fwd = SeqnoRequest {
            hop_count: req.hop_count - 1,
            ..*req
        };
        match self.resend.record_request(
            prefix,
            req.router_id,
            seqno,
            fwd.hop_count,
            Some(key),
            to,
            now + self.config.request_timeout,
        ) {
            Recorded::Send => {
                self.counters.seqno_requests_forwarded += 1;
                self.send_seqno_request(now, to, fwd);
            }
            Recorded::Duplicate => self.counters.seqno_requests_duplicate += 1,
            Recorded::Full => self.counters.output_dropped += 1,
        }
    }

    /// The next packet due, written into `buf` (cleared first): a whole Babel packet with no
    /// trailer. Call until it returns `None`.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        let ids: Vec<InterfaceId> = self.interfaces.keys().copied().collect();
        for id in ids {
            while let Some(ifc) = self.interfaces.get_mut(&id) {
                let due = |b: &Buffered| b.flush_at.is_some_and(|t| t <= now);
                let (dst, mut b) = if due(&ifc.mcast) {
                    (Destination::Multicast, std::mem::take(&mut ifc.mcast))
                } else if let Some(addr) = ifc.ucast.iter().find(|(_, b)| due(b)).map(|(a, _)| *a) {
                    match ifc.ucast.remove(&addr) {
                        Some(b) => (Destination::Unicast(addr), b),
                        None => break,
                    }
                } else {
                    break;
                };
                let wrote = self.build_packet(now, id, dst, &mut b, buf);
                if let Some(ifc) = self.interfaces.get_mut(&id) {
                    b.flush_at = (!b.is_empty()).then_some(now);
                    match dst {
                        Destination::Multicast => ifc.mcast = b,
                        Destination::Unicast(addr) => {
                            if !b.is_empty() {
                                ifc.ucast.insert(addr, b);
                            }
                        }
                    }
                }
                if wrote {
                    self.counters.packets_sent += 1;
                    return Some(Transmit { iface: id, dst });
                }
            }
        }
        None
    }

    /// Writes what fits of `b` into one packet. Returns false if nothing was worth sending.
    fn build_packet(
        &mut self,
        now: Instant,
        id: InterfaceId,
        dst: Destination,
        b: &mut Buffered,
        buf: &mut Vec<u8>,
    ) -> bool {
        let Some(ifc) = self.interfaces.get(&id) else {
            b.updates.clear();
            return false;
        };
        let cfg = ifc.cfg.clone();
        let hello_seqno = ifc.hello_seqno;
        let mut p = PacketBuilder::new(buf, cfg.max_packet_size).compress(true);
        // IHUs go before the Hello: receivers pair them with the Hello's timestamp wherever it is
        // in the packet (RFC 9616 §3.3; babeld too), and Wireshark/tshark 4.0 reports a packet
        // that ends with a timestamped IHU as malformed (babeld 1.12's own packets included).
        if b.ihu {
            // IHUs go with every Hello, so their interval is the Hello interval. A neighbour table
            // too big for one packet continues in the next one, from where this one stopped.
            let interval = Interface::centis(cfg.hello_interval);
            let from = b
                .ihu_from
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
            b.ihu = false;
            b.ihu_from = None;
            for (k, n) in self.neighbours.range(
                NeighbourKey {
                    iface: id,
                    addr: from,
                }..,
            ) {
                if k.iface != id {
                    break;
                }
                if let Destination::Unicast(a) = dst {
                    if k.addr != a {
                        continue;
                    }
                }
                let ihu = Tlv::Ihu(Ihu {
                    rxcost: n.rxcost,
                    interval,
                    addr: match cfg.kind {
                        InterfaceKind::PointToPoint => None,
                        _ => Some(k.addr),
                    },
                    timestamp: cfg.rtt.and(n.hello_ts),
                });
                if p.push(&ihu).is_err() {
                    if !p.is_empty() {
                        b.ihu = true;
                        b.ihu_from = Some(k.addr);
                    }
                    break;
                }
            }
        }
        if b.hello {
            let hello = Tlv::Hello(Hello {
                flags: 0,
                seqno: hello_seqno.0,
                interval: Interface::centis(cfg.hello_interval),
                timestamp: cfg.rtt.map(|_| timestamp(now)),
            });
            if p.push(&hello).is_ok() {
                b.hello = false;
                if let Some(ifc) = self.interfaces.get_mut(&id) {
                    ifc.hello_seqno = hello_seqno.plus(1);
                }
            }
        }
        while let Some(opaque) = b.acks.first().copied() {
            if p.push(&Tlv::Ack(opaque)).is_err() {
                break;
            }
            b.acks.remove(0);
        }
        while let Some(req) = b.seqno_requests.first().copied() {
            if p.push(&Tlv::SeqnoRequest(req)).is_err() {
                break;
            }
            b.seqno_requests.remove(0);
        }
        while let Some(prefix) = b.route_requests.first().copied() {
            let t = Tlv::RouteRequest(hypha_proto::babel::RouteRequest { prefix });
            if p.push(&t).is_err() {
                break;
            }
            b.route_requests.pop_first();
        }
        while let Some(prefix) = b.updates.first().copied() {
            match self.update_tlv(now, id, &cfg, prefix) {
                None => {
                    b.updates.pop_first();
                }
                Some(u) => {
                    if p.push(&Tlv::Update(u)).is_err() {
                        break;
                    }
                    b.updates.pop_first();
                    if u.metric < INFINITY {
                        if let (Some(rid), false) =
                            (u.router_id, self.xroutes.find(&prefix).is_some())
                        {
                            // §3.7.3: what we announce bounds what we may accept later.
                            self.sources
                                .update_source(now, prefix, rid, SeqNo(u.seqno), u.metric);
                        }
                    }
                }
            }
        }
        if p.is_empty() {
            // Nothing fitted in an empty packet: drop what cannot ever fit rather than spin.
            b.hello = false;
            b.acks.clear();
            b.seqno_requests.clear();
            b.route_requests.clear();
            b.updates.clear();
            return false;
        }
        p.finish();
        true
    }

    /// The Update we would send about `prefix` on interface `id` right now: our own, our selected
    /// route's (unless split horizon forbids, §3.7.4), or a retraction.
    fn update_tlv(
        &self,
        _now: Instant,
        id: InterfaceId,
        cfg: &super::InterfaceConfig,
        prefix: Prefix,
    ) -> Option<Update> {
        let interval = Interface::centis(cfg.update_interval);
        // IPv4 routes: our IPv4 address on the NIC as Next Hop, else v4-via-v6 (RFC 9229).
        let v4_nh = match cfg.kind {
            InterfaceKind::Broadcast => cfg.local_addrs.iter().copied().find(IpAddr::is_ipv4),
            _ => None,
        };
        let (next_hop, v4_via_v6) = if prefix.is_ipv4() {
            (v4_nh, v4_nh.is_none())
        } else {
            (None, false)
        };
        if let Some(x) = self.xroutes.find(&prefix) {
            return Some(Update {
                prefix: Some(prefix),
                v4_via_v6,
                interval,
                seqno: self.seqno.0,
                metric: x.metric,
                router_id: Some(self.config.router_id),
                next_hop,
                origin_key: x.origin_key,
            });
        }
        let route = self
            .routes
            .find_selected(&prefix)
            .filter(|r| self.metric_of(r) < INFINITY);
        match route {
            Some(r) => {
                if cfg.split_horizon && r.neighbour.iface == id {
                    return None;
                }
                Some(Update {
                    prefix: Some(prefix),
                    v4_via_v6,
                    interval,
                    seqno: r.seqno.0,
                    metric: self.metric_of(r),
                    router_id: Some(r.router_id),
                    next_hop,
                    origin_key: r.origin_key,
                })
            }
            None => Some(Update {
                prefix: Some(prefix),
                v4_via_v6,
                interval,
                seqno: self.seqno.0,
                metric: INFINITY,
                router_id: None,
                next_hop: None,
                origin_key: None,
            }),
        }
    }
}
