//! The node's local HTTP API: status, peers, routes and counters, in the JSON shapes of Mycelium's
//! v1 admin API so Mycelium's tooling and scripts work against a Hypha node, and peer changes
//! ([`peers_request`], which the daemon passes on to the event loop's command channel).
//!
//! Why snapshots: the API thread never touches the event loop's state. The loop publishes an
//! immutable [`Snapshot`] (at most every ~100 ms, and only when something changed) through
//! [`SharedSnapshot`]; requests read whichever snapshot is current. Every request goes through one
//! [`dispatch`] function, which later issues (message bus, peer management) extend with new paths.

mod server;

use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

pub use server::{ApiServer, ApiServerError};

/// `GET /api/v1/admin`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminInfo {
    /// The node's /64, e.g. `"4a5:...::/64"`.
    pub node_subnet: String,
    /// The node's overlay address.
    pub node_ip: String,
    /// The node's public key, 64 hex digits.
    pub node_pubkey: String,
    /// When the node started, in Unix seconds.
    pub node_start_time: u64,
}

/// How a peer is reached (Mycelium's `Endpoint`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Always `"udp"` for Hypha (Mycelium's CLI only knows tcp/tls/quic/vsock; see docs/api.yaml).
    pub proto: String,
    /// `ip:port` (IPv6 in brackets).
    pub socket_addr: String,
}

/// Where a peer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PeerType {
    /// Configured with `--peers` or in the config file.
    Static,
    /// It connected to us.
    Inbound,
    /// Found by link-local discovery (not implemented by Hypha; kept for Mycelium's shape).
    LinkLocalDiscovery,
}

/// The state of the link to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ConnectionState {
    /// The link handshake completed and the link is up.
    Alive,
    /// A handshake is in progress.
    Connecting,
    /// No link; a configured peer is retried with backoff.
    Dead,
}

/// One entry of `GET /api/v1/admin/peers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerInfo {
    /// How the peer is reached.
    pub endpoint: Endpoint,
    /// Where it came from.
    #[serde(rename = "type")]
    pub kind: PeerType,
    /// Link state.
    pub connection_state: ConnectionState,
    /// Bytes sent to this peer on the underlay.
    pub tx_bytes: u64,
    /// Bytes received from this peer on the underlay.
    pub rx_bytes: u64,
    /// Hypha extension: the peer's overlay address, once its key is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_ip: Option<String>,
    /// Hypha extension: the peer's public key, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pubkey: Option<String>,
}

/// A route metric: a number, or `"infinite"` for a retracted route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Metric {
    /// A finite metric.
    Value(u16),
    /// The string `"infinite"` (RFC 8966 metric 0xFFFF).
    Infinite(Infinite),
}

/// The string `"infinite"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Infinite {
    /// `"infinite"`.
    Infinite,
}

impl Metric {
    /// RFC 8966 §2.1: 0xFFFF is infinity.
    pub fn from_babel(m: u16) -> Metric {
        if m == u16::MAX {
            Metric::Infinite(Infinite::Infinite)
        } else {
            Metric::Value(m)
        }
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Metric::Value(v) => write!(f, "{v}"),
            Metric::Infinite(_) => f.write_str("infinite"),
        }
    }
}

/// One entry of `GET /api/v1/admin/routes/selected` or `/fallback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteInfo {
    /// The destination /64.
    pub subnet: String,
    /// The next hop as free text: the neighbour's `udp://ip:port` endpoint.
    pub next_hop: String,
    /// The route's metric.
    pub metric: Metric,
    /// The route's sequence number (RFC 8966 §2.5).
    pub seqno: u16,
    /// Hypha extension: the next-hop neighbour's overlay address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop_ip: Option<String>,
}

/// `GET /api/v1/admin/stats`: counters grouped by subsystem (`link`, `babel`, `runtime`, ...).
pub type Stats = BTreeMap<String, BTreeMap<String, u64>>;

/// Everything the API serves, as published by the event loop.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The node itself.
    pub admin: AdminInfo,
    /// Configured and inbound peers.
    pub peers: Vec<PeerInfo>,
    /// Selected routes.
    pub selected: Vec<RouteInfo>,
    /// Routes that are known but not selected.
    pub fallback: Vec<RouteInfo>,
    /// Counters.
    pub stats: Stats,
    /// The public key of every node with a selected route, by the base address of its /64 (the
    /// key came with the route's update).
    #[serde(default)]
    pub origin_keys: BTreeMap<Ipv6Addr, [u8; 32]>,
}

/// The loop's handle for publishing and the API's for reading.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

/// A response: status code and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// JSON body.
    pub body: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

fn json<T: Serialize>(value: &T) -> Reply {
    match serde_json::to_string(value) {
        Ok(body) => Reply { status: 200, body },
        Err(_) => error(500, "cannot encode response"),
    }
}

