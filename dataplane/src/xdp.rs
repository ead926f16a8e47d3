//! The XDP fast path's loader (DESIGN.md "XDP fast path", issue 7).
//!
//! Why: on a router, transit traffic should never reach user space, and junk to our port should
//! die before it costs a wakeup. The program (`hypha_ebpf::PROGRAM`, C) does that in the
//! driver; this module loads it with aya, attaches it to the underlay interface(s), keeps its two
//! maps in step with the FIB and peer set the control thread publishes, and reads its counters.
//!
//! **Maps.** `allowed_peers` holds every neighbour's underlay `addr:port`; `transit` maps a
//! destination /64 (upper 64 bits) to the next hop's underlay address, port and our source
//! address towards it. Only exact /64 routes go in (the program keys on the /64); a /64 with a
//! more specific route inside it stays out, so user space's longest-prefix match decides those
//! packets. Our own /64 never goes in.
//!
//! **Pins** (one directory per node, since namespaces share bpffs): `/sys/fs/bpf/hypha/<node>/`
//! with `<node>` the overlay address with `:` as `-`; it holds `prog`, the three maps by name,
//! and `link_<ifname>` per attachment (a pinned `bpf_link`), `link_tc_<ifname>` for the TC
//! ingress program's. On start, everything in that
//! directory is from a crashed run: links are unpinned (which detaches their program) and the
//! rest removed, then the program is loaded fresh. On clean exit ([`XdpFastPath::shutdown`] or
//! drop) links are detached and the directory removed. A SIGKILLed run leaves its program
//! attached and forwarding on its last maps until the next start replaces it.
//!
//! **Modes.** `auto` tries driver (native) mode and falls back to generic (SKB) mode per
//! interface, except on veth, which gets `tc` mode (below), or generic XDP if the TC program
//! can't attach: native `bpf_redirect` between veths drops frames or corrupts UDP checksums
//! unless the sender has tx checksum offload off and the target's peer runs XDP or GRO
//! (ENVIRONMENT.md "Gotchas"). `driver`/`generic` force that XDP mode, `tc` forces TC mode,
//! `off` does nothing. When the fast path can't be used at all, [`XdpFastPath::start`] fails
//! and the caller logs it once and runs without it — every packet then takes the user-space
//! path, which does everything XDP does.
//!
//! **Bulk transit.** GSO/GRO super-packets (a sender's UDP GSO batch over veth, a UDP GRO
//! aggregate) are longer than the MTU: XDP can't redirect them, so it passes them (`pass_gso`)
//! to the object's second program, `hypha_tc`, attached to TCX ingress next to every XDP
//! attachment, which forwards them as skbs (docs/operations.md "Bulk transit"). When TCX is
//! missing the XDP part still works and bulk transit takes the user-space path.
//!
//! **TC mode** (`tc`): `hypha_tc` alone, no XDP; the interface's ifindex goes into the `tc_only`
//! map, which tells the program to do everything the XDP program does (non-peer drop, single
//! datagram transit, hop limit, counters under the same names) besides the super-packets. Why
//! `auto` picks it on veth: generic XDP linearises every nonlinear skb before it runs, a ~64 KB
//! copy per GSO super-packet (ours or transit) just to pass it on to TC (measured:
//! bench/RESULTS.md "XDP fast path"); TC copies only the transit super-packets it rewrites, once,
//! and generic XDP has no earlier hook to offer on veth.
//!
//! **`bpf_fib_lookup` needs forwarding enabled** on the receiving interface
//! (`net.ipv4.conf.<if>.forwarding` / `net.ipv6.conf.<if>.forwarding`); otherwise every transit
//! packet passes up (counter `pass_fib_other`). Start warns when it is off.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use hypha_ebpf::maps::{PeerKey, PeerValue, TransitKey, TransitValue, XdpCounters};
use hypha_ebpf::{
    MAP_ALLOWED_PEERS, MAP_COUNTERS, MAP_TC_ONLY, MAP_TRANSIT, PORT_GLOBAL, PROGRAM_NAME,
    TC_PROGRAM_NAME,
};

use crate::fib::Fib;
use crate::state::PeerTable;

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// `--xdp`: whether and how to attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XdpSetting {
    /// Don't load XDP.
    Off,
    /// Generic (SKB) mode only.
    Generic,
    /// Driver (native) mode only.
    Driver,
    /// The TC ingress program alone (no XDP), doing everything the XDP program does on skbs.
    Tc,
    /// Driver mode, falling back to generic per interface; TC alone on veth.
    #[default]
    Auto,
}

