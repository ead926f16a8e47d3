//! Node identity: x25519 keys and the key file.
//!
//! The key file is Mycelium's format, 32 raw bytes of x25519 secret key, so a Mycelium node's key
//! (and with it its overlay address) moves to Hypha unchanged. A key file is never replaced or
//! rewritten once it exists: a file of the wrong size is an error, because silently generating a new
//! key would silently change the node's address. A world-readable file is refused; a group-readable
//! one is accepted with a warning, because Mycelium creates its key files with mode 0640.

use core::fmt;
use core::str::FromStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::addr::{OverlayAddr, Subnet};

/// Length of a key (public or secret) and of the key file.
pub const KEY_LEN: usize = 32;

/// Why a public key's text form was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseKeyError {
    /// Not 64 characters long.
    #[error("a public key is 64 hex digits (32 bytes), got {0} characters")]
    WrongLength(usize),
    /// A character that is not a hex digit.
    #[error("invalid hex digit {character:?} at position {index} of the public key")]
    InvalidHex {
        /// The offending character.
        character: char,
        /// Its position (0-based, in characters).
        index: usize,
    },
}

/// An x25519 public key: a node's identity. Text form: 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    /// The key with these bytes.
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> PublicKey {
        PublicKey(bytes)
    }

    /// The key's bytes.
    pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The node's overlay address ([`OverlayAddr::from_public_key`]).
    pub fn address(&self) -> OverlayAddr {
        OverlayAddr::from_public_key(self)
    }

    /// The /64 this key owns: the one around its address.
    pub fn subnet(&self) -> Subnet {
        self.address().subnet()
    }

    /// Whether `subnet` is exactly the /64 this key owns. Babel's route filter accepts a route for a
    /// subnet only from the key that owns it.
    pub fn owns(&self, subnet: &Subnet) -> bool {
        self.subnet() == *subnet
    }
}

impl From<x25519_dalek::PublicKey> for PublicKey {
    fn from(pk: x25519_dalek::PublicKey) -> PublicKey {
        PublicKey(pk.to_bytes())
    }
}

impl From<PublicKey> for x25519_dalek::PublicKey {
    fn from(pk: PublicKey) -> x25519_dalek::PublicKey {
        x25519_dalek::PublicKey::from(pk.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 2 * KEY_LEN];
        // The buffer is exactly twice the key's length, which is all `encode_to_slice` needs.
        hex::encode_to_slice(self.0, &mut buf).map_err(|_| fmt::Error)?;
        // Hex digits are ASCII.
        f.write_str(core::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = ParseKeyError;

    /// Parses 64 hex digits (either case).
    fn from_str(s: &str) -> Result<Self, ParseKeyError> {
        let chars = s.chars().count();
        if chars != 2 * KEY_LEN || s.len() != chars {
            // A non-ASCII character: report it, rather than a confusing length.
            if let Some((index, character)) = s.chars().enumerate().find(|(_, c)| !c.is_ascii()) {
                return Err(ParseKeyError::InvalidHex { character, index });
            }
            return Err(ParseKeyError::WrongLength(chars));
        }
        let mut bytes = [0u8; KEY_LEN];
        hex::decode_to_slice(s, &mut bytes).map_err(|e| match e {
            hex::FromHexError::InvalidHexCharacter { c, index } => ParseKeyError::InvalidHex {
                character: c,
                index,
            },
            hex::FromHexError::OddLength | hex::FromHexError::InvalidStringLength => {
                ParseKeyError::WrongLength(chars)
            }
        })?;
        Ok(PublicKey(bytes))
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An x25519 static secret key. Never printed: `Debug` shows only the public key.
#[derive(Clone)]
pub struct SecretKey(x25519_dalek::StaticSecret);

impl SecretKey {
    /// A new random key from the operating system's CSPRNG.
    pub fn generate() -> SecretKey {
        SecretKey(x25519_dalek::StaticSecret::random())
    }

    /// The key with these bytes (as stored in a key file; x25519 clamps them when used).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> SecretKey {
        SecretKey(x25519_dalek::StaticSecret::from(bytes))
    }

    /// The secret bytes, as stored in the key file and as Noise wants its local static key.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        self.0.as_bytes()
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey::from(x25519_dalek::PublicKey::from(&self.0))
    }

    /// The underlying x25519-dalek secret.
    pub fn as_x25519(&self) -> &x25519_dalek::StaticSecret {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("public", &self.public_key())
            .finish_non_exhaustive()
    }
}

/// Why a key file could not be used. Each message names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// An I/O error (open, read, create, write, sync).
    #[error("cannot {action} key file {}: {source}", path.display())]
    Io {
        /// What was being done ("open", "read", "create", "write", "sync").
        action: &'static str,
        /// The key file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file is not 32 bytes long. It is left alone.
    #[error(
        "key file {} has {size} bytes, but an x25519 secret key file has exactly 32; not using or replacing it",
        path.display()
    )]
    WrongSize {
        /// The key file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The file is readable by every user.
    #[error(
        "key file {} is readable by every user (mode {mode:04o}); restrict it, e.g. `chmod 600 {}`",
        path.display(), path.display()
    )]
    WorldReadable {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The path exists but is not a regular file.
    #[error("key file {} is not a regular file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// `generate` was asked to write over an existing file.
    #[error("key file {} already exists; refusing to overwrite it", path.display())]
    AlreadyExists {
        /// The key file.
        path: PathBuf,
    },
}

