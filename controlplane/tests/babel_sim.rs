//! Deterministic simulations of the Babel core (issue 3): convergence on a line, a ring and a
//! random graph of 200 nodes, rerouting around a cut link, a restarted node, a partition and its
//! heal. Every route is checked by following next hops to the destination (no loops, no dead
//! ends). Convergence times are printed in virtual seconds (`cargo test -- --nocapture`).

use std::time::Duration;

use hypha_controlplane::babel::InterfaceConfig;
use hypha_controlplane::sim::{LinkConfig, Sim};

/// Short timers so that the simulations take few virtual seconds: Hello 1 s, Update 4 s.
fn iface() -> InterfaceConfig {
    InterfaceConfig::point_to_point().with_intervals(Duration::from_secs(1), Duration::from_secs(4))
}

const CHECK: Duration = Duration::from_millis(100);

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
