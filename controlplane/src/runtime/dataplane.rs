//! The dataplane adapter: `hypha-dp` spawned, supervised and fed over shared memory.
//!
//! [`ShmUnderlay`] is the [`Underlay`] of a node with a dataplane. It owns the control plane's
//! side of the shm region: link frames go down as `PacketToSend` to a peer, control frames and
//! local packets come up as `PuntedPacket`, and the node's [`DataplaneCommand`]s become route,
//! peer and session-key records. It keeps the state it pushed (neighbours and routes), so that a
//! full replay is always possible:
//!
//! * **Start.** If a `hypha-dp` of this node is already running (a control-plane restart), attach
//!   to it through its hand-over socket (`proto::shm::handoff`) and resync with a new producer
//!   epoch: `Resync::Begin`, the state as it grows, and `Resync::End` only after
//!   [`DataplaneOptions::resync_hold`], so the dataplane forwards on its old FIB until routing has
//!   reconverged and then drops only what the new state no longer has. Otherwise create a region
//!   and spawn `hypha-dp` with it (own process group, no parent-death signal: it must outlive us).
//! * **Supervision.** A dataplane that exits is restarted with exponential backoff on a fresh
//!   region and gets a full replay (`Begin`, all neighbours, all routes, `End`); its sessions are
//!   gone, so the node forgets its own and new handshakes follow.
//! * **Peer ids** are a hash of the underlay endpoint, so a restarted control plane names every
//!   neighbour as its predecessor did and the old FIB's next hops stay right during the resync.

use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hypha_proto::babel::Prefix;
use hypha_proto::shm::handoff;
use hypha_proto::shm::{
    Cipher, Consumer, Event, KeyDirection, PeerId, PeerUp, Producer, PuntReason, Record, Region,
    RegionConfig, Resync, Role, RouteEntry, SendTo, SessionKey, SessionKeyId,
};
use hypha_proto::time::{Clock, Instant};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use super::node::{DataplaneCommand, Node};
use super::underlay::{Input, Underlay};
use crate::api::Stats;
use crate::e2e;
use crate::fib::FibSink;

/// How long a push waits for space on a full down ring before the record is dropped (and
/// counted; a replay repairs what was lost).
const PUSH_TIMEOUT: Duration = Duration::from_millis(100);
/// How often the dataplane's liveness is checked.
const SUPERVISE_INTERVAL: Duration = Duration::from_millis(200);
/// First restart delay; doubles per restart up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Longest restart delay.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A dataplane that ran this long resets the backoff.
const STABLE_RUN: Duration = Duration::from_secs(30);

/// How to run `hypha-dp`.
#[derive(Debug, Clone)]
pub struct DataplaneOptions {
    /// The `hypha-dp` executable.
    pub bin: PathBuf,
    /// The node's overlay address.
    pub addr: Ipv6Addr,
    /// The UDP port.
    pub port: u16,
    /// Worker threads (default: the dataplane's, one per core).
    pub workers: Option<usize>,
    /// Run without a TUN device.
    pub no_tun: bool,
    /// TUN device name (default: the dataplane's).
    pub tun_name: Option<String>,
    /// The XDP mode passed to `hypha-dp --xdp` (its default when `None`).
    pub xdp: Option<String>,
    /// Runtime directory (hand-over socket, pid file).
    pub runtime_dir: PathBuf,
    /// After attaching to a running dataplane, how long old routes stay before `Resync::End`.
    pub resync_hold: Duration,
}

impl DataplaneOptions {
    /// The runtime directory of the node at `addr` under the default base.
    pub fn default_runtime_dir(addr: Ipv6Addr) -> PathBuf {
        handoff::runtime_dir(Path::new(handoff::RUNTIME_BASE), addr)
    }
}

