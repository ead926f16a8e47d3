//! Integration tests of `hypha run --no-dataplane`: real daemons in network namespaces, connected
//! by veth links, queried through `hypha routes --json` / `hypha peers --json` run inside each
//! namespace (every namespace has its own 127.0.0.1, so every node uses the default API address).
//!
//! Topology of the main test (links are `TestNet::link(x, y)`; `y` lists `x` in `--peers`):
//!
//! ```text
//!   a --- b --- c --- d --- e --- f (no network key)
//!          \_________/
//! ```
//!
//! Loop-freedom is checked the way the issue asks: from every node, follow the selected route's
//! next hop (an underlay endpoint, mapped back to the node that owns it) until the destination is
//! reached; a repeated node or a missing route is a failure.
//!
//! Needs root (network namespaces). Run with `cargo test -p hypha-controlplane --test overlay_five_nodes`.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::Overlay;
use hypha_controlplane::api::{ConnectionState, PeerInfo, RouteInfo, Stats};
use hypha_testnet::{wait_until, Signal};

/// Nodes to run `hypha run --no-dataplane`, and a network key some of them get.
fn overlay(test: &str, names: &[&str]) -> Overlay {
    let mut o = Overlay::new(test, names);
    o.dataplane = false;
    o.rust_log = "hypha_controlplane=debug";
    std::fs::write(network_key(&o), [0x5au8; 32]).expect("write network key");
    o
}

fn network_key(o: &Overlay) -> std::path::PathBuf {
    o.net.log_dir().join("network.key")
}

/// The five-node tests' own helpers.
impl Overlay {
    /// Starts `hypha run --no-dataplane` on `name`.
    fn start_node(&mut self, name: &str, with_network_key: bool) {
        let mut more: Vec<OsString> = Vec::new();
        if with_network_key {
            more.push("--network-key".into());
            more.push(network_key(self).into());
        }
        self.start_with(name, &more);
    }

    fn routes(&self, name: &str) -> Option<Vec<RouteInfo>> {
        self.cli_json(name, &["routes"])
    }

    fn peers(&self, name: &str) -> Option<Vec<PeerInfo>> {
        self.cli_json(name, &["peers"])
    }

    fn stats(&self, name: &str) -> Option<Stats> {
        self.get(name, "/api/v1/admin/stats")
    }

    /// Waits for every named node's API and records its /64.
    fn learn_subnets(&mut self, names: &[&str]) {
        for n in names {
            self.learn(n);
        }
    }

    /// Follows selected next hops from `from` to `to` across the nodes' tables.
    fn path(
        &self,
        tables: &BTreeMap<String, Vec<RouteInfo>>,
        from: &str,
        to: &str,
    ) -> Result<Vec<String>, String> {
        let subnet = &self.subnets[to];
        let mut path = vec![from.to_string()];
        let mut cur = from.to_string();
        while cur != to {
            let route = tables
                .get(&cur)
                .and_then(|t| t.iter().find(|r| &r.subnet == subnet))
                .ok_or_else(|| format!("{cur} has no route to {to} ({subnet}); path {path:?}"))?;
            let hop = route
                .next_hop
                .strip_prefix("udp://")
                .and_then(|s| s.parse::<SocketAddr>().ok())
                .and_then(|e| self.endpoints.get(&e))
                .ok_or_else(|| format!("{cur}: unknown next hop {:?}", route.next_hop))?;
            if path.contains(hop) {
                path.push(hop.clone());
                return Err(format!("loop from {from} to {to}: {path:?}"));
            }
            path.push(hop.clone());
            cur = hop.clone();
        }
        Ok(path)
    }

    fn tables(&self, names: &[&str]) -> Option<BTreeMap<String, Vec<RouteInfo>>> {
        names
            .iter()
            .map(|n| self.routes(n).map(|r| (n.to_string(), r)))
            .collect()
    }

