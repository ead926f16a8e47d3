//! Lab-mode configuration: a TOML file (`-c`), overridden and extended by command-line flags.
//!
//! ```toml
//! redistribute = ["2001:db8:3::/48", "10.3.0.0/16"]
//! monitor-addr = "127.0.0.1:33123"
//! hello-interval = 4.0      # seconds, default for every interface (babeld's wired default)
//! update-interval = 16.0
//!
//! [[interface]]
//! name = "eth0"
//! hello-interval = 1.0      # per-interface override
//! mac-keys = ["00112233445566778899aabbccddeeff"]  # HMAC-SHA256 (RFC 8967), hex
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::mac::{parse_key, MacError};
use hypha_proto::babel::Prefix;

/// babeld's default Hello interval on wired interfaces.
pub const DEFAULT_HELLO_INTERVAL: Duration = Duration::from_secs(4);
/// babeld's default periodic update interval (four Hello intervals).
pub const DEFAULT_UPDATE_INTERVAL: Duration = Duration::from_secs(16);
/// babeld's local-interface port, which our monitor reuses.
pub const DEFAULT_MONITOR_ADDR: &str = "127.0.0.1:33123";
/// How long to wait at start for each interface's link-local address.
pub const DEFAULT_LINK_LOCAL_WAIT: Duration = Duration::from_secs(10);

/// A configuration problem, with the offending value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys.
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        source: toml::de::Error,
    },
    /// A prefix does not parse.
    #[error("bad prefix {0}")]
    Prefix(String),
    /// An interval is not a positive number of seconds (at most 655 s: Babel carries intervals in
    /// centiseconds in 16 bits).
    #[error("bad {what} {value}: must be a positive number of seconds up to 655")]
    Interval {
        /// Which interval.
        what: &'static str,
        /// The value given.
        value: f64,
    },
    /// `--mac-key` is not `IFACE=HEXKEY`, or the key is bad.
    #[error("bad MAC key for {iface}: {source}")]
    MacKey {
        /// The interface.
        iface: String,
        /// Why.
        source: MacError,
    },
    /// `--mac-key` not in `IFACE=HEXKEY` form.
    #[error("bad --mac-key {0:?}: expected IFACE=HEXKEY")]
    MacKeyForm(String),
    /// A MAC key names an interface that is not configured.
    #[error("MAC key for {0}, which is not a configured interface")]
    MacKeyInterface(String),
    /// No interface to run on.
    #[error("no interfaces: give -i IFACE or [[interface]] in the config")]
    NoInterfaces,
    /// The monitor address does not parse.
    #[error("bad monitor address {0:?}")]
    MonitorAddr(String),
}

/// The TOML file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct File {
    #[serde(default)]
    redistribute: Vec<String>,
    monitor_addr: Option<String>,
    hello_interval: Option<f64>,
    update_interval: Option<f64>,
    seed: Option<u64>,
    #[serde(default)]
    interface: Vec<FileInterface>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileInterface {
    name: String,
    hello_interval: Option<f64>,
    update_interval: Option<f64>,
    #[serde(default)]
    mac_keys: Vec<String>,
}

/// Settings of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceSettings {
    /// Kernel interface name.
    pub name: String,
    /// Hello (and IHU) interval.
    pub hello_interval: Duration,
    /// Periodic full-update interval.
    pub update_interval: Duration,
    /// HMAC-SHA256 keys (RFC 8967); empty means no authentication on this interface.
    pub mac_keys: Vec<Vec<u8>>,
}

/// The whole lab-mode configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabConfig {
    /// Interfaces to run Babel on.
    pub interfaces: Vec<InterfaceSettings>,
    /// Prefix filters: local addresses inside one of these are announced.
    pub redistribute: Vec<Prefix>,
    /// Where the monitor listens.
    pub monitor_addr: SocketAddr,
    /// Seed for the router's jitter and router-id; random when absent.
    pub seed: Option<u64>,
    /// How long to wait for link-local addresses at start.
    pub link_local_wait: Duration,
}

