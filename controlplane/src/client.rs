//! The CLI side of `hypha peers` and `hypha routes`: a plain HTTP/1.1 GET against the running
//! node's local API, printed as a table or passed through as JSON.
//!
//! Why std and not an HTTP crate: the API is on loopback, answers small JSON bodies with a
//! `Content-Length`, and closes the connection; a few dozen lines cover it without a dependency.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use crate::api::{AdminInfo, PeerInfo, RouteInfo};
use crate::config::DEFAULT_API_ADDR;

/// Largest response the client accepts.
const MAX_RESPONSE: u64 = 16 << 20;

/// Errors talking to the node's API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Nothing answers at the API address.
    #[error("cannot reach the hypha node API at {addr} (is `hypha run` running?): {source}")]
    Connect {
        /// The address tried.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The connection failed mid-request.
    #[error("talking to the hypha node API at {addr}: {source}")]
    Io {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The answer is not an HTTP response we understand.
    #[error("malformed HTTP response from {addr}: {reason}")]
    Malformed {
        /// The address.
        addr: SocketAddr,
        /// What is wrong.
        reason: &'static str,
    },
    /// The API answered with an error status.
    #[error("the hypha node API answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The body.
        body: String,
    },
    /// The body is not the JSON we expected.
    #[error("unexpected JSON from the hypha node API: {0}")]
    Json(#[from] serde_json::Error),
    /// The node refused a change (the message says why).
    #[error("{0}")]
    Refused(String),
}

/// Sends `GET path` to `addr` and returns status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), ClientError> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|source| ClientError::Connect { addr, source })?;
    let io = |source| ClientError::Io { addr, source };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE)
        .read_to_end(&mut raw)
        .map_err(io)?;
    parse_response(&raw).map_err(|reason| ClientError::Malformed { addr, reason })
}

/// Parses an HTTP/1.x response (Content-Length, chunked, or close-delimited body).
fn parse_response(raw: &[u8]) -> Result<(u16, String), &'static str> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(raw.get(..split).ok_or("truncated")?)
        .map_err(|_| "headers are not UTF-8")?;
    let body = raw.get(split + 4..).ok_or("truncated")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("no status line")?;
    let mut parts = status_line.split(' ');
    let version = parts.next().ok_or("no version")?;
    if !version.starts_with("HTTP/1.") {
        return Err("not HTTP/1.x");
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or("bad status code")?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or("bad header line")?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| "bad Content-Length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(n) = length {
        body.get(..n)
            .ok_or("body shorter than Content-Length")?
            .to_vec()
    } else {
        body.to_vec()
    };
    let body = String::from_utf8(body).map_err(|_| "body is not UTF-8")?;
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_line = std::str::from_utf8(data.get(..eol).ok_or("truncated")?)
            .map_err(|_| "bad chunk size")?;
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| "bad chunk size")?;
        data = data.get(eol + 2..).ok_or("truncated chunk")?;
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(data.get(..size).ok_or("truncated chunk")?);
        data = data.get(size..).ok_or("truncated chunk")?;
        data = data
            .strip_prefix(b"\r\n")
            .ok_or("missing chunk terminator")?;
    }
}

/// Fetches a JSON document from the API.
pub fn get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value, ClientError> {
    let (status, body) = http_get(addr, path)?;
    if status != 200 {
        return Err(ClientError::Status { status, body });
    }
    Ok(serde_json::from_str(&body)?)
}

/// `hypha peers [list|add|remove] [--json]`.
#[derive(Debug, Clone, clap::Args)]
pub struct PeersArgs {
    /// What to do (`list` is the default).
    #[command(subcommand)]
    pub action: Option<PeersAction>,
    /// Address of the node's HTTP API.
    #[arg(long = "api-addr", value_name = "ADDR", default_value_t = DEFAULT_API_ADDR, global = true)]
    pub api_addr: SocketAddr,
}

/// Subcommands of `hypha peers`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum PeersAction {
    /// List peers and the state of their links (default).
    List,
    /// Add a configured peer to the running node (not written to any config file).
    Add {
        /// The peer, `udp://IPV4:PORT` or `udp://[IPV6]:PORT`.
        #[arg(value_name = "ENDPOINT")]
        endpoint: String,
    },
    /// Remove a peer from the running node and tear down its link.
    Remove {
        /// The peer, as `hypha peers list` shows it (`udp://IP:PORT`).
        #[arg(value_name = "ENDPOINT")]
        endpoint: String,
    },
}

/// `hypha routes [selected|fallback] [--json]`.
#[derive(Debug, Clone, clap::Args)]
pub struct RoutesArgs {
    /// Which routes (default: selected).
    #[command(subcommand)]
    pub which: Option<RoutesWhich>,
    /// Address of the node's HTTP API.
    #[arg(long = "api-addr", value_name = "ADDR", default_value_t = DEFAULT_API_ADDR, global = true)]
    pub api_addr: SocketAddr,
}