/// Why the dataplane could not be started or attached.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// This node's dataplane runs but refused to hand over its region: another control plane
    /// of the same node is attached (or the socket misbehaved).
    #[error("this node's dataplane is running but would not hand over its region (another hypha run for this key?): {0}")]
    Busy(handoff::HandoffError),
    /// The shared-memory region failed.
    #[error("shared memory: {0}")]
    Shm(#[from] hypha_proto::shm::ShmError),
    /// `hypha-dp` could not be spawned.
    #[error("cannot start {bin}: {source}")]
    Spawn {
        /// The executable.
        bin: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// The running dataplane, as seen from here.
struct Attached {
    /// Keeps the mapping (and the descriptors the dataplane was given) alive.
    _region: Region,
    down: Producer,
    up: Consumer,
    child: Option<Child>,
    pid: u32,
    _conn: Option<UnixStream>,
    started: Instant,
}

/// Supervision counters, shown under `dataplane_supervisor` in the stats.
#[derive(Debug, Default, Clone)]
struct SupervisorCounters {
    spawned: u64,
    attached: u64,
    restarts: u64,
    records_dropped: u64,
    bad_records: u64,
}

/// The [`Underlay`] of a node with a dataplane.
pub struct ShmUnderlay {
    opts: DataplaneOptions,
    dp: Option<Attached>,
    registered: Option<(Token, RawFd)>,
    /// Endpoints announced with PeerUp (links up, and endpoints we sent handshakes to).
    contacted: HashSet<SocketAddr>,
    /// Keys of the neighbours whose link is up.
    keys: BTreeMap<SocketAddr, [u8; 32]>,
    routes: BTreeMap<Prefix, (SocketAddr, u16)>,
    generation: u64,
    resync_end: Option<(Instant, u64)>,
    next_check: Instant,
    restart_at: Option<Instant>,
    backoff: Duration,
    counters: SupervisorCounters,
    /// Neighbours our predecessor had, read when we attached to its dataplane.
    inherited: Vec<SocketAddr>,
    dp_stats: Arc<Mutex<Option<serde_json::Value>>>,
    stop_poller: Arc<AtomicBool>,
}

impl std::fmt::Debug for ShmUnderlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmUnderlay")
            .field("pid", &self.dp.as_ref().map(|d| d.pid))
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// The shm name of the neighbour at `endpoint`: stable across control-plane restarts.
pub fn peer_id(endpoint: SocketAddr) -> PeerId {
    // DefaultHasher::new() has fixed keys: the same endpoint gives the same id in every process
    // of this build, which is what a restarted control plane needs.
    let mut h = std::hash::DefaultHasher::new();
    endpoint.hash(&mut h);
    PeerId(h.finish().max(1))
}

/// Where the neighbour list for a successor control plane is kept.
fn neighbours_path(dir: &Path) -> PathBuf {
    dir.join("neighbours")
}

fn shm_cipher(c: e2e::Cipher) -> Cipher {
    match c {
        e2e::Cipher::ChaCha20Poly1305 => Cipher::ChaCha20Poly1305,
        e2e::Cipher::Aes256Gcm => Cipher::Aes256Gcm,
    }
}

fn prefix_v6(p: &Prefix) -> Option<(Ipv6Addr, u8)> {
    match p.addr() {
        std::net::IpAddr::V6(a) => Some((a, p.len())),
        std::net::IpAddr::V4(_) => None,
    }
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    let exists = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    // A zombie (exited, not reaped by its new parent yet) is dead for us.
    exists
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.trim_start().chars().next())
                    != Some('Z')
            })
            .unwrap_or(false)
}

impl ShmUnderlay {
    /// Attaches to this node's running dataplane, or spawns one.
    pub fn start(opts: DataplaneOptions, clock: Clock) -> Result<ShmUnderlay, DataplaneError> {
        let now = clock.now();
        let mut me = ShmUnderlay {
            opts,
            dp: None,
            registered: None,
            contacted: HashSet::new(),
            keys: BTreeMap::new(),
            routes: BTreeMap::new(),
            generation: 0,
            resync_end: None,
            next_check: now,
            restart_at: None,
            backoff: MIN_BACKOFF,
            counters: SupervisorCounters::default(),
            inherited: Vec::new(),
            dp_stats: Arc::new(Mutex::new(None)),
            stop_poller: Arc::new(AtomicBool::new(false)),
        };
        let socket = handoff::socket_path(&me.opts.runtime_dir);
        match handoff::attach(&socket) {
            Ok((fds, pid, conn)) => {
                let region = Region::attach(fds)?;
                let (down, up) = region.split(Role::ControlPlane)?;
                tracing::info!(
                    pid,
                    "attached to the running dataplane; resyncing (it keeps forwarding meanwhile)"
                );
                me.counters.attached += 1;
                me.inherited = std::fs::read_to_string(neighbours_path(&me.opts.runtime_dir))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect();
                me.dp = Some(Attached {
                    _region: region,
                    down,
                    up,
                    child: None,
                    pid,
                    _conn: Some(conn),
                    started: now,
                });
                me.begin_replay(now, me.opts.resync_hold);
            }
            Err(handoff::HandoffError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                tracing::debug!("no running dataplane to attach to ({e}); starting one");
                me.spawn(now)?;
            }
            Err(e) => return Err(DataplaneError::Busy(e)),
        }
        me.start_stats_poller();
        Ok(me)
    }

