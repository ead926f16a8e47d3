//! Packet buffers: allocated once per worker, handed out by index, never allocated per packet
//! (DESIGN.md Principle 2).
//!
//! A [`PacketPool`] owns `count` buffers of one size. [`PacketPool::alloc`] moves a buffer out of its
//! slot into a [`PacketBuf`] (the `Box` moves, the memory does not: an io_uring operation may point
//! into it while the `PacketBuf` travels through the worker's token slab), and
//! [`PacketPool::free`] puts it back. Every index is in exactly one place: the free list, an in-flight
//! operation, or the worker's hands (STYLE.md, dataplane).
//!
//! A `PacketBuf` is a window `[start, end)` into its buffer with headroom in front and tailroom
//! behind, so headers are prepended and the AEAD tag appended without copying the payload:
//!
//! ```text
//! | headroom        | data (len)                   | tailroom          |
//! 0               start                           end            capacity
//!    push_header ←──┤ pull_header ─→      extend_tail ├─→
//! ```
//!
//! **Sizes.** [`BufLayout::LARGE`] fits what one TUN read can return with IFF_VNET_HDR and TSO: a
//! 10-byte `virtio_net_hdr` ([`crate::vnet::LEN`]) plus a 64 KiB IPv6 super-packet, and what one UDP GRO receive can
//! coalesce (64 KiB). Its headroom ([`HEADROOM`] = 128) holds the 48-byte data header, the 1-byte
//! inner payload type and the virtio header with room to spare, rounded to cache lines; the outer
//! IPv6/UDP headers are the kernel's business (we send through a UDP socket). Its tailroom
//! ([`TAILROOM`] = 64) holds the 16-byte tag. [`BufLayout::MTU`] (2 KiB) is for workers that run
//! without offloads, where a buffer never holds more than one MTU-sized datagram.

/// Default headroom: data header (48) + payload type (1) + virtio_net_hdr (10), rounded up to two
/// cache lines.
pub const HEADROOM: usize = 128;
/// Default tailroom: the 16-byte AEAD tag, rounded up to a cache line.
pub const TAILROOM: usize = 64;

/// How big the buffers of a pool are and how much headroom a fresh buffer gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufLayout {
    /// Bytes kept free in front of the data of a freshly allocated buffer.
    pub headroom: usize,
    /// Bytes of data a fresh buffer can hold before eating into the reserved tailroom.
    pub data: usize,
    /// Bytes reserved behind the data for the tag.
    pub tailroom: usize,
}

impl BufLayout {
    /// 64 KiB of data: TSO/GRO super-packets (see the module doc).
    pub const LARGE: BufLayout = BufLayout {
        headroom: HEADROOM,
        data: 65_536 + crate::vnet::LEN,
        tailroom: TAILROOM,
    };

    /// One MTU-sized datagram per buffer (no offloads), 2 KiB in total.
    pub const MTU: BufLayout = BufLayout {
        headroom: HEADROOM,
        data: 2048 - HEADROOM - TAILROOM,
        tailroom: TAILROOM,
    };

    /// Total bytes per buffer.
    pub const fn buf_size(&self) -> usize {
        self.headroom + self.data + self.tailroom
    }
}

/// A pool or buffer operation that would break the pool's accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BufError {
    /// Not enough headroom to push a header, or data to pull one.
    #[error("not enough headroom or data at the front")]
    Front,
    /// Not enough tailroom to extend, or a length beyond the buffer.
    #[error("not enough tailroom")]
    Tail,
    /// The buffer does not belong to this pool, or its slot is not empty.
    #[error("buffer does not belong to this pool")]
    Foreign,
    /// The pool would have more than `u32::MAX` buffers.
    #[error("too many buffers")]
    TooMany,
}

/// A fixed set of equally sized packet buffers with a free list.
#[derive(Debug)]
pub struct PacketPool {
    slots: Vec<Option<Box<[u8]>>>,
    free: Vec<u32>,
    layout: BufLayout,
}

