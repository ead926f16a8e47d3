//! `hypha run` settings: command-line flags, an optional TOML file, and the merged [`RunConfig`].
//!
//! Why one merged type: the runtime should not care where a setting came from. The file is read
//! first, then every flag given on the command line overrides it (a list such as `--peers` replaces
//! the file's list rather than extending it, so a command line can always say exactly what it
//! wants). Everything that comes from outside (the file, the flags, the network key file) is
//! validated here and turned into a [`ConfigError`] that names the offending value; nothing panics.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// Default UDP port of a node (the same as Mycelium's).
pub const DEFAULT_PORT: u16 = 9651;
/// Default address of the local HTTP API.
pub const DEFAULT_API_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8989);
/// Default key file, relative to the working directory (Mycelium's name and format).
pub const DEFAULT_KEY_FILE: &str = "priv_key.bin";
/// Default Babel hello interval (RFC 8966 §3.4.1 suggests 4 s).
pub const DEFAULT_HELLO_INTERVAL: Duration = Duration::from_secs(4);
/// Default Babel periodic update interval (RFC 8966 Appendix B: 4 × hello).
pub const DEFAULT_UPDATE_INTERVAL: Duration = Duration::from_secs(16);
/// Default message deadline (Mycelium's: 5 minutes).
pub const DEFAULT_MESSAGE_DEADLINE: Duration = Duration::from_secs(300);
/// Length of a network key file.
pub const NETWORK_KEY_LEN: usize = 32;

/// Errors in the settings of `hypha run`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A peer is not of the form `udp://IP:PORT`.
    #[error("invalid peer `{input}`: {reason} (expected udp://IPV4:PORT or udp://[IPV6]:PORT)")]
    Peer {
        /// What was given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A duration is not `N`, `Ns` or `Nms`.
    #[error("invalid duration `{0}` (expected e.g. 4s, 500ms, or a number of seconds)")]
    Duration(String),
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for these settings.
    #[error("invalid config file {path}: {message}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message (it names the line and the key).
        message: String,
    },
    /// The network key file could not be read.
    #[error("cannot read network key file {path}: {source}")]
    ReadNetworkKey {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The network key file does not hold exactly 32 bytes.
    #[error("network key file {path} holds {len} bytes; it must hold exactly 32 raw bytes")]
    NetworkKeyLength {
        /// The file.
        path: PathBuf,
        /// How many bytes it holds.
        len: usize,
    },
    /// A setting has a value that cannot work.
    #[error("invalid {name}: {reason}")]
    Invalid {
        /// The setting.
        name: &'static str,
        /// Why.
        reason: &'static str,
    },
}

/// A configured peer: `udp://IP:PORT`, IPv4 or bracketed IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerEndpoint(pub SocketAddr);

impl FromStr for PeerEndpoint {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ConfigError::Peer {
            input: s.to_owned(),
            reason,
        };
        let (scheme, rest) = s.split_once("://").ok_or_else(|| err("missing scheme"))?;
        if !scheme.eq_ignore_ascii_case("udp") {
            return Err(err("unsupported scheme, only udp is supported"));
        }
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = if let Some(after) = rest.strip_prefix('[') {
            let (host, tail) = after
                .split_once(']')
                .ok_or_else(|| err("unclosed [ in IPv6 address"))?;
            let port = tail.strip_prefix(':').ok_or_else(|| err("missing :PORT"))?;
            let ip: Ipv6Addr = host.parse().map_err(|_| err("invalid IPv6 address"))?;
            (IpAddr::V6(ip), port)
        } else {
            let (host, port) = rest.rsplit_once(':').ok_or_else(|| err("missing :PORT"))?;
            if host.contains(':') {
                return Err(err("IPv6 addresses must be in brackets"));
            }
            let ip: Ipv4Addr = host
                .parse()
                .map_err(|_| err("invalid IPv4 address (host names are not supported)"))?;
            (IpAddr::V4(ip), port)
        };
        let port: u16 = port.parse().map_err(|_| err("invalid port"))?;
        if port == 0 {
            return Err(err("port 0"));
        }
        if ip_is_unusable(host) {
            return Err(err("unspecified or multicast address"));
        }
        Ok(PeerEndpoint(SocketAddr::new(host, port)))
    }
}

