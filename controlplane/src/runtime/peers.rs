//! The runtime's view of its peers: configured peers with their reconnect schedule, inbound peers,
//! which links belong to which, and per-peer byte counters for the API.
//!
//! Why here and not in the link layer: *whom* to connect to and *when to retry* is policy of the
//! daemon (flags, config file, backoff), while the link layer only knows handshakes and links. A
//! configured peer is retried forever with [`Backoff`]; a peer that connects to us is shown as
//! `inbound` while its link lives. Several links may exist to one endpoint for a moment (both sides
//! connected at once); the peer is alive while any of them is.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use hypha_proto::time::Instant;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::backoff::Backoff;
use crate::api::{ConnectionState, Endpoint, PeerInfo, PeerType};

/// How long a connect may stay unanswered before the runtime counts it as failed, in case the link
/// layer never reports the outcome (it should, after its handshake timeout).
const CONNECT_GUARD: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// Waiting until the instant to try again.
    Wait(Instant),
    /// A handshake was started at this instant.
    Connecting(Instant),
}

#[derive(Debug)]
struct Peer<L> {
    kind: PeerType,
    links: Vec<L>,
    attempt: Attempt,
    backoff: Backoff,
    /// The peer's public key (64 hex digits) and overlay address once a link came up.
    identity: Option<(String, String)>,
    tx_bytes: u64,
    rx_bytes: u64,
}

impl<L> Peer<L> {
    fn new(kind: PeerType, now: Instant) -> Self {
        Peer {
            kind,
            links: Vec::new(),
            attempt: Attempt::Wait(now),
            backoff: Backoff::default(),
            identity: None,
            tx_bytes: 0,
            rx_bytes: 0,
        }
    }
}

/// Why a peer could not be added or removed at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The endpoint is already a configured peer.
    #[error("the peer already exists")]
    AlreadyExists,
    /// No peer has this endpoint.
    #[error("no such peer")]
    NotFound,
    /// The event loop did not take the command (it is stopping or overloaded).
    #[error("the node did not answer")]
    Unavailable,
}

/// Peers by endpoint (underlay address, IPv4 addresses never v4-mapped).
#[derive(Debug)]
pub struct PeerTable<L> {
    peers: BTreeMap<SocketAddr, Peer<L>>,
    rng: StdRng,
}

impl<L: Copy + Eq> PeerTable<L> {
    /// Configured peers, all due for a first attempt at `now`.
    pub fn new(now: Instant, configured: &[SocketAddr], seed: u64) -> Self {
        let peers = configured
            .iter()
            .map(|&e| (e, Peer::new(PeerType::Static, now)))
            .collect();
        PeerTable {
            peers,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Adds a configured peer at run time, due for a connect attempt at `now`. A peer that is
    /// connected to us already (inbound) becomes configured and keeps its links.
    pub fn add(&mut self, now: Instant, endpoint: SocketAddr) -> Result<(), PeerError> {
        match self.peers.get_mut(&endpoint) {
            Some(p) if p.kind == PeerType::Static => Err(PeerError::AlreadyExists),
            Some(p) => {
                p.kind = PeerType::Static;
                p.attempt = Attempt::Wait(now);
                Ok(())
            }
            None => {
                self.peers
                    .insert(endpoint, Peer::new(PeerType::Static, now));
                Ok(())
            }
        }
    }

    /// Forgets a peer (configured or inbound); returns its links, which the caller tears down.
    pub fn remove(&mut self, endpoint: SocketAddr) -> Result<Vec<L>, PeerError> {
        self.peers
            .remove(&endpoint)
            .map(|p| p.links)
            .ok_or(PeerError::NotFound)
    }

    /// The next configured peer that is due for a connect attempt; marks it as connecting.
    pub fn poll_connect(&mut self, now: Instant) -> Option<SocketAddr> {
        for (endpoint, p) in self.peers.iter_mut() {
            if p.kind != PeerType::Static || !p.links.is_empty() {
                continue;
            }
            if let Attempt::Wait(at) = p.attempt {
                if at <= now {
                    p.attempt = Attempt::Connecting(now);
                    return Some(*endpoint);
                }
            }
        }
        None
    }

    /// Expires connects that the link layer never answered.
    pub fn handle_timeout(&mut self, now: Instant) {
        let stuck: Vec<SocketAddr> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                p.links.is_empty()
                    && matches!(p.attempt, Attempt::Connecting(t) if t + CONNECT_GUARD <= now)
            })
            .map(|(e, _)| *e)
            .collect();
        for e in stuck {
            self.on_handshake_failed(now, e);
        }
    }

