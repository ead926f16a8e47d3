//! `hypha run`: from flags to a running node.
//!
//! Exit codes: 2 for settings that cannot work (bad flags or config file, a missing
//! `--no-dataplane`), 1 for failures while starting or running (key file, socket, API address), 0
//! after a clean shutdown on SIGINT or SIGTERM.

use std::net::IpAddr;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use hypha_proto::babel::Prefix;
use hypha_proto::key;
use hypha_proto::time::Clock;

use crate::api::{PeerChange, Snapshot};
use crate::bus::api::{ApiServer as BusApiServer, Fallback, MessageApi, Reply};
use crate::bus::shared::SharedBus;
use crate::bus::BusConfig;
use crate::config::{RunArgs, RunConfig};
use crate::fib::FibTable;
use crate::runtime::dataplane::{DataplaneOptions, ShmUnderlay};
use crate::runtime::event_loop::{Commands, EventLoop, LoopTransport};
use crate::runtime::node::{Identity, Node, NodeConfig};
use crate::runtime::peers::PeerError;
use crate::runtime::signals::Signals;
use crate::runtime::underlay::{SocketUnderlay, Underlay};
use hypha_proto::addr::OverlayAddr;
use hypha_proto::key::PublicKey;

/// How long an API request waits for the event loop to apply a peer change.
const PEER_CHANGE_TIMEOUT: Duration = Duration::from_secs(5);

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
    // The message bus. Its driver starts with the event loop, whose command channel carries its
    // frames to the dataplane (without one, frames for other nodes are counted and dropped, and
    // only messages to our own address are delivered).
    let own =
        OverlayAddr::new(identity.addr).map_err(|e| DaemonError::Loop(std::io::Error::other(e)))?;
    let bus = SharedBus::new(
        BusConfig {
            rng_seed: rand::random(),
            default_deadline: config.message_deadline,
            ..BusConfig::default()
        },
        own,
    );
    // The loop's command channel, once the loop exists (peer changes before that get 503).
    let commands: Arc<OnceLock<Commands>> = Arc::new(OnceLock::new());
    let keys_snapshot = Arc::clone(&snapshot);
    let message_api = Arc::new(MessageApi::new(
        Arc::clone(&bus),
        PublicKey::from_bytes(identity.public),
        Box::new(move |a: OverlayAddr| key_of(&keys_snapshot.load(), a)),
    ));
    let admin_snapshot = Arc::clone(&snapshot);
    let admin_bus = Arc::clone(&bus);
    let peer_commands = Arc::clone(&commands);
    let fallback: Fallback = Box::new(move |method, url, body| {
        let apply = |change: PeerChange| {
            let Some(c) = peer_commands.get() else {
                return Err(PeerError::Unavailable);
            };
            c.change_peer(change, PEER_CHANGE_TIMEOUT)
        };
        if let Some(r) = crate::api::peers_request(method, url, body, &apply) {
            return Reply {
                status: r.status,
                body: r.body,
                content_type: "application/json",
            };
        }
        let mut snap = (**admin_snapshot.load()).clone();
        add_bus_stats(&mut snap, &admin_bus);
        let r = crate::api::dispatch(method, url, &snap);
        Reply {
            status: r.status,
            body: r.body,
            content_type: "application/json",
        }
    });
    let api = BusApiServer::start(config.api_addr, message_api, fallback).map_err(|e| {
        DaemonError::Api(crate::api::ApiServerError::Bind {
            addr: config.api_addr,
            message: e.to_string(),
        })
    })?;

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
        let l = EventLoop::new(node, underlay, signals, clock, snapshot.clone(), start_unix)
            .map_err(DaemonError::Loop)?;
        drive(l, &bus, &commands)?
    } else {
        let underlay = ShmUnderlay::start(dataplane_options(config, identity.addr), clock)?;
        let mut cfg = node_config.clone();
        for n in underlay.inherited_neighbours() {
            if !cfg.peers.contains(n) {
                cfg.peers.push(*n);
            }
        }
        let node = new_node(&cfg);
        let l = EventLoop::new(node, underlay, signals, clock, snapshot.clone(), start_unix)
            .map_err(DaemonError::Loop)?;
        drive(l, &bus, &commands)?
    };
    tracing::info!(signal = signo, "shutting down");
    drop(api);
    Ok(())
}