fn error(status: u16, message: &str) -> Reply {
    let body =
        serde_json::to_string(&ErrorBody { error: message }).unwrap_or_else(|_| String::from("{}"));
    Reply { status, body }
}

/// Answers one request. `url` may carry a query string, which these paths ignore.
pub fn dispatch(method: &str, url: &str, snap: &Snapshot) -> Reply {
    let path = url.split_once('?').map_or(url, |(p, _)| p);
    let path = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let known = matches!(
        path,
        "/api/v1/admin"
            | "/api/v1/admin/peers"
            | "/api/v1/admin/routes/selected"
            | "/api/v1/admin/routes/fallback"
            | "/api/v1/admin/stats"
    );
    if !known {
        return error(404, "not found");
    }
    if method != "GET" {
        return error(405, "method not allowed");
    }
    match path {
        "/api/v1/admin" => json(&snap.admin),
        "/api/v1/admin/peers" => json(&snap.peers),
        "/api/v1/admin/routes/selected" => json(&snap.selected),
        "/api/v1/admin/routes/fallback" => json(&snap.fallback),
        _ => json(&snap.stats),
    }
}

/// A change to the peer list asked for through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerChange {
    /// Add a configured peer at this endpoint.
    Add(SocketAddr),
    /// Remove the peer at this endpoint and tear its links down.
    Remove(SocketAddr),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddPeerBody {
    endpoint: String,
}