    fn start_stats_poller(&self) {
        let socket = handoff::socket_path(&self.opts.runtime_dir);
        let out = Arc::clone(&self.dp_stats);
        let stop = Arc::clone(&self.stop_poller);
        let spawned = std::thread::Builder::new()
            .name("hypha-dp-stats".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let v = handoff::query_stats(&socket, Duration::from_secs(1))
                        .ok()
                        .and_then(|s| serde_json::from_str(&s).ok());
                    *out.lock().unwrap_or_else(PoisonError::into_inner) = v;
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("no dataplane stats poller: {e}");
        }
    }

    fn spawn(&mut self, now: Instant) -> Result<(), DataplaneError> {
        let region = Region::create(&RegionConfig::default())?;
        let (down, up) = region.split(Role::ControlPlane)?;
        let mut cmd = Command::new(&self.opts.bin);
        cmd.arg("--addr")
            .arg(self.opts.addr.to_string())
            .arg("--port")
            .arg(self.opts.port.to_string())
            .arg("--runtime-dir")
            .arg(&self.opts.runtime_dir);
        if let Some(w) = self.opts.workers {
            cmd.arg("--workers").arg(w.to_string());
        }
        if self.opts.no_tun {
            cmd.arg("--no-tun");
        }
        if let Some(t) = &self.opts.tun_name {
            cmd.arg("--tun-name").arg(t);
        }
        if let Some(mode) = &self.opts.xdp {
            cmd.arg("--xdp").arg(mode);
        }
        region.share_with(&mut cmd);
        // SAFETY: runs in the forked child before exec and only calls sigprocmask, which is
        // async-signal-safe. Our SIGINT/SIGTERM are blocked (they arrive through a signalfd) and
        // a blocked mask is inherited: the dataplane must get its stop signals.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGINT);
                libc::sigaddset(&mut set, libc::SIGTERM);
                if libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // Its own process group: a signal to ours (a terminal's ^C, a supervisor's group kill) must
        // not take the dataplane down with a dying control plane. We stop it on a clean shutdown.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.stdin(Stdio::null());
        let child = cmd.spawn().map_err(|source| DataplaneError::Spawn {
            bin: self.opts.bin.clone(),
            source,
        })?;
        let pid = child.id();
        tracing::info!(pid, bin = %self.opts.bin.display(), "dataplane started");
        self.counters.spawned += 1;
        self.dp = Some(Attached {
            _region: region,
            down,
            up,
            child: Some(child),
            pid,
            _conn: None,
            started: now,
        });
        self.begin_replay(now, Duration::ZERO);
        Ok(())
    }

    /// Sends `Resync::Begin` and everything we know; `End` after `hold` (now if zero).
    fn begin_replay(&mut self, now: Instant, hold: Duration) {
        self.generation = self.generation.wrapping_add(1);
        let generation = self.generation;
        self.push(&Record::Resync(Resync::Begin { generation }));
        let peers: Vec<SocketAddr> = self.contacted.iter().copied().collect();
        for endpoint in peers {
            let key = self.keys.get(&endpoint).copied().unwrap_or([0; 32]);
            self.push_peer_up(endpoint, key);
        }
        let routes: Vec<(Prefix, SocketAddr, u16)> =
            self.routes.iter().map(|(p, (e, m))| (*p, *e, *m)).collect();
        for (prefix, endpoint, metric) in routes {
            self.push_route_add(prefix, endpoint, metric);
        }
        if hold.is_zero() {
            self.push(&Record::Resync(Resync::End { generation }));
            self.resync_end = None;
        } else {
            self.resync_end = Some((now + hold, generation));
        }
    }