fn ip_is_unusable(ip: IpAddr) -> bool {
    ip.is_unspecified() || ip.is_multicast()
}

impl fmt::Display for PeerEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "udp://{}", self.0)
    }
}

/// Parses `4`, `4s`, `1.5s` or `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let bad = || ConfigError::Duration(s.to_owned());
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    let secs = v * scale;
    if !secs.is_finite() || !(0.0..=86_400.0).contains(&secs) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The flags of `hypha run`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// Node key file when given on the command line (the global `-k/--key-file`; `main` fills it
    /// in, so that only an explicit flag overrides the config file).
    #[arg(skip)]
    pub key_file: Option<PathBuf>,
    /// UDP port for peers and data [default: 9651].
    #[arg(short = 'p', long = "port", value_name = "PORT")]
    pub port: Option<u16>,
    /// A peer to connect to, `udp://IPV4:PORT` or `udp://[IPV6]:PORT` (repeatable; replaces the
    /// config file's list).
    #[arg(long = "peers", value_name = "URL", num_args = 1.., value_parser = parse_peer_arg)]
    pub peers: Vec<PeerEndpoint>,
    /// TOML config file with the same settings; flags override it.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Network key (32 raw bytes): only nodes holding the same key become neighbours.
    #[arg(long = "network-key", value_name = "FILE")]
    pub network_key: Option<PathBuf>,
    /// Address of the local HTTP API [default: 127.0.0.1:8989].
    #[arg(long = "api-addr", value_name = "ADDR")]
    pub api_addr: Option<SocketAddr>,
    /// Run routing only, with the control plane owning the UDP socket (no hypha-dp, no TUN).
    #[arg(long = "no-dataplane")]
    pub no_dataplane: bool,
    /// The hypha-dp executable [default: next to this executable].
    #[arg(long = "dataplane-bin", value_name = "PATH")]
    pub dataplane_bin: Option<PathBuf>,
    /// Dataplane worker threads [default: one per core].
    #[arg(long = "workers", value_name = "N")]
    pub workers: Option<usize>,
    /// Route and forward without a TUN device.
    #[arg(long = "no-tun")]
    pub no_tun: bool,
    /// Name of the TUN device [default: hypha0].
    #[arg(long = "tun-name", value_name = "NAME")]
    pub tun_name: Option<String>,
    /// The dataplane's XDP fast path: off, generic, driver, tc or auto [default: hypha-dp's, auto].
    #[arg(long = "xdp", value_name = "MODE")]
    pub xdp: Option<String>,
    /// Runtime directory (dataplane hand-over socket) [default: /run/hypha/<overlay address>].
    #[arg(long = "runtime-dir", value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// Babel hello interval, e.g. `4s` or `250ms` [default: 4s].
    #[arg(long = "hello-interval", value_name = "DURATION", value_parser = parse_duration_arg)]
    pub hello_interval: Option<Duration>,
    /// Babel periodic update interval [default: 4 × hello interval].
    #[arg(long = "update-interval", value_name = "DURATION", value_parser = parse_duration_arg)]
    pub update_interval: Option<Duration>,
    /// How long the message bus tries to deliver a message before aborting it (Mycelium's API
    /// has no per-message deadline), e.g. `300s` or `2s` [default: 300s].
    #[arg(long = "message-deadline", value_name = "DURATION", value_parser = parse_duration_arg)]
    pub message_deadline: Option<Duration>,
}

fn parse_peer_arg(s: &str) -> Result<PeerEndpoint, String> {
    s.parse().map_err(|e: ConfigError| e.to_string())
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// The config file: the same settings as the flags, in TOML.
///
/// ```toml
/// key_file = "/var/lib/hypha/priv_key.bin"
/// port = 9651
/// peers = ["udp://192.0.2.1:9651", "udp://[2001:db8::1]:9651"]
/// network_key = "/etc/hypha/network.key"
/// api_addr = "127.0.0.1:8989"
/// no_dataplane = true
/// hello_interval = "4s"
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`RunArgs::key_file`].
    pub key_file: Option<PathBuf>,
    /// See [`RunArgs::port`].
    pub port: Option<u16>,
    /// See [`RunArgs::peers`].
    #[serde(default)]
    pub peers: Vec<String>,
    /// See [`RunArgs::network_key`].
    pub network_key: Option<PathBuf>,
    /// See [`RunArgs::api_addr`].
    pub api_addr: Option<String>,
    /// See [`RunArgs::no_dataplane`].
    #[serde(default)]
    pub no_dataplane: bool,
    /// See [`RunArgs::hello_interval`].
    pub hello_interval: Option<String>,
    /// See [`RunArgs::update_interval`].
    pub update_interval: Option<String>,
    /// See [`RunArgs::message_deadline`].
    pub message_deadline: Option<String>,
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses config text; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::ParseFile {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }
}

