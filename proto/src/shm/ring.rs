//! Single-producer single-consumer rings over the region's slots.
//!
//! The classic Lamport ring with free-running positions: the producer writes slot `head mod
//! capacity` and publishes `head + 1` with a Release store; the consumer reads `head` with Acquire,
//! copies the slot out, and publishes `tail + 1` with Release, which hands the slot back. Each
//! side caches the other's position and only re-reads it when the ring looks full (producer) or
//! empty (consumer), so a busy ring mostly touches only its own cache line.
//!
//! Wakeups use the Dekker pattern on the `*_sleeping` flags: the sleeper sets its flag, issues a
//! SeqCst fence and re-checks the ring before blocking; the waker publishes its position, issues
//! a SeqCst fence and checks the flag. The fences guarantee that at least one of them sees the
//! other's write, so a wakeup is never lost, and the eventfd is written only when someone sleeps.
//! A sleeping producer stores in its flag the tail position (plus one) at which it wants to be
//! woken, a quarter ring after the position that frees its slot, so the consumer does not pay a
//! system call per record while the producer is ahead. A wakeup can be spurious (the sleeper saw the data in its re-check and did not sleep, leaving a
//! count in the eventfd), so every sleeper re-checks the ring and sleeps again until its deadline.
//!
//! The other process is outside input: positions that cannot happen (`tail > head`, more than
//! `capacity` apart) are [`ShmError::Corrupt`], and records are decoded with full checks after
//! being copied into private memory.

use core::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;

use super::record::{DecodeError, EncodeError, Record, RecordMeta, RECORD_HEADER_LEN};
use super::region::Shared;
use super::{Direction, ShmError};

/// How many times a blocked side re-checks the ring before going to sleep on its eventfd.
const SPINS: u32 = 64;

/// A producer restart seen by the consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochChange {
    /// The epoch the consumer knew (0: no producer had started when the consumer attached).
    pub previous: u64,
    /// The producer's current epoch.
    pub current: u64,
}

/// Why [`Producer::try_push`] did not push.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TryPushError {
    /// The ring is full; nothing was written. Retry after the consumer made room.
    #[error("ring full")]
    Full,
    /// The record does not fit a slot.
    #[error(transparent)]
    TooLarge(#[from] EncodeError),
    /// The ring's positions are corrupt.
    #[error(transparent)]
    Shm(#[from] ShmError),
}

/// Why [`Producer::push`] did not push.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The ring stayed full until the timeout.
    #[error("ring still full after the timeout")]
    TimedOut,
    /// The record does not fit a slot.
    #[error(transparent)]
    TooLarge(#[from] EncodeError),
    /// The ring is corrupt or waiting failed.
    #[error(transparent)]
    Shm(#[from] ShmError),
}

/// Why [`Consumer::pop`] returned no record. The slot has been consumed either way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PopError {
    /// The slot does not hold a valid record.
    #[error("undecodable record at position {position}: {error}")]
    Decode {
        /// Ring position of the slot.
        position: u64,
        /// What is wrong.
        error: DecodeError,
    },
    /// The record's sequence number is not its ring position (a stale or misplaced slot).
    #[error("record at position {position} claims sequence number {seq}")]
    Sequence {
        /// Ring position of the slot.
        position: u64,
        /// Sequence number in the record header.
        seq: u64,
    },
}

/// A record taken from the ring, with its sequence number and the writing producer's epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received<'a> {
    /// Position and epoch.
    pub meta: RecordMeta,
    /// The record; borrowed from the consumer's private copy of the slot.
    pub record: Record<'a>,
}

