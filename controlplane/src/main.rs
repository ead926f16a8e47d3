//! `hypha`: the control-plane daemon and its command line.
//!
//! `main` parses the command line, starts logging, runs one [`cli::Command`] and turns its result into
//! an exit code: 0 on success, 2 for bad input on the command line, 1 for failures while running.

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use tracing_subscriber::EnvFilter;

use cli::{Cli, CliError, Command};

fn main() -> ExitCode {
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            // Help and version go to stdout with code 0; errors to stderr with code 2.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(cli::EXIT_USAGE));
        }
    };
    init_logging();
    match &cli.command {
        Command::Run(args) => {
            let mut args = (**args).clone();
            // `-k` is global with a default; only a key file given on the command line overrides
            // the config file's.
            if matches.value_source("key_file") == Some(ValueSource::CommandLine) {
                args.key_file = Some(cli.key_file.clone());
            }
            return hypha_controlplane::daemon::run(&args);
        }
        Command::Peers(args) => return hypha_controlplane::client::peers(args, cli.json),
        Command::Routes(args) => return hypha_controlplane::client::routes(args, cli.json),
        Command::Stats(args) => return hypha_controlplane::client::stats(args, cli.json),
        Command::Demo(args) => return cli::demo::run(args, cli.json),
        Command::GenerateKeys(_) | Command::Inspect(_) | Command::Message(_) | Command::Lab(_) => {}
    }
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
        Command::Message(args) => cli::message::run(cli, args),
        Command::Lab(args) => Ok(hypha_controlplane::lab::cli::run(args, cli.json)?),
        // Dispatched in `main`: they report their own errors and exit codes.
        Command::Run(_)
        | Command::Peers(_)
        | Command::Routes(_)
        | Command::Stats(_)
        | Command::Demo(_) => Ok(()),
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
