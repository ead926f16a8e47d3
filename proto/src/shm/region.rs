//! The region: a sealed memfd, its mapping, and the four eventfds that go with it.
//!
//! A memfd rather than a file under /dev/shm because network namespaces share the filesystem
//! (several nodes run on one machine) and an anonymous file needs no name, no cleanup and no
//! permissions: whoever holds the descriptor has the region. It is sealed against growing and
//! shrinking, so neither process can truncate it under the other's mapping (which would turn every
//! access into SIGBUS), and [`Region::attach`] refuses an unsealed one.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};
use rustix::event::{eventfd, EventfdFlags};
use rustix::fs::{fcntl_add_seals, fcntl_get_seals, fstat, ftruncate, memfd_create};
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::io::{fcntl_getfd, fcntl_setfd, Errno, FdFlags};
use zerocopy::{FromBytes, IntoBytes};

use super::layout::{Header, Layout, RegionConfig, RingControl};
use super::ring::{Consumer, Producer};
use super::{Direction, ShmError};

/// The environment variable that tells the dataplane its inherited descriptors.
pub const SHM_FDS_ENV: &str = "HYPHA_SHM_FDS";

/// Which side of the region a process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Produces on the down ring, consumes the up ring.
    ControlPlane,
    /// Consumes the down ring, produces on the up ring.
    Dataplane,
}

/// The five descriptor numbers of a region, as passed to a child.
///
/// Textual form (the value of [`SHM_FDS_ENV`]): `memfd,down_data,down_space,up_data,up_space`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdNumbers {
    /// The memfd.
    pub memfd: RawFd,
    /// Eventfds: down data, down space, up data, up space.
    pub events: [RawFd; 4],
}

impl FdNumbers {
    /// Parses the textual form.
    pub fn parse(s: &str) -> Result<FdNumbers, ShmError> {
        let bad = || ShmError::FdSpec(s.to_owned());
        let mut it = s.split(',').map(|p| p.trim().parse::<RawFd>());
        let mut next = || match it.next() {
            Some(Ok(n)) if n >= 0 => Ok(n),
            _ => Err(bad()),
        };
        let nums = FdNumbers {
            memfd: next()?,
            events: [next()?, next()?, next()?, next()?],
        };
        if it.next().is_some() {
            return Err(bad());
        }
        Ok(nums)
    }

    pub(crate) fn all(&self) -> [RawFd; 5] {
        let [a, b, c, d] = self.events;
        [self.memfd, a, b, c, d]
    }
}

impl core::fmt::Display for FdNumbers {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let [a, b, c, d] = self.events;
        write!(f, "{},{a},{b},{c},{d}", self.memfd)
    }
}

/// Index into the eventfd array: `2 * direction + (0 = data available, 1 = space available)`.
pub(super) fn event_index(dir: Direction, space: bool) -> usize {
    dir.index() * 2 + usize::from(space)
}

/// Owned descriptors of a region, before it is mapped.
#[derive(Debug)]
pub struct RegionFds {
    /// The memfd.
    pub memfd: OwnedFd,
    /// Eventfds in [`FdNumbers::events`] order.
    pub events: [OwnedFd; 4],
}

impl RegionFds {
    /// Takes ownership of descriptors inherited as announced in [`SHM_FDS_ENV`].
    ///
    /// Each number is checked to be an open descriptor before it is adopted.
    ///
    /// # Safety
    /// The descriptors named by the variable must have been inherited for this purpose and must not
    /// be owned by anything else in this process (call this once).
    pub unsafe fn from_env() -> Result<RegionFds, ShmError> {
        let spec = std::env::var(SHM_FDS_ENV).map_err(|_| ShmError::FdSpec(String::new()))?;
        let nums = FdNumbers::parse(&spec)?;
        // SAFETY: forwarded to our caller.
        unsafe { RegionFds::from_raw(nums) }
    }

