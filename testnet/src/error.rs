//! The harness's one error type: every failure says which command or system call failed and why,
//! so a broken test environment is diagnosed from the test output alone.

use std::io;
use std::time::Duration;

/// Everything that can go wrong while building, using or tearing down a [`TestNet`](crate::TestNet).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A command ran but exited unsuccessfully (for example `ip` refusing a setting).
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line, for the reader.
        cmd: String,
        /// How it ended (exit code or signal).
        status: String,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// A command could not be started at all (missing binary, bad namespace).
    #[error("could not start `{cmd}`: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// The error from `fork`/`exec` or from entering the namespace.
        source: io::Error,
    },
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// A system call made through `nix` failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The errno.
        source: nix::errno::Errno,
    },
    /// A generated kernel name would exceed its limit (15 bytes for interface names).
    #[error("name `{0}` is too long for the kernel (interface names have at most 15 bytes)")]
    NameTooLong(String),
    /// A node name is empty, has characters other than `[a-z0-9]`, or is already used in this net.
    #[error("invalid or duplicate node name `{0}` (use 1-16 characters of [a-z0-9])")]
    BadNodeName(String),
    /// An argument is out of range (for example a loss above 100 %).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A node or link from another [`TestNet`](crate::TestNet) was passed in.
    #[error("{0} does not belong to this TestNet")]
    Foreign(String),
    /// A process ended while the caller was waiting for it to do something
    /// ([`ProcHandle::wait_for_log`](crate::ProcHandle::wait_for_log)).
    #[error("process {name} ended ({exit}) before it logged what was awaited")]
    Exited {
        /// The name given to `spawn`.
        name: String,
        /// How it ended.
        exit: crate::ProcExit,
    },
    /// [`wait_until`](crate::wait_until) or a `wait_exit` ran out of time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// The harness's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn sys(what: impl Into<String>, source: nix::errno::Errno) -> Self {
        Error::Sys {
            what: what.into(),
            source,
        }
    }
}
