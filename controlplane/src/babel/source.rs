//! The source table (RFC 8966 §3.2.5): for each (router-id, prefix) we have announced, the
//! feasibility distance — the smallest (seqno, metric) we announced — which is what makes Babel
//! loop-free (§3.5.1).
//!
//! Memory: one entry is 64 bytes of key and value plus its `BTreeMap` slot.

use std::collections::BTreeMap;
use std::time::Duration;

use hypha_proto::babel::{Prefix, RouterId, INFINITY};
use hypha_proto::time::Instant;

use super::seqno::SeqNo;

/// A feasibility distance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Source {
    pub(crate) seqno: SeqNo,
    pub(crate) metric: u16,
    /// Last time we announced with this source (for garbage collection).
    pub(crate) time: Instant,
}

/// The source table, keyed by (prefix, router-id) so one prefix's sources are adjacent.
#[derive(Debug, Default)]
pub(crate) struct SourceTable {
    pub(crate) sources: BTreeMap<(Prefix, RouterId), Source>,
}

/// §3.5.1 (babeld `update_feasible`): an update is feasible when it is a retraction, when there is
/// no source entry, when its seqno is newer than the entry's, or when its seqno is equal and its
/// metric strictly smaller.
pub(crate) fn is_feasible(source: Option<&Source>, seqno: SeqNo, metric: u16) -> bool {
    if metric == INFINITY {
        return true;
    }
    match source {
        None => true,
        Some(s) => seqno.is_newer_than(s.seqno) || (seqno == s.seqno && metric < s.metric),
    }
}

impl SourceTable {
    pub(crate) fn find(&self, prefix: &Prefix, router_id: &RouterId) -> Option<&Source> {
        self.sources.get(&(*prefix, *router_id))
    }

    pub(crate) fn is_feasible(
        &self,
        prefix: &Prefix,
        router_id: &RouterId,
        seqno: SeqNo,
        metric: u16,
    ) -> bool {
        is_feasible(self.find(prefix, router_id), seqno, metric)
    }

    /// Records that we announced (router-id, prefix, seqno, metric) (§3.7.3, babeld
    /// `update_source`): a newer seqno replaces the entry, an equal seqno lowers the metric.
    pub(crate) fn update_source(
        &mut self,
        now: Instant,
        prefix: Prefix,
        router_id: RouterId,
        seqno: SeqNo,
        metric: u16,
    ) {
        if metric == INFINITY {
            return;
        }
        let e = self.sources.entry((prefix, router_id)).or_insert(Source {
            seqno,
            metric,
            time: now,
        });
        if seqno.is_newer_than(e.seqno) {
            e.seqno = seqno;
            e.metric = metric;
        } else if seqno == e.seqno && metric < e.metric {
            e.metric = metric;
        }
        e.time = now;
    }

    /// Forgets sources not announced for `gc_time` (§3.2.5; babeld `expire_sources`).
    pub(crate) fn expire_sources(&mut self, now: Instant, gc_time: Duration) {
        self.sources.retain(|_, s| now - s.time < gc_time);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feasibility_condition() {
        let s = Source {
            seqno: SeqNo(10),
            metric: 200,
            time: Instant::ZERO,
        };
        assert!(is_feasible(None, SeqNo(0), 5000));
        assert!(is_feasible(Some(&s), SeqNo(10), 199));
        assert!(!is_feasible(Some(&s), SeqNo(10), 200));
        assert!(!is_feasible(Some(&s), SeqNo(9), 1));
        assert!(is_feasible(Some(&s), SeqNo(11), 60000));
        assert!(is_feasible(Some(&s), SeqNo(9), INFINITY));
    }

    #[test]
    fn update_and_expire() {
        let p: Prefix = "400::/64".parse().unwrap();
        let r = RouterId([1; 8]);
        let mut t = SourceTable::default();
        t.update_source(Instant::ZERO, p, r, SeqNo(5), 300);
        t.update_source(Instant::ZERO, p, r, SeqNo(5), 400);
        assert_eq!(t.find(&p, &r).unwrap().metric, 300);
        t.update_source(Instant::ZERO, p, r, SeqNo(5), 100);
        assert_eq!(t.find(&p, &r).unwrap().metric, 100);
        t.update_source(Instant::from_secs(10), p, r, SeqNo(6), 900);
        assert_eq!(t.find(&p, &r).unwrap().seqno, SeqNo(6));
        assert_eq!(t.find(&p, &r).unwrap().metric, 900);
        t.update_source(Instant::from_secs(10), p, r, SeqNo(4), 1);
        assert_eq!(t.find(&p, &r).unwrap().seqno, SeqNo(6));
        t.expire_sources(Instant::from_secs(100), Duration::from_secs(180));
        assert!(t.find(&p, &r).is_some());
        t.expire_sources(Instant::from_secs(200), Duration::from_secs(180));
        assert!(t.find(&p, &r).is_none());
    }
}