/// Something wrong with a key file that still works; the caller logs it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileWarning {
    /// The file is readable by its group (as Mycelium creates key files, mode 0640).
    #[error(
        "key file {} is readable by its group (mode {mode:04o}); consider `chmod 600 {}`",
        path.display(), path.display()
    )]
    GroupReadable {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// How [`load_or_create`] got the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The file was missing; a new key was written to it.
    Created,
    /// The key was read from an existing file, possibly with a warning to log.
    Loaded {
        /// A problem that doesn't stop the key from being used.
        warning: Option<KeyFileWarning>,
    },
}

impl KeySource {
    /// The warning to log, if any.
    pub fn warning(&self) -> Option<&KeyFileWarning> {
        match self {
            KeySource::Created => None,
            KeySource::Loaded { warning } => warning.as_ref(),
        }
    }
}

/// Reads the key file at `path`; if there is none, creates it with a new key (mode 0600).
///
/// An existing file is never modified: a wrong size or a world-readable mode is an error.
pub fn load_or_create(path: &Path) -> Result<(SecretKey, KeySource), KeyFileError> {
    match load(path) {
        Ok((key, warning)) => Ok((key, KeySource::Loaded { warning })),
        Err(KeyFileError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            match generate(path) {
                Ok(key) => Ok((key, KeySource::Created)),
                // Someone else created it between our two attempts: use theirs.
                Err(KeyFileError::AlreadyExists { .. }) => {
                    let (key, warning) = load(path)?;
                    Ok((key, KeySource::Loaded { warning }))
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// Reads an existing key file: a regular file of exactly 32 bytes, not readable by everyone.
/// A group-readable file comes back with a warning.
pub fn load(path: &Path) -> Result<(SecretKey, Option<KeyFileWarning>), KeyFileError> {
    let io_err = |action| {
        move |source| KeyFileError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    };
    let file = File::open(path).map_err(io_err("open"))?;
    // Judge the file we opened, not the path (which could change in between).
    let meta = file.metadata().map_err(io_err("read"))?;
    if !meta.is_file() {
        return Err(KeyFileError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o004 != 0 {
        return Err(KeyFileError::WorldReadable {
            path: path.to_owned(),
            mode,
        });
    }
    let wrong_size = |size| KeyFileError::WrongSize {
        path: path.to_owned(),
        size,
    };
    if meta.len() != KEY_LEN as u64 {
        return Err(wrong_size(meta.len()));
    }
    // Read one byte more than a key, in case the file grew since `metadata`.
    let mut bytes = Vec::with_capacity(KEY_LEN + 1);
    file.take(KEY_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("read"))?;
    let key: [u8; KEY_LEN] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| wrong_size(bytes.len() as u64))?;
    let warning = (mode & 0o040 != 0).then(|| KeyFileWarning::GroupReadable {
        path: path.to_owned(),
        mode,
    });
    Ok((SecretKey::from_bytes(key), warning))
}

/// Writes a new random key to `path` with mode 0600. Refuses to overwrite an existing file.
///
/// The file is created exclusively, written in full and fsynced (and its directory too), so a crash
/// leaves either no file or a complete one; if writing fails the partial file is removed.
pub fn generate(path: &Path) -> Result<SecretKey, KeyFileError> {
    let key = SecretKey::generate();
    write_new(path, &key)?;
    Ok(key)
}

/// Writes `key` to a new file at `path` (mode 0600, exclusive create, fsync).
pub fn write_new(path: &Path, key: &SecretKey) -> Result<(), KeyFileError> {
    let io_err = |action| {
        move |source| KeyFileError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => KeyFileError::AlreadyExists {
                path: path.to_owned(),
            },
            _ => io_err("create")(source),
        })?;
    let written = file
        .write_all(key.as_bytes())
        .map_err(io_err("write"))
        .and_then(|()| file.sync_all().map_err(io_err("sync")));
    if let Err(e) = written {
        drop(file);
        // We created the file a moment ago; don't leave a partial key behind.
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync the directory of"))?;
    Ok(())
}

#[cfg(test)]
mod test {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const KNOWN: &str = "a47c1d6f2a15b2c670d3a88fbe0aeb301ced12f7bcb4c8e3aa877b20f8559c02";

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            use std::sync::atomic::{AtomicU32, Ordering};
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("hypha-key-test-{}-{n}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn public_key_text() {
        let pk: PublicKey = KNOWN.parse().unwrap();
        assert_eq!(pk.to_string(), KNOWN);
        assert_eq!(format!("{pk:?}"), format!("PublicKey({KNOWN})"));
        assert_eq!(KNOWN.to_uppercase().parse::<PublicKey>(), Ok(pk));
        assert_eq!(pk.as_bytes()[0], 0xa4);
        assert_eq!(pk.as_bytes()[31], 0x02);
        assert_eq!(
            pk.address().to_string(),
            "548:c783:d7ce:74a3:9ba1:a0cb:ae21:338d"
        );
        assert_eq!(
            KNOWN[..62].parse::<PublicKey>(),
            Err(ParseKeyError::WrongLength(62))
        );
        assert_eq!(
            format!("{KNOWN}00").parse::<PublicKey>(),
            Err(ParseKeyError::WrongLength(66))
        );
        assert_eq!("".parse::<PublicKey>(), Err(ParseKeyError::WrongLength(0)));
        let bad = format!("{}g{}", &KNOWN[..10], &KNOWN[11..]);
        assert_eq!(
            bad.parse::<PublicKey>(),
            Err(ParseKeyError::InvalidHex {
                character: 'g',
                index: 10
            })
        );
        let bad = format!("{}é{}", &KNOWN[..3], &KNOWN[4..]);
        assert_eq!(
            bad.parse::<PublicKey>(),
            Err(ParseKeyError::InvalidHex {
                character: 'é',
                index: 3
            })
        );
    }

    #[test]
    fn public_key_serde() {
        let pk: PublicKey = KNOWN.parse().unwrap();
        let json = serde_json::to_string(&pk).unwrap();
        assert_eq!(json, format!("\"{KNOWN}\""));
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), pk);
        assert!(serde_json::from_str::<PublicKey>("\"abcd\"").is_err());
    }

    #[test]
    fn secret_key_never_printed() {
        let key = SecretKey::from_bytes([0x42; 32]);
        let debug = format!("{key:?}");
        assert!(debug.contains(&key.public_key().to_string()));
        assert!(!debug.contains("4242"));
        assert!(!debug.contains("66, 66"));
    }

    #[test]
    fn secret_to_public_matches_rfc7748() {
        // RFC 7748 §6.1: Alice's private and public key.
        let secret: [u8; 32] =
            hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap()
                .try_into()
                .unwrap();
        let key = SecretKey::from_bytes(secret);
        assert_eq!(
            key.public_key().to_string(),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
        assert_eq!(key.as_bytes(), &secret);
    }

    #[test]
    fn create_then_load() {
        let dir = TempDir::new("create");
        let path = dir.0.join("priv_key.bin");
        let (key, source) = load_or_create(&path).unwrap();
        assert_eq!(source, KeySource::Created);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), key.as_bytes());
        let (again, source) = load_or_create(&path).unwrap();
        assert_eq!(source, KeySource::Loaded { warning: None });
        assert_eq!(again.as_bytes(), key.as_bytes());
        assert!(Subnet::OVERLAY.contains(key.public_key().address()));
    }

    #[test]
    fn generate_refuses_to_overwrite() {
        let dir = TempDir::new("generate");
        let path = dir.0.join("k");
        let key = generate(&path).unwrap();
        let err = generate(&path).unwrap_err();
        assert!(matches!(err, KeyFileError::AlreadyExists { .. }), "{err}");
        assert!(err.to_string().contains(&*path.to_string_lossy()));
        assert_eq!(std::fs::read(&path).unwrap(), key.as_bytes());
    }

    #[test]
    fn wrong_size_is_error_and_kept() {
        let dir = TempDir::new("size");
        for len in [0usize, 31, 33, 64] {
            let path = dir.0.join(format!("k{len}"));
            let content = vec![7u8; len];
            std::fs::write(&path, &content).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let err = load_or_create(&path).unwrap_err();
            assert!(
                matches!(err, KeyFileError::WrongSize { size, .. } if size == len as u64),
                "{err}"
            );
            assert!(err.to_string().contains(&*path.to_string_lossy()));
            assert_eq!(std::fs::read(&path).unwrap(), content);
        }
    }

    #[test]
    fn permissions() {
        let dir = TempDir::new("perm");
        let path = dir.0.join("k");
        std::fs::write(&path, [9u8; 32]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(&path).unwrap_err();
        assert!(
            matches!(err, KeyFileError::WorldReadable { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let (key, source) = load_or_create(&path).unwrap();
        assert_eq!(key.as_bytes(), &[9u8; 32]);
        assert_eq!(
            source.warning(),
            Some(&KeyFileWarning::GroupReadable {
                path: path.clone(),
                mode: 0o640
            })
        );
        // Loading never changes the file's mode.
        assert_eq!(mode(&path), 0o640);
    }

    #[test]
    fn not_a_file() {
        let dir = TempDir::new("dir");
        let err = load_or_create(&dir.0).unwrap_err();
        assert!(matches!(err, KeyFileError::NotAFile { .. }), "{err}");
        let sub = dir.0.join("missing-dir").join("k");
        let err = load_or_create(&sub).unwrap_err();
        assert!(
            matches!(
                err,
                KeyFileError::Io {
                    action: "create",
                    ..
                }
            ),
            "{err}"
        );
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn public_key_text_roundtrip(bytes in any::<[u8; 32]>()) {
            let pk = PublicKey::from_bytes(bytes);
            let text = pk.to_string();
            prop_assert_eq!(text.len(), 64);
            prop_assert!(text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            prop_assert_eq!(text.parse::<PublicKey>(), Ok(pk));
            prop_assert_eq!(text.to_uppercase().parse::<PublicKey>(), Ok(pk));
            let json = serde_json::to_string(&pk).unwrap();
            prop_assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), pk);
        }

        /// Arbitrary text: parsing never panics, and whatever parses formats back to itself.
        #[test]
        fn public_key_parse_any(s in "\\PC{0,70}") {
            if let Ok(pk) = s.parse::<PublicKey>() {
                prop_assert_eq!(pk.to_string(), s.to_lowercase());
            }
        }

        #[test]
        fn secret_key_bytes_roundtrip(bytes in any::<[u8; 32]>()) {
            let key = SecretKey::from_bytes(bytes);
            prop_assert_eq!(key.as_bytes(), &bytes);
            prop_assert_eq!(SecretKey::from_bytes(*key.as_bytes()).public_key(), key.public_key());
        }
    }
}
