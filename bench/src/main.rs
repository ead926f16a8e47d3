//! `hypha-bench`: benchmark commands that are not criterion micro-benchmarks.
//!
//! `hypha-bench system` (as root) compares Hypha's dataplane with the bare veth path, kernel
//! VXLAN and boringtun in network namespaces and writes a Markdown report and an SVG chart; see
//! `hypha_bench::system`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hypha_bench::system::{self, Options};

#[derive(Debug, Parser)]
#[command(name = "hypha-bench", version, about = "Hypha benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Throughput, loss, RTT and CPU per GB of veth, VXLAN, boringtun and hypha-dp in network
    /// namespaces (needs root, iperf3, ping; boringtun-cli and wg are optional).
    System {
        /// A few seconds per system and one repeat (CI).
        #[arg(long)]
        quick: bool,
        /// Markdown report.
        #[arg(long, default_value = "bench/RESULTS-system.md")]
        out: PathBuf,
        /// SVG chart.
        #[arg(long, default_value = "bench/system.svg")]
        svg: PathBuf,
        /// Repeats per measurement (median reported); --quick makes it 1.
        #[arg(long, default_value_t = 3)]
        repeat: u32,
        /// Seconds per iperf3 run; --quick makes it 2.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// UDP rate for the loss measurement (iperf3 -b syntax).
        #[arg(long, default_value = "300M")]
        udp_rate: String,
        /// Pings (every 10 ms) per idle RTT measurement; --quick makes it 100.
        #[arg(long, default_value_t = 500)]
        pings: u32,
        /// The hypha-dp binary (default: next to this executable).
        #[arg(long, value_name = "PATH")]
        hypha_dp: Option<PathBuf>,
        /// Only systems whose key contains this (veth, vxlan, boringtun, hypha-1w, transit, ...);
        /// repeatable.
        #[arg(long)]
        only: Vec<String>,
        /// Another `--xdp` mode for the transit node b (off, generic, driver, tc), measured as
        /// one more row beside `--xdp auto`; repeatable.
        #[arg(long, value_name = "MODE", value_parser = ["off", "generic", "driver", "tc"])]
        xdp_extra: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::System {
            quick,
            out,
            svg,
            repeat,
            seconds,
            udp_rate,
            pings,
            hypha_dp,
            only,
            xdp_extra,
        } => {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                eprintln!("hypha-bench system: needs root (network namespaces)");
                return ExitCode::from(2);
            }
            for tool in ["iperf3", "ping", "ip", "timeout", "ss"] {
                if !system::setup::in_path(tool) {
                    eprintln!("hypha-bench system: `{tool}` is required but not installed");
                    return ExitCode::from(2);
                }
            }
            let opts = Options {
                quick,
                out,
                svg,
                repeat: if quick { 1 } else { repeat.max(1) },
                seconds: if quick { 2 } else { seconds.max(2) },
                udp_rate,
                pings: if quick { 100 } else { pings.max(10) },
                hypha_dp,
                only,
                xdp_extra: xdp_extra
                    .iter()
                    .filter_map(|m| {
                        ["off", "generic", "driver", "tc"]
                            .into_iter()
                            .find(|k| k == m)
                    })
                    .collect(),
            };
            match system::run(opts) {
                Ok(r) => {
                    eprintln!(
                        "hypha-bench: {} systems measured, {} skipped, in {:.0} s; wrote {} and {}",
                        r.rows.len(),
                        r.skipped.len(),
                        r.elapsed.as_secs_f64(),
                        r.options.out.display(),
                        r.options.svg.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("hypha-bench system: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