impl std::str::FromStr for XdpSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(XdpSetting::Off),
            "generic" | "skb" => Ok(XdpSetting::Generic),
            "driver" | "native" => Ok(XdpSetting::Driver),
            "tc" => Ok(XdpSetting::Tc),
            "auto" => Ok(XdpSetting::Auto),
            _ => Err(format!(
                "--xdp {s}: expected off, generic, driver, tc or auto"
            )),
        }
    }
}

/// The mode an interface actually got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachedMode {
    /// Native, in the driver.
    Driver,
    /// Generic, in the stack (slower, works everywhere).
    Generic,
    /// No XDP: the TC ingress program alone.
    Tc,
}

impl AttachedMode {
    /// "driver", "generic" or "tc".
    pub fn as_str(self) -> &'static str {
        match self {
            AttachedMode::Driver => "driver",
            AttachedMode::Generic => "generic",
            AttachedMode::Tc => "tc",
        }
    }
}

/// Why the fast path could not be set up or updated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum XdpError {
    /// `--xdp off`.
    #[error("XDP is off")]
    Off,
    /// bpffs is not mounted and could not be.
    #[error("mounting bpffs on {BPFFS}: {0}")]
    Bpffs(String),
    /// A file system operation on the pin directory failed.
    #[error("{what} {path}: {source}")]
    Pin {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// aya refused to load the object or the program (verifier, permissions).
    #[error("loading the XDP program: {0}")]
    Load(String),
    /// A map could not be taken, updated or read.
    #[error("XDP map {map}: {detail}")]
    Map {
        /// The map.
        map: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// Attaching to an interface failed in every allowed mode.
    #[error("attaching XDP to {iface}: {detail}")]
    Attach {
        /// The interface.
        iface: String,
        /// What went wrong (per mode tried).
        detail: String,
    },
}

/// What the loader needs to know.
#[derive(Debug, Clone)]
pub struct XdpConfig {
    /// `--xdp`.
    pub setting: XdpSetting,
    /// The underlay interfaces; empty: the ones the peers are reached through, attached as
    /// peers appear ([`XdpFastPath::sync`]).
    pub ifaces: Vec<String>,
    /// The node's UDP port.
    pub port: u16,
    /// The node's overlay address (names the pin directory; its /64 is never transit).
    pub node: Ipv6Addr,
    /// The bpffs root for our pins (default `/sys/fs/bpf/hypha`).
    pub pin_root: PathBuf,
}

impl XdpConfig {
    /// Defaults for node `node` on `port`: auto mode, interfaces detected, pins in
    /// `/sys/fs/bpf/hypha`.
    pub fn new(node: Ipv6Addr, port: u16) -> Self {
        XdpConfig {
            setting: XdpSetting::Auto,
            ifaces: Vec::new(),
            port,
            node,
            pin_root: Path::new(BPFFS).join("hypha"),
        }
    }

    /// `<pin_root>/<node>`: the node's pin directory.
    pub fn pin_dir(&self) -> PathBuf {
        self.pin_root.join(node_dir_name(&self.node))
    }
}

/// The overlay address as a directory name: `:` replaced by `-` (e.g. `4aa-1-2-3--1`).
pub fn node_dir_name(node: &Ipv6Addr) -> String {
    node.to_string().replace(':', "-")
}

/// The maps' desired contents for a FIB and peer set.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Desired {
    /// allowed_peers keys.
    pub peers: HashSet<PeerKey>,
    /// transit entries.
    pub transit: HashMap<TransitKey, TransitValue>,
}

/// Computes what the maps should hold: every peer's address; every exact-/64 route other than
/// `local` with no more specific route inside it, whose next hop is up and for which
/// `source_for(next hop)` gives a local address of the same family.
pub fn desired(
    fib: &Fib,
    peers: &PeerTable,
    local: u64,
    mut source_for: impl FnMut(SocketAddr) -> Option<IpAddr>,
) -> Desired {
    let mut out = Desired::default();
    for (_, p) in peers.iter() {
        out.peers.insert(PeerKey::new(p.addr));
    }
    // /64s shadowed by a more specific route.
    let shadowed: HashSet<u64> = fib
        .routes()
        .filter(|(p, _)| p.prefix_len() > 64)
        .map(|(p, _)| (p.bits() >> 64) as u64)
        .collect();
    let mut sources: HashMap<SocketAddr, Option<IpAddr>> = HashMap::new();
    for (prefix, hop) in fib.routes() {
        let upper = (prefix.bits() >> 64) as u64;
        if prefix.prefix_len() != 64 || upper == local || shadowed.contains(&upper) {
            continue;
        }
        let Some(peer) = peers.get(hop.peer) else {
            continue;
        };
        let to = peer.addr;
        let src = *sources.entry(to).or_insert_with(|| source_for(to));
        if let Some(v) = src.and_then(|s| TransitValue::new(to, s)) {
            out.transit.insert(TransitKey::from_upper64(upper), v);
        }
    }
    out
}

