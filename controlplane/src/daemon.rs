//! `hypha run`: from flags to a running node.
//!
//! Exit codes: 2 for settings that cannot work (bad flags or config file, a missing
//! `--no-dataplane`), 1 for failures while starting or running (key file, socket, API address), 0
//! after a clean shutdown on SIGINT or SIGTERM.

use std::net::IpAddr;
use std::process::ExitCode;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hypha_proto::babel::Prefix;
use hypha_proto::key;
use hypha_proto::time::Clock;

use crate::api::{ApiServer, Snapshot};
use crate::config::{RunArgs, RunConfig};
use crate::fib::FibTable;
use crate::runtime::dataplane::{DataplaneOptions, ShmUnderlay};
use crate::runtime::event_loop::EventLoop;
use crate::runtime::node::{Identity, Node, NodeConfig};
use crate::runtime::signals::Signals;
use crate::runtime::underlay::SocketUnderlay;

/// Where `hypha-dp` is: `--dataplane-bin`, else next to this executable.
fn dataplane_bin(config: &RunConfig) -> std::path::PathBuf {
    if let Some(b) = &config.dataplane.bin {
        return b.clone();
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("hypha-dp")))
        .unwrap_or_else(|| "hypha-dp".into())
}

fn dataplane_options(config: &RunConfig, addr: std::net::Ipv6Addr) -> DataplaneOptions {
    DataplaneOptions {
        bin: dataplane_bin(config),
        addr,
        port: config.port,
        workers: config.dataplane.workers,
        no_tun: config.dataplane.no_tun,
        tun_name: config.dataplane.tun_name.clone(),
        xdp: config.dataplane.xdp.clone(),
        runtime_dir: config
            .dataplane
            .runtime_dir
            .clone()
            .unwrap_or_else(|| DataplaneOptions::default_runtime_dir(addr)),
        // Long enough for links to come back and Babel to relearn the routes.
        resync_hold: (config.hello_interval * 8).clamp(
            std::time::Duration::from_secs(3),
            std::time::Duration::from_secs(40),
        ),
    }
}

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The node key could not be loaded or created.
    #[error(transparent)]
    Key(#[from] key::KeyFileError),
    /// The UDP port could not be bound.
    #[error("cannot bind UDP port {port}: {source}")]
    Bind {
        /// The port.
        port: u16,
        /// Why.
        source: std::io::Error,
    },
    /// The API server could not start.
    #[error(transparent)]
    Api(#[from] crate::api::ApiServerError),
    /// The signal fd could not be set up.
    #[error("cannot set up signal handling: {0}")]
    Signals(std::io::Error),
    /// The dataplane could not be started.
    #[error(transparent)]
    Dataplane(#[from] crate::runtime::dataplane::DataplaneError),
    /// The event loop failed.
    #[error("event loop failed: {0}")]
    Loop(std::io::Error),
}

/// Runs `hypha run` and returns the process exit code.
pub fn run(args: &RunArgs) -> ExitCode {
    let config = match RunConfig::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match run_node(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "hypha stopped");
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// The node's identity from its key.
pub fn identity(secret: &key::SecretKey) -> Identity {
    let public = secret.public_key();
    let subnet = public.subnet();
    // Invariant: a Subnet's length is at most 128, the only thing Prefix::new checks.
    #[allow(clippy::expect_used)]
    let subnet = Prefix::new(IpAddr::V6(subnet.addr()), subnet.prefix_len())
        .expect("a Subnet is a valid IPv6 prefix");
    Identity {
        secret: *secret.as_bytes(),
        public: *public.as_bytes(),
        addr: public.address().into(),
        subnet,
    }
}

/// Starts the node described by `config` and runs it until a shutdown signal.
pub fn run_node(config: &RunConfig) -> Result<(), DaemonError> {
    // Before any thread exists, so every thread inherits the blocked mask.
    let signals = Signals::new().map_err(DaemonError::Signals)?;
    let (secret, source) = key::load_or_create(&config.key_file)?;
    if let Some(w) = source.warning() {
        tracing::warn!("{w}");
    }
    if matches!(source, key::KeySource::Created) {
        tracing::info!(path = %config.key_file.display(), "created a new node key");
    }
    let identity = identity(&secret);
    drop(secret);
    if !config.api_addr.ip().is_loopback() {
        tracing::warn!(
            api_addr = %config.api_addr,
            "the API listens on a non-loopback address and has no authentication"
        );
    }
    let clock = Clock::new();
    let start_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Who we are is known before the node runs (the dataplane may take a moment to attach).
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot {
        admin: crate::api::AdminInfo {
            node_subnet: identity.subnet.to_string(),
            node_ip: identity.addr.to_string(),
            node_pubkey: hex::encode(identity.public),
            node_start_time: start_unix,
        },
        ..Snapshot::default()
    }));
    let api = ApiServer::start(config.api_addr, Arc::clone(&snapshot))?;

    tracing::info!(
        address = %identity.addr,
        subnet = %identity.subnet,
        pubkey = %hex::encode(identity.public),
        port = config.port,
        api = %api.local_addr(),
        peers = config.peers.len(),
        private_network = config.network_key.is_some(),
        dataplane = !config.no_dataplane,
        "hypha node running"
    );
    let seed: u64 = rand::random();
    let node_config = NodeConfig::from_run(config, seed);
    let new_node = |cfg: &NodeConfig| {
        let node = Node::new(identity.clone(), cfg, FibTable::new(), clock.now());
        snapshot.store(Arc::new(node.snapshot(start_unix)));
        node
    };
    let signo = if config.no_dataplane {
        let underlay = SocketUnderlay::bind(config.port).map_err(|source| DaemonError::Bind {
            port: config.port,
            source,
        })?;
        let node = new_node(&node_config);
        EventLoop::new(node, underlay, signals, clock, snapshot.clone(), start_unix)
            .run()
            .map_err(DaemonError::Loop)?
    } else {
        let underlay = ShmUnderlay::start(dataplane_options(config, identity.addr), clock)?;
        let mut cfg = node_config.clone();
        for n in underlay.inherited_neighbours() {
            if !cfg.peers.contains(n) {
                cfg.peers.push(*n);
            }
        }
        let node = new_node(&cfg);
        EventLoop::new(node, underlay, signals, clock, snapshot.clone(), start_unix)
            .run()
            .map_err(DaemonError::Loop)?
    };
    tracing::info!(signal = signo, "shutting down");
    drop(api);
    Ok(())
}
