//! The shared-memory ABI between control plane and dataplane (DESIGN.md, principle 4).
//!
//! The processes share memory, not locks: one memfd [`Region`] holds a versioned [`Header`] and two
//! single-producer single-consumer rings of fixed-size slots, [`Direction::Down`] (control plane →
//! dataplane: routes, peers, session keys, packets to send) and [`Direction::Up`] (dataplane →
//! control plane: punted packets, events, counters). Each slot holds one [`Record`].
//!
//! * **No syscalls on the hot path.** Producer and consumer only touch their own cache lines of
//!   the ring's [`RingControl`] and the slots; an eventfd is written only when the other side said
//!   it is going to sleep (the `*_sleeping` flags), so a busy ring runs without system calls.
//! * **Back-pressure, never loss.** A full ring makes [`Producer::try_push`] return
//!   [`TryPushError::Full`] and [`Producer::push`] wait (on the "space" eventfd) with a timeout;
//!   nothing is ever overwritten.
//! * **Restarts are visible.** Each producer start bumps the ring's epoch and stamps every record
//!   with it; [`Consumer::poll_epoch`] reports the change, so the dataplane can keep forwarding on
//!   its old state until a full replay (bracketed by [`Resync`] records) has arrived.
//! * **The other process's bytes are outside input.** Header, ring positions and records are all
//!   validated; a bad region is a [`ShmError`], a bad record a [`DecodeError`]. Records are copied
//!   out of their slot before they are checked, so they cannot change under the decoder. What the
//!   protocol cannot defend against is the other process writing a slot it has handed over; that
//!   process is our own supervised binary, and the worst it can do is feed us bytes we check.
//!
//! ## Passing the region to the dataplane
//!
//! The control plane creates the region ([`Region::create`]) and spawns the dataplane with the
//! memfd and the four eventfds inherited: [`Region::share_with`] clears `FD_CLOEXEC` on exactly
//! those five descriptors in the child (they stay close-on-exec in the parent, so no other child
//! inherits them) and sets the environment variable [`SHM_FDS_ENV`] to
//! `memfd,down_data,down_space,up_data,up_space` (decimal fd numbers, see [`FdNumbers`]). The child
//! takes ownership with [`RegionFds::from_env`] and maps the region with [`Region::attach`].
//! The byte layout is written down in docs/shm.md.

pub mod handoff;
mod layout;
mod record;
mod region;
mod ring;

pub use layout::{
    Header, Layout, RegionConfig, RingControl, RingDesc, RingLayout, ABI_VERSION,
    DOWN_CONTROL_OFFSET, HEADER_PAGE, MAGIC, MAX_CAPACITY, MAX_REGION_LEN, SLOT_SIZE_RANGE,
    UP_CONTROL_OFFSET,
};
pub use record::{
    Cipher, Counters, DecodeError, EncodeError, Event, KeyDirection, PeerId, PeerUp, PuntReason,
    Record, RecordHeader, RecordKind, RecordMeta, Resync, RouteEntry, SendTo, SessionKey,
    SessionKeyId, RECORD_HEADER_LEN,
};
pub use region::{FdNumbers, Region, RegionFds, Role, SHM_FDS_ENV};
pub use ring::{Consumer, EpochChange, PopError, Producer, PushError, Received, TryPushError};

/// Which ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Control plane → dataplane.
    Down,
    /// Dataplane → control plane.
    Up,
}

impl Direction {
    /// 0 for down, 1 for up: the index into [`Header::rings`] and [`Layout::rings`].
    pub fn index(self) -> usize {
        match self {
            Direction::Down => 0,
            Direction::Up => 1,
        }
    }
}

/// Why a region cannot be created, attached or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShmError {
    /// The region does not start with [`MAGIC`]: not a Hypha region.
    #[error("not a Hypha shared-memory region: magic is {found:02x?}, expected \"HYPHASHM\"")]
    BadMagic {
        /// The first eight bytes found.
        found: [u8; 8],
    },
    /// The region was made by a build speaking another ABI version.
    #[error("shared-memory ABI version {found}, but this build speaks version {expected}")]
    AbiVersion {
        /// Version in the header.
        found: u32,
        /// [`ABI_VERSION`].
        expected: u32,
    },
    /// The memfd is too small to hold a header.
    #[error("shared-memory region of {0} bytes is too small for a header")]
    TooSmall(u64),
    /// The memfd is not sealed against shrinking, so the other process could make our mapping fault.
    #[error("shared-memory region is not sealed against shrinking")]
    NotSealed,
    /// The header's sizes or offsets are inconsistent.
    #[error("inconsistent shared-memory layout: {0}")]
    Layout(&'static str),
    /// A requested configuration is out of range.
    #[error("invalid shared-memory configuration: {0}")]
    Config(&'static str),
    /// This process already holds the producer (or consumer) of that ring.
    #[error("the {role} of the {dir:?} ring is already taken in this process")]
    Taken {
        /// The ring.
        dir: Direction,
        /// "producer" or "consumer".
        role: &'static str,
    },
    /// The ring's positions are impossible (`tail > head` or more than capacity apart).
    #[error("corrupt ring positions: head {head}, tail {tail}")]
    Corrupt {
        /// Producer position read.
        head: u64,
        /// Consumer position read.
        tail: u64,
    },
    /// The fd-passing environment variable is missing or malformed.
    #[error("bad {SHM_FDS_ENV} value {0:?}: expected five comma-separated fd numbers")]
    FdSpec(String),
    /// A system call failed.
    #[error("{what}: {errno}")]
    Sys {
        /// What we were doing.
        what: &'static str,
        /// The error.
        errno: rustix::io::Errno,
    },
}

impl ShmError {
    fn sys(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> ShmError {
        move |errno| ShmError::Sys { what, errno }
    }
}
