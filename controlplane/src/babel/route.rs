//! The route table (RFC 8966 §3.2.6): every route we heard, per prefix, one per neighbour, with a
//! `selected` flag — one table, not a separate selected/fallback pair — and the selection rule of
//! §3.6 with hysteresis.
//!
//! Memory: a `Route` is 112 bytes (it carries the 32-byte origin key); a prefix costs its
//! `BTreeMap` entry (~80 bytes with the selection snapshot) plus a `Vec` of its routes, so a prefix
//! heard from d neighbours takes about 80 + 112·d bytes (plus one 64-byte source-table entry per
//! router-id we announced it with).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use hypha_proto::babel::{Prefix, RouterId, INFINITY};
use hypha_proto::time::Instant;

use super::neighbour::NeighbourKey;
use super::seqno::SeqNo;

/// One route: what a neighbour announced for a prefix.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) neighbour: NeighbourKey,
    pub(crate) router_id: RouterId,
    pub(crate) seqno: SeqNo,
    /// The metric the neighbour announced (§3.2.6 "metric" before adding our link cost).
    pub(crate) refmetric: u16,
    pub(crate) next_hop: IpAddr,
    pub(crate) origin_key: Option<[u8; 32]>,
    /// The neighbour's announced update interval; the route expires after 3.5 of them (§3.5.3).
    pub(crate) interval: Duration,
    pub(crate) expires: Instant,
    pub(crate) selected: bool,
    /// A Route Request for it went to the neighbour because it is about to expire.
    pub(crate) refresh_requested: bool,
}

/// What was selected for a prefix, remembered to decide on triggered Updates (§3.7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Selected {
    pub(crate) neighbour: NeighbourKey,
    pub(crate) router_id: RouterId,
    pub(crate) seqno: SeqNo,
    pub(crate) metric: u16,
}

/// The routes for one prefix.
#[derive(Debug, Clone, Default)]
pub(crate) struct PrefixRoutes {
    pub(crate) routes: Vec<Route>,
    pub(crate) last: Option<Selected>,
}

impl PrefixRoutes {
    pub(crate) fn selected(&self) -> Option<&Route> {
        self.routes.iter().find(|r| r.selected)
    }
}

/// All routes.
#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    pub(crate) prefixes: BTreeMap<Prefix, PrefixRoutes>,
    /// Total number of routes, for the memory bound.
    pub(crate) count: usize,
}

impl RouteTable {
    pub(crate) fn find_selected(&self, prefix: &Prefix) -> Option<&Route> {
        self.prefixes.get(prefix)?.selected()
    }
}

/// A route's metric (§3.5.2): the announced metric plus the link cost, infinite if either is.
pub(crate) fn route_metric(refmetric: u16, cost: u16) -> u16 {
    if refmetric == INFINITY || cost == INFINITY {
        INFINITY
    } else {
        let m = u32::from(refmetric) + u32::from(cost);
        u16::try_from(m.min(u32::from(INFINITY - 1))).unwrap_or(INFINITY - 1)
    }
}

/// How much better a route must be to replace the selected one (§3.6 hysteresis): 1/16 of the
/// current metric, at least 1, so that RTT jitter does not make routes flap.
pub(crate) fn hysteresis(current: u16) -> u16 {
    (current / 16).max(1)
}

/// A candidate for selection: its metric and whether it is feasible.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidate {
    pub(crate) metric: u16,
    pub(crate) feasible: bool,
}

/// §3.6 (babeld `find_best_route` + `consider_route`): among feasible routes with a finite
/// metric, the smallest metric wins (ties keep the current one, then the first); the current
/// route is kept unless the best is better by more than [`hysteresis`].
pub(crate) fn find_best_route(cands: &[Candidate], current: Option<usize>) -> Option<usize> {
    let usable = |c: &Candidate| c.feasible && c.metric < INFINITY;
    let mut best: Option<usize> = None;
    for (i, c) in cands.iter().enumerate() {
        if !usable(c) {
            continue;
        }
        best = match best {
            Some(b) if cands[b].metric < c.metric => Some(b),
            Some(b) if cands[b].metric == c.metric && Some(i) != current => Some(b),
            _ => Some(i),
        };
    }
    let cur = current.filter(|&i| cands.get(i).is_some_and(usable));
    match (cur, best) {
        (Some(c), Some(b)) => {
            let (cm, bm) = (cands[c].metric, cands[b].metric);
            if u32::from(bm) + u32::from(hysteresis(cm)) <= u32::from(cm) {
                Some(b)
            } else {
                Some(c)
            }
        }
        (None, b) => b,
        (c, None) => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(metric: u16, feasible: bool) -> Candidate {
        Candidate { metric, feasible }
    }

    #[test]
    fn selection_with_hysteresis() {
        assert_eq!(find_best_route(&[], None), None);
        assert_eq!(
            find_best_route(&[c(300, true), c(200, true)], None),
            Some(1)
        );
        assert_eq!(
            find_best_route(&[c(300, true), c(200, false)], None),
            Some(0)
        );
        assert_eq!(find_best_route(&[c(INFINITY, true)], None), None);
        // Current 300, challenger 290: within 300/16 = 18, keep.
        assert_eq!(
            find_best_route(&[c(300, true), c(290, true)], Some(0)),
            Some(0)
        );
        // Challenger 280: better by 20, switch.
        assert_eq!(
            find_best_route(&[c(300, true), c(280, true)], Some(0)),
            Some(1)
        );
        // Ties keep the current.
        assert_eq!(
            find_best_route(&[c(200, true), c(200, true)], Some(1)),
            Some(1)
        );
        // An unusable current is replaced whatever the margin.
        assert_eq!(
            find_best_route(&[c(300, false), c(299, true)], Some(0)),
            Some(1)
        );
        assert_eq!(
            find_best_route(&[c(INFINITY, true), c(299, true)], Some(0)),
            Some(1)
        );
    }

    #[test]
    fn metric_addition_saturates() {
        assert_eq!(route_metric(100, 96), 196);
        assert_eq!(route_metric(INFINITY, 1), INFINITY);
        assert_eq!(route_metric(1, INFINITY), INFINITY);
        assert_eq!(route_metric(INFINITY - 1, 96), INFINITY - 1);
    }
}