/// The command-line side of the configuration (flags win over the file).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `-c`: the TOML file.
    pub config: Option<std::path::PathBuf>,
    /// `-i`: interfaces, added to the file's.
    pub interfaces: Vec<String>,
    /// `--redistribute`: added to the file's.
    pub redistribute: Vec<String>,
    /// `--hello-interval`, seconds: default for every interface without its own.
    pub hello_interval: Option<f64>,
    /// `--update-interval`, seconds.
    pub update_interval: Option<f64>,
    /// `--mac-key IFACE=HEX`, added to the file's.
    pub mac_keys: Vec<String>,
    /// `--monitor-addr`.
    pub monitor_addr: Option<String>,
    /// `--seed`.
    pub seed: Option<u64>,
}

fn interval(what: &'static str, secs: f64) -> Result<Duration, ConfigError> {
    if secs.is_finite() && secs > 0.0 && secs <= 655.0 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(ConfigError::Interval { what, value: secs })
    }
}

impl LabConfig {
    /// Builds the configuration from an optional file and the flags.
    pub fn load(o: &Overrides) -> Result<Self, ConfigError> {
        let file = match &o.config {
            Some(p) => read_file(p)?,
            None => File::default(),
        };
        Self::merge(file, o)
    }

    /// Builds the configuration from TOML text (no file) and the flags.
    pub fn from_toml(text: &str, o: &Overrides) -> Result<Self, ConfigError> {
        let file: File = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: "<inline>".into(),
            source,
        })?;
        Self::merge(file, o)
    }

    fn merge(file: File, o: &Overrides) -> Result<Self, ConfigError> {
        let hello_default = match o.hello_interval.or(file.hello_interval) {
            Some(s) => interval("hello-interval", s)?,
            None => DEFAULT_HELLO_INTERVAL,
        };
        let update_default = match o.update_interval.or(file.update_interval) {
            Some(s) => interval("update-interval", s)?,
            None => DEFAULT_UPDATE_INTERVAL,
        };
        // Interfaces in order of first mention; a name given twice is configured once.
        let mut interfaces: Vec<InterfaceSettings> = Vec::new();
        for fi in &file.interface {
            let mut keys = Vec::new();
            for k in &fi.mac_keys {
                keys.push(parse_key(k).map_err(|source| ConfigError::MacKey {
                    iface: fi.name.clone(),
                    source,
                })?);
            }
            let s = InterfaceSettings {
                name: fi.name.clone(),
                hello_interval: match fi.hello_interval {
                    Some(v) => interval("hello-interval", v)?,
                    None => hello_default,
                },
                update_interval: match fi.update_interval {
                    Some(v) => interval("update-interval", v)?,
                    None => update_default,
                },
                mac_keys: keys,
            };
            match interfaces.iter_mut().find(|i| i.name == s.name) {
                Some(existing) => *existing = s,
                None => interfaces.push(s),
            }
        }
        for name in &o.interfaces {
            if !interfaces.iter().any(|i| &i.name == name) {
                interfaces.push(InterfaceSettings {
                    name: name.clone(),
                    hello_interval: hello_default,
                    update_interval: update_default,
                    mac_keys: Vec::new(),
                });
            }
        }
        if interfaces.is_empty() {
            return Err(ConfigError::NoInterfaces);
        }
        let mut cli_keys: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        for spec in &o.mac_keys {
            let (iface, hex_key) = spec
                .split_once('=')
                .ok_or_else(|| ConfigError::MacKeyForm(spec.clone()))?;
            let key = parse_key(hex_key).map_err(|source| ConfigError::MacKey {
                iface: iface.to_string(),
                source,
            })?;
            cli_keys.entry(iface.to_string()).or_default().push(key);
        }
        for (iface, keys) in cli_keys {
            let i = interfaces
                .iter_mut()
                .find(|i| i.name == iface)
                .ok_or(ConfigError::MacKeyInterface(iface))?;
            i.mac_keys.extend(keys);
        }
        let mut redistribute = Vec::new();
        for p in file.redistribute.iter().chain(&o.redistribute) {
            let p: Prefix = p.parse().map_err(|_| ConfigError::Prefix(p.clone()))?;
            if !redistribute.contains(&p) {
                redistribute.push(p);
            }
        }
        let monitor = o
            .monitor_addr
            .clone()
            .or(file.monitor_addr)
            .unwrap_or_else(|| DEFAULT_MONITOR_ADDR.to_string());
        let monitor_addr = monitor
            .parse()
            .map_err(|_| ConfigError::MonitorAddr(monitor.clone()))?;
        Ok(LabConfig {
            interfaces,
            redistribute,
            monitor_addr,
            seed: o.seed.or(file.seed),
            link_local_wait: DEFAULT_LINK_LOCAL_WAIT,
        })
    }
}

