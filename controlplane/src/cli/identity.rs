//! `hypha generate-keys` and `hypha inspect`: the node's identity.

use std::io::Write;

use hypha_proto::key::{self, KeySource};
use hypha_proto::{OverlayAddr, PublicKey};
use serde::Serialize;

use super::{CliError, GenerateKeysArgs, InspectArgs};

/// What both commands print. The JSON keys are part of the CLI's interface.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Identity {
    public_key: PublicKey,
    address: OverlayAddr,
}

impl Identity {
    fn of(public_key: PublicKey) -> Identity {
        Identity {
            public_key,
            address: public_key.address(),
        }
    }

    fn print(&self, json: bool) -> Result<(), CliError> {
        let mut out = std::io::stdout().lock();
        if json {
            serde_json::to_writer(&mut out, self)?;
            writeln!(out).map_err(CliError::Output)
        } else {
            writeln!(out, "Public key: {}", self.public_key)
                .and_then(|()| writeln!(out, "Address: {}", self.address))
                .map_err(CliError::Output)
        }
    }
}

/// `hypha generate-keys [PATH]`: writes a new key file (never over an existing one).
pub fn generate_keys(cli: &super::Cli, args: &GenerateKeysArgs) -> Result<(), CliError> {
    let path = args.path.as_deref().unwrap_or(&cli.key_file);
    let secret = key::generate(path)?;
    tracing::info!(path = %path.display(), "wrote new key file");
    Identity::of(secret.public_key()).print(cli.json)
}

/// `hypha inspect [PUBKEY_HEX]`: the given key's address, or the node's own.
pub fn inspect(cli: &super::Cli, args: &InspectArgs) -> Result<(), CliError> {
    let public_key = match args.public_key {
        Some(pk) => pk,
        None => {
            let (secret, source) = key::load_or_create(&cli.key_file)?;
            match &source {
                KeySource::Created => {
                    tracing::info!(path = %cli.key_file.display(), "created new key file");
                }
                KeySource::Loaded {
                    warning: Some(warning),
                } => tracing::warn!("{warning}"),
                KeySource::Loaded { warning: None } => {}
            }
            secret.public_key()
        }
    };
    Identity::of(public_key).print(cli.json)
}
