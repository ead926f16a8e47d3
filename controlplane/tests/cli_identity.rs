//! The identity commands, run as a user would: the built `hypha` binary in a scratch directory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use hypha_proto::{OverlayAddr, PublicKey, Subnet};

const KNOWN_KEY: &str = "a47c1d6f2a15b2c670d3a88fbe0aeb301ced12f7bcb4c8e3aa877b20f8559c02";
const KNOWN_ADDR: &str = "548:c783:d7ce:74a3:9ba1:a0cb:ae21:338d";

/// A scratch directory named after the process and a counter, removed on drop (even on panic).
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("hypha-cli-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Runs `hypha args...` in this directory with default logging.
    fn hypha(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_hypha"))
            .args(args)
            .current_dir(&self.0)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Parses `--json` output: exactly the keys `publicKey` and `address`, checked against each other.
fn parse_json(o: &Output) -> (PublicKey, OverlayAddr) {
    assert!(o.status.success(), "{o:?}");
    let value: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let obj = value.as_object().unwrap();
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["address", "publicKey"]);
    let pk: PublicKey = obj["publicKey"].as_str().unwrap().parse().unwrap();
    let addr: OverlayAddr = obj["address"].as_str().unwrap().parse().unwrap();
    assert_eq!(pk.address(), addr);
    (pk, addr)
}

#[test]
fn inspect_known_key() {
    let dir = Scratch::new();
    let text = dir.hypha(&["inspect", KNOWN_KEY]);
    assert!(text.status.success(), "{text:?}");
    assert_eq!(
        stdout(&text),
        format!("Public key: {KNOWN_KEY}\nAddress: {KNOWN_ADDR}\n")
    );
    let json = dir.hypha(&["inspect", "--json", KNOWN_KEY]);
    let (pk, addr) = parse_json(&json);
    assert_eq!(pk.to_string(), KNOWN_KEY);
    assert_eq!(addr.to_string(), KNOWN_ADDR);
    // Inspecting a given key touches no key file.
    assert!(!dir.path("priv_key.bin").exists());
}

#[test]
fn inspect_own_key_creates_it_once() {
    let dir = Scratch::new();
    let first = dir.hypha(&["inspect", "--json"]);
    let (pk, addr) = parse_json(&first);
    let file = dir.path("priv_key.bin");
    assert_eq!(mode(&file), 0o600);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 32);
    assert!(Subnet::OVERLAY.contains(addr));
    assert!(stderr(&first).contains("created new key file"));
    // The second run loads the same key.
    let second = dir.hypha(&["inspect", "--json"]);
    assert_eq!(parse_json(&second), (pk, addr));
    assert!(!stderr(&second).contains("created"));
    // -k picks another file.
    let other = dir.hypha(&["-k", "other.bin", "inspect", "--json"]);
    assert_ne!(parse_json(&other).0, pk);
    assert_eq!(mode(&dir.path("other.bin")), 0o600);
}

#[test]
fn generate_keys_refuses_to_overwrite() {
    let dir = Scratch::new();
    let out = dir.hypha(&["generate-keys", "node.key", "--json"]);
    let (pk, _) = parse_json(&out);
    let file = dir.path("node.key");
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes.len(), 32);
    assert_eq!(mode(&file), 0o600);
    // The printed key is the file's key.
    let own = dir.hypha(&["-k", "node.key", "inspect", "--json"]);
    assert_eq!(parse_json(&own).0, pk);

    let again = dir.hypha(&["generate-keys", "node.key"]);
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(stderr(&again).contains("already exists"), "{again:?}");
    assert_eq!(std::fs::read(&file).unwrap(), bytes);

    // Without a path it writes the --key-file path.
    let default = dir.hypha(&["generate-keys"]);
    assert!(default.status.success(), "{default:?}");
    assert!(stdout(&default).starts_with("Public key: "));
    assert_eq!(mode(&dir.path("priv_key.bin")), 0o600);
}

#[test]
fn bad_public_key_is_usage_error() {
    let dir = Scratch::new();
    let bad_hex = format!("{}zz", &KNOWN_KEY[..62]);
    for (arg, expect) in [
        (bad_hex.as_str(), "invalid hex digit"),
        (&KNOWN_KEY[..62], "64 hex digits"),
        ("", "64 hex digits"),
    ] {
        let out = dir.hypha(&["inspect", arg]);
        assert_eq!(out.status.code(), Some(2), "{arg:?}: {out:?}");
        assert!(stderr(&out).contains(expect), "{arg:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn short_key_file_is_error_and_unchanged() {
    let dir = Scratch::new();
    let file = dir.path("priv_key.bin");
    std::fs::write(&file, [0x11u8; 31]).unwrap();
    set_mode(&file, 0o600);
    let out = dir.hypha(&["inspect"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("31 bytes"), "{}", stderr(&out));
    assert!(stderr(&out).contains("priv_key.bin"));
    assert_eq!(std::fs::read(&file).unwrap(), [0x11u8; 31]);
}

#[test]
fn world_readable_key_is_error() {
    let dir = Scratch::new();
    let file = dir.path("priv_key.bin");
    std::fs::write(&file, [0x22u8; 32]).unwrap();
    set_mode(&file, 0o644);
    let out = dir.hypha(&["inspect"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr(&out).contains("readable by every user"),
        "{}",
        stderr(&out)
    );
    assert_eq!(mode(&file), 0o644);
}

#[test]
fn group_readable_key_works_with_warning() {
    let dir = Scratch::new();
    let file = dir.path("mycelium.key");
    std::fs::write(&file, [0x33u8; 32]).unwrap();
    set_mode(&file, 0o640);
    let out = dir.hypha(&["--key-file", "mycelium.key", "inspect", "--json"]);
    let (pk, _) = parse_json(&out);
    let expected = hypha_proto::SecretKey::from_bytes([0x33u8; 32]).public_key();
    assert_eq!(pk, expected);
    let err = stderr(&out);
    assert!(err.contains("WARN") && err.contains("group"), "{err}");
    assert_eq!(mode(&file), 0o640);
}