    /// Takes ownership of the given descriptor numbers, after checking each is open.
    ///
    /// # Safety
    /// As for [`RegionFds::from_env`]: the numbers must be this region's descriptors, owned by
    /// nothing else in this process.
    pub unsafe fn from_raw(nums: FdNumbers) -> Result<RegionFds, ShmError> {
        let all = nums.all();
        for (i, fd) in all.iter().enumerate() {
            if all[..i].contains(fd) {
                return Err(ShmError::FdSpec(nums.to_string()));
            }
            // SAFETY: only used for this call; an fd that is not open yields EBADF.
            fcntl_getfd(unsafe { BorrowedFd::borrow_raw(*fd) })
                .map_err(ShmError::sys("inherited shm descriptor"))?;
        }
        // SAFETY: open, distinct, and ownership is transferred to us by the caller's contract.
        let own = |fd| unsafe { OwnedFd::from_raw_fd(fd) };
        let [a, b, c, d] = nums.events;
        Ok(RegionFds {
            memfd: own(nums.memfd),
            events: [own(a), own(b), own(c), own(d)],
        })
    }
}

/// State shared by a [`Region`] and the producers and consumers made from it.
pub(super) struct Shared {
    map: MmapRaw,
    pub(super) layout: Layout,
    fds: RegionFds,
    /// Producer and consumer handed out, per ring: `[down prod, down cons, up prod, up cons]`.
    taken: [AtomicBool; 4],
}

impl Shared {
    /// The control block of a ring.
    pub(super) fn control(&self, dir: Direction) -> &RingControl {
        let off = self.layout.ring(dir).control_offset;
        // SAFETY: the layout was validated against the mapping's length: the control block is in
        // bounds, 128-aligned (page-aligned mapping, offsets are constants); `RingControl` is
        // atomics plus padding nobody accesses, and it lives as long as `self` (the mapping).
        unsafe { &*self.map.as_ptr().add(off).cast::<RingControl>() }
    }

    /// Pointer to the first slot of a ring; `capacity * slot_size` bytes are mapped from there.
    pub(super) fn slots(&self, dir: Direction) -> *mut u8 {
        let off = self.layout.ring(dir).slots_offset;
        // SAFETY: in bounds, as validated by `Layout`.
        unsafe { self.map.as_mut_ptr().add(off) }
    }

    pub(super) fn event(&self, dir: Direction, space: bool) -> BorrowedFd<'_> {
        self.fds.events[event_index(dir, space)].as_fd()
    }

    pub(super) fn take(&self, dir: Direction, producer: bool) -> Result<(), ShmError> {
        let i = dir.index() * 2 + usize::from(!producer);
        if self.taken[i].swap(true, Ordering::AcqRel) {
            return Err(ShmError::Taken {
                dir,
                role: if producer { "producer" } else { "consumer" },
            });
        }
        Ok(())
    }

    pub(super) fn release(&self, dir: Direction, producer: bool) {
        let i = dir.index() * 2 + usize::from(!producer);
        self.taken[i].store(false, Ordering::Release);
    }
}

/// A mapped shared-memory region. Cheap to clone; the mapping lives until the last clone and the
/// last [`Producer`]/[`Consumer`] made from it are dropped.
#[derive(Clone)]
pub struct Region {
    shared: Arc<Shared>,
}

impl core::fmt::Debug for Region {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Region")
            .field("layout", &self.shared.layout)
            .field("fds", &self.fd_numbers())
            .finish()
    }
}

fn new_eventfd() -> Result<OwnedFd, ShmError> {
    eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map_err(ShmError::sys("eventfd"))
}

fn map(memfd: &OwnedFd, len: usize) -> Result<MmapRaw, ShmError> {
    MmapOptions::new()
        .len(len)
        .map_raw(memfd.as_raw_fd())
        .map_err(|e| ShmError::Sys {
            what: "mmap shm region",
            errno: Errno::from_io_error(&e).unwrap_or(Errno::IO),
        })
}

