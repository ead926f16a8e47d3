//! Deterministic simulations of the Babel core (issue 3): convergence on a line, a ring and a
//! random graph of 200 nodes, rerouting around a cut link, a restarted node, a partition and its
//! heal. Every route is checked by following next hops to the destination (no loops, no dead
//! ends). Convergence times are printed in virtual seconds (`cargo test -- --nocapture`).

use std::time::Duration;

use hypha_controlplane::babel::InterfaceConfig;
use hypha_controlplane::sim::{LinkConfig, Sim};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Short timers so that the simulations take few virtual seconds: Hello 1 s, Update 4 s.
fn iface() -> InterfaceConfig {
    InterfaceConfig::point_to_point().with_intervals(Duration::from_secs(1), Duration::from_secs(4))
}

const CHECK: Duration = Duration::from_millis(20);

fn converge(sim: &mut Sim, what: &str, timeout: Duration) -> Duration {
    match sim.drive_until(timeout, CHECK, Sim::converged) {
        Some(t) => {
            println!(
                "[seed {}] {what}: converged in {:.2} virtual s ({} packets delivered, {} lost)",
                sim.seed,
                t.as_secs_f64(),
                sim.delivered,
                sim.lost
            );
            t
        }
        None => panic!(
            "[seed {}] {what}: not converged after {timeout:?}: {}",
            sim.seed,
            sim.check_routes().unwrap_err()
        ),
    }
}

fn line(seed: u64, n: usize) -> Sim {
    let mut sim = Sim::new(seed, iface());
    for _ in 0..n {
        sim.add_node();
    }
    for i in 1..n {
        sim.connect(i - 1, i, LinkConfig::default());
    }
    sim
}

#[test]
fn line_of_10_converges() {
    let mut sim = line(1, 10);
    converge(&mut sim, "line of 10", Duration::from_secs(30));
    // Stays converged.
    sim.drive(Duration::from_secs(20));
    sim.check_routes().unwrap();
    assert_eq!(sim.trace(0, 9).unwrap().len(), 10);
}

#[test]
fn line_of_10_with_loss_converges() {
    let mut sim = Sim::new(2, iface());
    for _ in 0..10 {
        sim.add_node();
    }
    for i in 1..10 {
        sim.connect(
            i - 1,
            i,
            LinkConfig {
                delay: Duration::from_millis(10),
                loss: 0.1,
            },
        );
    }
    converge(&mut sim, "line of 10, 10% loss", Duration::from_secs(60));
}

fn ring(seed: u64, n: usize) -> Sim {
    let mut sim = line(seed, n);
    sim.connect(n - 1, 0, LinkConfig::default());
    sim
}

#[test]
fn ring_of_20_converges_and_reroutes_around_a_cut() {
    let mut sim = ring(3, 20);
    converge(&mut sim, "ring of 20", Duration::from_secs(30));
    // 0 → 5 goes the short way, through 1..4.
    assert_eq!(sim.trace(0, 5).unwrap(), vec![0, 1, 2, 3, 4, 5]);
    // Cut 2–3: 0 → 5 must go the long way round.
    sim.set_link_up(2, false);
    converge(
        &mut sim,
        "ring of 20 after cutting link 2-3",
        Duration::from_secs(30),
    );
    let path = sim.trace(0, 5).unwrap();
    assert_eq!(path.len(), 16, "{path:?}");
    assert_eq!(path[1], 19);
    // Heal: back to the short way (hysteresis allows it: 5 hops against 15).
    sim.set_link_up(2, true);
    let t = sim.drive_until(Duration::from_secs(60), CHECK, |s| {
        s.converged() && s.trace(0, 5).is_ok_and(|p| p.len() == 6)
    });
    match t {
        Some(t) => println!(
            "[seed 3] ring of 20 after healing: short path back in {:.2} virtual s",
            t.as_secs_f64()
        ),
        None => panic!("short path not restored: {:?}", sim.trace(0, 5)),
    }
}