/// Answers `POST /api/v1/admin/peers` (body `{"endpoint": "udp://IP:PORT"}`: 204 added, 400 bad,
/// 409 exists) and `DELETE /api/v1/admin/peers/{endpoint}` (URL-encoded endpoint: 204 removed,
/// 400 bad, 404 unknown), Mycelium's shapes, by calling `apply`. `None` for any other request.
pub fn peers_request(
    method: &str,
    url: &str,
    body: &[u8],
    apply: &dyn Fn(PeerChange) -> Result<(), crate::runtime::peers::PeerError>,
) -> Option<Reply> {
    use crate::runtime::peers::PeerError;
    let path = url.split_once('?').map_or(url, |(p, _)| p);
    let path = path.strip_suffix('/').unwrap_or(path);
    let change = if path == "/api/v1/admin/peers" && method == "POST" {
        let b: AddPeerBody = match serde_json::from_slice(body) {
            Ok(b) => b,
            Err(e) => return Some(error(400, &format!("invalid request body: {e}"))),
        };
        match b.endpoint.parse::<crate::config::PeerEndpoint>() {
            Ok(e) => PeerChange::Add(e.0),
            Err(e) => return Some(error(400, &e.to_string())),
        }
    } else if let Some(raw) = path.strip_prefix("/api/v1/admin/peers/") {
        if method != "DELETE" {
            return Some(error(405, "method not allowed"));
        }
        let Some(ep) = crate::bus::api::percent_decode(raw) else {
            return Some(error(400, "the endpoint is not valid percent-encoding"));
        };
        match ep.parse::<crate::config::PeerEndpoint>() {
            Ok(e) => PeerChange::Remove(e.0),
            Err(e) => return Some(error(400, &e.to_string())),
        }
    } else {
        return None;
    };
    Some(match apply(change) {
        Ok(()) => Reply {
            status: 204,
            body: String::new(),
        },
        Err(e @ PeerError::AlreadyExists) => error(409, &e.to_string()),
        Err(e @ PeerError::NotFound) => error(404, &e.to_string()),
        Err(e) => error(503, &e.to_string()),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Snapshot {
        let mut stats = Stats::new();
        stats
            .entry("link".into())
            .or_default()
            .insert("handshake_failures".into(), 3);
        Snapshot {
            admin: AdminInfo {
                node_subnet: "400:1:2:3::/64".into(),
                node_ip: "400:1:2:3::1".into(),
                node_pubkey: "ab".repeat(32),
                node_start_time: 1_700_000_000,
            },
            peers: vec![PeerInfo {
                endpoint: Endpoint {
                    proto: "udp".into(),
                    socket_addr: "10.0.0.2:9651".into(),
                },
                kind: PeerType::Static,
                connection_state: ConnectionState::Alive,
                tx_bytes: 10,
                rx_bytes: 20,
                overlay_ip: Some("400:9::1".into()),
                pubkey: None,
            }],
            selected: vec![RouteInfo {
                subnet: "400:9::/64".into(),
                next_hop: "udp://10.0.0.2:9651".into(),
                metric: Metric::Value(96),
                seqno: 7,
                next_hop_ip: Some("400:9::1".into()),
            }],
            fallback: vec![RouteInfo {
                subnet: "400:9::/64".into(),
                next_hop: "udp://10.0.0.3:9651".into(),
                metric: Metric::from_babel(u16::MAX),
                seqno: 6,
                next_hop_ip: None,
            }],
            stats,
            origin_keys: BTreeMap::new(),
        }
    }

    #[test]
    fn peer_changes_have_mycelium_codes() {
        use crate::runtime::peers::PeerError;
        use std::sync::Mutex;
        let seen = Mutex::new(Vec::new());
        let apply = |c: PeerChange| {
            let mut seen = seen.lock().unwrap();
            let r = match c {
                PeerChange::Add(_) if seen.contains(&c) => Err(PeerError::AlreadyExists),
                PeerChange::Remove(e) if !seen.contains(&PeerChange::Add(e)) => {
                    Err(PeerError::NotFound)
                }
                _ => Ok(()),
            };
            seen.push(c);
            r
        };
        let post = |b: &str| peers_request("POST", "/api/v1/admin/peers", b.as_bytes(), &apply);
        let ok = r#"{"endpoint":"udp://10.0.0.2:9651"}"#;
        assert_eq!(post(ok).map(|r| r.status), Some(204));
        assert_eq!(post(ok).map(|r| r.status), Some(409));
        for bad in [
            r#"{"endpoint":"tcp://10.0.0.2:9651"}"#,
            r#"{"endpoint":"udp://10.0.0.2"}"#,
            r#"{"ep":"udp://10.0.0.2:9651"}"#,
            "not json",
        ] {
            assert_eq!(post(bad).map(|r| r.status), Some(400), "{bad}");
        }
        let del = |p: &str| peers_request("DELETE", p, b"", &apply).map(|r| r.status);
        assert_eq!(
            del("/api/v1/admin/peers/udp%3A%2F%2F10.0.0.2%3A9651"),
            Some(204)
        );
        assert_eq!(del("/api/v1/admin/peers/udp://10.0.0.9:9651"), Some(404));
        assert_eq!(del("/api/v1/admin/peers/udp%3A%2F%2Fnope"), Some(400));
        assert_eq!(del("/api/v1/admin/peers/%zz"), Some(400));
        assert!(peers_request("GET", "/api/v1/admin/peers", b"", &apply).is_none());
        assert!(peers_request("POST", "/api/v1/admin", b"", &apply).is_none());
    }

    fn get(path: &str) -> (u16, serde_json::Value) {
        let r = dispatch("GET", path, &sample());
        (r.status, serde_json::from_str(&r.body).unwrap())
    }

    #[test]
    fn admin_has_mycelium_shape() {
        let (s, v) = get("/api/v1/admin");
        assert_eq!(s, 200);
        assert_eq!(v["nodeSubnet"], "400:1:2:3::/64");
        assert_eq!(v["nodeIp"], "400:1:2:3::1");
        assert_eq!(v["nodePubkey"], "ab".repeat(32));
        assert_eq!(v["nodeStartTime"], 1_700_000_000u64);
    }

    #[test]
    fn peers_have_mycelium_shape() {
        let (s, v) = get("/api/v1/admin/peers/");
        assert_eq!(s, 200);
        let p = &v[0];
        assert_eq!(p["endpoint"]["proto"], "udp");
        assert_eq!(p["endpoint"]["socketAddr"], "10.0.0.2:9651");
        assert_eq!(p["type"], "static");
        assert_eq!(p["connectionState"], "alive");
        assert_eq!(p["txBytes"], 10);
        assert_eq!(p["rxBytes"], 20);
        assert_eq!(p["overlayIp"], "400:9::1");
        assert!(p.get("pubkey").is_none());
    }

    #[test]
    fn routes_have_mycelium_shape() {
        let (s, v) = get("/api/v1/admin/routes/selected?x=1");
        assert_eq!(s, 200);
        assert_eq!(v[0]["subnet"], "400:9::/64");
        assert_eq!(v[0]["nextHop"], "udp://10.0.0.2:9651");
        assert_eq!(v[0]["metric"], 96);
        assert_eq!(v[0]["seqno"], 7);
        let (_, v) = get("/api/v1/admin/routes/fallback");
        assert_eq!(v[0]["metric"], "infinite");
        let back: Vec<RouteInfo> = serde_json::from_value(v).unwrap();
        assert_eq!(back, sample().fallback);
    }

    #[test]
    fn stats_and_errors() {
        let (s, v) = get("/api/v1/admin/stats");
        assert_eq!(s, 200);
        assert_eq!(v["link"]["handshake_failures"], 3);
        let (s, v) = get("/api/v1/nope");
        assert_eq!(s, 404);
        assert_eq!(v["error"], "not found");
        assert_eq!(get("/").0, 404);
        assert_eq!(get("").0, 404);
        let r = dispatch("POST", "/api/v1/admin", &sample());
        assert_eq!(r.status, 405);
    }
}