    /// When [`Self::poll_connect`] or [`Self::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter(|p| p.kind == PeerType::Static && p.links.is_empty())
            .map(|p| match p.attempt {
                Attempt::Wait(t) => t,
                Attempt::Connecting(t) => t + CONNECT_GUARD,
            })
            .min()
    }

    /// A link came up with `remote`; `identity` is the peer's (pubkey hex, overlay address).
    pub fn on_up(&mut self, link: L, remote: SocketAddr, identity: (String, String)) {
        let p = self
            .peers
            .entry(remote)
            .or_insert_with(|| Peer::new(PeerType::Inbound, Instant::ZERO));
        if !p.links.contains(&link) {
            p.links.push(link);
        }
        p.backoff.reset();
        p.identity = Some(identity);
    }

    /// A link went down: a configured peer is retried after a backoff delay, an inbound peer
    /// without other links is forgotten. Returns the endpoint the link belonged to.
    pub fn on_down(&mut self, now: Instant, link: L) -> Option<SocketAddr> {
        let endpoint = self
            .peers
            .iter()
            .find(|(_, p)| p.links.contains(&link))
            .map(|(e, _)| *e)?;
        let p = self.peers.get_mut(&endpoint)?;
        p.links.retain(|l| *l != link);
        if p.links.is_empty() {
            match p.kind {
                PeerType::Static => {
                    // Reconnect soon: the first retry uses the reset backoff's shortest delay.
                    let delay = p.backoff.next_delay(&mut self.rng);
                    p.attempt = Attempt::Wait(now + delay);
                }
                _ => {
                    self.peers.remove(&endpoint);
                }
            }
        }
        Some(endpoint)
    }

    /// A handshake with `remote` failed: a configured peer is retried after a backoff delay.
    pub fn on_handshake_failed(&mut self, now: Instant, remote: SocketAddr) {
        if let Some(p) = self.peers.get_mut(&remote) {
            if p.kind == PeerType::Static && p.links.is_empty() {
                let delay = p.backoff.next_delay(&mut self.rng);
                p.attempt = Attempt::Wait(now + delay);
            }
        }
    }

    /// The endpoint a link belongs to.
    pub fn endpoint_of(&self, link: L) -> Option<SocketAddr> {
        self.peers
            .iter()
            .find(|(_, p)| p.links.contains(&link))
            .map(|(e, _)| *e)
    }

    /// Counts bytes received from `from` if it is a peer.
    pub fn count_rx(&mut self, from: SocketAddr, n: usize) {
        if let Some(p) = self.peers.get_mut(&from) {
            p.rx_bytes = p.rx_bytes.saturating_add(n as u64);
        }
    }

    /// Counts bytes sent to `to` if it is a peer.
    pub fn count_tx(&mut self, to: SocketAddr, n: usize) {
        if let Some(p) = self.peers.get_mut(&to) {
            p.tx_bytes = p.tx_bytes.saturating_add(n as u64);
        }
    }

    /// Number of peers with at least one live link.
    pub fn alive(&self) -> usize {
        self.peers.values().filter(|p| !p.links.is_empty()).count()
    }

    /// The peers as the API shows them.
    pub fn infos(&self) -> Vec<PeerInfo> {
        self.peers
            .iter()
            .map(|(e, p)| PeerInfo {
                endpoint: Endpoint {
                    proto: "udp".into(),
                    socket_addr: e.to_string(),
                },
                kind: p.kind,
                connection_state: if !p.links.is_empty() {
                    ConnectionState::Alive
                } else if matches!(p.attempt, Attempt::Connecting(_)) {
                    ConnectionState::Connecting
                } else {
                    ConnectionState::Dead
                },
                tx_bytes: p.tx_bytes,
                rx_bytes: p.rx_bytes,
                overlay_ip: p.identity.as_ref().map(|(_, ip)| ip.clone()),
                pubkey: p.identity.as_ref().map(|(k, _)| k.clone()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn id() -> (String, String) {
        ("aa".repeat(32), "400::1".into())
    }

    #[test]
    fn configured_peer_connects_retries_and_reconnects() {
        let t0 = Instant::from_secs(1);
        let a = ep("10.0.0.1:9651");
        let mut t: PeerTable<u32> = PeerTable::new(t0, &[a], 1);
        assert_eq!(t.poll_timeout(), Some(t0));
        assert_eq!(t.poll_connect(t0), Some(a));
        assert_eq!(t.poll_connect(t0), None);
        assert_eq!(t.infos()[0].connection_state, ConnectionState::Connecting);

        // Failure: retried after 250..=500 ms, then 500..=1000 ms.
        t.on_handshake_failed(t0, a);
        let next = t.poll_timeout().unwrap();
        assert!(
            next > t0 && next <= t0 + Duration::from_millis(500),
            "{next:?}"
        );
        assert_eq!(t.poll_connect(next - Duration::from_micros(1)), None);
        assert_eq!(t.poll_connect(next), Some(a));
        t.on_handshake_failed(next, a);
        let next2 = t.poll_timeout().unwrap();
        assert!(next2 >= next + Duration::from_millis(500), "{next2:?}");
        assert_eq!(t.infos()[0].connection_state, ConnectionState::Dead);

        // Up resets the backoff; down schedules a quick retry.
        assert_eq!(t.poll_connect(next2), Some(a));
        t.on_up(7, a, id());
        assert_eq!(t.poll_timeout(), None);
        assert_eq!(t.alive(), 1);
        assert_eq!(t.infos()[0].connection_state, ConnectionState::Alive);
        assert_eq!(t.infos()[0].overlay_ip.as_deref(), Some("400::1"));
        let t1 = Instant::from_secs(100);
        assert_eq!(t.on_down(t1, 7), Some(a));
        let retry = t.poll_timeout().unwrap();
        assert!(retry <= t1 + Duration::from_millis(500), "{retry:?}");
        assert_eq!(t.on_down(t1, 7), None);
    }

    #[test]
    fn stuck_connect_is_expired() {
        let a = ep("[2001:db8::1]:1");
        let mut t: PeerTable<u32> = PeerTable::new(Instant::ZERO, &[a], 1);
        assert_eq!(t.poll_connect(Instant::ZERO), Some(a));
        let guard = t.poll_timeout().unwrap();
        assert_eq!(guard, Instant::ZERO + CONNECT_GUARD);
        t.handle_timeout(guard);
        assert!(t.poll_timeout().unwrap() > guard);
    }

    #[test]
    fn inbound_peers_live_with_their_links_and_count_bytes() {
        let b = ep("10.0.0.2:9651");
        let mut t: PeerTable<u32> = PeerTable::new(Instant::ZERO, &[], 1);
        t.count_rx(b, 100);
        t.on_up(1, b, id());
        t.on_up(2, b, id());
        t.count_rx(b, 100);
        t.count_tx(b, 7);
        let i = &t.infos()[0];
        assert_eq!(
            (i.kind, i.rx_bytes, i.tx_bytes),
            (PeerType::Inbound, 100, 7)
        );
        assert_eq!(t.endpoint_of(2), Some(b));
        assert_eq!(t.poll_connect(Instant::from_secs(9)), None);
        t.on_down(Instant::ZERO, 1);
        assert_eq!(t.alive(), 1);
        t.on_down(Instant::ZERO, 2);
        assert!(t.infos().is_empty());
        assert_eq!(t.poll_timeout(), None);
    }
}