/// Everything `hypha run` needs, validated.
#[derive(Clone, PartialEq, Eq)]
pub struct RunConfig {
    /// Node key file.
    pub key_file: PathBuf,
    /// UDP port.
    pub port: u16,
    /// Configured peers, deduplicated, in the order given.
    pub peers: Vec<PeerEndpoint>,
    /// The network key, when the network is private.
    pub network_key: Option<[u8; NETWORK_KEY_LEN]>,
    /// HTTP API address.
    pub api_addr: SocketAddr,
    /// Whether `--no-dataplane` was given.
    pub no_dataplane: bool,
    /// Babel hello interval.
    pub hello_interval: Duration,
    /// Babel periodic update interval.
    pub update_interval: Duration,
    /// Deadline of every message the bus sends.
    pub message_deadline: Duration,
    /// The dataplane's settings (unused with `no_dataplane`).
    pub dataplane: DataplaneArgs,
}

/// The dataplane flags of `hypha run`, passed through to `hypha-dp`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataplaneArgs {
    /// See [`RunArgs::dataplane_bin`].
    pub bin: Option<PathBuf>,
    /// See [`RunArgs::workers`].
    pub workers: Option<usize>,
    /// See [`RunArgs::no_tun`].
    pub no_tun: bool,
    /// See [`RunArgs::tun_name`].
    pub tun_name: Option<String>,
    /// See [`RunArgs::xdp`].
    pub xdp: Option<String>,
    /// See [`RunArgs::runtime_dir`].
    pub runtime_dir: Option<PathBuf>,
}

impl fmt::Debug for RunConfig {
    /// Never prints the network key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunConfig")
            .field("key_file", &self.key_file)
            .field("port", &self.port)
            .field("peers", &self.peers)
            .field("network_key", &self.network_key.map(|_| "<set>"))
            .field("api_addr", &self.api_addr)
            .field("no_dataplane", &self.no_dataplane)
            .field("hello_interval", &self.hello_interval)
            .field("update_interval", &self.update_interval)
            .field("message_deadline", &self.message_deadline)
            .finish()
    }
}