/// A random connected graph: a random spanning tree plus `extra` random links, delays 1–20 ms.
fn random_graph(seed: u64, n: usize, extra: usize) -> Sim {
    let mut sim = Sim::new(seed, iface());
    let mut rng = SmallRng::seed_from_u64(seed);
    for _ in 0..n {
        sim.add_node();
    }
    let mut edges = std::collections::BTreeSet::new();
    let mut link = |sim: &mut Sim, a: usize, b: usize, rng: &mut SmallRng| {
        let key = (a.min(b), a.max(b));
        if a != b && edges.insert(key) {
            let delay = Duration::from_millis(rng.random_range(1..=20));
            sim.connect(a, b, LinkConfig { delay, loss: 0.0 });
        }
    };
    for i in 1..n {
        let j = rng.random_range(0..i);
        link(&mut sim, i, j, &mut rng);
    }
    for _ in 0..extra {
        let (a, b) = (rng.random_range(0..n), rng.random_range(0..n));
        link(&mut sim, a, b, &mut rng);
    }
    sim
}

#[test]
fn random_graph_of_200_converges() {
    let mut sim = random_graph(4, 200, 200);
    println!("200 nodes, {} links", sim.links.len());
    converge(&mut sim, "random graph of 200", Duration::from_secs(60));
    // Still right after a full round of periodic Updates.
    sim.drive(Duration::from_secs(5));
    sim.check_routes().unwrap();
    let c = sim.nodes[0].router.counters().clone();
    println!(
        "node 0 after {:.0} virtual s: {} routes, {:?}",
        sim.now().as_micros() as f64 / 1e6,
        sim.nodes[0].router.routes().count(),
        c
    );
}

#[test]
fn restarted_node_with_new_router_id_is_reachable_again() {
    let mut sim = ring(5, 12);
    converge(&mut sim, "ring of 12", Duration::from_secs(30));
    let old_id = sim.nodes[6].router.router_id();
    sim.kill(6);
    sim.drive(Duration::from_secs(5));
    sim.restart(6);
    let new_id = sim.nodes[6].router.router_id();
    assert_ne!(old_id, new_id, "a restart draws a new router-id");
    assert_eq!(old_id.0[..4], new_id.0[..4], "the stable part stays");
    let prefix = sim.nodes[6].prefix;
    let t = sim.drive_until(Duration::from_secs(60), CHECK, |s| {
        s.converged()
            && s.nodes.iter().enumerate().all(|(i, n)| {
                i == 6
                    || n.router
                        .selected_route(&prefix)
                        .is_some_and(|r| r.router_id == new_id)
            })
    });
    match t {
        Some(t) => println!(
            "[seed 5] restarted node reachable through its new router-id after {:.2} virtual s",
            t.as_secs_f64()
        ),
        None => panic!("not reachable again: {:?}", sim.check_routes()),
    }
}

#[test]
fn partition_and_heal() {
    // Two random halves of 30 joined by two bridges.
    let mut sim = random_graph(6, 30, 20);
    let first = sim.links.len();
    let mut a = random_graph(7, 30, 20);
    // Graft the second graph onto the first.
    let offset = sim.nodes.len();
    for _ in 0..a.nodes.len() {
        sim.add_node();
    }
    for l in a.links.drain(..) {
        sim.connect(l.ends[0].0 + offset, l.ends[1].0 + offset, l.cfg);
    }
    let b1 = sim.connect(3, offset + 4, LinkConfig::default());
    let b2 = sim.connect(17, offset + 20, LinkConfig::default());
    assert!(sim.links.len() > first);
    converge(&mut sim, "60 nodes, two halves", Duration::from_secs(60));
    sim.set_link_up(b1, false);
    sim.set_link_up(b2, false);
    let t = converge(
        &mut sim,
        "partitioned (no routes across)",
        Duration::from_secs(120),
    );
    println!(
        "partition: stale routes gone after {:.2} virtual s",
        t.as_secs_f64()
    );
    sim.set_link_up(b1, true);
    sim.set_link_up(b2, true);
    converge(
        &mut sim,
        "healed (the two halves merged)",
        Duration::from_secs(60),
    );
}

#[test]
fn same_seed_same_run() {
    let run = |seed| {
        let mut sim = random_graph(seed, 30, 15);
        sim.drive(Duration::from_secs(5));
        (sim.delivered, sim.lost, sim.nodes[7].fib.clone())
    };
    assert_eq!(run(11), run(11));
    assert_ne!(run(11).0, run(12).0);
}