/// Runs the event loop with the bus driver attached to its command channel, until a signal.
fn drive<U: Underlay>(
    event_loop: EventLoop<FibTable, U>,
    bus: &Arc<SharedBus>,
    commands: &OnceLock<Commands>,
) -> Result<i32, DaemonError> {
    let mut event_loop = event_loop.with_bus(Arc::clone(bus));
    let c = event_loop.commands();
    // Dropped (stopped) when the loop returns.
    let _bus_driver = bus
        .spawn_driver(Box::new(LoopTransport::new(c.clone())))
        .map_err(DaemonError::Loop)?;
    let _ = commands.set(c);
    event_loop.run().map_err(DaemonError::Loop)
}

/// The key of the node at `a`, from what the snapshot knows: linked peers' keys, then the origin
/// key of the route to `a`'s /64.
fn key_of(snap: &Snapshot, a: OverlayAddr) -> Option<PublicKey> {
    let ip = a.to_string();
    let from_peer = snap
        .peers
        .iter()
        .filter(|p| p.overlay_ip.as_deref() == Some(ip.as_str()))
        .find_map(|p| p.pubkey.as_deref())
        .and_then(|k| k.parse().ok());
    if from_peer.is_some() {
        return from_peer;
    }
    let s = std::net::Ipv6Addr::from(a).segments();
    let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
    let key = PublicKey::from_bytes(*snap.origin_keys.get(&net)?);
    // The route filter already ties a /64 to its key; checked again since this answer names a key.
    (key.subnet().addr() == net).then_some(key)
}

/// Puts the message bus's counters under `bus` in `GET /api/v1/admin/stats`.
fn add_bus_stats(snap: &mut Snapshot, bus: &SharedBus) {
    let c = bus.counters();
    let g = snap.stats.entry("bus".into()).or_default();
    for (k, v) in [
        ("outbound_bytes", c.outbound_bytes as u64),
        ("inbound_bytes", c.inbound_bytes as u64),
        ("inbox", c.inbox_len as u64),
        ("pushed", c.pushed),
        ("push_refused", c.push_refused),
        ("delivered", c.delivered),
        ("aborted", c.aborted),
        ("received", c.received),
        ("read", c.read),
        ("chunks_sent", c.chunks_sent),
        ("chunks_retransmitted", c.chunks_retransmitted),
        ("chunks_received", c.chunks_received),
        ("duplicate_chunks", c.duplicate_chunks),
        ("chunks_refused_full", c.chunks_refused_full),
        ("acks_sent", c.acks_sent),
        ("acks_received", c.acks_received),
        ("checksum_failures", c.checksum_failures),
        ("malformed_frames", c.malformed_frames),
        ("misbehaving_frames", c.misbehaving_frames),
        ("reassemblies_expired", c.reassemblies_expired),
        ("outbound_active", c.outbound_active as u64),
        ("reassemblies", c.reassemblies as u64),
    ] {
        g.insert(k.into(), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_routed_nodes_come_from_their_routes() {
        let k = key::SecretKey::from_bytes([3; 32]).public_key();
        let other = key::SecretKey::from_bytes([4; 32]).public_key();
        let net = k.subnet().addr();
        let mut snap = Snapshot::default();
        let a = k.address();
        assert_eq!(key_of(&snap, a), None);
        snap.origin_keys.insert(net, *k.as_bytes());
        assert_eq!(key_of(&snap, a), Some(k));
        // Any address in the node's /64 names it.
        let s = std::net::Ipv6Addr::from(a).segments();
        let b = OverlayAddr::new(std::net::Ipv6Addr::new(
            s[0], s[1], s[2], s[3], 0, 0, 0, 0x99,
        ))
        .expect("overlay");
        assert_eq!(key_of(&snap, b), Some(k));
        // A key that doesn't own the /64 is never named.
        snap.origin_keys.insert(net, *other.as_bytes());
        assert_eq!(key_of(&snap, a), None);
    }
}