impl RunConfig {
    /// Merges the flags over the file named by `--config` (if any) and reads the network key.
    pub fn from_args(args: &RunArgs) -> Result<RunConfig, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    /// Merges the flags over an already parsed file.
    pub fn merge(args: &RunArgs, file: FileConfig) -> Result<RunConfig, ConfigError> {
        let key_file = args
            .key_file
            .clone()
            .or(file.key_file)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_KEY_FILE));
        let port = args.port.or(file.port).unwrap_or(DEFAULT_PORT);
        if port == 0 {
            return Err(ConfigError::Invalid {
                name: "port",
                reason: "must not be 0",
            });
        }
        let mut peers = if args.peers.is_empty() {
            file.peers
                .iter()
                .map(|p| p.parse())
                .collect::<Result<Vec<PeerEndpoint>, _>>()?
        } else {
            args.peers.clone()
        };
        let mut seen = std::collections::HashSet::new();
        peers.retain(|p| seen.insert(*p));
        let network_key = match args.network_key.clone().or(file.network_key) {
            Some(path) => Some(read_network_key(&path)?),
            None => None,
        };
        let api_addr = match (args.api_addr, file.api_addr) {
            (Some(a), _) => a,
            (None, Some(s)) => s.parse().map_err(|_| ConfigError::Invalid {
                name: "api_addr",
                reason: "expected IP:PORT",
            })?,
            (None, None) => DEFAULT_API_ADDR,
        };
        let hello_interval = match (args.hello_interval, file.hello_interval) {
            (Some(d), _) => d,
            (None, Some(s)) => parse_duration(&s)?,
            (None, None) => DEFAULT_HELLO_INTERVAL,
        };
        if hello_interval < Duration::from_millis(10) {
            return Err(ConfigError::Invalid {
                name: "hello interval",
                reason: "must be at least 10ms",
            });
        }
        // RFC 8966 §4.4.3: hello intervals travel in centiseconds in a u16.
        if hello_interval > Duration::from_millis(655_350) {
            return Err(ConfigError::Invalid {
                name: "hello interval",
                reason: "must be at most 655.35s",
            });
        }
        let update_interval = match (args.update_interval, file.update_interval) {
            (Some(d), _) => d,
            (None, Some(s)) => parse_duration(&s)?,
            (None, None) => {
                if args.hello_interval.is_some() || hello_interval != DEFAULT_HELLO_INTERVAL {
                    hello_interval * 4
                } else {
                    DEFAULT_UPDATE_INTERVAL
                }
            }
        };
        if update_interval < hello_interval || update_interval > Duration::from_millis(655_350) {
            return Err(ConfigError::Invalid {
                name: "update interval",
                reason: "must be at least the hello interval and at most 655.35s",
            });
        }
        let message_deadline = match (args.message_deadline, file.message_deadline) {
            (Some(d), _) => d,
            (None, Some(s)) => parse_duration(&s)?,
            (None, None) => DEFAULT_MESSAGE_DEADLINE,
        };
        if message_deadline < Duration::from_millis(100) {
            return Err(ConfigError::Invalid {
                name: "message deadline",
                reason: "must be at least 100ms",
            });
        }
        Ok(RunConfig {
            key_file,
            port,
            peers,
            network_key,
            api_addr,
            no_dataplane: args.no_dataplane || file.no_dataplane,
            hello_interval,
            update_interval,
            message_deadline,
            dataplane: DataplaneArgs {
                bin: args.dataplane_bin.clone(),
                workers: args.workers,
                no_tun: args.no_tun,
                tun_name: args.tun_name.clone(),
                xdp: args.xdp.clone(),
                runtime_dir: args.runtime_dir.clone(),
            },
        })
    }
}

