//! Things sent more than once (babeld's resend.c): seqno requests, which are retried through other
//! neighbours when the first gets no answer (RFC 8966 §3.8.2.1–§3.8.2.2), and urgent Updates
//! (retractions and router-id changes, §3.7.2), repeated a few times since a lost one is costly.
//!
//! The table doubles as the duplicate-suppression record for forwarded seqno requests (§3.8.1.2):
//! a request already pending for the same prefix and router-id with a seqno at least as new is not
//! forwarded again.
//!
//! Memory: bounded by [`MAX_PENDING_REQUESTS`] requests (~150 bytes each) and one small entry per
//! prefix for urgent Updates.

use std::collections::BTreeMap;

use hypha_proto::babel::{Prefix, RouterId};
use hypha_proto::time::Instant;

use super::neighbour::NeighbourKey;
use super::seqno::SeqNo;

/// Most seqno requests pending at once; more are refused and counted.
pub const MAX_PENDING_REQUESTS: usize = 512;
/// How many neighbours a request is tried through (the first send included).
pub(crate) const MAX_REQUEST_TRIES: usize = 3;
/// How often an urgent Update is repeated after the first send.
pub(crate) const URGENT_RESENDS: u8 = 2;

/// A seqno request we sent or forwarded and still wait for an answer to.
#[derive(Debug, Clone)]
pub(crate) struct PendingRequest {
    pub(crate) seqno: SeqNo,
    pub(crate) hop_count: u8,
    /// The neighbour that asked us, never asked back; `None` when the request is ours.
    pub(crate) requester: Option<NeighbourKey>,
    /// Neighbours asked so far, in order.
    pub(crate) tried: Vec<NeighbourKey>,
    pub(crate) next_at: Instant,
}

/// An Update to repeat.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UrgentUpdate {
    pub(crate) remaining: u8,
    pub(crate) next_at: Instant,
}

/// Pending requests and urgent Updates.
#[derive(Debug, Default)]
pub(crate) struct ResendTable {
    pub(crate) requests: BTreeMap<(Prefix, RouterId), PendingRequest>,
    pub(crate) urgent: BTreeMap<Prefix, UrgentUpdate>,
}

/// What [`ResendTable::record_request`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// New (or newer than what was pending): send it.
    Send,
    /// A request at least as new is already pending: suppress this one.
    Duplicate,
    /// The table is full.
    Full,
}

impl ResendTable {
    /// Records a request for (prefix, router-id, seqno) about to be sent to `to`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record_request(
        &mut self,
        prefix: Prefix,
        router_id: RouterId,
        seqno: SeqNo,
        hop_count: u8,
        requester: Option<NeighbourKey>,
        to: NeighbourKey,
        next_at: Instant,
    ) -> Recorded {
        if let Some(p) = self.requests.get_mut(&(prefix, router_id)) {
            if p.seqno.is_at_least(seqno) {
                return Recorded::Duplicate;
            }
            *p = PendingRequest {
                seqno,
                hop_count,
                requester,
                tried: vec![to],
                next_at,
            };
            return Recorded::Send;
        }
        if self.requests.len() >= MAX_PENDING_REQUESTS {
            return Recorded::Full;
        }
        self.requests.insert(
            (prefix, router_id),
            PendingRequest {
                seqno,
                hop_count,
                requester,
                tried: vec![to],
                next_at,
            },
        );
        Recorded::Send
    }

    /// An Update for `prefix` from `router_id` with `seqno` arrived: the requests it answers are
    /// done (babeld `satisfy_request`: the same source with a seqno at least as new, or another
    /// source altogether, which makes the question moot).
    pub(crate) fn satisfy_request(&mut self, prefix: &Prefix, router_id: &RouterId, seqno: SeqNo) {
        let range = (*prefix, RouterId([0; 8]))..=(*prefix, RouterId([0xff; 8]));
        let done: Vec<_> = self
            .requests
            .range(range)
            .filter(|((_, id), p)| id != router_id || seqno.is_at_least(p.seqno))
            .map(|(k, _)| *k)
            .collect();
        for k in done {
            self.requests.remove(&k);
        }
    }

    /// Forgets everything involving a neighbour that went away: requests it asked us for.
    pub(crate) fn flush_neighbour(&mut self, key: &NeighbourKey) {
        self.requests
            .retain(|_, p| p.requester.as_ref() != Some(key));
    }

    pub(crate) fn record_urgent(&mut self, prefix: Prefix, next_at: Instant) {
        self.urgent.insert(
            prefix,
            UrgentUpdate {
                remaining: URGENT_RESENDS,
                next_at,
            },
        );
    }

    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        let r = self.requests.values().map(|p| p.next_at).min();
        let u = self.urgent.values().map(|u| u.next_at).min();
        r.into_iter().chain(u).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::babel::InterfaceId;

    #[test]
    fn duplicates_and_satisfaction() {
        let p: Prefix = "400::/64".parse().unwrap();
        let r = RouterId([3; 8]);
        let n = NeighbourKey {
            iface: InterfaceId(1),
            addr: "::1".parse().unwrap(),
        };
        let mut t = ResendTable::default();
        let at = Instant::from_secs(1);
        assert_eq!(
            t.record_request(p, r, SeqNo(5), 64, None, n, at),
            Recorded::Send
        );
        assert_eq!(
            t.record_request(p, r, SeqNo(5), 64, None, n, at),
            Recorded::Duplicate
        );
        assert_eq!(
            t.record_request(p, r, SeqNo(4), 64, None, n, at),
            Recorded::Duplicate
        );
        assert_eq!(
            t.record_request(p, r, SeqNo(6), 64, None, n, at),
            Recorded::Send
        );
        t.satisfy_request(&p, &r, SeqNo(5));
        assert_eq!(
            t.requests.len(),
            1,
            "seqno 5 does not answer a request for 6"
        );
        t.satisfy_request(&p, &r, SeqNo(6));
        assert!(t.requests.is_empty());
        t.record_request(p, r, SeqNo(6), 64, Some(n), n, at);
        t.satisfy_request(&p, &RouterId([4; 8]), SeqNo(0));
        assert!(t.requests.is_empty(), "another source answers too");
        t.record_request(p, r, SeqNo(6), 64, Some(n), n, at);
        t.flush_neighbour(&n);
        assert!(t.requests.is_empty());
        assert_eq!(t.next_timeout(), None);
    }
}
