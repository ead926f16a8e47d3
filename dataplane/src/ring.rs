//! The one place that talks to io_uring: submissions, completions and the provided-buffer ring.
//!
//! **user_data** packs an operation kind ([`Op`], the top byte) and an index (the low 32 bits: a
//! pool buffer index or a send-slot index), tcp_echo's `Token` squeezed into a `u64` (STYLE.md §5).
//! [`CANCEL_USER_DATA`] at the top of the range marks the shutdown cancel.
//!
//! **Ownership rule for every submission** (the `// SAFETY:` comments below refer to it): the
//! memory an entry points at — a pool buffer, a `msghdr` with its `iovec` and address — must stay
//! valid and unmoved until that entry's completion has been reaped. The worker keeps every such
//! buffer in its in-flight table, never in the pool's free list, and returns it to the free list
//! only on its completion; on shutdown it cancels and reaps before dropping the pool. The
//! `unsafe fn`s here hand that obligation to their caller.
//!
//! **A full submission queue** means submit and retry ([`Ring::push`]); it is counted, never queued
//! without bound.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::types::{BufRingEntry, CancelBuilder, Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};

/// What an in-flight operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// A read from the TUN queue into pool buffer `index`.
    TunRead = 1,
    /// A write to the TUN queue from send slot `index`.
    TunWrite = 2,
    /// A `sendmsg` on the UDP socket from send slot `index`.
    UdpSend = 3,
    /// The multishot `recvmsg` on the UDP socket (the buffer comes in the completion flags).
    UdpRecv = 4,
}

/// user_data of the shutdown cancel.
pub const CANCEL_USER_DATA: u64 = u64::MAX;

/// Packs `op` and `index` into a user_data value.
#[inline]
pub const fn pack(op: Op, index: u32) -> u64 {
    ((op as u64) << 56) | index as u64
}

/// Unpacks a user_data value; `None` for the reserved values.
#[inline]
pub fn unpack(user_data: u64) -> Option<(Op, u32)> {
    let index = user_data as u32;
    let op = match user_data >> 56 {
        1 => Op::TunRead,
        2 => Op::TunWrite,
        3 => Op::UdpSend,
        4 => Op::UdpRecv,
        _ => return None,
    };
    Some((op, index))
}

/// One completion, copied out of the completion queue.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// The operation's user_data.
    pub user_data: u64,
    /// The result (bytes, or a negated errno).
    pub result: i32,
    /// The completion flags (buffer id, more).
    pub flags: u32,
}

impl Completion {
    /// The provided buffer the kernel picked, for buffer-select operations.
    pub fn buffer_id(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }

    /// Whether a multishot operation stays armed after this completion.
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }
}

/// A worker's io_uring.
pub struct Ring {
    uring: IoUring,
    sq_full: u64,
}