/// Subcommands of `hypha routes`.
#[derive(Debug, Clone, Copy, clap::Subcommand)]
pub enum RoutesWhich {
    /// Routes in use (default).
    Selected,
    /// Routes known but not selected.
    Fallback,
}

/// `hypha stats [--json]`: counters by subsystem, the dataplane's per-reason drops included.
#[derive(Debug, Clone, clap::Args)]
pub struct StatsArgs {
    /// Address of the node's HTTP API.
    #[arg(long = "api-addr", value_name = "ADDR", default_value_t = DEFAULT_API_ADDR)]
    pub api_addr: SocketAddr,
}

/// Runs `hypha stats` (`json`: the global `--json`); errors go to stderr and exit with 1.
pub fn stats(args: &StatsArgs, json: bool) -> ExitCode {
    report(stats_text(args.api_addr, json))
}

/// The output of `hypha stats`: one `group.counter value` line per counter, or the JSON object.
pub fn stats_text(addr: SocketAddr, json: bool) -> Result<String, ClientError> {
    let v = get_json(addr, "/api/v1/admin/stats")?;
    if json {
        return pretty(&v);
    }
    let stats: crate::api::Stats = serde_json::from_value(v)?;
    let rows: Vec<Vec<String>> = stats
        .iter()
        .flat_map(|(group, counters)| {
            counters
                .iter()
                .map(move |(name, value)| vec![format!("{group}.{name}"), value.to_string()])
        })
        .collect();
    Ok(table(&["COUNTER", "VALUE"], &rows))
}

/// Runs `hypha peers` (`json`: the global `--json`); errors go to stderr and exit with 1.
pub fn peers(args: &PeersArgs, json: bool) -> ExitCode {
    match &args.action {
        None | Some(PeersAction::List) => report(peers_text(args.api_addr, json)),
        Some(PeersAction::Add { endpoint }) => {
            report(change_peer(args.api_addr, endpoint, true, json))
        }
        Some(PeersAction::Remove { endpoint }) => {
            report(change_peer(args.api_addr, endpoint, false, json))
        }
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters (a path segment).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `hypha peers add|remove ENDPOINT`: `POST /api/v1/admin/peers` or `DELETE
/// /api/v1/admin/peers/{endpoint}`; the output says what happened.
pub fn change_peer(
    addr: SocketAddr,
    endpoint: &str,
    add: bool,
    json: bool,
) -> Result<String, ClientError> {
    let (method, path, body) = if add {
        let body = serde_json::json!({ "endpoint": endpoint }).to_string();
        ("POST", "/api/v1/admin/peers".to_string(), Some(body))
    } else {
        let path = format!("/api/v1/admin/peers/{}", percent_encode(endpoint));
        ("DELETE", path, None)
    };
    let r = crate::bus::client::request(
        addr,
        method,
        &path,
        body.as_deref().map(str::as_bytes),
        Duration::from_secs(15),
    )
    .map_err(|e| match e {
        crate::bus::client::ClientError::Io { addr, source }
            if source.kind() == std::io::ErrorKind::ConnectionRefused =>
        {
            ClientError::Connect { addr, source }
        }
        crate::bus::client::ClientError::Io { addr, source } => ClientError::Io { addr, source },
        _ => ClientError::Malformed {
            addr,
            reason: "not an HTTP response",
        },
    })?;
    let said = serde_json::from_slice::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&r.body).into_owned());
    let done = if add { "added" } else { "removed" };
    match r.status {
        204 | 200 => {
            if json {
                pretty(&serde_json::json!({ "endpoint": endpoint, "result": done }))
            } else {
                Ok(format!("peer {endpoint} {done}\n"))
            }
        }
        409 => Err(ClientError::Refused(format!(
            "peer {endpoint} is already configured"
        ))),
        404 => Err(ClientError::Refused(format!("no peer {endpoint}"))),
        400 => Err(ClientError::Refused(said)),
        status => Err(ClientError::Status { status, body: said }),
    }
}

/// Runs `hypha routes` (`json`: the global `--json`); errors go to stderr and exit with 1.
pub fn routes(args: &RoutesArgs, json: bool) -> ExitCode {
    let which = args.which.unwrap_or(RoutesWhich::Selected);
    report(routes_text(args.api_addr, which, json))
}

