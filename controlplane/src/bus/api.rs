//! The message bus's part of the local HTTP API, in Mycelium's v1 paths and JSON shapes
//! (docs/api.yaml), plus `GET /metrics`.
//!
//! [`MessageApi::handle`] answers one request and returns `None` for paths it doesn't own, so the
//! daemon's API dispatcher can try it first and fall back to its own paths. Requests that wait
//! (long-poll receive, `reply_timeout`) block the calling thread on the bus's condition variable,
//! so the server must run each request on its own thread ([`serve`] does, up to a bound).
//!
//! Every input is hostile: bad JSON, bad base64, bad ids and bad addresses are 4xx with a JSON body
//! `{"error": "..."}`; nothing here panics on input.

use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hypha_proto::addr::OverlayAddr;
use hypha_proto::key::PublicKey;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use super::shared::SharedBus;
use super::{InboundMessage, MessageId, MessageState, PushError};

/// Longest long-poll or reply wait a request may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
/// Largest request body read (a 1 MiB payload is ~1.4 MiB in base64).
pub const MAX_BODY: usize = 4 << 20;

/// A response: status, body, content type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// Body (JSON unless `content_type` says otherwise; empty for 204).
    pub body: String,
    /// Content-Type.
    pub content_type: &'static str,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

fn error(status: u16, message: &str) -> Reply {
    Reply {
        status,
        body: serde_json::to_string(&ErrorBody { error: message })
            .unwrap_or_else(|_| String::from("{}")),
        content_type: "application/json",
    }
}

fn json<T: Serialize>(status: u16, v: &T) -> Reply {
    match serde_json::to_string(v) {
        Ok(body) => Reply {
            status,
            body,
            content_type: "application/json",
        },
        Err(_) => error(500, "cannot encode response"),
    }
}

fn no_content() -> Reply {
    Reply {
        status: 204,
        body: String::new(),
        content_type: "application/json",
    }
}

/// `dst` of a push: an overlay IP or a public key (Mycelium's `MessageDestination`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Destination {
    ip: Option<String>,
    pk: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PushBody {
    dst: Destination,
    #[serde(default)]
    topic: Option<String>,
    payload: String,
}

#[derive(Debug, Serialize)]
struct PushResponse {
    id: String,
}

/// Mycelium's `InboundMessage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InboundJson {
    /// 16 hex digits.
    pub id: String,
    /// Sender's overlay address.
    pub src_ip: String,
    /// Sender's public key (64 hex digits; empty if not known).
    pub src_pk: String,
    /// Our overlay address.
    pub dst_ip: String,
    /// Our public key.
    pub dst_pk: String,
    /// Base64 topic (absent when empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Base64 payload.
    pub payload: String,
}

/// Mycelium's `TransmissionState` plus Hypha's `delivered`-equivalent `received`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StateJson {
    /// Accepted, not sent yet.
    Pending,
    /// Chunk counts while sending.
    Sending {
        /// Never sent.
        pending: u32,
        /// Sent, not acknowledged.
        sent: u32,
        /// Acknowledged.
        acked: u32,
    },
    /// Outbound: the receiver has it. Inbound: waiting to be read.
    Received,
    /// Inbound: read by the application.
    Read,
    /// The deadline passed before delivery.
    Aborted,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
/// `GET /api/v1/messages/status/{id}`.
pub struct StatusJson {
    /// The other end.
    pub dst: String,
    /// State (a string, or `{"sending": {...}}`).
    pub state: StateJson,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds.
    pub deadline: u64,
    /// Payload length.
    pub msg_len: usize,
}

/// Looks up the public key behind an overlay address (from the origin keys Babel learned).
pub type KeyLookup = Box<dyn Fn(OverlayAddr) -> Option<PublicKey> + Send + Sync>;

/// The bus endpoints. See the module documentation.
pub struct MessageApi {
    bus: Arc<SharedBus>,
    local_pk: PublicKey,
    keys: KeyLookup,
}

impl std::fmt::Debug for MessageApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageApi")
            .field("bus", &self.bus)
            .finish()
    }
}

fn query<'a>(url: &'a str, key: &str) -> Option<&'a str> {
    let q = url.split_once('?')?.1;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

/// Decodes `%XX` escapes (query values and path segments).
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(if c == b'+' { b' ' } else { c });
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn secs_param(url: &str, key: &str) -> Result<Option<Duration>, Reply> {
    match query(url, key) {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse::<u64>()
            .map(|s| Some(Duration::from_secs(s).min(MAX_WAIT)))
            .map_err(|_| error(400, &format!("{key} must be a number of seconds"))),
    }
}