    fn push(&mut self, record: &Record<'_>) {
        let Some(dp) = &mut self.dp else {
            self.counters.records_dropped += 1;
            return;
        };
        if let Err(e) = dp.down.push(record, PUSH_TIMEOUT) {
            self.counters.records_dropped += 1;
            tracing::debug!("shm record dropped: {e}");
        }
    }

    fn push_peer_up(&mut self, endpoint: SocketAddr, key: [u8; 32]) {
        self.push(&Record::PeerUp(PeerUp {
            peer: peer_id(endpoint),
            underlay: endpoint,
            public_key: key,
        }));
    }

    fn push_route_add(&mut self, prefix: Prefix, endpoint: SocketAddr, metric: u16) {
        let Some((addr, len)) = prefix_v6(&prefix) else {
            return;
        };
        if let Some(e) = RouteEntry::new(addr, len, peer_id(endpoint), u32::from(metric)) {
            self.push(&Record::RouteAdd(&[e]));
        }
    }

    fn register_fd(&mut self, registry: &Registry) -> io::Result<()> {
        let Some((token, old)) = self.registered else {
            return Ok(());
        };
        let Some(dp) = &self.dp else {
            return Ok(());
        };
        let fd = dp.up.data_fd().as_raw_fd();
        if fd != old {
            // The old fd may already be closed (its region dropped): ignore the error.
            let _ = registry.deregister(&mut SourceFd(&old));
            registry.register(&mut SourceFd(&fd), token, Interest::READABLE)?;
            self.registered = Some((token, fd));
        }
        Ok(())
    }

    /// The dataplane is gone: drop its region and schedule a restart.
    fn lost(&mut self, now: Instant, registry: &Registry, why: &str) {
        if let Some((_, fd)) = self.registered {
            let _ = registry.deregister(&mut SourceFd(&fd));
        }
        if let Some(dp) = self.dp.take() {
            if now.saturating_duration_since(dp.started) >= STABLE_RUN {
                self.backoff = MIN_BACKOFF;
            }
            tracing::warn!(
                pid = dp.pid,
                "dataplane {why}; restarting in {:?}",
                self.backoff
            );
            drop(dp);
        }
        self.restart_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// The neighbours of the control plane that ran this dataplane before us (empty unless we
    /// attached to a running one). Dial them at once: their links to our predecessor die after
    /// their dead interval, and routes through us with them.
    pub fn inherited_neighbours(&self) -> &[SocketAddr] {
        &self.inherited
    }

    /// Writes the neighbours whose link is up to the runtime directory, for a successor.
    fn save_neighbours(&self) {
        let text: String = self.keys.keys().map(|e| format!("{e}\n")).collect();
        let path = neighbours_path(&self.opts.runtime_dir);
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
            tracing::debug!("cannot save the neighbour list: {e}");
        }
    }

    /// The pid of the running dataplane.
    pub fn dataplane_pid(&self) -> Option<u32> {
        self.dp.as_ref().map(|d| d.pid)
    }
}

