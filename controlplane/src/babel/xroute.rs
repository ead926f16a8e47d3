//! Exported routes (babeld's xroute): prefixes this router originates — the node's own /64 in
//! overlay mode, redistributed local prefixes (IPv4 and IPv6) in lab mode. They are announced with
//! our router-id and seqno and metric 0, and learnt routes to them are never selected.

use std::collections::BTreeMap;

use hypha_proto::babel::Prefix;

/// One originated prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct XRoute {
    pub(crate) metric: u16,
    pub(crate) origin_key: Option<[u8; 32]>,
}

/// The table of originated prefixes.
#[derive(Debug, Default)]
pub(crate) struct XRouteTable {
    pub(crate) routes: BTreeMap<Prefix, XRoute>,
}

impl XRouteTable {
    pub(crate) fn find(&self, prefix: &Prefix) -> Option<&XRoute> {
        self.routes.get(prefix)
    }
}