impl PacketPool {
    /// Allocates `count` buffers of `layout.buf_size()` bytes each, all free. This is the only
    /// allocation the pool ever makes.
    pub fn new(count: usize, layout: BufLayout) -> Result<PacketPool, BufError> {
        let count32 = u32::try_from(count).map_err(|_| BufError::TooMany)?;
        let size = layout.buf_size();
        let slots = (0..count)
            .map(|_| Some(vec![0u8; size].into_boxed_slice()))
            .collect();
        // Pop from the end: hand out low indices first.
        let free = (0..count32).rev().collect();
        Ok(PacketPool {
            slots,
            free,
            layout,
        })
    }

    /// The buffers' layout.
    pub fn layout(&self) -> BufLayout {
        self.layout
    }

    /// The number of buffers.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The number of free buffers.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Takes a free buffer, empty, with the layout's headroom; `None` when all are in use (that is
    /// backpressure: count it and stop reading).
    #[inline]
    pub fn alloc(&mut self) -> Option<PacketBuf> {
        let index = self.free.pop()?;
        let storage = self.slots.get_mut(index as usize)?.take()?;
        let start = self.layout.headroom;
        Some(PacketBuf {
            index,
            storage,
            start,
            end: start,
        })
    }

    /// Returns a buffer to the free list.
    #[inline]
    pub fn free(&mut self, buf: PacketBuf) -> Result<(), BufError> {
        let slot = self
            .slots
            .get_mut(buf.index as usize)
            .ok_or(BufError::Foreign)?;
        if slot.is_some() || buf.storage.len() != self.layout.buf_size() {
            return Err(BufError::Foreign);
        }
        *slot = Some(buf.storage);
        self.free.push(buf.index);
        Ok(())
    }
}

/// One buffer taken from a [`PacketPool`], with its data window.
///
/// Dropping a `PacketBuf` instead of [`PacketPool::free`]ing it loses that slot for the pool's
/// lifetime (the memory is released; the pool just has one buffer fewer).
pub struct PacketBuf {
    index: u32,
    storage: Box<[u8]>,
    start: usize,
    end: usize,
}

impl core::fmt::Debug for PacketBuf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PacketBuf")
            .field("index", &self.index)
            .field("start", &self.start)
            .field("end", &self.end)
            .field("capacity", &self.storage.len())
            .finish()
    }
}

impl PacketBuf {
    /// The buffer's index in its pool (what goes into an io_uring `user_data`).
    #[inline]
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Bytes of data.
    #[inline]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether there is no data.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Free bytes in front of the data.
    #[inline]
    pub fn headroom(&self) -> usize {
        self.start
    }

    /// Free bytes behind the data.
    #[inline]
    pub fn tailroom(&self) -> usize {
        self.storage.len() - self.end
    }

    /// The data.
    #[inline]
    pub fn data(&self) -> &[u8] {
        self.storage.get(self.start..self.end).unwrap_or(&[])
    }

    /// The data, mutable.
    #[inline]
    pub fn data_mut(&mut self) -> &mut [u8] {
        self.storage
            .get_mut(self.start..self.end)
            .unwrap_or(&mut [])
    }

    /// The data followed by the whole tailroom: for sealing in place, where the tag goes right
    /// after the data (then [`PacketBuf::extend_tail`] by the tag length).
    #[inline]
    pub fn data_and_tail_mut(&mut self) -> &mut [u8] {
        self.storage.get_mut(self.start..).unwrap_or(&mut [])
    }

    /// Grows the data by `n` bytes at the front and returns them (to write a header into).
    #[inline]
    pub fn push_header(&mut self, n: usize) -> Result<&mut [u8], BufError> {
        let start = self.start.checked_sub(n).ok_or(BufError::Front)?;
        self.start = start;
        self.storage
            .get_mut(start..start + n)
            .ok_or(BufError::Front)
    }

