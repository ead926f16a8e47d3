//! The monitoring interface, like babeld's local interface: the running router listens on a
//! localhost TCP port and writes one JSON [`Dump`] to each client that connects; `hypha lab dump`
//! is that client, printing it as JSON or as babeld-style text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::mac::MacCounters;

/// Everything the router knows, at one instant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Dump {
    /// Our router-id (RFC 8966 §3.2.2), hex with colons as babeld prints it.
    pub router_id: String,
    /// The interfaces we run on.
    pub interfaces: Vec<InterfaceDump>,
    /// The neighbour table (§3.2.4).
    pub neighbours: Vec<NeighbourDump>,
    /// The route table (§3.2.6): every route, with the selected one flagged.
    pub routes: Vec<RouteDump>,
    /// The source table (§3.2.5): feasibility distances.
    pub sources: Vec<SourceDump>,
    /// Prefixes we originate (redistributed local addresses).
    pub xroutes: Vec<String>,
    /// Counters of the router core, by name (a JSON object).
    pub router_counters: BTreeMap<String, u64>,
    /// Counters of the socket adapter.
    pub socket: SocketCounters,
}

/// One interface.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InterfaceDump {
    /// Kernel name.
    pub name: String,
    /// Kernel index.
    pub ifindex: u32,
    /// The link-local address we send from.
    pub link_local: String,
    /// Whether the interface is usable (false while it is gone or has no link-local address).
    pub up: bool,
    /// Hello interval, milliseconds.
    pub hello_interval_ms: u64,
    /// Update interval, milliseconds.
    pub update_interval_ms: u64,
    /// RFC 8967 counters, when MAC authentication is on for this interface.
    pub mac: Option<MacCounters>,
}

/// One neighbour.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NeighbourDump {
    /// Its link-local address.
    pub address: String,
    /// Interface name.
    pub iface: String,
    /// Hello history bitmap (most recent Hello in the high bit).
    pub reach: u16,
    /// Cost of receiving from it (§3.4.3).
    pub rxcost: u16,
    /// Cost of sending to it, from its IHUs.
    pub txcost: u16,
    /// Link cost (§3.4.3) including the RTT penalty.
    pub cost: u16,
    /// Smoothed round-trip time in milliseconds, when timestamps are exchanged (RFC 9616).
    pub rtt_ms: Option<f64>,
}

/// One route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteDump {
    /// Destination prefix.
    pub prefix: String,
    /// Originating router-id.
    pub router_id: String,
    /// Seqno of the update.
    pub seqno: u16,
    /// Metric as advertised by the neighbour.
    pub refmetric: u16,
    /// Our metric through this neighbour (refmetric + link cost), 65535 when retracted.
    pub metric: u16,
    /// Next hop.
    pub next_hop: String,
    /// Interface name.
    pub iface: String,
    /// The route selected for forwarding (and installed in the kernel).
    pub selected: bool,
    /// Whether it is feasible (§3.5.1).
    pub feasible: bool,
}

/// One source (feasibility distance).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceDump {
    /// Prefix.
    pub prefix: String,
    /// Router-id.
    pub router_id: String,
    /// Seqno of the feasibility distance.
    pub seqno: u16,
    /// Metric of the feasibility distance.
    pub metric: u16,
}

/// What the socket adapter saw and dropped before the router.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketCounters {
    /// Datagrams received.
    pub received: u64,
    /// Datagrams sent.
    pub sent: u64,
    /// Sends that failed.
    pub send_errors: u64,
    /// Datagrams dropped because their source was not link-local (RFC 8966 §4).
    pub not_link_local: u64,
    /// Datagrams dropped because they came in on an interface we don't run on.
    pub foreign_interface: u64,
    /// Datagrams dropped because they were larger than our receive buffer.
    pub truncated: u64,
    /// Datagrams dropped by RFC 8967 (all interfaces; details per interface).
    pub mac_dropped: u64,
    /// Kernel route changes that failed.
    pub netlink_errors: u64,
    /// Routes currently installed in the kernel.
    pub installed_routes: u64,
}

/// Errors of the dump client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DumpError {
    /// No router listening, or the connection failed.
    #[error("connecting to {addr}: {source} (is `hypha lab` running in this network namespace?)")]
    Connect {
        /// The monitor address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Reading the dump failed.
    #[error("reading the dump: {0}")]
    Read(std::io::Error),
    /// The dump is not valid JSON of the expected shape.
    #[error("bad dump: {0}")]
    Json(#[from] serde_json::Error),
}

/// Connects to a running router's monitor and reads its dump.
pub fn fetch(addr: SocketAddr) -> Result<Dump, DumpError> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|source| DumpError::Connect { addr, source })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(DumpError::Read)?;
    let mut text = String::new();
    // Bounded: a dump is a few kilobytes per hundred routes.
    (&mut s)
        .take(64 * 1024 * 1024)
        .read_to_string(&mut text)
        .map_err(DumpError::Read)?;
    Ok(serde_json::from_str(&text)?)
}

