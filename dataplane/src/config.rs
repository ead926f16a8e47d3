//! `hypha-dp --static-config FILE`: a dataplane without a control plane, for debugging and
//! benchmarks.
//!
//! The file gives everything the control plane would otherwise push over shared memory — the
//! node's address and port, neighbours, routes and session keys — so two or more `hypha-dp`
//! processes carry traffic between namespaces with no handshakes at all. The keys are whatever
//! the file says: this mode has **no** key exchange, no rekeying and no forward secrecy; never
//! use it outside tests and measurements.
//!
//! ```toml
//! address = "4aa:1:2:3::1"          # this node's overlay address (its /64 is local)
//! port = 9651                       # UDP port (optional; the CLI's --port wins)
//!
//! [[peers]]                         # neighbours: an id used by routes, and the underlay address
//! id = 1
//! endpoint = "10.0.0.2:9651"
//!
//! [[routes]]                        # prefix -> neighbour id
//! prefix = "5bb:4:5:6::/64"
//! peer = 1
//!
//! [[sessions]]                      # one E2E session per remote node
//! peer = "5bb:4:5:6::2"             # the remote node's overlay address (its /64)
//! rx_index = 10                     # our receiver index: the remote puts it in its packets
//! tx_index = 20                     # the remote's receiver index: we put it in ours
//! tx_key = "<64 hex digits>"        # our sending key = the remote's rx_key
//! rx_key = "<64 hex digits>"        # our receiving key = the remote's tx_key
//! cipher = "aes-256-gcm"            # or "chacha20-poly1305"
//! ```

use std::net::{Ipv6Addr, SocketAddr};
use std::path::Path;

use serde::Deserialize;

use crate::fib::{NextHop, PeerId, Prefix};
use crate::session::{Cipher, SessionParams, KEY_LEN};
use crate::state::upper64;

/// Why a static configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML did not parse or has unknown fields.
    #[error("parsing the static config: {0}")]
    Toml(#[from] toml::de::Error),
    /// A value is out of range.
    #[error("static config: {0}")]
    Invalid(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    address: Ipv6Addr,
    port: Option<u16>,
    #[serde(default)]
    peers: Vec<RawPeer>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    sessions: Vec<RawSession>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    id: PeerId,
    endpoint: SocketAddr,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    prefix: String,
    peer: PeerId,
    #[serde(default)]
    metric: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSession {
    peer: Ipv6Addr,
    rx_index: u32,
    tx_index: u32,
    tx_key: String,
    rx_key: String,
    cipher: String,
}

/// A checked static configuration.
#[derive(Debug)]
pub struct StaticConfig {
    /// This node's overlay address.
    pub address: Ipv6Addr,
    /// The UDP port, if the file sets one.
    pub port: Option<u16>,
    /// Neighbours.
    pub peers: Vec<(PeerId, SocketAddr)>,
    /// Routes.
    pub routes: Vec<(Prefix, NextHop)>,
    /// Sessions.
    pub sessions: Vec<SessionParams>,
}

fn key(hex_str: &str, what: &str) -> Result<[u8; KEY_LEN], ConfigError> {
    let bytes =
        hex::decode(hex_str.trim()).map_err(|e| ConfigError::Invalid(format!("{what}: {e}")))?;
    bytes
        .try_into()
        .map_err(|_| ConfigError::Invalid(format!("{what}: expected {KEY_LEN} bytes")))
}

fn prefix(s: &str) -> Result<Prefix, ConfigError> {
    let bad = || ConfigError::Invalid(format!("route prefix {s:?}: expected ADDR/LEN"));
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let addr: Ipv6Addr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    Prefix::new(addr, len).map_err(|e| ConfigError::Invalid(e.to_string()))
}

impl StaticConfig {
    /// Parses a configuration from TOML text.
    pub fn parse(text: &str) -> Result<StaticConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text)?;
        let peers = raw.peers.iter().map(|p| (p.id, p.endpoint)).collect();
        let routes = raw
            .routes
            .iter()
            .map(|r| {
                Ok((
                    prefix(&r.prefix)?,
                    NextHop {
                        peer: r.peer,
                        metric: r.metric,
                    },
                ))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let sessions = raw
            .sessions
            .iter()
            .map(|s| {
                Ok(SessionParams {
                    local_index: s.rx_index,
                    remote_index: s.tx_index,
                    remote_prefix: upper64(&s.peer),
                    cipher: s
                        .cipher
                        .parse::<Cipher>()
                        .map_err(|e| ConfigError::Invalid(e.to_string()))?,
                    send_key: key(&s.tx_key, "tx_key")?,
                    recv_key: key(&s.rx_key, "rx_key")?,
                    initiator: false,
                    send_counter: 0,
                    replay_base: 0,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        Ok(StaticConfig {
            address: raw.address,
            port: raw.port,
            peers,
            routes,
            sessions,
        })
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<StaticConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
address = "4aa:1:2:3::1"
port = 9700
[[peers]]
id = 1
endpoint = "10.0.0.2:9651"
[[routes]]
prefix = "5bb:4:5:6::/64"
peer = 1
[[sessions]]
peer = "5bb:4:5:6::2"
rx_index = 10
tx_index = 20
tx_key = "0101010101010101010101010101010101010101010101010101010101010101"
rx_key = "0202020202020202020202020202020202020202020202020202020202020202"
cipher = "chacha20-poly1305"
"#;

    #[test]
    fn parses_a_full_config() {
        let c = StaticConfig::parse(GOOD).unwrap();
        assert_eq!(c.port, Some(9700));
        assert_eq!(c.peers, vec![(1, "10.0.0.2:9651".parse().unwrap())]);
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.routes[0].0.prefix_len(), 64);
        let s = &c.sessions[0];
        assert_eq!((s.local_index, s.remote_index), (10, 20));
        assert_eq!(s.send_key, [1; 32]);
        assert_eq!(s.cipher, Cipher::ChaCha20Poly1305);
        assert_eq!(s.remote_prefix, 0x05bb_0004_0005_0006);
    }

    #[test]
    fn rejects_bad_values() {
        for (from, to) in [
            ("cipher = \"chacha20-poly1305\"", "cipher = \"rot13\""),
            (
                "0101010101010101010101010101010101010101010101010101010101010101",
                "0101",
            ),
            ("5bb:4:5:6::/64", "5bb:4:5:6::/129"),
            ("5bb:4:5:6::/64", "5bb:4:5:6::"),
            ("port = 9700", "port = 97000"),
            ("port = 9700", "colour = 1"),
        ] {
            let text = GOOD.replace(from, to);
            assert!(StaticConfig::parse(&text).is_err(), "{to}");
        }
    }
}