/// The local address the kernel would send from to reach `to` (a connected UDP socket's name;
/// nothing is sent).
pub fn route_source(to: SocketAddr) -> Option<IpAddr> {
    let bind: SocketAddr = match to {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(bind).ok()?;
    s.connect(to).ok()?;
    let ip = s.local_addr().ok()?.ip();
    match ip {
        IpAddr::V6(v6) => Some(v6.to_ipv4_mapped().map_or(ip, IpAddr::V4)),
        v4 => Some(v4),
    }
}

/// The interface holding local address `ip`.
pub fn iface_with_addr(ip: IpAddr) -> Option<String> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    for ifa in addrs {
        let Some(a) = ifa.address else { continue };
        let hit = match ip {
            IpAddr::V4(v4) => a.as_sockaddr_in().map(|s| s.ip()) == Some(v4),
            IpAddr::V6(v6) => a.as_sockaddr_in6().map(|s| s.ip()) == Some(v6),
        };
        if hit {
            return Some(ifa.interface_name);
        }
    }
    None
}

/// Mounts bpffs on [`BPFFS`] unless it already is.
pub fn ensure_bpffs() -> Result<(), XdpError> {
    if let Ok(st) = nix::sys::statfs::statfs(BPFFS) {
        if st.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC {
            return Ok(());
        }
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| XdpError::Bpffs(e.to_string()))
}

/// Removes what a previous run left in `dir`: pinned links are unpinned and dropped (which
/// detaches their programs), other pins removed. Returns how many links were detached.
pub fn clean_stale_pins(dir: &Path) -> Result<usize, XdpError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(XdpError::Pin {
                what: "reading",
                path: dir.to_owned(),
                source,
            })
        }
    };
    let mut detached = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let is_link = entry.file_name().to_string_lossy().starts_with("link_");
        if is_link {
            if let Ok(pinned) = PinnedLink::from_pin(&path) {
                // Unpinning drops the last reference once the FdLink is dropped: detached.
                if let Ok(link) = pinned.unpin() {
                    drop::<FdLink>(link);
                    detached += 1;
                    continue;
                }
            }
        }
        std::fs::remove_file(&path).map_err(|source| XdpError::Pin {
            what: "removing stale pin",
            path: path.clone(),
            source,
        })?;
    }
    Ok(detached)
}

fn warn_forwarding(iface: &str) {
    if !forwarding_enabled(iface) {
        tracing::warn!(
            iface,
            "IP forwarding is off on this interface: bpf_fib_lookup refuses to forward, so \
             transit traffic takes the user-space path (sysctl \
             net.ipv4.conf.{iface}.forwarding=1 and net.ipv6.conf.{iface}.forwarding=1 enable \
             the fast path)"
        );
    }
}

fn forwarding_enabled(iface: &str) -> bool {
    ["ipv4", "ipv6"].iter().all(|v| {
        std::fs::read_to_string(format!("/proc/sys/net/{v}/conf/{iface}/forwarding"))
            .map(|s| s.trim() == "1")
            .unwrap_or(false)
    })
}

/// The interface's driver name (`ETHTOOL_GDRVINFO`), asked in the current network namespace
/// (unlike `/sys/class/net`, which shows the namespace sysfs was mounted in). `None` if the
/// interface doesn't exist or doesn't answer.
#[allow(unsafe_code)]
pub fn driver_name(iface: &str) -> Option<String> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 3;
    /// `struct ethtool_drvinfo` (linux/ethtool.h).
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 32 * 4 + 12 + 5 * 4],
    }
    /// `struct ifreq` with `ifr_data` (40 bytes on 64-bit, 32 on 32-bit; padded to 40).
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    const _: () = assert!(size_of::<DrvInfo>() == 196);
    let bytes = iface.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return None;
    }
    let sock = [AddressFamily::Inet, AddressFamily::Inet6]
        .into_iter()
        .find_map(|af| socket(af, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).ok())?;
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 32 * 4 + 12 + 5 * 4],
    };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: `req` is a valid `struct ifreq` whose `ifr_data` points at a `struct
    // ethtool_drvinfo` that outlives the call; the kernel writes at most its 196 bytes.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut req as *mut IfReq) };
    if rc < 0 {
        return None;
    }
    let len = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    std::str::from_utf8(info.driver.get(..len)?)
        .ok()
        .map(str::to_owned)
}