fn push_error(e: &PushError) -> Reply {
    let status = match e {
        PushError::TooLarge { .. } => 413,
        PushError::DestinationFull(_) => 503,
        PushError::TotalFull => 507,
        _ => 400,
    };
    error(status, &e.to_string())
}

impl MessageApi {
    /// The API for `bus`, whose node has key `local_pk`; `keys` finds other nodes' keys.
    pub fn new(bus: Arc<SharedBus>, local_pk: PublicKey, keys: KeyLookup) -> MessageApi {
        MessageApi {
            bus,
            local_pk,
            keys,
        }
    }

    fn key_of(&self, a: OverlayAddr) -> Option<PublicKey> {
        if a == self.bus.local() {
            Some(self.local_pk)
        } else {
            (self.keys)(a)
        }
    }

    /// Answers a request on one of the bus's paths; `None` when the path isn't one of them.
    pub fn handle(&self, method: &str, url: &str, body: &[u8]) -> Option<Reply> {
        let path = url.split_once('?').map_or(url, |(p, _)| p);
        let path = path.strip_suffix('/').unwrap_or(path);
        let reply = if path == "/api/v1/messages" {
            match method {
                "POST" => self.post_message(url, body),
                "GET" => self.get_message(url),
                _ => error(405, "method not allowed"),
            }
        } else if let Some(id) = path.strip_prefix("/api/v1/messages/reply/") {
            match method {
                "POST" => self.post_reply(id, body),
                _ => error(405, "method not allowed"),
            }
        } else if let Some(id) = path.strip_prefix("/api/v1/messages/status/") {
            match method {
                "GET" => self.get_status(id),
                _ => error(405, "method not allowed"),
            }
        } else if let Some(ip) = path.strip_prefix("/api/v1/pubkey/") {
            match method {
                "GET" => self.get_pubkey(ip),
                _ => error(405, "method not allowed"),
            }
        } else if path == "/metrics" {
            match method {
                "GET" => self.metrics(),
                _ => error(405, "method not allowed"),
            }
        } else {
            return None;
        };
        Some(reply)
    }

    fn parse_push(&self, body: &[u8]) -> Result<(OverlayAddr, Vec<u8>, Vec<u8>), Reply> {
        let b: PushBody = serde_json::from_slice(body)
            .map_err(|e| error(400, &format!("invalid request body: {e}")))?;
        let dst = match (b.dst.ip, b.dst.pk) {
            (Some(ip), None) => {
                let ip: Ipv6Addr = ip
                    .parse()
                    .map_err(|_| error(400, "dst.ip is not an IPv6 address"))?;
                OverlayAddr::new(ip).map_err(|e| error(400, &e.to_string()))?
            }
            (None, Some(pk)) => {
                let mut k = [0u8; 32];
                hex::decode_to_slice(pk.as_bytes(), &mut k)
                    .map_err(|_| error(400, "dst.pk must be 64 hex digits"))?;
                PublicKey::from_bytes(k).address()
            }
            _ => return Err(error(400, "dst needs exactly one of ip or pk")),
        };
        let topic = match b.topic {
            Some(t) => B64
                .decode(t.as_bytes())
                .map_err(|_| error(400, "topic is not valid base64"))?,
            None => Vec::new(),
        };
        let payload = B64
            .decode(b.payload.as_bytes())
            .map_err(|_| error(400, "payload is not valid base64"))?;
        Ok((dst, topic, payload))
    }

    fn post_message(&self, url: &str, body: &[u8]) -> Reply {
        let reply_timeout = match secs_param(url, "reply_timeout") {
            Ok(t) => t,
            Err(r) => return r,
        };
        let (dst, topic, payload) = match self.parse_push(body) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let id = match self.bus.push(dst, &topic, payload, None, None) {
            Ok(id) => id,
            Err(e) => return push_error(&e),
        };
        let Some(wait) = reply_timeout else {
            return json(201, &PushResponse { id: id.to_string() });
        };
        match self.bus.wait_reply(id, wait) {
            Some(m) => json(200, &self.inbound_json(&m)),
            None => json(408, &PushResponse { id: id.to_string() }),
        }
    }

    fn inbound_json(&self, m: &InboundMessage) -> InboundJson {
        let hex_key =
            |k: Option<PublicKey>| k.map(|k| hex::encode(k.as_bytes())).unwrap_or_default();
        InboundJson {
            id: m.id.to_string(),
            src_ip: m.src.to_string(),
            src_pk: hex_key(self.key_of(m.src)),
            dst_ip: self.bus.local().to_string(),
            dst_pk: hex::encode(self.local_pk.as_bytes()),
            topic: (!m.topic.is_empty()).then(|| B64.encode(&m.topic)),
            payload: B64.encode(&m.payload),
        }
    }

