//! `hypha lab`: run the lab router, or (`hypha lab dump`) ask a running one for its tables.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::config::{ConfigError, LabConfig, Overrides, DEFAULT_MONITOR_ADDR};
use super::dump::DumpError;
use super::runtime::{Lab, LabError};

/// Arguments of `hypha lab`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LabArgs {
    /// `dump`: print a running router's neighbours, routes and sources.
    #[command(subcommand)]
    pub action: Option<LabAction>,
    /// Run Babel on this interface (repeatable).
    #[arg(short = 'i', long = "interface", value_name = "IFACE")]
    pub interfaces: Vec<String>,
    /// Announce local addresses (of any interface, `lo` included) inside this prefix (repeatable).
    #[arg(long, value_name = "PREFIX")]
    pub redistribute: Vec<String>,
    /// TOML configuration file (see docs/lab.md); flags override it.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Hello interval in seconds for interfaces without their own (default 4, as babeld's wired).
    #[arg(long, value_name = "SECONDS")]
    pub hello_interval: Option<f64>,
    /// Periodic update interval in seconds (default 16).
    #[arg(long, value_name = "SECONDS")]
    pub update_interval: Option<f64>,
    /// RFC 8967 HMAC-SHA256 key for an interface, as IFACE=HEXKEY (repeatable).
    #[arg(long = "mac-key", value_name = "IFACE=HEXKEY")]
    pub mac_keys: Vec<String>,
    /// Where the monitor listens (default 127.0.0.1:33123).
    #[arg(long, value_name = "ADDR")]
    pub monitor_addr: Option<String>,
    /// Seed for jitter and the router-id (random by default).
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Subcommands of `hypha lab`.
#[derive(Debug, clap::Subcommand)]
pub enum LabAction {
    /// Print a running lab router's neighbours, routes and sources (`--json` for JSON).
    Dump {
        /// The router's monitor address.
        #[arg(long, default_value = DEFAULT_MONITOR_ADDR)]
        monitor_addr: SocketAddr,
    },
}

/// Why `hypha lab` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabCliError {
    /// The configuration (file or flags) is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The monitor port could not be bound.
    #[error("monitor {addr}: {source}")]
    Monitor {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The router could not start or failed while running.
    #[error(transparent)]
    Run(#[from] LabError),
    /// `hypha lab dump` could not get a dump.
    #[error(transparent)]
    Dump(#[from] DumpError),
    /// Writing the result failed.
    #[error("cannot write to stdout: {0}")]
    Output(std::io::Error),
}

impl LabCliError {
    /// 2 for an unusable configuration (bad input, as clap's usage errors), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            LabCliError::Config(_) => 2,
            _ => 1,
        }
    }
}

/// Runs `hypha lab ...`; `json` is the global `--json` flag.
pub fn run(args: &LabArgs, json: bool) -> Result<(), LabCliError> {
    if let Some(LabAction::Dump { monitor_addr }) = &args.action {
        let d = super::dump::fetch(*monitor_addr)?;
        let text = if json {
            let mut t = serde_json::to_string_pretty(&d).map_err(DumpError::Json)?;
            t.push('\n');
            t
        } else {
            d.to_text()
        };
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .map_err(LabCliError::Output)?;
        return Ok(());
    }
    let o = Overrides {
        config: args.config.clone(),
        interfaces: args.interfaces.clone(),
        redistribute: args.redistribute.clone(),
        hello_interval: args.hello_interval,
        update_interval: args.update_interval,
        mac_keys: args.mac_keys.clone(),
        monitor_addr: args.monitor_addr.clone(),
        seed: args.seed,
    };
    let config = LabConfig::load(&o)?;
    let monitor = std::net::TcpListener::bind(config.monitor_addr).map_err(|source| {
        LabCliError::Monitor {
            addr: config.monitor_addr,
            source,
        }
    })?;
    Lab::start(&config)?.run(monitor)?;
    Ok(())
}