/// Writes `dump` as JSON to a monitor client (blocking, with a timeout so a stuck client can't
/// hold the router for long).
pub fn serve(dump: &Dump, mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    let json = serde_json::to_vec(dump).map_err(std::io::Error::other)?;
    stream.write_all(&json)?;
    stream.flush()
}

impl Dump {
    /// babeld-style text: one line per object.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "my-id {}", self.router_id);
        for i in &self.interfaces {
            let _ = writeln!(
                s,
                "interface {} ifindex {} {} ll {} hello {}ms update {}ms{}",
                i.name,
                i.ifindex,
                if i.up { "up" } else { "down" },
                i.link_local,
                i.hello_interval_ms,
                i.update_interval_ms,
                if i.mac.is_some() { " mac on" } else { "" }
            );
        }
        for n in &self.neighbours {
            let rtt = n.rtt_ms.map(|r| format!(" rtt {r:.3}")).unwrap_or_default();
            let _ = writeln!(
                s,
                "neighbour {} if {} reach {:04x} rxcost {} txcost {} cost {}{}",
                n.address, n.iface, n.reach, n.rxcost, n.txcost, n.cost, rtt
            );
        }
        for x in &self.xroutes {
            let _ = writeln!(s, "xroute {x}");
        }
        for r in &self.routes {
            let _ = writeln!(
                s,
                "route {} id {} seqno {} refmetric {} metric {} via {} if {}{}{}",
                r.prefix,
                r.router_id,
                r.seqno,
                r.refmetric,
                r.metric,
                r.next_hop,
                r.iface,
                if r.selected { " selected" } else { "" },
                if r.feasible { "" } else { " unfeasible" }
            );
        }
        for src in &self.sources {
            let _ = writeln!(
                s,
                "source {} id {} seqno {} metric {}",
                src.prefix, src.router_id, src.seqno, src.metric
            );
        }
        let c = &self.socket;
        let _ = writeln!(
            s,
            "socket received {} sent {} send-errors {} not-link-local {} foreign-interface {} \
             truncated {} mac-dropped {} netlink-errors {} installed {}",
            c.received,
            c.sent,
            c.send_errors,
            c.not_link_local,
            c.foreign_interface,
            c.truncated,
            c.mac_dropped,
            c.netlink_errors,
            c.installed_routes
        );
        // Only the counters that moved; `--json` has them all.
        for (name, v) in self.router_counters.iter().filter(|(_, v)| **v != 0) {
            let _ = writeln!(s, "counter {name} {v}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_text() {
        let d = Dump {
            router_id: "02:00:00:00:00:00:00:01".into(),
            neighbours: vec![NeighbourDump {
                address: "fe80::1".into(),
                iface: "eth0".into(),
                reach: 0xfff0,
                rxcost: 96,
                txcost: 96,
                cost: 96,
                rtt_ms: Some(0.25),
            }],
            routes: vec![RouteDump {
                prefix: "2001:db8::/48".into(),
                router_id: "02:00:00:00:00:00:00:02".into(),
                seqno: 3,
                refmetric: 0,
                metric: 96,
                next_hop: "fe80::1".into(),
                iface: "eth0".into(),
                selected: true,
                feasible: true,
            }],
            router_counters: [("malformed".to_string(), 2), ("quiet".to_string(), 0)].into(),
            ..Default::default()
        };
        let json = serde_json::to_string(&d).unwrap();
        let back: Dump = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d);
        let text = d.to_text();
        assert!(text.contains(
            "neighbour fe80::1 if eth0 reach fff0 rxcost 96 txcost 96 cost 96 rtt 0.250"
        ));
        assert!(text.contains("route 2001:db8::/48 id 02:00:00:00:00:00:00:02 seqno 3 refmetric 0 metric 96 via fe80::1 if eth0 selected"));
        assert!(text.contains("counter malformed 2"));
        assert!(!text.contains("quiet"));
    }

    #[test]
    fn serve_and_fetch_over_tcp() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let d = Dump {
            router_id: "x".into(),
            ..Default::default()
        };
        let d2 = d.clone();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            serve(&d2, s).unwrap();
        });
        assert_eq!(fetch(addr).unwrap(), d);
        t.join().unwrap();
        // Nobody listening: a clear error.
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = l2.local_addr().unwrap();
        drop(l2);
        assert!(matches!(fetch(dead), Err(DumpError::Connect { .. })));
    }
}
