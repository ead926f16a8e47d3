//! `hypha`: the control-plane daemon and its command line.
//!
//! `main` parses the command line, starts logging, runs one [`cli::Command`] and turns its result into
//! an exit code: 0 on success, 2 for bad input on the command line, 1 for failures while running.

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use cli::{Cli, CliError, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with code 0; errors to stderr with code 2.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(cli::EXIT_USAGE));
        }
    };
    init_logging();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not through tracing: a failure must show even with RUST_LOG=off.
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(cli: &Cli) -> Result<(), CliError> {
    match &cli.command {
        Command::GenerateKeys(args) => cli::identity::generate_keys(cli, args),
        Command::Inspect(args) => cli::identity::inspect(cli, args),
        Command::Lab(args) => Ok(hypha_controlplane::lab::cli::run(args, cli.json)?),
    }
}

/// Logs go to stderr (stdout is for results), filtered by `RUST_LOG`, `info` by default.
fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .init();
}