    /// All paths between `names`, or the first problem.
    fn all_paths(&self, names: &[&str]) -> Result<BTreeMap<(String, String), Vec<String>>, String> {
        let tables = self
            .tables(names)
            .ok_or("a node's routes could not be read")?;
        let mut out = BTreeMap::new();
        for t in names {
            let own = &self.subnets[*t];
            let table = &tables[*t];
            let others = table.iter().filter(|r| &r.subnet != own).count();
            if others != names.len() - 1 {
                return Err(format!("{t} has {others} routes to others: {table:?}"));
            }
            for f in names {
                if f != t {
                    out.insert((t.to_string(), f.to_string()), self.path(&tables, t, f)?);
                }
            }
        }
        Ok(out)
    }

    /// Waits until `check` passes on the current paths; returns the time it took.
    fn converge(
        &self,
        names: &[&str],
        timeout: Duration,
        check: impl Fn(&BTreeMap<(String, String), Vec<String>>) -> Result<(), String>,
    ) -> Result<Duration, String> {
        let start = Instant::now();
        let mut last = String::new();
        let done = wait_until(timeout, Duration::from_millis(100), || {
            match self.all_paths(names).and_then(|p| check(&p)) {
                Ok(()) => true,
                Err(e) => {
                    last = e;
                    false
                }
            }
        });
        match done {
            Ok(()) => Ok(start.elapsed()),
            Err(_) => Err(last),
        }
    }
}

fn uses(path: &[String], x: &str, y: &str) -> bool {
    path.windows(2)
        .any(|w| (w[0] == x && w[1] == y) || (w[0] == y && w[1] == x))
}

