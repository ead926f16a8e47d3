//! The `hypha` command line: options, subcommands and how their failures map to exit codes.
//!
//! Each subcommand is one variant of [`Command`] with its implementation in a submodule, so adding
//! `run`, `peers` or `routes` means one variant, one module and one arm in `main`'s dispatch.

pub mod demo;
pub mod identity;
pub mod message;

use std::io;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use hypha_proto::key::KeyFileError;
use hypha_proto::PublicKey;

/// Hypha: an encrypted IPv6 overlay network.
#[derive(Debug, Parser)]
#[command(name = "hypha", version, propagate_version = true)]
pub struct Cli {
    /// The node's key file: 32 raw bytes of x25519 secret key (Mycelium's format). It is created with
    /// mode 0600 when a command needs the node's key and the file is missing; an existing file is never
    /// replaced.
    #[arg(
        short = 'k',
        long = "key-file",
        value_name = "PATH",
        default_value = "priv_key.bin",
        global = true
    )]
    pub key_file: PathBuf,

    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a new key file and print its public key and overlay address. Never overwrites a file.
    GenerateKeys(GenerateKeysArgs),
    /// Print a public key and the overlay address derived from it (by default the node's own, from
    /// the key file, which is created if missing).
    Inspect(InspectArgs),
    /// Send, receive and track messages through the running node's API.
    Message(message::MessageArgs),
    /// Run the node: the control plane, which starts and supervises the dataplane (hypha-dp);
    /// with --no-dataplane routing only.
    Run(Box<hypha_controlplane::config::RunArgs>),
    /// Show the running node's peers (`list`, the default), or add or remove one at run time.
    Peers(hypha_controlplane::client::PeersArgs),
    /// Show the running node's routes (`selected`, the default, or `fallback`).
    Routes(hypha_controlplane::client::RoutesArgs),
    /// Show the running node's counters (control plane and dataplane, per subsystem and reason).
    Stats(hypha_controlplane::client::StatsArgs),
    /// Try Hypha on this machine (root): nodes in namespaces, ping, a message, a reroute.
    ///
    /// Builds N nodes (default 4), each in its own network namespace (`hd<pid>-0-a`, `-b`, ...)
    /// with its own key, linked by veth pairs in a ring (two parallel links for 2 nodes, chords
    /// from 7 on) so that any single link can fail. Starts the real `hypha run` (and its
    /// `hypha-dp`, which must sit next to this binary) in each, with 200 ms hellos, then:
    ///
    ///   1. waits until every node has selected a route to every other node, and says how long
    ///      that took;
    ///   2. pings the farthest node's overlay address from node a over the TUN devices
    ///      (`ping -6`), showing the path and the round-trip time;
    ///   3. sends a message from a to that node through the message bus (POST /api/v1/messages
    ///      with reply_timeout) and answers it on the receiver (GET /api/v1/messages, POST
    ///      /api/v1/messages/reply/ID), timing the round trip;
    ///   4. cuts the first link of the current path and times until a's route has moved and
    ///      ping answers again;
    ///   5. prints a summary and removes every process, namespace and link it created.
    ///
    /// Each step prints one result line (a spinner shows progress on a terminal); --json prints
    /// only a machine-readable summary on stdout (the step lines then go to stderr). Ctrl-C or
    /// SIGTERM at any point stops the nodes and removes everything. Needs root, iproute2 and
    /// iputils-ping. Exit code: 0 when every step worked, 1 when one failed, 2 when the demo could
    /// not start, 128 + the signal number when interrupted.
    #[command(verbatim_doc_comment)]
    Demo(demo::DemoArgs),
    /// Lab mode: run the Babel core alone as a standard RFC 8966 router on real interfaces
    /// (interoperable with babeld and BIRD), or `lab dump` a running one. See docs/lab.md.
    Lab(hypha_controlplane::lab::cli::LabArgs),
}

/// Arguments of `hypha generate-keys`.
#[derive(Debug, Args)]
pub struct GenerateKeysArgs {
    /// Where to write the new key file [default: the --key-file path].
    #[arg(value_name = "PATH")]
    pub path: Option<PathBuf>,
}

/// Arguments of `hypha inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A public key to inspect: 64 hex digits. Without it, the node's own key from --key-file.
    #[arg(value_name = "PUBKEY_HEX", value_parser = parse_public_key)]
    pub public_key: Option<PublicKey>,
}

fn parse_public_key(s: &str) -> Result<PublicKey, hypha_proto::key::ParseKeyError> {
    s.parse()
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The key file could not be read, created or written.
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    /// Writing the result to stdout failed.
    #[error("cannot write to stdout: {0}")]
    Output(#[source] io::Error),
    /// JSON output could not be produced.
    #[error("cannot encode JSON output: {0}")]
    Json(#[from] serde_json::Error),
    /// The node's API could not be reached or refused the request.
    #[error("{0}")]
    Api(String),
    /// `hypha lab` failed.
    #[error(transparent)]
    Lab(#[from] hypha_controlplane::lab::cli::LabCliError),
}

impl CliError {
    /// The process exit code: 2 for bad input on the command line (clap reports those itself),
    /// 1 for everything that went wrong while running.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::KeyFile(_) | CliError::Output(_) | CliError::Json(_) | CliError::Api(_) => 1,
            CliError::Lab(e) => e.exit_code(),
        }
    }
}

/// Exit code for a command line that could not be parsed (clap's convention).
pub const EXIT_USAGE: u8 = 2;