    /// Shrinks the data by `n` bytes at the front (a parsed header) and returns them.
    #[inline]
    pub fn pull_header(&mut self, n: usize) -> Result<&[u8], BufError> {
        if n > self.len() {
            return Err(BufError::Front);
        }
        let old = self.start;
        self.start += n;
        self.storage.get(old..old + n).ok_or(BufError::Front)
    }

    /// Grows the data by `n` bytes at the back and returns them (to write a tag into).
    #[inline]
    pub fn extend_tail(&mut self, n: usize) -> Result<&mut [u8], BufError> {
        if n > self.tailroom() {
            return Err(BufError::Tail);
        }
        let old = self.end;
        self.end += n;
        self.storage.get_mut(old..old + n).ok_or(BufError::Tail)
    }

    /// Shortens the data to `len` bytes (no-op if it is shorter), e.g. to drop a verified tag.
    #[inline]
    pub fn truncate(&mut self, len: usize) {
        if len < self.len() {
            self.end = self.start + len;
        }
    }

    /// Empties the buffer and sets the headroom to `headroom` (clamped to the buffer size).
    #[inline]
    pub fn reset(&mut self, headroom: usize) {
        let h = headroom.min(self.storage.len());
        self.start = h;
        self.end = h;
    }

    /// Everything behind the data start: where a read (TUN, UDP) writes, followed by
    /// [`PacketBuf::set_len`] with the byte count the kernel returned.
    #[inline]
    pub fn read_target(&mut self) -> &mut [u8] {
        self.storage.get_mut(self.start..).unwrap_or(&mut [])
    }