fn counter(stats: &Stats, group: &str, needle: &str) -> u64 {
    stats
        .get(group)
        .map(|g| {
            g.iter()
                .filter(|(k, _)| k.contains(needle))
                .map(|(_, v)| *v)
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn five_nodes_converge_reroute_and_refuse_a_node_without_the_network_key() {
    let five = ["a", "b", "c", "d", "e"];
    let mut o = overlay("ovl5", &["a", "b", "c", "d", "e", "f"]);
    o.link("a", "b");
    let bc = o.link("b", "c");
    o.link("c", "d");
    o.link("d", "e");
    o.link("b", "d");
    o.link("e", "f");

    let start = Instant::now();
    for n in five {
        o.start_node(n, true);
    }
    o.start_node("f", false);
    o.learn_subnets(&["a", "b", "c", "d", "e", "f"]);

    // Every node lists the other four /64s with loop-free next hops within 10 s of start.
    let budget = Duration::from_secs(10).saturating_sub(start.elapsed());
    o.converge(&five, budget, |_| Ok(())).unwrap_or_else(|e| {
        panic!(
            "no convergence within 10 s of start: {e}\nlog of b:\n{}",
            o.log("b")
        )
    });
    eprintln!("converged {:.2?} after start", start.elapsed());

    // The keyless node is refused: no alive peer, no routes, and e counted failed handshakes.
    let f_peers = o.peers("f").expect("f's peers");
    assert!(!f_peers.is_empty(), "f should list its configured peer");
    assert!(
        f_peers
            .iter()
            .all(|p| p.connection_state != ConnectionState::Alive),
        "f must not have a live link: {f_peers:?}"
    );
    let f_routes = o.routes("f").expect("f's routes");
    let f_own = &o.subnets["f"];
    assert!(
        f_routes.iter().all(|r| &r.subnet == f_own),
        "f must learn no routes: {f_routes:?}"
    );
    // With a network key, message 1 carries a tag, so e drops f's LINK_INITs as malformed (or
    // fails them later); f never gets an answer and times out.
    // f retries with backoff, so its next attempt may still be on its way: wait for e to count it.
    let mut e_stats = None;
    let refused = wait_until(Duration::from_secs(15), Duration::from_millis(200), || {
        let Some(s) = o.stats("e") else { return false };
        let n = counter(&s, "link", "malformed") + counter(&s, "link", "handshakes_failed");
        e_stats = Some(s);
        n > 0
    });
    assert!(
        refused.is_ok(),
        "e should count refused handshakes: {e_stats:?}"
    );

    for n in five {
        let t = o.routes(n).expect("routes");
        assert!(t.iter().all(|r| &r.subnet != f_own), "{n} learnt f's /64");
    }

    // Cut b–c: a→c must go a-b-d-c, and no path may use b–c, within 5 s.
    let paths = o.all_paths(&five).expect("paths before the cut");
    eprintln!(
        "before the cut: a→c {:?}, a→e {:?}",
        paths[&("a".into(), "c".into())],
        paths[&("a".into(), "e".into())]
    );
    bc.set_up(false).expect("cut b–c");
    let took = o
        .converge(&five, Duration::from_secs(5), |p| {
            for (k, path) in p {
                if uses(path, "b", "c") {
                    return Err(format!("{k:?} still uses b–c: {path:?}"));
                }
            }
            let ae = &p[&("a".to_string(), "e".to_string())];
            if !uses(ae, "b", "d") {
                return Err(format!("a→e does not use b–d: {ae:?}"));
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("no reroute within 5 s of cutting b–c: {e}"));
    // f's own handshake attempts give up after the handshake timeout and are retried.
    let mut f_stats = None;
    wait_until(Duration::from_secs(15), Duration::from_millis(200), || {
        f_stats = o.stats("f");
        f_stats.as_ref().is_some_and(|s| {
            counter(s, "link", "handshake_timeouts") + counter(s, "link", "handshakes_failed") > 0
        })
    })
    .unwrap_or_else(|_| panic!("f should count failed handshakes: {f_stats:?}"));
    assert!(
        o.peers("f")
            .expect("f's peers")
            .iter()
            .all(|p| p.connection_state != ConnectionState::Alive),
        "f never gets a live link"
    );
    let p = o.all_paths(&five).expect("paths after the cut");
    eprintln!(
        "rerouted {took:.2?} after cutting b–c: a→c {:?}, a→e {:?}",
        p[&("a".into(), "c".into())],
        p[&("a".into(), "e".into())]
    );
}

#[test]
fn a_killed_peer_restarted_with_its_key_is_reconnected() {
    let three = ["a", "b", "c"];
    let mut o = overlay("ovlrs", &three);
    o.link("a", "b");
    // c dials b over IPv6 (`udp://[fd00:..]:9651`), exercising the dual-stack socket.
    o.link_over("b", "c", true);
    for n in three {
        o.start_node(n, false);
    }
    o.learn_subnets(&three);
    let took = o
        .converge(&three, Duration::from_secs(10), |_| Ok(()))
        .unwrap_or_else(|e| panic!("no convergence: {e}"));
    eprintln!("3-node line converged in {took:.2?}");

    // SIGKILL b: no clean shutdown, its neighbours must notice on their own.
    let b = o.procs.remove("b").expect("b runs");
    b.kill(Signal::SIGKILL).expect("kill b");
    b.wait_exit(Duration::from_secs(5)).expect("b exits");
    let b_subnet = o.subnets["b"].clone();
    wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        o.routes("a")
            .is_some_and(|r| !r.iter().any(|r| r.subnet == b_subnet))
            && o.peers("c").is_some_and(|p| {
                p.iter()
                    .all(|p| p.connection_state != ConnectionState::Alive)
            })
    })
    .unwrap_or_else(|_| panic!("a still routes to the dead b: {:?}", o.routes("a")));

    // Restart b with the same key: the same /64 comes back and every route returns.
    let restart = Instant::now();
    o.start_node("b", false);
    o.learn_subnets(&["b"]);
    assert_eq!(o.subnets["b"], b_subnet, "same key, same /64");
    let took = o
        .converge(&three, Duration::from_secs(30), |_| Ok(()))
        .unwrap_or_else(|e| panic!("routes did not come back: {e}\nlog of c:\n{}", o.log("c")));
    let c_peers = o.peers("c").expect("c's peers");
    assert!(
        c_peers
            .iter()
            .any(|p| p.connection_state == ConnectionState::Alive),
        "c re-handshaked with b: {c_peers:?}"
    );
    eprintln!(
        "routes back {took:.2?} after convergence check began, {:.2?} after the restart",
        restart.elapsed()
    );
}
