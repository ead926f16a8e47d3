//! Helpers for tests and benchmarks that run `hypha-dp --static-config` in the namespaces
//! (dataplane/tests, `hypha-bench system`): the usual node addresses, the static configuration
//! file, and the dataplane's JSON stats endpoint.

use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use crate::Node;

/// The dataplane's UDP port (Mycelium's default).
pub const PORT: u16 = 9651;
/// Where `hypha-dp --stats-listen` answers inside a node's namespace.
pub const STATS: &str = "127.0.0.1:9652";
/// Overlay address of node a of a line a–b–c.
pub const A: &str = "4aa:1:2:3::1";
/// Overlay address of node b.
pub const B: &str = "5bb:4:5:6::1";
/// Overlay address of node c.
pub const C: &str = "4cc:7:8:9::1";

/// True when running as root (namespaces, TUN, XDP).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// True if `tool --version` runs.
pub fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Bytes as lowercase hex.
pub fn hex_key(k: &[u8]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

/// A 32-byte key of `byte` repeated, as hex.
pub fn key(byte: u8) -> String {
    hex_key(&[byte; 32])
}

/// The /64 network of an address as text (`4aa:1:2:3::`); `::` if `addr` is not an address.
pub fn net64(addr: &str) -> String {
    let a: Ipv6Addr = addr.parse().unwrap_or(Ipv6Addr::UNSPECIFIED);
    Ipv6Addr::from(u128::from(a) & !((1u128 << 64) - 1)).to_string()
}

/// One static session (AES-256-GCM) of a [`static_config`].
#[derive(Debug, Clone)]
pub struct StaticSession<'a> {
    /// The peer's overlay address.
    pub peer: &'a str,
    /// Our receiver index.
    pub rx_index: u32,
    /// The peer's receiver index.
    pub tx_index: u32,
    /// Sending key (hex).
    pub tx_key: String,
    /// Receiving key (hex).
    pub rx_key: String,
}

/// The TOML of `hypha-dp --static-config` for node `addr` on [`PORT`]: peers (id, underlay
/// endpoint), routes (a /64 network as [`net64`] gives it, peer id) and sessions.
pub fn static_config(
    addr: &str,
    peers: &[(u32, SocketAddr)],
    routes: &[(&str, u32)],
    sessions: &[StaticSession<'_>],
) -> String {
    let mut s = format!("address = \"{addr}\"\nport = {PORT}\n");
    for (id, ep) in peers {
        s += &format!("[[peers]]\nid = {id}\nendpoint = \"{ep}\"\n");
    }
    for (prefix, peer) in routes {
        s += &format!("[[routes]]\nprefix = \"{prefix}/64\"\npeer = {peer}\n");
    }
    for x in sessions {
        s += &format!(
            "[[sessions]]\npeer = \"{}\"\nrx_index = {}\ntx_index = {}\ntx_key = \"{}\"\n\
             rx_key = \"{}\"\ncipher = \"aes-256-gcm\"\n",
            x.peer, x.rx_index, x.tx_index, x.tx_key, x.rx_key
        );
    }
    s
}

/// The JSON document of `hypha-dp --stats-listen` at [`STATS`] in `node` (`None` if it does not
/// answer within a few seconds or answers something else).
pub fn stats(node: &Node) -> Option<serde_json::Value> {
    node.run_in(|| -> Option<serde_json::Value> {
        let addr = STATS.parse().ok()?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        serde_json::from_str(out.split_once("\r\n\r\n")?.1).ok()
    })
    .ok()
    .flatten()
}

/// Counter `name` of the hypha-dp in `node` (its stats' `counters` object).
pub fn counter(node: &Node, name: &str) -> Option<u64> {
    stats(node)?["counters"][name].as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_and_networks() {
        assert_eq!(net64(C), "4cc:7:8:9::");
        assert_eq!(net64("junk"), "::");
        assert_eq!(key(0x0f).len(), 64);
        let cfg = static_config(
            A,
            &[(1, "10.0.0.2:9651".parse().unwrap())],
            &[(&net64(C), 1)],
            &[StaticSession {
                peer: C,
                rx_index: 7,
                tx_index: 9,
                tx_key: key(1),
                rx_key: key(2),
            }],
        );
        assert!(cfg.starts_with("address = \"4aa:1:2:3::1\"\nport = 9651\n"));
        assert!(cfg.contains("prefix = \"4cc:7:8:9::/64\"\npeer = 1\n"));
        assert!(cfg.contains("rx_index = 7\ntx_index = 9\n"));
    }
}