impl Underlay for ShmUnderlay {
    fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        if let Some(dp) = &self.dp {
            let fd = dp.up.data_fd().as_raw_fd();
            registry.register(&mut SourceFd(&fd), token, Interest::READABLE)?;
            self.registered = Some((token, fd));
        } else {
            self.registered = Some((token, -1));
        }
        Ok(())
    }

    fn set_writable_interest(&mut self, _: &Registry, _: Token, _: bool) -> io::Result<()> {
        // Sends wait briefly for ring space and never report WouldBlock.
        Ok(())
    }

    fn send_to(&mut self, to: SocketAddr, datagram: &[u8]) -> io::Result<()> {
        if self.contacted.insert(to) {
            let key = self.keys.get(&to).copied().unwrap_or([0; 32]);
            self.push_peer_up(to, key);
        }
        let before = self.counters.records_dropped;
        self.push(&Record::PacketToSend {
            to: SendTo::Peer(peer_id(to)),
            bytes: datagram,
        });
        if self.counters.records_dropped != before {
            return Err(io::Error::other("dataplane ring full or dataplane down"));
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<Input>> {
        let Some(dp) = &mut self.dp else {
            return Ok(None);
        };
        let popped = match dp.up.pop() {
            Ok(p) => p,
            Err(e) => return Err(io::Error::other(format!("shm up-ring: {e}"))),
        };
        let Some(item) = popped else {
            return Ok(None);
        };
        let received = match item {
            Ok(r) => r,
            Err(e) => {
                self.counters.bad_records += 1;
                tracing::debug!("bad record from the dataplane: {e}");
                return Ok(Some(Input::Consumed));
            }
        };
        let mut copy = |bytes: &[u8]| -> Option<usize> {
            let dst = buf.get_mut(..bytes.len())?;
            dst.copy_from_slice(bytes);
            Some(bytes.len())
        };
        Ok(Some(match received.record {
            Record::PuntedPacket {
                from,
                reason,
                bytes,
            } => match (copy(bytes), reason) {
                (Some(len), PuntReason::ControlFrame) => Input::Datagram { from, len },
                (Some(len), PuntReason::LocalDelivery) => Input::Local { len },
                (None, _) => Input::Consumed,
            },
            Record::Event(Event::NoSession(dst)) => Input::NoSession(dst),
            Record::Event(Event::NoRoute(dst)) => Input::NoRoute(dst),
            _ => Input::Consumed,
        }))
    }

    fn apply(&mut self, cmd: DataplaneCommand) -> io::Result<()> {
        match cmd {
            DataplaneCommand::PeerUp { endpoint, key } => {
                self.keys.insert(endpoint, key);
                self.contacted.insert(endpoint);
                self.push_peer_up(endpoint, key);
                self.save_neighbours();
            }
            DataplaneCommand::PeerDown { endpoint } => {
                self.keys.remove(&endpoint);
                self.contacted.remove(&endpoint);
                self.push(&Record::PeerDown(peer_id(endpoint)));
                self.save_neighbours();
            }
            DataplaneCommand::RouteAdd {
                prefix,
                endpoint,
                metric,
            } => {
                self.routes.insert(prefix, (endpoint, metric));
                self.push_route_add(prefix, endpoint, metric);
            }
            DataplaneCommand::RouteRemove { prefix } => {
                self.routes.remove(&prefix);
                if let Some((addr, len)) = prefix_v6(&prefix) {
                    if let Some(e) = RouteEntry::new(addr, len, PeerId(0), 0) {
                        self.push(&Record::RouteRemove(&[e]));
                    }
                }
            }
            DataplaneCommand::SessionInstall {
                peer,
                local_index,
                remote_index,
                tx_key,
                rx_key,
                cipher,
            } => {
                let cipher = shm_cipher(cipher);
                self.push(&Record::SessionKeyInstall(SessionKey {
                    index: local_index,
                    direction: KeyDirection::Receive,
                    cipher,
                    peer,
                    key: rx_key,
                    counter: 0,
                }));
                self.push(&Record::SessionKeyInstall(SessionKey {
                    index: remote_index,
                    direction: KeyDirection::Send,
                    cipher,
                    peer,
                    key: tx_key,
                    counter: 0,
                }));
            }
            DataplaneCommand::SessionRemove { peer, local_index } => {
                self.push(&Record::SessionKeyRemove(SessionKeyId {
                    index: local_index,
                    direction: KeyDirection::Receive,
                    peer,
                }));
            }
            DataplaneCommand::SendOverlay { dst, packet } => {
                self.push(&Record::PacketToSend {
                    to: SendTo::Overlay(dst),
                    bytes: &packet,
                });
            }
        }
        Ok(())
    }

    fn prepare_sleep(&mut self) -> io::Result<bool> {
        match &mut self.dp {
            Some(dp) => dp.up.arm().map_err(|e| io::Error::other(e.to_string())),
            None => Ok(true),
        }
    }

    fn woke(&mut self) {
        if let Some(dp) = &mut self.dp {
            dp.up.disarm();
        }
    }

    fn handle_timeout<F: FibSink>(
        &mut self,
        now: Instant,
        node: &mut Node<F>,
        registry: &Registry,
    ) -> io::Result<()> {
        if self.restart_at.is_some_and(|t| now >= t) {
            self.restart_at = None;
            self.counters.restarts += 1;
            // Its sessions died with it; ours must not be installed again (nonce reuse).
            node.dataplane_restarted();
            match self.spawn(now) {
                Ok(()) => self.register_fd(registry)?,
                Err(e) => {
                    tracing::error!("dataplane restart failed: {e}");
                    self.restart_at = Some(now + self.backoff);
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        if let Some((at, generation)) = self.resync_end {
            if now >= at {
                self.resync_end = None;
                tracing::info!(generation, "resync complete");
                self.push(&Record::Resync(Resync::End { generation }));
            }
        }
        if now < self.next_check {
            return Ok(());
        }
        self.next_check = now + SUPERVISE_INTERVAL;
        let dead = match &mut self.dp {
            Some(dp) => match &mut dp.child {
                Some(child) => match child.try_wait() {
                    Ok(Some(status)) => Some(format!("exited ({status})")),
                    Ok(None) => None,
                    Err(e) => Some(format!("cannot be waited for ({e})")),
                },
                None => (!process_alive(dp.pid)).then(|| "is gone".to_owned()),
            },
            None => None,
        };
        if let Some(why) = dead {
            self.lost(now, registry, &why);
        }
        Ok(())
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.next_check;
        if let Some((at, _)) = self.resync_end {
            t = t.min(at);
        }
        if let Some(r) = self.restart_at {
            t = t.min(r);
        }
        Some(t)
    }

    fn stats(&self, out: &mut Stats) {
        let c = &self.counters;
        let sup = out.entry("dataplane_supervisor".into()).or_default();
        for (k, v) in [
            ("spawned", c.spawned),
            ("attached", c.attached),
            ("restarts", c.restarts),
            ("records_dropped", c.records_dropped),
            ("bad_records", c.bad_records),
            ("generation", self.generation),
            ("running", u64::from(self.dp.is_some())),
            ("pid", self.dp.as_ref().map_or(0, |d| u64::from(d.pid))),
        ] {
            sup.insert(k.into(), v);
        }
        let snap = self
            .dp_stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(v) = snap else {
            return;
        };
        xdp_stats(&v, out);
        if let Some(counters) = v.get("counters").and_then(|c| c.as_object()) {
            let g = out.entry("dataplane".into()).or_default();
            // The XDP counters (`xdp_` names) go to the `xdp` group instead.
            for (k, val) in counters.iter().filter(|(k, _)| !k.starts_with("xdp_")) {
                if let Some(n) = val.as_u64() {
                    g.insert(k.clone(), n);
                }
            }
            for k in ["routes", "sessions", "peers"] {
                if let Some(n) = v.get(k).and_then(|x| x.as_u64()) {
                    g.insert(k.into(), n);
                }
            }
        }
        if let Some(peers) = v.get("per_peer").and_then(|r| r.as_array()) {
            for peer in peers {
                let Some(endpoint) = peer.get("endpoint").and_then(|e| e.as_str()) else {
                    continue;
                };
                let g = out.entry(format!("dataplane_peer_{endpoint}")).or_default();
                for k in ["tx_packets", "tx_bytes", "rx_packets", "rx_bytes"] {
                    if let Some(n) = peer.get(k).and_then(|x| x.as_u64()) {
                        g.insert(k.into(), n);
                    }
                }
            }
        }
        if let Some(rows) = v.get("per_thread").and_then(|r| r.as_array()) {
            for (i, row) in rows.iter().enumerate() {
                let Some(obj) = row.as_object() else {
                    continue;
                };
                let g = out.entry(format!("dataplane_thread_{i}")).or_default();
                for (k, val) in obj {
                    if let Some(n) = val.as_u64() {
                        g.insert(k.clone(), n);
                    }
                }
            }
        }
    }

    fn shutdown(&mut self) {
        self.stop_poller.store(true, Ordering::Relaxed);
        if let Some(mut dp) = self.dp.take() {
            if let Ok(pid) = i32::try_from(dp.pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if let Some(child) = &mut dp.child {
                for _ in 0..50 {
                    if matches!(child.try_wait(), Ok(Some(_))) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The dataplane's `xdp` object (hand-over stats) as counter groups: `xdp` with every XDP/TC
/// counter (summed over CPUs, names without the `xdp_` prefix), `loaded`, `mode_<mode>` = 1
/// (`off`, `generic`, `driver`, `tc`, `mixed` or `unattached`), `interfaces`,
/// `interfaces_generic`, `interfaces_driver`, `interfaces_tc`, `transit_entries`,
/// `allowed_peers`; and one `xdp_iface_<name>` group per attached interface with `generic`,
/// `driver` or `tc` = 1.
fn xdp_stats(v: &serde_json::Value, out: &mut Stats) {
    let Some(x) = v.get("xdp").and_then(|x| x.as_object()) else {
        return;
    };
    let mut g = BTreeMap::new();
    let loaded = x.get("loaded").and_then(|l| l.as_bool()).unwrap_or(false);
    g.insert("loaded".to_owned(), u64::from(loaded));
    if let Some(mode) = x.get("mode").and_then(|m| m.as_str()) {
        if mode.len() <= 32 && mode.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            g.insert(format!("mode_{mode}"), 1);
        }
    }
    if let Some(c) = x.get("counters").and_then(|c| c.as_object()) {
        for (k, val) in c {
            if let Some(n) = val.as_u64() {
                g.insert(k.strip_prefix("xdp_").unwrap_or(k).to_owned(), n);
            }
        }
    }
    for k in ["transit_entries", "allowed_peers"] {
        if let Some(n) = x.get(k).and_then(|n| n.as_u64()) {
            g.insert(k.to_owned(), n);
        }
    }
    let (mut generic, mut driver, mut tc) = (0u64, 0u64, 0u64);
    if let Some(ifaces) = x.get("interfaces").and_then(|i| i.as_object()) {
        for (name, mode) in ifaces {
            let mode = mode.as_str().unwrap_or_default();
            match mode {
                "generic" => generic += 1,
                "driver" => driver += 1,
                "tc" => tc += 1,
                _ => continue,
            }
            let ig = out.entry(format!("xdp_iface_{name}")).or_default();
            ig.insert(mode.to_owned(), 1);
        }
    }
    g.insert("interfaces".to_owned(), generic + driver + tc);
    g.insert("interfaces_generic".to_owned(), generic);
    g.insert("interfaces_driver".to_owned(), driver);
    g.insert("interfaces_tc".to_owned(), tc);
    out.insert("xdp".to_owned(), g);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdp_object_becomes_counter_groups() {
        let v = serde_json::json!({
            "counters": {"forwarded": 3, "xdp_redirect": 7},
            "xdp": {
                "loaded": true,
                "mode": "generic",
                "interfaces": {"veth0": "generic", "eth1": "driver", "veth1": "tc", "odd": 5},
                "transit_entries": 2,
                "allowed_peers": 1,
                "counters": {"xdp_redirect": 7, "xdp_drop_unknown_peer": 4, "xdp_bad": "x"},
            },
        });
        let mut out = Stats::new();
        xdp_stats(&v, &mut out);
        let x = &out["xdp"];
        assert_eq!(x["loaded"], 1);
        assert_eq!(x["mode_generic"], 1);
        assert_eq!(x["redirect"], 7);
        assert_eq!(x["drop_unknown_peer"], 4);
        assert!(!x.contains_key("bad"));
        assert_eq!(x["interfaces"], 3);
        assert_eq!(x["interfaces_generic"], 1);
        assert_eq!(x["interfaces_driver"], 1);
        assert_eq!(x["interfaces_tc"], 1);
        assert_eq!(out["xdp_iface_veth1"]["tc"], 1);
        assert_eq!(x["transit_entries"], 2);
        assert_eq!(out["xdp_iface_veth0"]["generic"], 1);
        assert_eq!(out["xdp_iface_eth1"]["driver"], 1);
        assert!(!out.contains_key("xdp_iface_odd"));

        let mut off = Stats::new();
        xdp_stats(
            &serde_json::json!({"xdp": {"loaded": false, "mode": "off", "interfaces": {}}}),
            &mut off,
        );
        assert_eq!(off["xdp"]["loaded"], 0);
        assert_eq!(off["xdp"]["mode_off"], 1);
        assert_eq!(off["xdp"]["interfaces"], 0);
    }
}