impl Ring {
    /// A ring with `entries` submission slots and four times as many completion slots (so the
    /// operations a worker keeps in flight can never overflow the completion queue).
    pub fn new(entries: u32) -> io::Result<Ring> {
        let uring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(4))
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(entries)?;
        Ok(Ring { uring, sq_full: 0 })
    }

    /// How often the submission queue was full.
    pub fn sq_full(&self) -> u64 {
        self.sq_full
    }

    /// Pushes an entry; a full queue is submitted first.
    ///
    /// # Safety
    /// The entry's memory must follow the module's ownership rule.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: forwarded to our caller (module ownership rule).
            if unsafe { self.uring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.sq_full += 1;
            match self.uring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // The completion queue is full: the caller reaps on its next turn; the
                    // kernel keeps overflowed completions (IORING_FEAT_NODROP).
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads up to `len` bytes from `fd` into `buf`.
    ///
    /// # Safety
    /// `buf..buf+len` must stay valid and unaliased by writers until the completion is reaped.
    pub unsafe fn read(
        &mut self,
        fd: RawFd,
        buf: *mut u8,
        len: u32,
        user_data: u64,
    ) -> io::Result<()> {
        let e = opcode::Read::new(Fd(fd), buf, len)
            .build()
            .user_data(user_data);
        // SAFETY: the caller keeps the buffer alive until completion (module ownership rule).
        unsafe { self.push(&e) }
    }

    /// Writes `len` bytes at `buf` to `fd`.
    ///
    /// # Safety
    /// `buf..buf+len` must stay valid until the completion is reaped.
    pub unsafe fn write(
        &mut self,
        fd: RawFd,
        buf: *const u8,
        len: u32,
        user_data: u64,
    ) -> io::Result<()> {
        let e = opcode::Write::new(Fd(fd), buf, len)
            .build()
            .user_data(user_data);
        // SAFETY: the caller keeps the buffer alive until completion (module ownership rule).
        unsafe { self.push(&e) }
    }

    /// Writes the `count` buffers the iovecs at `iov` describe to `fd`, as one write.
    ///
    /// # Safety
    /// The iovec array and every buffer it points to must stay valid until the completion is
    /// reaped.
    pub unsafe fn writev(
        &mut self,
        fd: RawFd,
        iov: *const libc::iovec,
        count: u32,
        user_data: u64,
    ) -> io::Result<()> {
        let e = opcode::Writev::new(Fd(fd), iov, count)
            .build()
            .user_data(user_data);
        // SAFETY: the caller keeps the iovecs and buffers alive (module ownership rule).
        unsafe { self.push(&e) }
    }

    /// `sendmsg(fd, msg)`.
    ///
    /// # Safety
    /// `msg` and everything it points to (address, iovecs, buffers, control data) must stay valid
    /// until the completion is reaped.
    pub unsafe fn send_msg(
        &mut self,
        fd: RawFd,
        msg: *const libc::msghdr,
        user_data: u64,
    ) -> io::Result<()> {
        let e = opcode::SendMsg::new(Fd(fd), msg)
            .build()
            .user_data(user_data);
        // SAFETY: the caller keeps the msghdr and its buffers alive (module ownership rule).
        unsafe { self.push(&e) }
    }

    /// A multishot `recvmsg` on `fd` with buffers from group `group`; `msg` gives the name and
    /// control lengths the kernel lays out in each buffer.
    ///
    /// # Safety
    /// `msg` must stay valid until the final completion (one without the "more" flag), and the
    /// buffers in the group must follow the ownership rule.
    pub unsafe fn recv_msg_multi(
        &mut self,
        fd: RawFd,
        msg: *const libc::msghdr,
        group: u16,
        user_data: u64,
    ) -> io::Result<()> {
        let e = opcode::RecvMsgMulti::new(Fd(fd), msg, group)
            .build()
            .user_data(user_data);
        // SAFETY: the caller keeps the msghdr and the provided buffers alive (ownership rule).
        unsafe { self.push(&e) }
    }

    /// Asks the kernel to cancel every in-flight operation (shutdown).
    pub fn cancel_all(&mut self) -> io::Result<()> {
        let e = opcode::AsyncCancel2::new(CancelBuilder::any())
            .build()
            .user_data(CANCEL_USER_DATA);
        // SAFETY: a cancel entry points at no memory.
        unsafe { self.push(&e) }?;
        self.uring.submit().map(drop)
    }

    /// Submits what is queued and waits for at least one completion or `timeout`.
    pub fn submit_and_wait(&mut self, timeout: Duration) -> io::Result<()> {
        let ts = Timespec::new()
            .sec(timeout.as_secs())
            .nsec(timeout.subsec_nanos());
        let args = SubmitArgs::new().timespec(&ts);
        match self.uring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Submits what is queued without waiting.
    pub fn submit(&mut self) -> io::Result<()> {
        match self.uring.submit() {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EINTR)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Moves every waiting completion into `out` (which keeps its capacity between batches).
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        for cqe in self.uring.completion() {
            out.push(Completion {
                user_data: cqe.user_data(),
                result: cqe.result(),
                flags: cqe.flags(),
            });
        }
    }
}

/// A provided-buffer ring (`IORING_REGISTER_PBUF_RING`): the kernel takes a buffer from it for
/// each datagram a multishot receive delivers.
pub struct BufRing {
    base: *mut BufRingEntry,
    map_len: usize,
    entries: u16,
    tail: u16,
    group: u16,
}

impl BufRing {
    /// Maps and registers a ring of `entries` (a power of two ≤ 32768) for buffer group `group`.
    pub fn new(ring: &Ring, entries: u16, group: u16) -> io::Result<BufRing> {
        if !entries.is_power_of_two() {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let map_len = usize::from(entries) * size_of::<BufRingEntry>();
        // SAFETY: an anonymous private mapping; the result is checked.
        let base = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let me = BufRing {
            base: base.cast(),
            map_len,
            entries,
            tail: 0,
            group,
        };
        // SAFETY: `base` is a page-aligned mapping of `entries` entries that lives as long as
        // `me`, which unregisters it before unmapping (Drop) — and `me` is dropped only after the
        // ring's operations are reaped (the worker's field order).
        unsafe {
            ring.uring
                .submitter()
                .register_buf_ring_with_flags(base as u64, entries, group, 0)?;
        }
        Ok(me)
    }

    /// The buffer group id.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// Adds a buffer; it becomes visible to the kernel at the next [`BufRing::publish`].
    ///
    /// # Safety
    /// `addr..addr+len` must stay valid until the kernel hands the buffer back in a completion
    /// (or the ring is unregistered).
    pub unsafe fn add(&mut self, addr: *mut u8, len: u32, bid: u16) {
        let mask = self.entries - 1;
        let i = usize::from(self.tail & mask);
        // SAFETY: `i < entries`, inside the mapping; the kernel only reads entries below the
        // published tail, and this one is beyond it until `publish`.
        let entry = unsafe { &mut *self.base.add(i) };
        entry.set_addr(addr as u64);
        entry.set_len(len);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes the buffers added since the last call (one release store of the tail).
    pub fn publish(&mut self) {
        // SAFETY: the tail lives in the first entry's reserved field, inside the mapping, and is
        // a naturally aligned u16 that the kernel reads atomically.
        unsafe {
            let tail = BufRingEntry::tail(self.base).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; the ring was unregistered by its owner or the io_uring
        // is already gone (a dropped io_uring releases its registrations).
        unsafe {
            libc::munmap(self.base.cast(), self.map_len);
        }
    }
}

/// Unregisters `buf_ring` from `ring` (before dropping either).
pub fn unregister(ring: &Ring, buf_ring: &BufRing) {
    let _ = ring.uring.submitter().unregister_buf_ring(buf_ring.group);
}

use std::mem::size_of;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        for op in [Op::TunRead, Op::TunWrite, Op::UdpSend, Op::UdpRecv] {
            for i in [0u32, 1, 4095, u32::MAX] {
                assert_eq!(unpack(pack(op, i)), Some((op, i)));
            }
        }
        assert_eq!(unpack(CANCEL_USER_DATA), None);
        assert_eq!(unpack(0), None);
    }
}
