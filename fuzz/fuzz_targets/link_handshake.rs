//! Link layer: two nodes with fixed keys shake hands for real, then the input drives them with raw
//! datagrams, mutated copies of their genuine frames (so every handshake and session state is
//! reachable) and clock jumps. Nothing may panic.
#![no_main]

use std::net::SocketAddr;
use std::time::Duration;

use hypha_controlplane::link::{LinkConfig, LinkLayer};
use hypha_proto::time::Instant;
use libfuzzer_sys::fuzz_target;

/// Delivers every queued datagram between the two nodes (bounded), recording them.
fn pump(nodes: &mut [(LinkLayer, SocketAddr); 2], now: Instant, seen: &mut Vec<Vec<u8>>) {
    let mut buf = Vec::new();
    for _ in 0..16 {
        let mut moved = false;
        for i in 0..2 {
            while let Some(to) = nodes[i].0.poll_transmit(&mut buf) {
                moved = true;
                let from = nodes[i].1;
                if seen.len() < 64 {
                    seen.push(buf.clone());
                }
                if let Some(j) = nodes.iter().position(|n| n.1 == to) {
                    let _ = nodes[j].0.handle_datagram(now, from, &buf);
                }
            }
            while nodes[i].0.poll_event().is_some() {}
        }
        if !moved {
            break;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let a: SocketAddr = ([10, 0, 0, 1], 9651).into();
    let b: SocketAddr = ([10, 0, 0, 2], 9651).into();
    let mut now = Instant::from_secs(1);
    let mut nodes = [
        (LinkLayer::new(LinkConfig::new([1; 32]), now), a),
        (LinkLayer::new(LinkConfig::new([2; 32]), now), b),
    ];
    let mut seen = Vec::new();
    nodes[0].0.connect(now, b);
    pump(&mut nodes, now, &mut seen);
    // Records: [op, len, len bytes].
    let mut rest = data;
    while let [op, len, tail @ ..] = rest {
        let (bytes, next) = tail.split_at(usize::from(*len).min(tail.len()));
        rest = next;
        let to = usize::from(op & 1);
        let from = nodes[1 - to].1;
        match op >> 1 & 3 {
            0 => {
                let _ = nodes[to].0.handle_datagram(now, from, bytes);
            }
            1 | 2 if !seen.is_empty() => {
                let pick = usize::from(bytes.first().copied().unwrap_or(0)) % seen.len();
                let mut d = seen[pick].clone();
                for (k, x) in bytes.iter().skip(1).enumerate() {
                    if let Some(slot) = d.get_mut(k) {
                        *slot ^= x;
                    }
                }
                let _ = nodes[to].0.handle_datagram(now, from, &d);
            }
            _ => {
                let ms = bytes.iter().fold(0u64, |acc, &x| (acc << 8 | u64::from(x)) % 400_000);
                now += Duration::from_millis(ms);
                for n in nodes.iter_mut() {
                    n.0.handle_timeout(now);
                }
            }
        }
        pump(&mut nodes, now, &mut seen);
    }
    for n in &nodes {
        let _ = n.0.links().count();
        let _ = n.0.poll_timeout();
    }
});