fn sum_counters(map: &PerCpuArray<MapData, XdpCounters>) -> Result<XdpCounters, XdpError> {
    let per_cpu = map.get(&0, 0).map_err(map_err(MAP_COUNTERS))?;
    let mut sum = XdpCounters::default();
    for c in per_cpu.iter() {
        sum.accumulate(c);
    }
    Ok(sum)
}

/// What the stats readers see of a loaded fast path: its attachments and map sizes when it
/// was published, and the counters map itself (read when asked, summed over CPUs).
pub struct XdpView {
    counters: Arc<PerCpuArray<MapData, XdpCounters>>,
    /// The pin directory.
    pub pin_dir: PathBuf,
    /// The attached interfaces and their modes.
    pub interfaces: Vec<(String, AttachedMode)>,
    /// Entries in the transit map.
    pub transit_entries: usize,
    /// Entries in the allowed-peers map.
    pub allowed_peers: usize,
}

impl core::fmt::Debug for XdpView {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("XdpView")
            .field("pin_dir", &self.pin_dir)
            .field("interfaces", &self.interfaces)
            .finish_non_exhaustive()
    }
}

impl XdpView {
    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Result<XdpCounters, XdpError> {
        sum_counters(&self.counters)
    }

    /// `driver`, `generic` or `tc` when every attached interface has that mode, `mixed` when they
    /// differ, `unattached` before the first interface is attached.
    pub fn mode(&self) -> &'static str {
        let mut modes = self.interfaces.iter().map(|(_, m)| *m);
        match modes.next() {
            None => "unattached",
            Some(first) if modes.all(|m| m == first) => first.as_str(),
            Some(_) => "mixed",
        }
    }

    /// `{"loaded": true, "mode", "pin_dir", "interfaces": {name: mode}, "transit_entries",
    /// "allowed_peers", "counters": {"xdp_<name>": n}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        match self.counters() {
            Ok(c) => {
                for (name, v) in c.iter() {
                    map.insert(format!("xdp_{name}"), v.into());
                }
            }
            Err(e) => tracing::debug!("reading the XDP counters: {e}"),
        }
        let ifaces: serde_json::Map<String, serde_json::Value> = self
            .interfaces
            .iter()
            .map(|(i, m)| (i.clone(), m.as_str().into()))
            .collect();
        serde_json::json!({
            "loaded": true,
            "mode": self.mode(),
            "pin_dir": self.pin_dir.display().to_string(),
            "interfaces": ifaces,
            "transit_entries": self.transit_entries,
            "allowed_peers": self.allowed_peers,
            "counters": map,
        })
    }

    /// The document of a dataplane without XDP: `{"loaded": false, "mode": "off", ...}`.
    pub fn off_json() -> serde_json::Value {
        serde_json::json!({
            "loaded": false,
            "mode": "off",
            "interfaces": {},
            "counters": {},
        })
    }
}

struct Attachment {
    iface: String,
    mode: AttachedMode,
    link: Option<PinnedLink>,
    /// The TC ingress program's link (super-packets), if it attached.
    tc_link: Option<PinnedLink>,
}

/// The loaded, attached fast path (see the module doc).
pub struct XdpFastPath {
    ebpf: Ebpf,
    dir: PathBuf,
    setting: XdpSetting,
    auto_ifaces: bool,
    local: u64,
    peers_map: BpfHashMap<MapData, PeerKey, PeerValue>,
    transit_map: BpfHashMap<MapData, TransitKey, TransitValue>,
    counters_map: Arc<PerCpuArray<MapData, XdpCounters>>,
    tc_only_map: BpfHashMap<MapData, u32, u32>,
    current: Desired,
    attached: Vec<Attachment>,
    /// Detected interfaces that refused the program (warned about once).
    refused: HashSet<String>,
    /// The TC ingress program loaded (it is attached next to every XDP attachment).
    tc_loaded: bool,
}