/// Reads a network key file: exactly 32 raw bytes.
pub fn read_network_key(path: &Path) -> Result<[u8; NETWORK_KEY_LEN], ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::ReadNetworkKey {
        path: path.to_owned(),
        source,
    })?;
    <[u8; NETWORK_KEY_LEN]>::try_from(bytes.as_slice()).map_err(|_| ConfigError::NetworkKeyLength {
        path: path.to_owned(),
        len: bytes.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(s: &str) -> Result<SocketAddr, String> {
        s.parse::<PeerEndpoint>()
            .map(|p| p.0)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn peers_parse_v4_and_bracketed_v6() {
        assert_eq!(
            peer("udp://10.0.0.1:9651"),
            Ok("10.0.0.1:9651".parse().unwrap())
        );
        assert_eq!(peer("UDP://10.0.0.1:1/"), Ok("10.0.0.1:1".parse().unwrap()));
        assert_eq!(
            peer("udp://[2001:db8::1]:9651"),
            Ok("[2001:db8::1]:9651".parse().unwrap())
        );
        assert_eq!(
            "udp://[2001:db8::1]:7"
                .parse::<PeerEndpoint>()
                .unwrap()
                .to_string(),
            "udp://[2001:db8::1]:7"
        );
    }

    #[test]
    fn bad_peers_name_the_problem() {
        for (input, reason) in [
            ("10.0.0.1:9651", "missing scheme"),
            ("tcp://10.0.0.1:9651", "only udp"),
            ("udp://10.0.0.1", "missing :PORT"),
            ("udp://10.0.0.1:x", "invalid port"),
            ("udp://10.0.0.1:70000", "invalid port"),
            ("udp://10.0.0.1:0", "port 0"),
            ("udp://2001:db8::1:9651", "brackets"),
            ("udp://[2001:db8::1:9651", "unclosed"),
            ("udp://[2001:db8::1]9651", "missing :PORT"),
            ("udp://[zz::1]:9651", "invalid IPv6"),
            ("udp://example.com:9651", "host names"),
            ("udp://0.0.0.0:9651", "unspecified"),
            ("udp://[ff02::1]:9651", "multicast"),
            ("", "missing scheme"),
        ] {
            let e = peer(input).expect_err(input);
            assert!(e.contains(reason), "{input}: {e}");
            assert!(e.contains("expected udp://"), "{input}: {e}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("4").unwrap(), Duration::from_secs(4));
        assert_eq!(parse_duration("4s").unwrap(), Duration::from_secs(4));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        for bad in ["", "s", "-1s", "1h", "nan", "inf", "1e9"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults() {
        let c = RunConfig::merge(&RunArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(c.port, DEFAULT_PORT);
        assert_eq!(c.api_addr, DEFAULT_API_ADDR);
        assert_eq!(c.key_file, PathBuf::from("priv_key.bin"));
        assert_eq!(c.hello_interval, DEFAULT_HELLO_INTERVAL);
        assert_eq!(c.update_interval, DEFAULT_UPDATE_INTERVAL);
        assert!(c.peers.is_empty());
        assert!(c.network_key.is_none());
        assert!(!c.no_dataplane);
    }

    #[test]
    fn flags_override_the_file() {
        let file = FileConfig::parse(
            Path::new("t.toml"),
            r#"
            key_file = "/k"
            port = 1000
            peers = ["udp://10.0.0.1:1", "udp://[::2]:2"]
            api_addr = "127.0.0.1:1234"
            no_dataplane = true
            hello_interval = "500ms"
            "#,
        )
        .unwrap();
        let c = RunConfig::merge(&RunArgs::default(), file.clone()).unwrap();
        assert_eq!(c.key_file, PathBuf::from("/k"));
        assert_eq!(c.port, 1000);
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.api_addr, "127.0.0.1:1234".parse().unwrap());
        assert!(c.no_dataplane);
        assert_eq!(c.hello_interval, Duration::from_millis(500));
        assert_eq!(c.update_interval, Duration::from_secs(2));

        let args = RunArgs {
            port: Some(2000),
            peers: vec!["udp://10.9.9.9:9".parse().unwrap(); 2],
            hello_interval: Some(Duration::from_secs(1)),
            ..RunArgs::default()
        };
        let c = RunConfig::merge(&args, file).unwrap();
        assert_eq!(c.port, 2000);
        assert_eq!(c.peers, vec!["udp://10.9.9.9:9".parse().unwrap()]);
        assert_eq!(c.hello_interval, Duration::from_secs(1));
        assert_eq!(c.key_file, PathBuf::from("/k"));
    }

    #[test]
    fn bad_files_are_errors() {
        let p = Path::new("t.toml");
        let e = FileConfig::parse(p, "prot = 1").unwrap_err().to_string();
        assert!(e.contains("prot"), "{e}");
        assert!(FileConfig::parse(p, "port = 70000").is_err());
        assert!(FileConfig::parse(p, "port = ").is_err());
        let f = FileConfig::parse(p, r#"peers = ["udp://nope"]"#).unwrap();
        assert!(RunConfig::merge(&RunArgs::default(), f).is_err());
        let f = FileConfig::parse(p, r#"api_addr = "localhost""#).unwrap();
        assert!(RunConfig::merge(&RunArgs::default(), f).is_err());
        let f = FileConfig::parse(p, r#"hello_interval = "1ms""#).unwrap();
        assert!(RunConfig::merge(&RunArgs::default(), f).is_err());
        assert!(matches!(
            FileConfig::load(Path::new("/nonexistent/hypha.toml")),
            Err(ConfigError::ReadFile { .. })
        ));
    }

    #[test]
    fn network_key_must_be_32_bytes() {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("hypha-netkey-{}", std::process::id()));
        std::fs::write(&path, [7u8; 31]).unwrap();
        assert!(matches!(
            read_network_key(&path),
            Err(ConfigError::NetworkKeyLength { len: 31, .. })
        ));
        std::fs::write(&path, [7u8; 32]).unwrap();
        assert_eq!(read_network_key(&path).unwrap(), [7u8; 32]);
        let args = RunArgs {
            network_key: Some(path.clone()),
            ..RunArgs::default()
        };
        let c = RunConfig::merge(&args, FileConfig::default()).unwrap();
        assert!(c.network_key.is_some());
        assert!(!format!("{c:?}").contains("7, 7"));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            read_network_key(&path),
            Err(ConfigError::ReadNetworkKey { .. })
        ));
    }
}
