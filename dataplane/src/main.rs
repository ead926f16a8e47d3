//! `hypha-dp`: the dataplane process.
//!
//! Normally started by `hypha run` with the shared-memory region inherited (see `proto::shm`:
//! the descriptors are named by the `HYPHA_SHM_FDS` environment variable, or by `--shm-fds`).
//! For debugging and benchmarks it also runs alone with `--static-config FILE` (see
//! `hypha_dataplane::config`), with neighbours, routes and session keys from the file and no
//! control plane at all.
#![allow(unsafe_code)]

use std::net::{Ipv6Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use clap::Parser;
use hypha_dataplane::config::StaticConfig;
use hypha_dataplane::control::Control;
use hypha_dataplane::counters::CounterSet;
use hypha_dataplane::fib::FibUpdater;
use hypha_dataplane::handoff::Handoff;
use hypha_dataplane::session::SessionTable;
use hypha_dataplane::state::{upper64, PeerTable, Shared, UpLink};
use hypha_dataplane::tun::{Offloads, Tun};
use hypha_dataplane::udp;
use hypha_dataplane::worker::{self, WorkerSetup};
use hypha_dataplane::xdp::{XdpConfig, XdpFastPath, XdpSetting};
use hypha_proto::shm::{FdNumbers, Region, RegionFds, Role, SHM_FDS_ENV};
use hypha_proto::time::Clock;

/// Default TUN MTU: 1500 (underlay) − 40 (IPv6) − 8 (UDP) − 48 (data header) − 1 (inner type)
/// − 16 (tag) = 1387, rounded down. With an IPv4 underlay 20 more bytes would fit.
const DEFAULT_MTU: u32 = 1380;

#[derive(Debug, Parser)]
#[command(name = "hypha-dp", version, about = "Hypha's dataplane")]
struct Args {
    /// Run without a control plane from this TOML file (debugging and benchmarks only: static
    /// keys, no handshakes, no rekeying).
    #[arg(long, value_name = "FILE")]
    static_config: Option<PathBuf>,
    /// The inherited shm descriptors `memfd,down_data,down_space,up_data,up_space`; default: the
    /// HYPHA_SHM_FDS environment variable.
    #[arg(long, value_name = "FDS")]
    shm_fds: Option<String>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// UDP port (default: the static config's, else 9651).
    #[arg(long)]
    port: Option<u16>,
    /// TUN interface name.
    #[arg(long, default_value = "hypha0")]
    tun_name: String,
    /// Route and forward without a TUN device.
    #[arg(long)]
    no_tun: bool,
    /// This node's overlay address (default: the static config's).
    #[arg(long, value_name = "OVERLAY_ADDR")]
    addr: Option<Ipv6Addr>,
    /// TUN MTU.
    #[arg(long, default_value_t = DEFAULT_MTU)]
    mtu: u32,
    /// Runtime directory for the hand-over socket and pid file (default:
    /// /run/hypha/<overlay address>; only with a shm region).
    #[arg(long, value_name = "DIR")]
    runtime_dir: Option<PathBuf>,
    /// Serve the counters as JSON (HTTP/1.0) on this address, e.g. 127.0.0.1:9652.
    #[arg(long, value_name = "ADDR")]
    stats_listen: Option<SocketAddr>,
    /// XDP fast path: off, generic, driver, tc (the TC ingress program alone, no XDP), or auto
    /// (driver, falling back to generic; tc on veth, where generic XDP would copy every GSO/GRO
    /// super-packet before running).
    #[arg(long, default_value = "auto", value_name = "MODE")]
    xdp: XdpSetting,
    /// Underlay interface to attach XDP to (repeatable); default: the interfaces the peers are
    /// reached through.
    #[arg(long = "xdp-iface", value_name = "IFACE")]
    xdp_ifaces: Vec<String>,
    /// bpffs directory for the XDP pins (one subdirectory per node).
    #[arg(long, default_value = "/sys/fs/bpf/hypha", value_name = "DIR")]
    xdp_pin_root: PathBuf,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    install_signal_handlers();
    let config = match &args.static_config {
        Some(path) => Some(StaticConfig::load(path).map_err(|e| e.to_string())?),
        None => None,
    };
    let region = if config.is_none() {
        let fds = match &args.shm_fds {
            Some(spec) => {
                let nums = FdNumbers::parse(spec).map_err(|e| e.to_string())?;
                // SAFETY: the operator (or `hypha run`) says these descriptors are the region's and
                // inherited for us; nothing else in this process owns them.
                unsafe { RegionFds::from_raw(nums) }
            }
            // SAFETY: as above, announced through the environment.
            None => unsafe { RegionFds::from_env() },
        }
        .map_err(|e| format!("no --static-config, and no shm region ({SHM_FDS_ENV}): {e}"))?;
        Some(Region::attach(fds).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let addr = args
        .addr
        .or(config.as_ref().map(|c| c.address))
        .ok_or("--addr is required without a static config")?;
    let port = args
        .port
        .or(config.as_ref().and_then(|c| c.port))
        .unwrap_or(9651);
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);

    let tun_queues = if args.no_tun {
        None
    } else {
        let mut tun = Tun::open(&args.tun_name, workers).map_err(|e| e.to_string())?;
        // TSO6/USO6 (with CSUM): the workers segment super-packets themselves (dataplane::vnet).
        if !tun.set_offloads(Offloads::FULL)
            && !tun.set_offloads(Offloads::TSO)
            && !tun.set_offloads(Offloads::NONE)
        {
            return Err("could not set the TUN offloads".to_owned());
        }
        tracing::info!(offloads = tun.offloads().0, "TUN offloads");
        tun.set_mtu_up(args.mtu).map_err(|e| e.to_string())?;
        // The node's address with prefix 7: the kernel then routes all of 400::/7 into the TUN.
        tun.add_address(addr, 7).map_err(|e| e.to_string())?;
        Some(tun.into_queues())
    };
    let mut sockets = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (fd, offloads) = udp::bind(port).map_err(|e| e.to_string())?;
        tracing::debug!(gro = offloads.gro, gso = offloads.gso, "UDP socket bound");
        sockets.push((fd, offloads.gso));
    }
    let send_fd = sockets
        .first()
        .ok_or("no worker")?
        .0
        .try_clone()
        .map_err(|e| e.to_string())?;

    let (up, down) = match &region {
        Some(r) => {
            let (p, c) = r.split(Role::Dataplane).map_err(|e| e.to_string())?;
            (Some(UpLink::new(p)), Some(c))
        }
        None => (None, None),
    };
    let (fib, fib_handle) = FibUpdater::new();
    let shared = Arc::new(Shared {
        addr,
        prefix: upper64(&addr),
        fib: fib_handle,
        sessions: Arc::new(SessionTable::new()),
        peers: ArcSwap::from_pointee(PeerTable::default()),
        counters: CounterSet::new(workers + 1),
        clock: Clock::new(),
        up,
        stop: AtomicBool::new(false),
        xdp: Default::default(),
    });
    let mut control = Control::new(shared.clone(), fib, send_fd, workers);
    if args.xdp == XdpSetting::Off {
        tracing::info!("XDP fast path off (--xdp off)");
    } else {
        let cfg = XdpConfig {
            setting: args.xdp,
            ifaces: args.xdp_ifaces.clone(),
            port,
            node: addr,
            pin_root: args.xdp_pin_root.clone(),
        };
        match XdpFastPath::start(&cfg) {
            Ok(x) => {
                tracing::info!(pins = %x.pin_dir().display(), "XDP fast path loaded");
                control.set_xdp(x);
            }
            Err(e) => tracing::warn!(
                "XDP fast path not used ({e}); every packet takes the user-space path"
            ),
        }
    }
    if let Some(cfg) = &config {
        control.apply_static(cfg).map_err(|e| e.to_string())?;
    }
    if let Some(stats) = args.stats_listen {
        let l = TcpListener::bind(stats).map_err(|e| format!("stats listener {stats}: {e}"))?;
        control.serve_stats(l).map_err(|e| e.to_string())?;
    }

    // The hand-over socket: a restarted control plane finds this dataplane through it.
    let mut handoff_thread = None;
    if let Some(region) = region {
        let dir = args.runtime_dir.clone().unwrap_or_else(|| {
            hypha_proto::shm::handoff::runtime_dir(
                std::path::Path::new(hypha_proto::shm::handoff::RUNTIME_BASE),
                addr,
            )
        });
        let handoff = Handoff::bind(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (r, s) = (Arc::new(region), shared.clone());
        handoff_thread = Some(
            std::thread::Builder::new()
                .name("hypha-dp-handoff".into())
                .spawn(move || handoff.serve(r, s))
                .map_err(|e| e.to_string())?,
        );
    }

    let mut tun_iter = tun_queues.map(Vec::into_iter);
    let mut handles = Vec::with_capacity(workers);
    for (index, (udp, udp_gso)) in sockets.into_iter().enumerate() {
        let tun = tun_iter.as_mut().and_then(Iterator::next);
        let setup = WorkerSetup {
            index,
            udp,
            tun,
            shared: shared.clone(),
            udp_gso,
        };
        let h = std::thread::Builder::new()
            .name(format!("hypha-dp-w{index}"))
            .spawn(move || worker::run(setup))
            .map_err(|e| e.to_string())?;
        handles.push(h);
    }
    tracing::info!(%addr, port, workers, tun = !args.no_tun, "hypha-dp running");

    // The signal handler sets STOP; the control loop mirrors it into the shared flag.
    let watcher_shared = shared.clone();
    let watcher = std::thread::spawn(move || {
        while !watcher_shared.stopping() {
            if STOP.load(Ordering::Relaxed) {
                watcher_shared.stop.store(true, Ordering::Relaxed);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    });
    control.run(down);
    shared.stop.store(true, Ordering::Relaxed);
    let mut failed = None;
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = Some(e.to_string()),
            Err(_) => failed = Some("a worker panicked".to_owned()),
        }
    }
    let _ = watcher.join();
    if let Some(h) = handoff_thread {
        let _ = h.join();
    }
    control.shutdown_xdp();
    tracing::info!("hypha-dp stopped");
    failed.map_or(Ok(()), Err)
}
