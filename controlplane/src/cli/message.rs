//! `hypha message send|receive|status`: the message bus through the running node's HTTP API, so
//! the CLI is just another API client (what works here works for scripts and Mycelium's tools).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use clap::{Args, Subcommand};
use hypha_controlplane::bus::client::{request, Response};
use serde_json::{json, Value};

use super::CliError;

/// Arguments of `hypha message`.
#[derive(Debug, Args)]
pub struct MessageArgs {
    /// The node's API address.
    #[arg(
        long,
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:8989",
        global = true
    )]
    pub api_addr: SocketAddr,
    /// What to do.
    #[command(subcommand)]
    pub command: MessageCommand,
}

/// `hypha message` subcommands.
#[derive(Debug, Subcommand)]
pub enum MessageCommand {
    /// Send a message; prints its id (or, with --wait, the reply).
    Send {
        /// Destination: an overlay IPv6 address or a public key (64 hex digits).
        dest: String,
        /// Topic (UTF-8 text).
        #[arg(long)]
        topic: Option<String>,
        /// Wait for the receiver's reply and print it.
        #[arg(long)]
        wait: bool,
        /// With --wait: seconds to wait for the reply.
        #[arg(long, default_value_t = 60, requires = "wait")]
        timeout: u64,
        /// Read the payload from this file.
        #[arg(long, conflicts_with = "payload")]
        file: Option<PathBuf>,
        /// The payload (UTF-8 text).
        #[arg(required_unless_present = "file")]
        payload: Option<String>,
    },
    /// Take the oldest received message (waiting up to --timeout seconds).
    Receive {
        /// Only messages with this topic.
        #[arg(long)]
        topic: Option<String>,
        /// Seconds to wait for a message.
        #[arg(long, default_value_t = 0)]
        timeout: u64,
        /// Write only the payload bytes, unmodified.
        #[arg(long)]
        raw: bool,
    },
    /// Show where a message stands.
    Status {
        /// The message id (16 hex digits).
        id: String,
    },
}

fn api(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    wait: u64,
) -> Result<Response, CliError> {
    let body = body.map(Value::to_string);
    request(
        addr,
        method,
        path,
        body.as_deref().map(str::as_bytes),
        Duration::from_secs(wait + 10),
    )
    .map_err(|e| CliError::Api(e.to_string()))
}

fn api_error(r: &Response) -> CliError {
    let msg = serde_json::from_slice::<Value>(&r.body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&r.body).into_owned());
    CliError::Api(format!("the node answered {}: {msg}", r.status))
}

fn parse_json(r: &Response) -> Result<Value, CliError> {
    serde_json::from_slice(&r.body).map_err(CliError::Json)
}

fn out(s: &str) -> Result<(), CliError> {
    writeln!(std::io::stdout(), "{s}").map_err(CliError::Output)
}

/// Prints an inbound message: JSON as the API gave it, raw payload bytes, or a text summary.
fn print_message(m: &Value, json_out: bool, raw: bool) -> Result<(), CliError> {
    let payload = B64
        .decode(m["payload"].as_str().unwrap_or_default())
        .map_err(|_| CliError::Api("the node sent a payload that is not base64".into()))?;
    if json_out {
        return out(&m.to_string());
    }
    if raw {
        return std::io::stdout()
            .write_all(&payload)
            .map_err(CliError::Output);
    }
    let topic = m["topic"]
        .as_str()
        .and_then(|t| B64.decode(t).ok())
        .map(|t| String::from_utf8_lossy(&t).into_owned());
    out(&format!(
        "message {} from {}{}",
        m["id"].as_str().unwrap_or("?"),
        m["srcIp"].as_str().unwrap_or("?"),
        topic.map(|t| format!(" topic {t:?}")).unwrap_or_default()
    ))?;
    out(&String::from_utf8_lossy(&payload))
}

/// Runs `hypha message ...`.
pub fn run(cli: &super::Cli, args: &MessageArgs) -> Result<(), CliError> {
    let addr = args.api_addr;
    match &args.command {
        MessageCommand::Send {
            dest,
            topic,
            wait,
            timeout,
            file,
            payload,
        } => {
            let bytes = match (file, payload) {
                (Some(f), _) => std::fs::read(f)
                    .map_err(|e| CliError::Api(format!("cannot read {}: {e}", f.display())))?,
                (None, Some(p)) => p.as_bytes().to_vec(),
                (None, None) => Vec::new(),
            };
            let dst = if dest.parse::<std::net::Ipv6Addr>().is_ok() {
                json!({ "ip": dest })
            } else {
                json!({ "pk": dest })
            };
            let mut body = json!({ "dst": dst, "payload": B64.encode(&bytes) });
            if let Some(t) = topic {
                body["topic"] = json!(B64.encode(t));
            }
            let path = if *wait {
                format!("/api/v1/messages?reply_timeout={timeout}")
            } else {
                "/api/v1/messages".to_owned()
            };
            let r = api(
                addr,
                "POST",
                &path,
                Some(&body),
                if *wait { *timeout } else { 0 },
            )?;
            match r.status {
                201 => {
                    let v = parse_json(&r)?;
                    if cli.json {
                        out(&v.to_string())
                    } else {
                        out(v["id"].as_str().unwrap_or("?"))
                    }
                }
                200 => print_message(&parse_json(&r)?, cli.json, false),
                408 => {
                    let v = parse_json(&r)?;
                    Err(CliError::Api(format!(
                        "message {} sent, no reply within {timeout} s",
                        v["id"].as_str().unwrap_or("?")
                    )))
                }
                _ => Err(api_error(&r)),
            }
        }
        MessageCommand::Receive {
            topic,
            timeout,
            raw,
        } => {
            let mut path = format!("/api/v1/messages?timeout={timeout}");
            if let Some(t) = topic {
                let b = B64
                    .encode(t)
                    .replace('+', "%2B")
                    .replace('/', "%2F")
                    .replace('=', "%3D");
                path.push_str(&format!("&topic={b}"));
            }
            let r = api(addr, "GET", &path, None, *timeout)?;
            match r.status {
                200 => print_message(&parse_json(&r)?, cli.json, *raw),
                204 => {
                    if cli.json {
                        out("null")
                    } else {
                        eprintln!("no message within {timeout} s");
                        Ok(())
                    }
                }
                _ => Err(api_error(&r)),
            }
        }
        MessageCommand::Status { id } => {
            let r = api(
                addr,
                "GET",
                &format!("/api/v1/messages/status/{id}"),
                None,
                0,
            )?;
            if r.status != 200 {
                return Err(api_error(&r));
            }
            let v = parse_json(&r)?;
            if cli.json {
                return out(&v.to_string());
            }
            let state = match &v["state"] {
                Value::String(s) => s.clone(),
                Value::Object(o) => match o.get("sending") {
                    Some(s) => format!(
                        "sending ({} pending, {} sent, {} acked chunks)",
                        s["pending"], s["sent"], s["acked"]
                    ),
                    None => v["state"].to_string(),
                },
                other => other.to_string(),
            };
            out(&format!(
                "{id}: {state}, peer {}, {} bytes, created {}, deadline {}",
                v["dst"].as_str().unwrap_or("?"),
                v["msgLen"],
                v["created"],
                v["deadline"]
            ))
        }
    }
}