    /// Sets the data length (after a read into [`PacketBuf::read_target`]).
    #[inline]
    pub fn set_len(&mut self, len: usize) -> Result<(), BufError> {
        let end = self.start.checked_add(len).ok_or(BufError::Tail)?;
        if end > self.storage.len() {
            return Err(BufError::Tail);
        }
        self.end = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_until_empty_then_free_reuses() {
        let mut pool = PacketPool::new(3, BufLayout::MTU).unwrap();
        assert_eq!(pool.capacity(), 3);
        let a = pool.alloc().unwrap();
        let b = pool.alloc().unwrap();
        let c = pool.alloc().unwrap();
        assert_eq!([a.index(), b.index(), c.index()], [0, 1, 2]);
        assert!(pool.alloc().is_none());
        assert_eq!(pool.available(), 0);
        pool.free(b).unwrap();
        let b2 = pool.alloc().unwrap();
        assert_eq!(b2.index(), 1);
        assert_eq!(b2.headroom(), HEADROOM);
        assert!(b2.is_empty());
        for buf in [a, b2, c] {
            pool.free(buf).unwrap();
        }
        assert_eq!(pool.available(), 3);
    }

    #[test]
    fn memory_does_not_move_between_alloc_and_free() {
        let mut pool = PacketPool::new(1, BufLayout::MTU).unwrap();
        let mut a = pool.alloc().unwrap();
        let p = a.read_target().as_ptr();
        pool.free(a).unwrap();
        let mut b = pool.alloc().unwrap();
        assert_eq!(b.read_target().as_ptr(), p);
    }

    #[test]
    fn foreign_and_double_free_are_refused() {
        let mut p1 = PacketPool::new(2, BufLayout::MTU).unwrap();
        let mut p2 = PacketPool::new(2, BufLayout::LARGE).unwrap();
        let a = p1.alloc().unwrap();
        let _held = p2.alloc().unwrap();
        // Same index, wrong size.
        assert_eq!(p2.free(a), Err(BufError::Foreign));
        let mut p3 = PacketPool::new(1, BufLayout::MTU).unwrap();
        let b = p1.alloc().unwrap();
        // Index 1 does not exist in a pool of one.
        assert_eq!(p3.free(b), Err(BufError::Foreign));
        // A slot that is already full.
        let c = p3.alloc().unwrap();
        let mut p4 = PacketPool::new(1, BufLayout::MTU).unwrap();
        assert_eq!(p4.free(c), Err(BufError::Foreign));
    }

    #[test]
    fn headroom_and_tailroom_accounting() {
        let mut pool = PacketPool::new(1, BufLayout::MTU).unwrap();
        let mut buf = pool.alloc().unwrap();
        let size = BufLayout::MTU.buf_size();
        assert_eq!(size, 2048);
        assert_eq!(buf.tailroom(), size - HEADROOM);
        // A read of 100 bytes.
        buf.read_target()[..100].fill(0xab);
        buf.set_len(100).unwrap();
        assert_eq!(buf.data(), &[0xab; 100][..]);
        // Prepend a 48-byte header and a 1-byte type.
        buf.push_header(1).unwrap().copy_from_slice(&[0x00]);
        buf.push_header(48).unwrap().fill(0x01);
        assert_eq!(buf.len(), 149);
        assert_eq!(buf.headroom(), HEADROOM - 49);
        assert_eq!(buf.data()[..48], [0x01; 48]);
        assert_eq!(buf.data()[48], 0x00);
        // Append a tag.
        buf.extend_tail(16).unwrap().fill(0xcc);
        assert_eq!(buf.len(), 165);
        assert_eq!(buf.data()[149..], [0xcc; 16]);
        assert_eq!(buf.tailroom(), size - HEADROOM - 100 - 16);
        // Receive side: pull the header, drop the tag.
        assert_eq!(buf.pull_header(48).unwrap(), &[0x01; 48][..]);
        buf.truncate(buf.len() - 16);
        assert_eq!(buf.len(), 101);
        assert_eq!(buf.data()[0], 0x00);
        // Limits.
        assert_eq!(buf.pull_header(102), Err(BufError::Front));
        assert_eq!(
            buf.push_header(HEADROOM - 1 + 1),
            Err(BufError::Front),
            "headroom is 127 after pulling 48 of 49 pushed bytes"
        );
        assert!(buf.push_header(HEADROOM - 1).is_ok());
        assert_eq!(buf.headroom(), 0);
        let tail = buf.tailroom();
        assert_eq!(buf.extend_tail(tail + 1), Err(BufError::Tail));
        assert!(buf.extend_tail(tail).is_ok());
        assert_eq!(buf.tailroom(), 0);
        assert_eq!(buf.set_len(size + 1), Err(BufError::Tail));
        buf.reset(HEADROOM);
        assert!(buf.is_empty());
        assert_eq!(buf.headroom(), HEADROOM);
        buf.reset(usize::MAX);
        assert_eq!(buf.headroom(), size);
        assert_eq!(buf.tailroom(), 0);
        assert!(buf.data().is_empty());
    }

    #[test]
    fn seal_in_place_with_tag_in_tailroom() {
        use crate::session::{Cipher, OpeningKey, SealingKey, TAG_LEN};
        let mut pool = PacketPool::new(1, BufLayout::LARGE).unwrap();
        let mut buf = pool.alloc().unwrap();
        buf.extend_tail(1400).unwrap().fill(0x5a);
        let seal = SealingKey::new(Cipher::Aes256Gcm, &[9; 32]).unwrap();
        let len = buf.len();
        let sealed = seal
            .seal_in_place_append(7, b"aad", buf.data_and_tail_mut(), len)
            .unwrap();
        buf.extend_tail(sealed - len).unwrap();
        assert_eq!(buf.len(), 1400 + TAG_LEN);
        let open = OpeningKey::new(Cipher::Aes256Gcm, &[9; 32]).unwrap();
        let plain = open.open_in_place(7, b"aad", buf.data_mut()).unwrap();
        assert_eq!(plain, &[0x5a; 1400][..]);
        buf.truncate(1400);
        pool.free(buf).unwrap();
    }
}