fn eventfd_signal(fd: rustix::fd::BorrowedFd<'_>) {
    // A full counter (EAGAIN) still wakes the reader, so the result needs no handling.
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

fn eventfd_clear(fd: rustix::fd::BorrowedFd<'_>) {
    let mut buf = [0u8; 8];
    // Non-blocking: EAGAIN just means no wakeup was pending.
    let _ = rustix::io::read(fd, &mut buf);
}

/// Waits until `fd` is readable or `timeout` passes.
fn wait_readable(fd: rustix::fd::BorrowedFd<'_>, timeout: Duration) -> Result<(), ShmError> {
    let ts = Timespec {
        tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    match poll(&mut fds, Some(&ts)) {
        Ok(_) | Err(Errno::INTR) => Ok(()),
        Err(errno) => Err(ShmError::Sys {
            what: "poll eventfd",
            errno,
        }),
    }
}

fn check_positions(head: u64, tail: u64, capacity: u64) -> Result<u64, ShmError> {
    match head.checked_sub(tail) {
        Some(used) if used <= capacity => Ok(used),
        _ => Err(ShmError::Corrupt { head, tail }),
    }
}

/// The writing end of one ring.
///
/// Hot path: [`Producer::try_push`] (one slot write, one Release store, one fence and one load;
/// a system call only when the consumer sleeps). [`Producer::try_push_batch`] publishes many
/// records with one store.
pub struct Producer {
    shared: Arc<Shared>,
    dir: Direction,
    slots: *mut u8,
    slot_size: usize,
    capacity: u64,
    mask: u64,
    head: u64,
    cached_tail: u64,
    epoch: u64,
    wakeups: u64,
}

// SAFETY: the raw slot pointer points into the mapping that `shared` keeps alive; the producer is
// the only writer of its slots in this process (enforced by `Shared::take`), so moving it to
// another thread is fine. It is not `Sync`: every operation takes `&mut self`.
unsafe impl Send for Producer {}

impl core::fmt::Debug for Producer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Producer")
            .field("dir", &self.dir)
            .field("head", &self.head)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl Producer {
    pub(super) fn new(shared: Arc<Shared>, dir: Direction) -> Result<Producer, ShmError> {
        shared.take(dir, true)?;
        let ring = *shared.layout.ring(dir);
        let capacity = ring.capacity as u64;
        let ctl = shared.control(dir);
        let head = ctl.head.load(Ordering::Acquire);
        let tail = ctl.tail.load(Ordering::Acquire);
        if let Err(e) = check_positions(head, tail, capacity) {
            shared.release(dir, true);
            return Err(e);
        }
        // A new epoch per start; 0 is reserved for "no producer yet".
        let mut epoch = ctl
            .producer_epoch
            .fetch_add(1, Ordering::AcqRel)
            .wrapping_add(1);
        if epoch == 0 {
            epoch = ctl
                .producer_epoch
                .fetch_add(1, Ordering::AcqRel)
                .wrapping_add(1);
        }
        Ok(Producer {
            slots: shared.slots(dir),
            slot_size: shared.layout.slot_size,
            dir,
            capacity,
            mask: capacity - 1,
            head,
            cached_tail: tail,
            epoch,
            wakeups: 0,
            shared,
        })
    }

    /// Which ring this produces on.
    pub fn direction(&self) -> Direction {
        self.dir
    }

    /// This producer's epoch, stamped on every record it writes.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Records written so far (the ring's head position).
    pub fn position(&self) -> u64 {
        self.head
    }

    /// How many times this producer wrote the data eventfd (the consumer was asleep).
    pub fn wakeups_sent(&self) -> u64 {
        self.wakeups
    }

    /// Free slots, re-reading the consumer's position.
    pub fn free_slots(&mut self) -> Result<u64, ShmError> {
        self.refresh_tail()?;
        Ok(self.capacity - (self.head - self.cached_tail))
    }

    /// Records written but not yet consumed, re-reading the consumer's position.
    pub fn in_flight(&mut self) -> Result<u64, ShmError> {
        self.refresh_tail()?;
        Ok(self.head - self.cached_tail)
    }

    fn refresh_tail(&mut self) -> Result<(), ShmError> {
        let tail = self.shared.control(self.dir).tail.load(Ordering::Acquire);
        check_positions(self.head, tail, self.capacity)?;
        self.cached_tail = tail;
        Ok(())
    }

    fn has_space(&mut self) -> Result<bool, ShmError> {
        if self.head - self.cached_tail < self.capacity {
            return Ok(true);
        }
        self.refresh_tail()?;
        Ok(self.head - self.cached_tail < self.capacity)
    }

    /// Encodes `record` into the next slot, without publishing it. Space has been checked.
    fn write(&mut self, record: &Record<'_>) -> Result<(), EncodeError> {
        let off = (self.head & self.mask) as usize * self.slot_size;
        // SAFETY: `off + slot_size` is within the ring's slot array (head & mask < capacity), the
        // slot is free (head - tail < capacity), so the consumer no longer reads it and only this
        // producer writes it until `head` is published past it.
        let slot = unsafe { core::slice::from_raw_parts_mut(self.slots.add(off), self.slot_size) };
        record.encode(
            RecordMeta {
                seq: self.head,
                epoch: self.epoch,
            },
            slot,
        )?;
        Ok(())
    }

    fn publish(&mut self) {
        let ctl = self.shared.control(self.dir);
        ctl.head.store(self.head, Ordering::Release);
        fence(Ordering::SeqCst);
        if ctl.consumer_sleeping.load(Ordering::Relaxed) != 0
            && ctl.consumer_sleeping.swap(0, Ordering::AcqRel) != 0
        {
            self.wakeups += 1;
            eventfd_signal(self.shared.event(self.dir, false));
        }
    }

    /// Writes one record and publishes it, or reports [`TryPushError::Full`] without writing.
    pub fn try_push(&mut self, record: &Record<'_>) -> Result<(), TryPushError> {
        if record.encoded_len() > self.slot_size {
            return Err(EncodeError::TooLarge {
                needed: record.encoded_len(),
                capacity: self.slot_size,
            }
            .into());
        }
        if !self.has_space()? {
            return Err(TryPushError::Full);
        }
        self.write(record)?;
        self.head += 1;
        self.publish();
        Ok(())
    }

    /// Writes as many of `records` as fit, publishes them with one store, and returns how many
    /// were written (0 when the ring is full). Stops before the first record too large for a slot
    /// and reports it if it is the first.
    pub fn try_push_batch(&mut self, records: &[Record<'_>]) -> Result<usize, TryPushError> {
        let mut n = 0;
        for r in records {
            if !self.has_space()? {
                break;
            }
            if let Err(e) = self.write(r) {
                if n == 0 {
                    return Err(e.into());
                }
                break;
            }
            self.head += 1;
            n += 1;
        }
        if n > 0 {
            self.publish();
        }
        Ok(n)
    }

    /// Pushes one record, waiting up to `timeout` for space while the ring is full.
    pub fn push(&mut self, record: &Record<'_>, timeout: Duration) -> Result<(), PushError> {
        // The clock is read only once the ring turns out to be full.
        let mut deadline = None;
        loop {
            match self.try_push(record) {
                Ok(()) => return Ok(()),
                Err(TryPushError::Full) => {}
                Err(TryPushError::TooLarge(e)) => return Err(e.into()),
                Err(TryPushError::Shm(e)) => return Err(e.into()),
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + timeout);
            self.wait_space(deadline)?;
        }
    }

    /// Waits until the ring has a free slot, or `deadline` passes ([`PushError::TimedOut`]).
    pub fn wait_space(&mut self, deadline: Instant) -> Result<(), PushError> {
        for _ in 0..SPINS {
            if self.has_space()? {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        loop {
            if !self.arm()? {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                self.disarm();
                return Err(PushError::TimedOut);
            }
            wait_readable(self.space_fd(), deadline - now)?;
            self.disarm();
        }
    }

    /// Announces that this producer is about to sleep on [`Producer::space_fd`] because the ring
    /// is full. Returns `false` (and does not arm) if a slot is free already: don't sleep then.
    /// After waking, call [`Producer::disarm`]. For event loops that poll the eventfd themselves.
    ///
    /// The wakeup comes once a quarter of the ring is free, so a producer that outruns its
    /// consumer sleeps once per quarter ring rather than once per record.
    pub fn arm(&mut self) -> Result<bool, ShmError> {
        let wake_at = self.head.saturating_sub(self.capacity) + (self.capacity / 4).max(1);
        let shared = self.shared.clone();
        let ctl = shared.control(self.dir);
        ctl.producer_sleeping.store(wake_at + 1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.has_space()? {
            ctl.producer_sleeping.store(0, Ordering::Relaxed);
            return Ok(false);
        }
        Ok(true)
    }

    /// Ends a sleep begun with [`Producer::arm`]: clears the flag and the eventfd.
    pub fn disarm(&mut self) {
        self.shared
            .control(self.dir)
            .producer_sleeping
            .store(0, Ordering::Relaxed);
        eventfd_clear(self.space_fd());
    }

    /// The "space available" eventfd of this ring (readable after the consumer woke us).
    pub fn space_fd(&self) -> rustix::fd::BorrowedFd<'_> {
        self.shared.event(self.dir, true)
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.shared.release(self.dir, true);
    }
}

/// The reading end of one ring.
///
/// Each record is copied out of its slot into a private buffer before it is decoded (so the
/// producer cannot change it between check and use) and the slot is handed back at once.
pub struct Consumer {
    shared: Arc<Shared>,
    dir: Direction,
    slots: *const u8,
    slot_size: usize,
    capacity: u64,
    mask: u64,
    tail: u64,
    cached_head: u64,
    known_epoch: u64,
    scratch: Box<[u8]>,
    wakeups: u64,
}

// SAFETY: as for `Producer`: the pointer is kept valid by `shared`, and the consumer is unique per
// ring in this process.
unsafe impl Send for Consumer {}

impl core::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Consumer")
            .field("dir", &self.dir)
            .field("tail", &self.tail)
            .field("known_epoch", &self.known_epoch)
            .finish()
    }
}

impl Consumer {
    pub(super) fn new(shared: Arc<Shared>, dir: Direction) -> Result<Consumer, ShmError> {
        shared.take(dir, false)?;
        let ring = *shared.layout.ring(dir);
        let capacity = ring.capacity as u64;
        let ctl = shared.control(dir);
        let tail = ctl.tail.load(Ordering::Acquire);
        let head = ctl.head.load(Ordering::Acquire);
        if let Err(e) = check_positions(head, tail, capacity) {
            shared.release(dir, false);
            return Err(e);
        }
        Ok(Consumer {
            slots: shared.slots(dir),
            slot_size: shared.layout.slot_size,
            dir,
            capacity,
            mask: capacity - 1,
            tail,
            cached_head: head,
            known_epoch: ctl.producer_epoch.load(Ordering::Acquire),
            scratch: vec![0u8; shared.layout.slot_size].into_boxed_slice(),
            wakeups: 0,
            shared,
        })
    }

    /// Which ring this consumes.
    pub fn direction(&self) -> Direction {
        self.dir
    }

    /// Records consumed so far (the ring's tail position).
    pub fn position(&self) -> u64 {
        self.tail
    }

    /// The producer epoch this consumer has acknowledged through [`Consumer::poll_epoch`].
    pub fn known_epoch(&self) -> u64 {
        self.known_epoch
    }

    /// How many times this consumer wrote the space eventfd (the producer was asleep).
    pub fn wakeups_sent(&self) -> u64 {
        self.wakeups
    }

    /// Reports a producer (re)start since the last call: the producer's epoch differs from the one
    /// this consumer knew. Records keep their writer's epoch in [`Received::meta`], so records
    /// still queued from before the restart can be told apart.
    pub fn poll_epoch(&mut self) -> Option<EpochChange> {
        let current = self
            .shared
            .control(self.dir)
            .producer_epoch
            .load(Ordering::Acquire);
        (current != self.known_epoch).then(|| {
            let change = EpochChange {
                previous: self.known_epoch,
                current,
            };
            self.known_epoch = current;
            change
        })
    }

    /// Records ready to read, re-reading the producer's position.
    pub fn available(&mut self) -> Result<u64, ShmError> {
        let head = self.shared.control(self.dir).head.load(Ordering::Acquire);
        check_positions(head, self.tail, self.capacity)?;
        self.cached_head = head;
        Ok(head - self.tail)
    }

    fn has_data(&mut self) -> Result<bool, ShmError> {
        if self.cached_head != self.tail {
            return Ok(true);
        }
        Ok(self.available()? > 0)
    }

    /// Copies the slot at `tail` into `scratch`; returns the bytes copied. Data is available.
    fn copy_slot(&mut self) -> usize {
        let off = (self.tail & self.mask) as usize * self.slot_size;
        // SAFETY: the slot is inside the ring's slot array and published (tail < head, read with
        // Acquire), so the producer will not write it until we publish a tail past it. The copy
        // goes through raw pointers into private memory; the length is taken from our copy of
        // the header and clamped to the slot, so a lying header cannot make us read out of bounds.
        unsafe {
            let src = self.slots.add(off);
            let dst = self.scratch.as_mut_ptr();
            core::ptr::copy_nonoverlapping(src, dst, RECORD_HEADER_LEN);
            let len = self
                .scratch
                .get(4..8)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_le_bytes)
                .unwrap_or(0) as usize;
            let copy = RECORD_HEADER_LEN + len.min(self.slot_size - RECORD_HEADER_LEN);
            core::ptr::copy_nonoverlapping(
                src.add(RECORD_HEADER_LEN),
                dst.add(RECORD_HEADER_LEN),
                copy - RECORD_HEADER_LEN,
            );
            copy
        }
    }

    fn release(&mut self) {
        let ctl = self.shared.control(self.dir);
        ctl.tail.store(self.tail, Ordering::Release);
        fence(Ordering::SeqCst);
        let sleeping = ctl.producer_sleeping.load(Ordering::Relaxed);
        if sleeping != 0
            && self.tail >= sleeping - 1
            && ctl.producer_sleeping.swap(0, Ordering::AcqRel) != 0
        {
            self.wakeups += 1;
            eventfd_signal(self.shared.event(self.dir, true));
        }
    }

    fn decode(scratch: &[u8], position: u64) -> Result<Received<'_>, PopError> {
        let (meta, record) =
            Record::decode(scratch).map_err(|error| PopError::Decode { position, error })?;
        if meta.seq != position {
            return Err(PopError::Sequence {
                position,
                seq: meta.seq,
            });
        }
        Ok(Received { meta, record })
    }

    /// Takes the next record, if any. `Ok(None)`: the ring is empty. `Err(ShmError)`: the ring's
    /// positions are corrupt. `Ok(Some(Err(PopError)))`: a slot held garbage; it was consumed.
    #[allow(clippy::type_complexity)]
    pub fn pop(&mut self) -> Result<Option<Result<Received<'_>, PopError>>, ShmError> {
        if !self.has_data()? {
            return Ok(None);
        }
        let position = self.tail;
        let n = self.copy_slot();
        self.tail += 1;
        self.release();
        Ok(Some(Self::decode(
            self.scratch.get(..n).unwrap_or(&[]),
            position,
        )))
    }

    /// Calls `f` for up to `max` waiting records, in order, and hands their slots back with one
    /// store at the end. Returns how many were taken (0: the ring was empty).
    pub fn drain<F>(&mut self, max: usize, mut f: F) -> Result<usize, ShmError>
    where
        F: FnMut(Result<Received<'_>, PopError>),
    {
        let avail = if self.cached_head != self.tail {
            self.cached_head - self.tail
        } else {
            self.available()?
        };
        let n = avail.min(max as u64);
        for _ in 0..n {
            let position = self.tail;
            let len = self.copy_slot();
            self.tail += 1;
            f(Self::decode(
                self.scratch.get(..len).unwrap_or(&[]),
                position,
            ));
        }
        if n > 0 {
            self.release();
        }
        Ok(n as usize)
    }

    /// Announces that this consumer is about to sleep on [`Consumer::data_fd`]. Returns `false`
    /// (and does not arm) if records are already waiting: don't sleep then. After waking, call
    /// [`Consumer::disarm`]. For event loops that poll the eventfd themselves (io_uring, mio).
    pub fn arm(&mut self) -> Result<bool, ShmError> {
        let ctl = self.shared.control(self.dir);
        ctl.consumer_sleeping.store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.available()? > 0 {
            self.shared
                .control(self.dir)
                .consumer_sleeping
                .store(0, Ordering::Relaxed);
            return Ok(false);
        }
        Ok(true)
    }

    /// Ends a sleep begun with [`Consumer::arm`]: clears the flag and the eventfd.
    pub fn disarm(&mut self) {
        self.shared
            .control(self.dir)
            .consumer_sleeping
            .store(0, Ordering::Relaxed);
        eventfd_clear(self.shared.event(self.dir, false));
    }

    /// The "data available" eventfd of this ring (readable after the producer woke us).
    pub fn data_fd(&self) -> rustix::fd::BorrowedFd<'_> {
        self.shared.event(self.dir, false)
    }

    /// Waits up to `timeout` for a record; returns whether one is available (`false` only once
    /// the timeout has passed: spurious eventfd wakeups are absorbed here).
    pub fn wait(&mut self, timeout: Duration) -> Result<bool, ShmError> {
        for _ in 0..SPINS {
            if self.has_data()? {
                return Ok(true);
            }
            core::hint::spin_loop();
        }
        let deadline = Instant::now() + timeout;
        loop {
            if !self.arm()? {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                self.disarm();
                return self.has_data();
            }
            wait_readable(self.data_fd(), deadline - now)?;
            self.disarm();
            if self.has_data()? {
                return Ok(true);
            }
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.shared.release(self.dir, false);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{PeerId, Region, RegionConfig};
    use super::*;

    fn small() -> Region {
        Region::create(&RegionConfig {
            down_capacity: 8,
            up_capacity: 4,
            slot_size: 256,
        })
        .unwrap()
    }

    fn peer(r: Result<Received<'_>, PopError>) -> (u64, u64) {
        match r.unwrap() {
            Received {
                meta,
                record: Record::PeerDown(PeerId(p)),
            } => (meta.seq, p),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn full_ring_reports_and_never_overwrites() {
        let r = small();
        let mut p = r.producer(Direction::Down).unwrap();
        let mut c = r.consumer(Direction::Down).unwrap();
        for i in 0..8 {
            p.try_push(&Record::PeerDown(PeerId(i))).unwrap();
        }
        assert_eq!(
            p.try_push(&Record::PeerDown(PeerId(99))),
            Err(TryPushError::Full)
        );
        assert_eq!(
            p.push(&Record::PeerDown(PeerId(99)), Duration::from_millis(20)),
            Err(PushError::TimedOut)
        );
        for i in 0..8 {
            assert_eq!(peer(c.pop().unwrap().unwrap()), (i, i));
        }
        assert!(c.pop().unwrap().is_none());
        // Wraps around.
        let recs: Vec<_> = (8..20).map(|i| Record::PeerDown(PeerId(i))).collect();
        assert_eq!(p.try_push_batch(&recs).unwrap(), 8);
        let mut seen = vec![];
        assert_eq!(c.drain(100, |r| seen.push(peer(r))).unwrap(), 8);
        assert_eq!(seen, (8..16).map(|i| (i, i)).collect::<Vec<_>>());
    }

    #[test]
    fn too_large_and_garbage() {
        let r = small();
        let mut p = r.producer(Direction::Up).unwrap();
        let mut c = r.consumer(Direction::Up).unwrap();
        let big = Record::PuntedPacket {
            from: "127.0.0.1:1".parse().unwrap(),
            reason: super::super::PuntReason::ControlFrame,
            bytes: &[0; 256],
        };
        assert!(matches!(p.try_push(&big), Err(TryPushError::TooLarge(_))));
        p.try_push(&Record::PeerDown(PeerId(1))).unwrap();
        // Scribble over the published slot's kind, as a broken producer would.
        // SAFETY: test only; the consumer has not read the slot yet.
        unsafe { *r.shared_slots(Direction::Up) = 0xee };
        assert!(matches!(
            c.pop().unwrap().unwrap(),
            Err(PopError::Decode {
                position: 0,
                error: DecodeError::UnknownKind(0xee)
            })
        ));
        // The bad slot was consumed; the ring goes on.
        p.try_push(&Record::PeerDown(PeerId(2))).unwrap();
        assert_eq!(peer(c.pop().unwrap().unwrap()), (1, 2));
    }

    #[test]
    fn corrupt_positions_are_errors() {
        let r = small();
        let mut c = r.consumer(Direction::Down).unwrap();
        r.shared_control(Direction::Down)
            .head
            .store(100, Ordering::Release);
        assert_eq!(c.available(), Err(ShmError::Corrupt { head: 100, tail: 0 }));
        assert!(r.producer(Direction::Down).is_err());
    }

    #[test]
    fn sleeping_producer_is_woken_once_a_quarter_is_free() {
        let r = small();
        let mut p = r.producer(Direction::Down).unwrap();
        let mut c = r.consumer(Direction::Down).unwrap();
        for i in 0..8 {
            p.try_push(&Record::PeerDown(PeerId(i))).unwrap();
        }
        assert!(p.arm().unwrap(), "full ring: the producer may sleep");
        assert_eq!(peer(c.pop().unwrap().unwrap()), (0, 0));
        assert_eq!(c.wakeups_sent(), 0, "one free slot of eight: no wakeup yet");
        assert_eq!(peer(c.pop().unwrap().unwrap()), (1, 1));
        assert_eq!(c.wakeups_sent(), 1, "a quarter free: one wakeup");
        assert_eq!(peer(c.pop().unwrap().unwrap()), (2, 2));
        assert_eq!(c.wakeups_sent(), 1, "the flag was cleared by the wakeup");
        p.disarm();
        assert!(!p.arm().unwrap(), "free slots: no sleeping");
        assert_eq!(p.free_slots().unwrap(), 3);
        p.wait_space(Instant::now()).unwrap();
    }

    #[test]
    fn stale_wakeup_does_not_end_a_wait() {
        let r = small();
        let mut c = r.consumer(Direction::Down).unwrap();
        let mut p = r.producer(Direction::Down).unwrap();
        // Armed, then a record arrives: the producer writes the eventfd...
        assert!(c.arm().unwrap());
        p.try_push(&Record::PeerDown(PeerId(0))).unwrap();
        // ...but the consumer reads the record without sleeping, leaving the count behind.
        assert_eq!(peer(c.pop().unwrap().unwrap()), (0, 0));
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            p.try_push(&Record::PeerDown(PeerId(1))).unwrap();
        });
        // The stale count wakes the consumer at once; it must go back to sleep, not give up.
        assert!(c.wait(Duration::from_secs(30)).unwrap());
        assert_eq!(peer(c.pop().unwrap().unwrap()), (1, 1));
        t.join().unwrap();
    }

    #[test]
    fn epochs_and_wakeups_in_process() {
        let r = small();
        let mut c = r.consumer(Direction::Down).unwrap();
        assert_eq!(c.poll_epoch(), None);
        let mut p = r.producer(Direction::Down).unwrap();
        assert_eq!(
            c.poll_epoch(),
            Some(EpochChange {
                previous: 0,
                current: 1
            })
        );
        assert_eq!(c.poll_epoch(), None);
        // An armed consumer gets exactly one eventfd write.
        assert!(c.arm().unwrap());
        p.try_push(&Record::PeerDown(PeerId(0))).unwrap();
        p.try_push(&Record::PeerDown(PeerId(1))).unwrap();
        assert_eq!(p.wakeups_sent(), 1);
        assert!(c.wait(Duration::from_secs(5)).unwrap());
        drop(p);
        let p2 = r.producer(Direction::Down).unwrap();
        assert_eq!(p2.epoch(), 2);
        assert_eq!(p2.position(), 2);
        assert_eq!(
            c.poll_epoch(),
            Some(EpochChange {
                previous: 1,
                current: 2
            })
        );
    }
}