    fn get_message(&self, url: &str) -> Reply {
        let timeout = match secs_param(url, "timeout") {
            Ok(t) => t.unwrap_or(Duration::ZERO),
            Err(r) => return r,
        };
        let peek = match query(url, "peek") {
            None | Some("") | Some("false") => false,
            Some("true") => true,
            Some(_) => return error(400, "peek must be true or false"),
        };
        let topic = match query(url, "topic") {
            None | Some("") => None,
            Some(t) => {
                let Some(t) = percent_decode(t) else {
                    return error(400, "topic is not valid percent-encoding");
                };
                match B64.decode(t.as_bytes()) {
                    Ok(t) => Some(t),
                    Err(_) => return error(400, "topic is not valid base64"),
                }
            }
        };
        match self.bus.receive(topic.as_deref(), peek, timeout) {
            Some(m) => json(200, &self.inbound_json(&m)),
            None => no_content(),
        }
    }

    fn post_reply(&self, id: &str, body: &[u8]) -> Reply {
        let Ok(id) = id.parse::<MessageId>() else {
            return error(400, "invalid message id (expected 16 hex digits)");
        };
        let Some(src) = self.bus.knows_inbound(id) else {
            return error(404, "no received message with this id");
        };
        // The body has a push's shape; its dst is ignored (the reply goes to the sender).
        let (_, topic, payload) = match self.parse_push(body) {
            Ok(x) => x,
            Err(r) => return r,
        };
        match self.bus.push(src, &topic, payload, None, Some(id)) {
            Ok(_) => no_content(),
            Err(e) => push_error(&e),
        }
    }

    fn get_status(&self, id: &str) -> Reply {
        let Ok(id) = id.parse::<MessageId>() else {
            return error(400, "invalid message id (expected 16 hex digits)");
        };
        let Some(s) = self.bus.status(id) else {
            return error(404, "unknown message id");
        };
        let state = match s.state {
            MessageState::Pending => StateJson::Pending,
            MessageState::Sending {
                pending,
                sent,
                acked,
            } => StateJson::Sending {
                pending,
                sent,
                acked,
            },
            MessageState::Delivered | MessageState::Received => StateJson::Received,
            MessageState::Read => StateJson::Read,
            MessageState::Aborted => StateJson::Aborted,
        };
        json(
            200,
            &StatusJson {
                dst: s.peer.to_string(),
                state,
                created: self.bus.unix_secs(s.created),
                deadline: self.bus.unix_secs(s.deadline),
                msg_len: s.len,
            },
        )
    }

    fn get_pubkey(&self, ip: &str) -> Reply {
        let Some(ip) = percent_decode(ip) else {
            return error(400, "invalid address");
        };
        let Ok(ip) = ip.parse::<Ipv6Addr>() else {
            return error(400, "not an IPv6 address");
        };
        let Ok(a) = OverlayAddr::new(ip) else {
            return error(400, "not an overlay address (400::/7)");
        };
        match self.key_of(a) {
            Some(k) => Reply {
                status: 200,
                body: format!("{{\"NodePubKey\":\"{}\"}}", hex::encode(k.as_bytes())),
                content_type: "application/json",
            },
            None => error(404, "no key known for this address"),
        }
    }

    fn metrics(&self) -> Reply {
        let mut registry = Registry::with_prefix("hypha_bus");
        registry.register_collector(Box::new(BusCollector(Arc::clone(&self.bus))));
        let mut body = String::new();
        match prometheus_client::encoding::text::encode(&mut body, &registry) {
            Ok(()) => Reply {
                status: 200,
                body,
                content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            },
            Err(_) => error(500, "cannot encode metrics"),
        }
    }
}

#[derive(Debug)]
struct BusCollector(Arc<SharedBus>);