impl core::fmt::Debug for XdpFastPath {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("XdpFastPath")
            .field("dir", &self.dir)
            .field("attached", &self.attached())
            .field("peers", &self.current.peers.len())
            .field("transit", &self.current.transit.len())
            .finish_non_exhaustive()
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> XdpError {
    move |e| XdpError::Map {
        map,
        detail: e.to_string(),
    }
}

impl XdpFastPath {
    /// Mounts bpffs if needed, replaces a crashed run's pins, loads the program with the port
    /// set, pins program and maps, and attaches to `cfg.ifaces` (if given).
    pub fn start(cfg: &XdpConfig) -> Result<Self, XdpError> {
        if cfg.setting == XdpSetting::Off {
            return Err(XdpError::Off);
        }
        ensure_bpffs()?;
        let dir = cfg.pin_dir();
        let stale = clean_stale_pins(&dir)?;
        if stale > 0 {
            tracing::info!(links = stale, dir = %dir.display(), "detached XDP left by an earlier run");
        }
        std::fs::create_dir_all(&dir).map_err(|source| XdpError::Pin {
            what: "creating",
            path: dir.clone(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .override_global(PORT_GLOBAL, &cfg.port, true)
            .load(hypha_ebpf::PROGRAM)
            .map_err(|e| XdpError::Load(e.to_string()))?;
        for name in [MAP_ALLOWED_PEERS, MAP_TRANSIT, MAP_COUNTERS] {
            let map = ebpf.map(name).ok_or(XdpError::Map {
                map: name,
                detail: "not in the object".to_owned(),
            })?;
            map.pin(dir.join(name)).map_err(|e| XdpError::Map {
                map: name,
                detail: format!("pinning: {e}"),
            })?;
        }
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(XdpError::Map {
                map: name,
                detail: "not in the object".to_owned(),
            })
        };
        let peers_map = BpfHashMap::try_from(take(&mut ebpf, MAP_ALLOWED_PEERS)?)
            .map_err(map_err(MAP_ALLOWED_PEERS))?;
        let transit_map =
            BpfHashMap::try_from(take(&mut ebpf, MAP_TRANSIT)?).map_err(map_err(MAP_TRANSIT))?;
        let counters_map = Arc::new(
            PerCpuArray::try_from(take(&mut ebpf, MAP_COUNTERS)?).map_err(map_err(MAP_COUNTERS))?,
        );
        let tc_only_map =
            BpfHashMap::try_from(take(&mut ebpf, MAP_TC_ONLY)?).map_err(map_err(MAP_TC_ONLY))?;
        {
            let prog: &mut Xdp = ebpf
                .program_mut(PROGRAM_NAME)
                .ok_or_else(|| XdpError::Load(format!("no program {PROGRAM_NAME}")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| XdpError::Load(e.to_string()))?;
            prog.load().map_err(|e| XdpError::Load(e.to_string()))?;
            prog.pin(dir.join("prog"))
                .map_err(|e| XdpError::Load(format!("pinning the program: {e}")))?;
        }
        // The TC half is optional: without it (an older kernel's verifier, no bpf_loop) the XDP
        // part still works and bulk transit takes the user-space path.
        let tc_loaded = match ebpf
            .program_mut(TC_PROGRAM_NAME)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
        {
            Some(tc) => match tc.load() {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(
                        "loading {TC_PROGRAM_NAME} failed ({e}): bulk transit (GSO/GRO \
                         super-packets) takes the user-space path"
                    );
                    false
                }
            },
            None => false,
        };
        let local = crate::state::upper64(&cfg.node);
        let mut fp = XdpFastPath {
            ebpf,
            dir,
            setting: cfg.setting,
            auto_ifaces: cfg.ifaces.is_empty(),
            local,
            peers_map,
            transit_map,
            counters_map,
            tc_only_map,
            current: Desired::default(),
            attached: Vec::new(),
            refused: HashSet::new(),
            tc_loaded,
        };
        for iface in &cfg.ifaces {
            fp.attach(iface)?;
        }
        Ok(fp)
    }

    /// Attaches to `iface` (driver mode, then generic, as the setting allows; `auto` puts the TC
    /// program alone on veth, falling back to generic XDP, see the module doc) and pins the
    /// link. Already attached: nothing to do.
    pub fn attach(&mut self, iface: &str) -> Result<AttachedMode, XdpError> {
        if let Some(a) = self.attached.iter().find(|a| a.iface == iface) {
            return Ok(a.mode);
        }
        let mut errors = Vec::new();
        let modes: &[(XdpMode, AttachedMode)] = match self.setting {
            XdpSetting::Off => return Err(XdpError::Off),
            XdpSetting::Generic => &[(XdpMode::Skb, AttachedMode::Generic)],
            XdpSetting::Driver => &[(XdpMode::Driver, AttachedMode::Driver)],
            XdpSetting::Tc => {
                return self
                    .attach_tc_only(iface)
                    .map_err(|detail| XdpError::Attach {
                        iface: iface.to_owned(),
                        detail,
                    })
            }
            XdpSetting::Auto if driver_name(iface).as_deref() == Some("veth") => {
                tracing::info!(
                    iface,
                    "veth: using the TC program alone (generic XDP copies every GSO/GRO \
                     super-packet into one linear buffer before running, TC only the transit \
                     ones it rewrites; native redirect between veths needs tx offload off and \
                     XDP/GRO on the target's peer)"
                );
                match self.attach_tc_only(iface) {
                    Ok(m) => return Ok(m),
                    Err(e) => {
                        tracing::warn!(iface, "TC alone: {e}; trying generic XDP");
                        errors.push(format!("tc: {e}"));
                    }
                }
                &[(XdpMode::Skb, AttachedMode::Generic)]
            }
            XdpSetting::Auto => &[
                (XdpMode::Driver, AttachedMode::Driver),
                (XdpMode::Skb, AttachedMode::Generic),
            ],
        };
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| XdpError::Load(format!("no program {PROGRAM_NAME}")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| XdpError::Load(e.to_string()))?;
        for (mode, got) in modes {
            match prog.attach(iface, *mode) {
                Ok(id) => {
                    // Pin the link (bpf_link attachments only; the netlink fallback of old
                    // kernels can't be pinned and detaches when this process exits).
                    let pin_path = self.dir.join(format!("link_{iface}"));
                    let link = prog
                        .take_link(id)
                        .ok()
                        .and_then(|l| FdLink::try_from(l).ok())
                        .and_then(|l| match l.pin(&pin_path) {
                            Ok(p) => Some(p),
                            Err(e) => {
                                tracing::warn!(iface, "could not pin the XDP link: {e}");
                                None
                            }
                        });
                    warn_forwarding(iface);
                    tracing::info!(iface, mode = got.as_str(), "XDP fast path attached");
                    let tc_link = self.attach_tc(iface);
                    self.attached.push(Attachment {
                        iface: iface.to_owned(),
                        mode: *got,
                        link,
                        tc_link,
                    });
                    return Ok(*got);
                }
                Err(e) => errors.push(format!("{}: {e}", got.as_str())),
            }
        }
        Err(XdpError::Attach {
            iface: iface.to_owned(),
            detail: errors.join("; "),
        })
    }

    /// Attaches the TC ingress program alone to `iface`, marked in `tc_only` so that it does
    /// all of the XDP program's work there.
    fn attach_tc_only(&mut self, iface: &str) -> Result<AttachedMode, String> {
        if !self.tc_loaded {
            return Err(format!("{TC_PROGRAM_NAME} is not loaded"));
        }
        let ifindex =
            nix::net::if_::if_nametoindex(iface).map_err(|e| format!("no interface: {e}"))?;
        // Marked first, so the first packet the program sees there is handled in full.
        self.tc_only_map
            .insert(ifindex, 1, 0)
            .map_err(|e| format!("{MAP_TC_ONLY}: {e}"))?;
        match self.tc_link(iface) {
            Ok(l) => {
                warn_forwarding(iface);
                tracing::info!(iface, mode = "tc", "fast path attached (TC ingress alone)");
                self.attached.push(Attachment {
                    iface: iface.to_owned(),
                    mode: AttachedMode::Tc,
                    link: None,
                    tc_link: Some(l),
                });
                Ok(AttachedMode::Tc)
            }
            Err(e) => {
                let _ = self.tc_only_map.remove(&ifindex);
                Err(e)
            }
        }
    }

    /// Attaches the TC ingress program to `iface` through TCX and pins the link
    /// (`link_tc_<iface>`).
    fn tc_link(&mut self, iface: &str) -> Result<PinnedLink, String> {
        let pin_path = self.dir.join(format!("link_tc_{iface}"));
        self.ebpf
            .program_mut(TC_PROGRAM_NAME)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
            .ok_or_else(|| format!("no program {TC_PROGRAM_NAME}"))
            .and_then(|tc| {
                let id = tc
                    .attach(iface, TcAttachType::Ingress)
                    .map_err(|e| e.to_string())?;
                let link = tc.take_link(id).map_err(|e| e.to_string())?;
                let fd = FdLink::try_from(link).map_err(|e| e.to_string())?;
                fd.pin(&pin_path).map_err(|e| format!("pinning: {e}"))
            })
    }

    /// Attaches the TC ingress program (GSO/GRO super-packets, which XDP passes) to `iface`
    /// through TCX and pins the link (`link_tc_<iface>`). Without it the fast path still works;
    /// bulk transit then takes the user-space path.
    fn attach_tc(&mut self, iface: &str) -> Option<PinnedLink> {
        if !self.tc_loaded {
            return None;
        }
        let attached = self.tc_link(iface);
        match attached {
            Ok(l) => {
                tracing::info!(iface, "TC ingress program attached (GSO/GRO bulk transit)");
                Some(l)
            }
            Err(e) => {
                tracing::warn!(
                    iface,
                    "TC ingress program not attached ({e}): bulk transit (GSO/GRO super-packets) \
                     takes the user-space path"
                );
                None
            }
        }
    }

    /// The interfaces attached so far, with their modes.
    pub fn attached(&self) -> Vec<(String, AttachedMode)> {
        self.attached
            .iter()
            .map(|a| (a.iface.clone(), a.mode))
            .collect()
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }

    /// Brings the maps in step with `fib` and `peers` (only differences are written) and, when
    /// the interfaces are detected, attaches to the ones new peers are reached through.
    /// Returns `(entries written, entries removed)`.
    pub fn sync(&mut self, fib: &Fib, peers: &PeerTable) -> Result<(usize, usize), XdpError> {
        let want = desired(fib, peers, self.local, route_source);
        self.apply(want)
    }

    /// Writes `want` into the maps (differences only); see [`XdpFastPath::sync`].
    pub fn apply(&mut self, want: Desired) -> Result<(usize, usize), XdpError> {
        if self.auto_ifaces {
            let mut ifaces: Vec<String> = want
                .transit
                .values()
                .filter_map(|v| {
                    let to = PeerKey {
                        addr: v.addr,
                        port: v.port,
                        family: v.family,
                    }
                    .socket_addr()?;
                    iface_with_addr(route_source(to)?)
                })
                .collect();
            for k in &want.peers {
                if let Some(i) = k
                    .socket_addr()
                    .and_then(route_source)
                    .and_then(iface_with_addr)
                {
                    ifaces.push(i);
                }
            }
            ifaces.sort();
            ifaces.dedup();
            for iface in ifaces {
                if self.refused.contains(&iface) {
                    continue;
                }
                if let Err(e) = self.attach(&iface) {
                    tracing::warn!("{e}; traffic on {iface} takes the user-space path");
                    self.refused.insert(iface);
                }
            }
        }
        let (mut written, mut removed) = (0, 0);
        for k in want.peers.difference(&self.current.peers) {
            self.peers_map
                .insert(k, PeerValue::default(), 0)
                .map_err(map_err(MAP_ALLOWED_PEERS))?;
            written += 1;
        }
        for k in self.current.peers.difference(&want.peers) {
            self.peers_map
                .remove(k)
                .map_err(map_err(MAP_ALLOWED_PEERS))?;
            removed += 1;
        }
        for (k, v) in &want.transit {
            if self.current.transit.get(k) != Some(v) {
                self.transit_map
                    .insert(k, v, 0)
                    .map_err(map_err(MAP_TRANSIT))?;
                written += 1;
            }
        }
        for k in self.current.transit.keys() {
            if !want.transit.contains_key(k) {
                self.transit_map.remove(k).map_err(map_err(MAP_TRANSIT))?;
                removed += 1;
            }
        }
        self.current = want;
        Ok((written, removed))
    }

    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Result<XdpCounters, XdpError> {
        sum_counters(&self.counters_map)
    }

    /// A snapshot of the attachments and map sizes with a handle on the counters map, for
    /// readers on other threads ([`crate::state::Shared::xdp`]).
    pub fn view(&self) -> XdpView {
        XdpView {
            counters: Arc::clone(&self.counters_map),
            pin_dir: self.dir.clone(),
            interfaces: self.attached(),
            transit_entries: self.current.transit.len(),
            allowed_peers: self.current.peers.len(),
        }
    }

    /// The counters as a JSON object (`xdp_<name>`), plus the attachments (see
    /// [`XdpView::to_json`]).
    pub fn stats_json(&self) -> serde_json::Value {
        self.view().to_json()
    }

    /// Detaches from every interface and removes the pins (also done on drop).
    pub fn shutdown(mut self) {
        self.teardown();
    }

    fn teardown(&mut self) {
        for a in self.attached.drain(..) {
            for link in [a.link, a.tc_link].into_iter().flatten() {
                match link.unpin() {
                    Ok(l) => drop(l),
                    Err(e) => tracing::warn!(iface = a.iface, "unpinning the XDP link: {e}"),
                }
            }
            tracing::info!(iface = a.iface, "XDP fast path detached");
        }
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

impl Drop for XdpFastPath {
    fn drop(&mut self) {
        self.teardown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fib::{FibHasherBuilder, NextHop, Prefix};

    fn fib(routes: &[(&str, u8, u32)]) -> Fib {
        Fib::from_routes(
            FibHasherBuilder::random(),
            routes.iter().map(|(a, len, peer)| {
                (
                    Prefix::new(a.parse().unwrap(), *len).unwrap(),
                    NextHop {
                        peer: *peer,
                        metric: 1,
                    },
                )
            }),
        )
    }

    #[test]
    fn driver_name_of_missing_or_bad_interface_is_none() {
        assert_eq!(driver_name("hyphanosuchif0"), None);
        assert_eq!(driver_name(""), None);
        assert_eq!(driver_name("a\0b"), None);
        assert_eq!(driver_name("waytoolonginterfacename"), None);
    }

    #[test]
    fn setting_parses() {
        assert_eq!("off".parse(), Ok(XdpSetting::Off));
        assert_eq!("generic".parse(), Ok(XdpSetting::Generic));
        assert_eq!("driver".parse(), Ok(XdpSetting::Driver));
        assert_eq!("tc".parse(), Ok(XdpSetting::Tc));
        assert_eq!("auto".parse(), Ok(XdpSetting::Auto));
        assert!("on".parse::<XdpSetting>().is_err());
    }

    #[test]
    fn pin_dir_is_keyed_by_the_node() {
        let cfg = XdpConfig::new("548:c783:1::1".parse().unwrap(), 9651);
        assert_eq!(cfg.pin_dir(), Path::new("/sys/fs/bpf/hypha/548-c783-1--1"));
    }

    #[test]
    fn desired_maps_from_fib_and_peers() {
        let mut peers = PeerTable::default();
        peers.set(1, Some("10.0.0.1:9651".parse().unwrap()));
        peers.set(2, Some("[fd00::2]:9700".parse().unwrap()));
        let local = 0x04aa_0000_0000_0001u64;
        let f = fib(&[
            ("4aa:0:0:1::", 64, 1), // our own /64: never transit
            ("4bb::", 64, 1),
            ("4cc::", 64, 2),
            ("4dd::", 64, 3), // peer 3 is down
            ("4ee::", 64, 1), // shadowed by the /80 below
            ("4ee::1:0:0:0", 80, 2),
            ("500::", 48, 2), // not a /64
        ]);
        let d = desired(&f, &peers, local, |to| match to {
            SocketAddr::V4(_) => Some("10.0.0.9".parse().unwrap()),
            SocketAddr::V6(_) => Some("fd00::9".parse().unwrap()),
        });
        assert_eq!(d.peers.len(), 2);
        assert!(d
            .peers
            .contains(&PeerKey::new("10.0.0.1:9651".parse().unwrap())));
        let keys: HashSet<[u8; 8]> = d.transit.keys().map(|k| k.prefix).collect();
        assert_eq!(
            keys,
            HashSet::from([
                [0x04, 0xbb, 0, 0, 0, 0, 0, 0],
                [0x04, 0xcc, 0, 0, 0, 0, 0, 0]
            ])
        );
        let bb = d.transit[&TransitKey::from_upper64(0x04bb_0000_0000_0000)];
        assert_eq!(
            bb,
            TransitValue::new(
                "10.0.0.1:9651".parse().unwrap(),
                "10.0.0.9".parse().unwrap()
            )
            .unwrap()
        );
        let cc = d.transit[&TransitKey::from_upper64(0x04cc_0000_0000_0000)];
        assert_eq!(cc.port, 9700);
        assert_eq!(cc.family, hypha_ebpf::maps::FAMILY_V6);

        // No source address (no route to the next hop): left to user space.
        let none = desired(&f, &peers, local, |_| None);
        assert!(none.transit.is_empty());
        assert_eq!(none.peers.len(), 2);
    }
}