impl Region {
    /// Creates a region: a new sealed memfd with the header written, and four eventfds. All five
    /// descriptors are close-on-exec; see [`Region::share_with`] to hand them to a child.
    pub fn create(config: &RegionConfig) -> Result<Region, ShmError> {
        let layout = Layout::new(config)?;
        let memfd = memfd_create("hypha-shm", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(ShmError::sys("memfd_create"))?;
        ftruncate(&memfd, layout.region_len as u64).map_err(ShmError::sys("ftruncate memfd"))?;
        fcntl_add_seals(
            &memfd,
            SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
        )
        .map_err(ShmError::sys("seal memfd"))?;
        let map = map(&memfd, layout.region_len)?;
        let header = layout.header();
        let bytes = header.as_bytes();
        // SAFETY: the mapping is at least a page long and nobody else has the memfd yet, so this
        // plain write of the immutable header cannot race.
        unsafe {
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), map.as_mut_ptr(), bytes.len());
        }
        let fds = RegionFds {
            memfd,
            events: [
                new_eventfd()?,
                new_eventfd()?,
                new_eventfd()?,
                new_eventfd()?,
            ],
        };
        Ok(Region::from_parts(map, layout, fds))
    }

    /// Maps a region whose descriptors we own (typically from [`RegionFds::from_env`]).
    ///
    /// Checks, in order: size, seals, magic ([`ShmError::BadMagic`]), ABI version
    /// ([`ShmError::AbiVersion`]), then the layout.
    pub fn attach(fds: RegionFds) -> Result<Region, ShmError> {
        let size = fstat(&fds.memfd)
            .map_err(ShmError::sys("fstat memfd"))?
            .st_size;
        let size = u64::try_from(size).unwrap_or(0);
        let header_len = core::mem::size_of::<Header>();
        if size < super::HEADER_PAGE as u64 {
            return Err(ShmError::TooSmall(size));
        }
        let seals = fcntl_get_seals(&fds.memfd).map_err(ShmError::sys("get memfd seals"))?;
        if !seals.contains(SealFlags::SHRINK) {
            return Err(ShmError::NotSealed);
        }
        // Map the header alone first: its sizes are outside input until validated.
        let head_map = map(&fds.memfd, header_len)?;
        let mut header_bytes = [0u8; core::mem::size_of::<Header>()];
        // SAFETY: `header_len` bytes are mapped; the header is immutable after creation.
        unsafe {
            core::ptr::copy_nonoverlapping(
                head_map.as_ptr(),
                header_bytes.as_mut_ptr(),
                header_len,
            );
        }
        drop(head_map);
        let header =
            Header::read_from_bytes(&header_bytes).map_err(|_| ShmError::Layout("header size"))?;
        let layout = Layout::from_header(&header, size)?;
        let map = map(&fds.memfd, layout.region_len)?;
        for fd in &fds.events {
            // Our waits rely on non-blocking reads.
            rustix::fs::fcntl_setfl(fd, rustix::fs::OFlags::NONBLOCK)
                .map_err(ShmError::sys("set eventfd non-blocking"))?;
        }
        Ok(Region::from_parts(map, layout, fds))
    }

    fn from_parts(map: MmapRaw, layout: Layout, fds: RegionFds) -> Region {
        Region {
            shared: Arc::new(Shared {
                map,
                layout,
                fds,
                taken: Default::default(),
            }),
        }
    }

    /// The region's layout.
    pub fn layout(&self) -> &Layout {
        &self.shared.layout
    }

    /// The memfd.
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.shared.fds.memfd.as_fd()
    }

    /// The descriptor numbers, as [`Region::share_with`] announces them.
    pub fn fd_numbers(&self) -> FdNumbers {
        let e = &self.shared.fds.events;
        FdNumbers {
            memfd: self.shared.fds.memfd.as_raw_fd(),
            events: [
                e[0].as_raw_fd(),
                e[1].as_raw_fd(),
                e[2].as_raw_fd(),
                e[3].as_raw_fd(),
            ],
        }
    }

    /// Prepares `cmd` so the child inherits the region: sets [`SHM_FDS_ENV`] and clears
    /// `FD_CLOEXEC` on the five descriptors in the child only, between fork and exec.
    ///
    /// The region must stay alive until `cmd` is spawned (the descriptors are looked up then;
    /// if they are gone, spawning fails with EBADF).
    pub fn share_with(&self, cmd: &mut Command) {
        let nums = self.fd_numbers();
        cmd.env(SHM_FDS_ENV, nums.to_string());
        let fds = nums.all();
        // SAFETY: the closure runs in the forked child before exec and only makes fcntl system
        // calls, which are async-signal-safe; it allocates nothing and takes no locks.
        unsafe {
            cmd.pre_exec(move || {
                for fd in fds {
                    // SAFETY: the fd is open in the child (inherited from the parent at fork).
                    fcntl_setfd(BorrowedFd::borrow_raw(fd), FdFlags::empty())?;
                }
                Ok(())
            });
        }
    }

    /// The producer of ring `dir`. One per ring per process; across processes, the supervisor
    /// must make sure an old producer is dead before a new one starts. The new producer continues
    /// at the ring's head and starts a new epoch.
    pub fn producer(&self, dir: Direction) -> Result<Producer, ShmError> {
        Producer::new(self.shared.clone(), dir)
    }

    /// The consumer of ring `dir`. One per ring per process; it continues at the ring's tail.
    pub fn consumer(&self, dir: Direction) -> Result<Consumer, ShmError> {
        Consumer::new(self.shared.clone(), dir)
    }

    /// The producer and consumer a process in `role` uses.
    pub fn split(&self, role: Role) -> Result<(Producer, Consumer), ShmError> {
        let (out, inn) = match role {
            Role::ControlPlane => (Direction::Down, Direction::Up),
            Role::Dataplane => (Direction::Up, Direction::Down),
        };
        Ok((self.producer(out)?, self.consumer(inn)?))
    }

    #[cfg(test)]
    pub(super) fn shared_slots(&self, dir: Direction) -> *mut u8 {
        self.shared.slots(dir)
    }

    #[cfg(test)]
    pub(super) fn shared_control(&self, dir: Direction) -> &RingControl {
        self.shared.control(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_numbers_text() {
        let n = FdNumbers::parse("3,4,5,6,7").unwrap();
        assert_eq!(n.memfd, 3);
        assert_eq!(n.events, [4, 5, 6, 7]);
        assert_eq!(n.to_string(), "3,4,5,6,7");
        for bad in ["", "3,4,5,6", "3,4,5,6,7,8", "3,4,x,6,7", "-1,4,5,6,7"] {
            assert!(
                matches!(FdNumbers::parse(bad), Err(ShmError::FdSpec(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn create_then_attach_in_process() {
        let r = Region::create(&RegionConfig::default()).unwrap();
        let dup = |fd: BorrowedFd<'_>| fd.try_clone_to_owned().unwrap();
        let fds = RegionFds {
            memfd: dup(r.memfd()),
            events: core::array::from_fn(|i| dup(r.shared.fds.events[i].as_fd())),
        };
        let a = Region::attach(fds).unwrap();
        assert_eq!(a.layout(), r.layout());
    }

    #[test]
    fn unsealed_or_small_memfd_is_refused() {
        let memfd = memfd_create("t", MemfdFlags::CLOEXEC).unwrap();
        let fds = |memfd| RegionFds {
            memfd,
            events: [
                new_eventfd().unwrap(),
                new_eventfd().unwrap(),
                new_eventfd().unwrap(),
                new_eventfd().unwrap(),
            ],
        };
        ftruncate(&memfd, 100).unwrap();
        let m2 = memfd.try_clone().unwrap();
        assert_eq!(
            Region::attach(fds(memfd)).unwrap_err(),
            ShmError::TooSmall(100)
        );
        ftruncate(&m2, 8192).unwrap();
        assert_eq!(Region::attach(fds(m2)).unwrap_err(), ShmError::NotSealed);
    }

    #[test]
    fn one_producer_per_ring() {
        let r = Region::create(&RegionConfig::default()).unwrap();
        let p = r.producer(Direction::Down).unwrap();
        assert!(matches!(
            r.producer(Direction::Down),
            Err(ShmError::Taken { .. })
        ));
        drop(p);
        let (_p, _c) = r.split(Role::ControlPlane).unwrap();
        assert!(r.consumer(Direction::Up).is_err());
        assert!(r.consumer(Direction::Down).is_ok());
    }
}