fn report(r: Result<String, ClientError>) -> ExitCode {
    match r {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn pretty(v: &serde_json::Value) -> Result<String, ClientError> {
    Ok(serde_json::to_string_pretty(v)? + "\n")
}

/// The output of `hypha peers`.
pub fn peers_text(addr: SocketAddr, json: bool) -> Result<String, ClientError> {
    let v = get_json(addr, "/api/v1/admin/peers")?;
    if json {
        return pretty(&v);
    }
    let peers: Vec<PeerInfo> = serde_json::from_value(v)?;
    Ok(peers_table(&peers))
}

/// The output of `hypha routes`.
pub fn routes_text(
    addr: SocketAddr,
    which: RoutesWhich,
    json: bool,
) -> Result<String, ClientError> {
    let path = match which {
        RoutesWhich::Selected => "/api/v1/admin/routes/selected",
        RoutesWhich::Fallback => "/api/v1/admin/routes/fallback",
    };
    let v = get_json(addr, path)?;
    if json {
        return pretty(&v);
    }
    let routes: Vec<RouteInfo> = serde_json::from_value(v)?;
    Ok(routes_table(&routes))
}

/// The node's own identity (used by tests and tools).
pub fn admin(addr: SocketAddr) -> Result<AdminInfo, ClientError> {
    Ok(serde_json::from_value(get_json(addr, "/api/v1/admin")?)?)
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (cell, w) in cells.zip(&widths) {
            l.push_str(&format!("{cell:<w$}  "));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

fn lower<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::from("?"),
    }
}

/// A human table of peers.
pub fn peers_table(peers: &[PeerInfo]) -> String {
    if peers.is_empty() {
        return String::from("no peers\n");
    }
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            vec![
                format!("{}://{}", p.endpoint.proto, p.endpoint.socket_addr),
                lower(&p.kind),
                lower(&p.connection_state),
                p.overlay_ip.clone().unwrap_or_else(|| "-".into()),
                p.tx_bytes.to_string(),
                p.rx_bytes.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "ENDPOINT",
            "TYPE",
            "STATE",
            "OVERLAY IP",
            "TX BYTES",
            "RX BYTES",
        ],
        &rows,
    )
}

/// A human table of routes.
pub fn routes_table(routes: &[RouteInfo]) -> String {
    if routes.is_empty() {
        return String::from("no routes\n");
    }
    let rows: Vec<Vec<String>> = routes
        .iter()
        .map(|r| {
            vec![
                r.subnet.clone(),
                r.next_hop.clone(),
                r.metric.to_string(),
                r.seqno.to_string(),
            ]
        })
        .collect();
    table(&["SUBNET", "NEXT HOP", "METRIC", "SEQNO"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ApiServer, Metric, Snapshot};
    use std::sync::Arc;

    #[test]
    fn parses_responses() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]extra").unwrap();
        assert_eq!(r, (200, "[]".into()));
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1;x\r\nd\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r, (404, "abcd".into()));
        let r = parse_response(b"HTTP/1.0 200 OK\r\n\r\nall").unwrap();
        assert_eq!(r, (200, "all".into()));
        for bad in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\n",
            b"SPDY 200\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nnocolon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n\xff",
        ] {
            assert!(parse_response(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tables() {
        let snap = crate::api::tests::sample();
        let t = peers_table(&snap.peers);
        assert!(t.starts_with("ENDPOINT"), "{t}");
        assert!(t.contains("udp://10.0.0.2:9651  static"), "{t}");
        let t = routes_table(&snap.fallback);
        assert!(t.contains("infinite"), "{t}");
        assert_eq!(routes_table(&[]), "no routes\n");
        assert_eq!(peers_table(&[]), "no peers\n");
    }

    #[test]
    fn client_against_the_server() {
        let shared = Arc::new(arc_swap::ArcSwap::from_pointee(Snapshot::default()));
        let server = ApiServer::start("127.0.0.1:0".parse().unwrap(), Arc::clone(&shared)).unwrap();
        let addr = server.local_addr();
        assert_eq!(
            routes_text(addr, RoutesWhich::Selected, false).unwrap(),
            "no routes\n"
        );
        shared.store(Arc::new(crate::api::tests::sample()));
        let text = routes_text(addr, RoutesWhich::Selected, true).unwrap();
        let v: Vec<RouteInfo> = serde_json::from_str(&text).unwrap();
        assert_eq!(v[0].metric, Metric::Value(96));
        assert!(peers_text(addr, false).unwrap().contains("alive"));
        assert_eq!(admin(addr).unwrap().node_ip, "400:1:2:3::1");
        match get_json(addr, "/api/v1/nothing") {
            Err(ClientError::Status { status: 404, .. }) => {}
            other => panic!("{other:?}"),
        }
        drop(server);
        match peers_text(addr, true) {
            Err(e @ ClientError::Connect { .. }) => {
                assert!(e.to_string().contains("is `hypha run` running?"))
            }
            // tiny_http's accept thread may still hold the listener for a moment after the drop:
            // the kernel then accepts and resets the connection instead of refusing it.
            Err(ClientError::Io { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}