impl Collector for BusCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = self.0.counters();
        let gauges: [(&str, &str, usize); 5] = [
            (
                "outbound_bytes",
                "Bytes held for undelivered outbound messages",
                c.outbound_bytes,
            ),
            (
                "inbound_bytes",
                "Bytes held for inbound messages in reassembly or unread",
                c.inbound_bytes,
            ),
            (
                "outbound_active",
                "Outbound messages not yet finished",
                c.outbound_active,
            ),
            (
                "reassemblies",
                "Inbound reassemblies in progress",
                c.reassemblies,
            ),
            ("inbox", "Messages waiting to be read", c.inbox_len),
        ];
        for (name, help, v) in gauges {
            let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
            g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let counters: [(&str, &str, u64); 17] = [
            ("pushed", "Messages accepted", c.pushed),
            ("push_refused", "Pushes refused", c.push_refused),
            ("delivered", "Outbound messages delivered", c.delivered),
            (
                "aborted",
                "Outbound messages aborted at their deadline",
                c.aborted,
            ),
            ("received", "Inbound messages completed", c.received),
            ("read", "Inbound messages read", c.read),
            (
                "chunks_sent",
                "Data chunks sent (first time)",
                c.chunks_sent,
            ),
            (
                "chunks_retransmitted",
                "Data chunks sent again",
                c.chunks_retransmitted,
            ),
            ("chunks_received", "Data chunks received", c.chunks_received),
            (
                "duplicate_chunks",
                "Duplicate chunks received",
                c.duplicate_chunks,
            ),
            (
                "chunks_refused_full",
                "Chunks refused for lack of inbound memory",
                c.chunks_refused_full,
            ),
            ("acks_sent", "Acks sent", c.acks_sent),
            ("acks_received", "Acks received", c.acks_received),
            (
                "checksum_failures",
                "Reassembled messages failing their checksum",
                c.checksum_failures,
            ),
            (
                "malformed_frames",
                "Frames that did not parse",
                c.malformed_frames,
            ),
            (
                "misbehaving_frames",
                "Well-formed frames contradicting earlier ones",
                c.misbehaving_frames,
            ),
            (
                "reassemblies_expired",
                "Reassemblies dropped for inactivity",
                c.reassemblies_expired,
            ),
        ];
        for (name, help, v) in counters {
            let k = ConstCounter::new(v);
            k.encode(enc.encode_descriptor(name, help, None, k.metric_type())?)?;
        }
        Ok(())
    }
}

/// Handles one HTTP request when the bus API doesn't own its path.
pub type Fallback = Box<dyn Fn(&str, &str, &[u8]) -> Reply + Send + Sync>;

/// Most requests handled at once; more get 503 (each may block in a long poll).
pub const MAX_CONCURRENT: usize = 64;

/// A running HTTP server for the bus API (and a fallback for other paths); dropping it stops it.
pub struct ApiServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl ApiServer {
    /// Listens on `addr`; each request runs on its own thread (at most [`MAX_CONCURRENT`]).
    pub fn start(
        addr: SocketAddr,
        api: Arc<MessageApi>,
        fallback: Fallback,
    ) -> std::io::Result<ApiServer> {
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the API is reachable from other hosts; it has no authentication");
        }
        let server = tiny_http::Server::http(addr)
            .map_err(|e| std::io::Error::other(format!("cannot listen on {addr}: {e}")))?;
        let addr = server.server_addr().to_ip().unwrap_or(addr);
        let server = Arc::new(server);
        let s = Arc::clone(&server);
        let fallback = Arc::new(fallback);
        let thread = std::thread::Builder::new()
            .name("hypha-api".into())
            .spawn(move || serve(&s, &api, &fallback))?;
        Ok(ApiServer {
            server,
            thread: Some(thread),
            addr,
        })
    }

    /// The address bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn respond(request: tiny_http::Request, reply: Reply) {
    let mut response = tiny_http::Response::from_string(reply.body).with_status_code(reply.status);
    if let Ok(h) =
        tiny_http::Header::from_bytes(&b"Content-Type"[..], reply.content_type.as_bytes())
    {
        response.add_header(h);
    }
    if let Err(e) = request.respond(response) {
        tracing::debug!(error = %e, "API client went away");
    }
}

fn serve(server: &tiny_http::Server, api: &Arc<MessageApi>, fallback: &Arc<Fallback>) {
    let busy = Arc::new(AtomicUsize::new(0));
    for mut request in server.incoming_requests() {
        if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CONCURRENT {
            busy.fetch_sub(1, Ordering::AcqRel);
            respond(request, error(503, "too many requests in progress"));
            continue;
        }
        let (api, fallback, busy2) = (Arc::clone(api), Arc::clone(fallback), Arc::clone(&busy));
        let spawned = std::thread::Builder::new()
            .name("hypha-api-req".into())
            .spawn(move || {
                let mut body = Vec::new();
                let reply = {
                    use std::io::Read;
                    let r = request
                        .as_reader()
                        .take(MAX_BODY as u64 + 1)
                        .read_to_end(&mut body);
                    if r.is_err() {
                        error(400, "cannot read request body")
                    } else if body.len() > MAX_BODY {
                        error(413, "request body too large")
                    } else {
                        let method = request.method().as_str().to_owned();
                        let url = request.url().to_owned();
                        api.handle(&method, &url, &body)
                            .unwrap_or_else(|| fallback(&method, &url, &body))
                    }
                };
                respond(request, reply);
                busy2.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            busy.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(error = %e, "cannot spawn an API request thread");
        }
    }
}

/// The fallback for a node whose daemon API isn't attached: 404 for every other path.
pub fn not_found() -> Fallback {
    Box::new(|_, _, _| error(404, "not found"))
}