fn read_file(path: &Path) -> Result<File, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_flags_merge() {
        let text = r#"
            redistribute = ["2001:db8:3::/48"]
            hello-interval = 2.0
            [[interface]]
            name = "eth0"
            hello-interval = 1.0
            mac-keys = ["0011"]
            [[interface]]
            name = "eth1"
        "#;
        let o = Overrides {
            interfaces: vec!["eth1".into(), "eth2".into()],
            redistribute: vec!["10.3.0.0/16".into()],
            update_interval: Some(8.0),
            mac_keys: vec!["eth2=aabb".into()],
            ..Default::default()
        };
        let c = LabConfig::from_toml(text, &o).unwrap();
        let names: Vec<_> = c.interfaces.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["eth0", "eth1", "eth2"]);
        assert_eq!(c.interfaces[0].hello_interval, Duration::from_secs(1));
        assert_eq!(c.interfaces[1].hello_interval, Duration::from_secs(2));
        assert_eq!(c.interfaces[2].update_interval, Duration::from_secs(8));
        assert_eq!(c.interfaces[0].mac_keys, vec![vec![0x00, 0x11]]);
        assert_eq!(c.interfaces[2].mac_keys, vec![vec![0xaa, 0xbb]]);
        assert_eq!(c.redistribute.len(), 2);
        assert_eq!(c.monitor_addr.to_string(), DEFAULT_MONITOR_ADDR);
    }

    #[test]
    fn defaults_are_babelds() {
        let o = Overrides {
            interfaces: vec!["x".into()],
            ..Default::default()
        };
        let c = LabConfig::from_toml("", &o).unwrap();
        assert_eq!(c.interfaces[0].hello_interval, DEFAULT_HELLO_INTERVAL);
        assert_eq!(c.interfaces[0].update_interval, DEFAULT_UPDATE_INTERVAL);
        assert!(c.interfaces[0].mac_keys.is_empty());
    }

    #[test]
    fn errors_are_reported() {
        let none = Overrides::default();
        assert!(matches!(
            LabConfig::from_toml("", &none),
            Err(ConfigError::NoInterfaces)
        ));
        let o = |f: fn(&mut Overrides)| {
            let mut o = Overrides {
                interfaces: vec!["x".into()],
                ..Default::default()
            };
            f(&mut o);
            LabConfig::from_toml("", &o)
        };
        assert!(matches!(
            o(|o| o.hello_interval = Some(0.0)),
            Err(ConfigError::Interval { .. })
        ));
        assert!(matches!(
            o(|o| o.mac_keys = vec!["y=00".into()]),
            Err(ConfigError::MacKeyInterface(_))
        ));
        assert!(matches!(
            o(|o| o.mac_keys = vec!["nokey".into()]),
            Err(ConfigError::MacKeyForm(_))
        ));
        assert!(matches!(
            o(|o| o.redistribute = vec!["10.0.0.0".into()]),
            Err(ConfigError::Prefix(_))
        ));
        assert!(matches!(
            o(|o| o.monitor_addr = Some("nope".into())),
            Err(ConfigError::MonitorAddr(_))
        ));
        assert!(matches!(
            LabConfig::from_toml("bogus = 1", &Overrides::default()),
            Err(ConfigError::Parse { .. })
        ));
    }
}
