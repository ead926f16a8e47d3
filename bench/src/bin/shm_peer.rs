//! The dataplane side of the `shm_ring` benchmark: drains the down ring in batches and answers
//! each `Resync::End` marker with the same marker on the up ring, so the benchmark knows when
//! everything it pushed has been consumed. Started by the benchmark with the region inherited.

use std::process::ExitCode;
use std::time::Duration;

use hypha_proto::shm::{Record, Region, RegionFds, Resync, Role};

/// Environment variable: how many records to drain per batch.
const BATCH_ENV: &str = "HYPHA_BENCH_BATCH";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hypha-bench-shm-peer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let batch: usize = std::env::var(BATCH_ENV)
        .map_err(|_| format!("{BATCH_ENV} not set"))?
        .parse()?;
    // SAFETY: the benchmark passed these descriptors to us; nothing else here owns them.
    let region = Region::attach(unsafe { RegionFds::from_env() }?)?;
    let (mut up, mut down) = region.split(Role::Dataplane)?;
    let mut ack = None;
    let mut bad = 0u64;
    loop {
        let n = down.drain(batch, |r| match r {
            Ok(r) => {
                if let Record::Resync(Resync::End { generation }) = r.record {
                    ack = Some(generation);
                }
            }
            Err(_) => bad += 1,
        })?;
        if bad > 0 {
            return Err(format!("{bad} undecodable records").into());
        }
        if let Some(generation) = ack.take() {
            up.push(
                &Record::Resync(Resync::End { generation }),
                Duration::from_secs(10),
            )?;
        }
        if n == 0 {
            // Exits when the benchmark is gone (it kills us) or silent for a minute.
            if !down.wait(Duration::from_secs(60))? {
                return Ok(());
            }
        }
    }
}
