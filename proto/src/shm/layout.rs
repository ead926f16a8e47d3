//! The region's header and layout: the part of the ABI both processes must agree on byte for byte.
//!
//! The header page (4096 bytes) holds the immutable [`Header`] (written once by the creator, before
//! any other process can see the region) and one [`RingControl`] block per ring, whose fields
//! change at run time and are therefore atomics. The slot arrays of the two rings follow, each
//! starting on a page boundary.

use core::sync::atomic::AtomicU64;

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::record::RECORD_HEADER_LEN;
use super::{Direction, ShmError};

/// Magic bytes at offset 0 of every region.
pub const MAGIC: [u8; 8] = *b"HYPHASHM";
/// The ABI version this build speaks. Any change to a byte offset, a record layout or the ring
/// protocol bumps it; there is no negotiation, both processes come from the same release.
pub const ABI_VERSION: u32 = 1;
/// Bytes before the first slot array: header plus ring control blocks, one page.
pub const HEADER_PAGE: usize = 4096;
/// Offset of the down ring's control block.
pub const DOWN_CONTROL_OFFSET: usize = 128;
/// Offset of the up ring's control block.
pub const UP_CONTROL_OFFSET: usize = DOWN_CONTROL_OFFSET + core::mem::size_of::<RingControl>();
/// The largest region [`Layout::new`] accepts (1 GiB).
pub const MAX_REGION_LEN: usize = 1 << 30;
/// Smallest and largest slot sizes.
pub const SLOT_SIZE_RANGE: core::ops::RangeInclusive<usize> = 128..=65536;
/// Largest ring capacity (slots).
pub const MAX_CAPACITY: usize = 1 << 20;

/// Where one ring lives, as recorded in the header (32 bytes).
///
/// | offset | size | field          |
/// |-------:|-----:|----------------|
/// | 0      | 8    | control_offset |
/// | 8      | 8    | slots_offset   |
/// | 16     | 4    | capacity (slots, a power of two) |
/// | 20     | 12   | reserved       |
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct RingDesc {
    /// Offset of the ring's [`RingControl`].
    pub control_offset: U64,
    /// Offset of the ring's first slot.
    pub slots_offset: U64,
    /// Number of slots, a power of two.
    pub capacity: U32,
    /// Zero.
    pub reserved: [u8; 12],
}
const _: () = assert!(core::mem::size_of::<RingDesc>() == 32);

/// The immutable region header at offset 0 (128 bytes).
///
/// | offset | size | field             |
/// |-------:|-----:|-------------------|
/// | 0      | 8    | magic `HYPHASHM`  |
/// | 8      | 4    | abi_version       |
/// | 12     | 4    | header_len (4096) |
/// | 16     | 8    | region_len        |
/// | 24     | 4    | slot_size         |
/// | 28     | 4    | record_header_len (32) |
/// | 32     | 32   | rings\[0\]: down (control plane → dataplane) |
/// | 64     | 32   | rings\[1\]: up (dataplane → control plane)   |
/// | 96     | 32   | reserved          |
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`ABI_VERSION`].
    pub abi_version: U32,
    /// [`HEADER_PAGE`].
    pub header_len: U32,
    /// Length of the whole region in bytes.
    pub region_len: U64,
    /// Bytes per slot (both rings).
    pub slot_size: U32,
    /// [`RECORD_HEADER_LEN`].
    pub record_header_len: U32,
    /// Down ring, then up ring.
    pub rings: [RingDesc; 2],
    /// Zero.
    pub reserved: [u8; 32],
}
const _: () = assert!(core::mem::size_of::<Header>() == 128);
const _: () = assert!(core::mem::size_of::<Header>() <= DOWN_CONTROL_OFFSET);

/// The run-time state of one ring (512 bytes, four 128-byte blocks).
///
/// Each block has one writer, so the two processes never write the same cache line (128 bytes,
/// not 64, because x86's adjacent-line prefetcher pulls lines in pairs):
///
/// | offset | field             | written by                         |
/// |-------:|-------------------|------------------------------------|
/// | 0      | head              | producer (Release)                 |
/// | 8      | producer_epoch    | producer, once per start           |
/// | 128    | tail              | consumer (Release)                 |
/// | 256    | consumer_sleeping | consumer sets, producer clears     |
/// | 384    | producer_sleeping | producer sets, consumer clears     |
///
/// `consumer_sleeping` is 0 or 1. `producer_sleeping` is 0, or one more than the tail position at
/// which the sleeping producer wants its wakeup (it sleeps only when the ring is full and asks to
/// be woken once a quarter of the ring is free).
///
/// `head` and `tail` are free-running counters of records written and read; the slot of
/// position `p` is `p mod capacity`, the ring is full when `head - tail == capacity`.
///
/// Atomics in shared memory are sound here because: the mapping is `MAP_SHARED`, page-aligned, and
/// every atomic sits at a multiple of 8 (checked by the const asserts); `AtomicU64` is lock-free on
/// every target we build for (`target_has_atomic = "64"`), and lock-free atomics are address-free,
/// so two processes mapping the same physical page at different addresses synchronize exactly as
/// two threads would; and after creation these bytes are only ever accessed through the atomics.
#[derive(FromBytes, KnownLayout)]
#[repr(C, align(128))]
pub struct RingControl {
    /// Records written (producer's position).
    pub head: AtomicU64,
    /// The current producer's epoch; bumped by each producer start.
    pub producer_epoch: AtomicU64,
    _p0: [u8; 112],
    /// Records read (consumer's position).
    pub tail: AtomicU64,
    _p1: [u8; 120],
    /// Non-zero while the consumer is (about to be) asleep on the data eventfd.
    pub consumer_sleeping: AtomicU64,
    _p2: [u8; 120],
    /// Non-zero while the producer is (about to be) asleep on the space eventfd: the tail
    /// position plus one at which it wants to be woken.
    pub producer_sleeping: AtomicU64,
    _p3: [u8; 120],
}
const _: () = assert!(core::mem::size_of::<RingControl>() == 512);
const _: () = assert!(core::mem::offset_of!(RingControl, tail) == 128);
const _: () = assert!(core::mem::offset_of!(RingControl, consumer_sleeping) == 256);
const _: () = assert!(core::mem::offset_of!(RingControl, producer_sleeping) == 384);
const _: () = assert!(UP_CONTROL_OFFSET + core::mem::size_of::<RingControl>() <= HEADER_PAGE);
const _: () =
    assert!(DOWN_CONTROL_OFFSET.is_multiple_of(128) && UP_CONTROL_OFFSET.is_multiple_of(128));
#[cfg(not(target_has_atomic = "64"))]
compile_error!("the shared-memory ring needs lock-free 64-bit atomics");

/// Sizes of a region to create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionConfig {
    /// Slots of the down ring (control plane → dataplane); a power of two.
    pub down_capacity: usize,
    /// Slots of the up ring (dataplane → control plane); a power of two.
    pub up_capacity: usize,
    /// Bytes per slot, a multiple of 64 in [`SLOT_SIZE_RANGE`].
    pub slot_size: usize,
}

impl Default for RegionConfig {
    /// 4096 slots of 2048 bytes each way (16 MiB): a 1500-byte packet fits a slot.
    fn default() -> Self {
        RegionConfig {
            down_capacity: 4096,
            up_capacity: 4096,
            slot_size: 2048,
        }
    }
}

/// Where one ring lives in the mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    /// Offset of its [`RingControl`].
    pub control_offset: usize,
    /// Offset of its first slot.
    pub slots_offset: usize,
    /// Slots, a power of two.
    pub capacity: usize,
}

/// The validated layout of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Bytes per slot.
    pub slot_size: usize,
    /// Total length.
    pub region_len: usize,
    /// Down ring, then up ring (index with [`Direction::index`]).
    pub rings: [RingLayout; 2],
}

fn page_align(n: usize) -> Option<usize> {
    n.checked_add(HEADER_PAGE - 1)
        .map(|n| n & !(HEADER_PAGE - 1))
}

impl Layout {
    /// The layout for `config`, or why it is not acceptable.
    pub fn new(config: &RegionConfig) -> Result<Layout, ShmError> {
        let slot_size = config.slot_size;
        if !SLOT_SIZE_RANGE.contains(&slot_size) || !slot_size.is_multiple_of(64) {
            return Err(ShmError::Config(
                "slot size must be a multiple of 64 in 128..=65536",
            ));
        }
        for cap in [config.down_capacity, config.up_capacity] {
            if !cap.is_power_of_two() || !(2..=MAX_CAPACITY).contains(&cap) {
                return Err(ShmError::Config(
                    "ring capacity must be a power of two in 2..=2^20",
                ));
            }
        }
        let too_big = ShmError::Config("region larger than 1 GiB");
        let down_slots = HEADER_PAGE;
        let up_slots = config
            .down_capacity
            .checked_mul(slot_size)
            .and_then(|n| n.checked_add(down_slots))
            .and_then(page_align)
            .ok_or(too_big.clone())?;
        let region_len = config
            .up_capacity
            .checked_mul(slot_size)
            .and_then(|n| n.checked_add(up_slots))
            .and_then(page_align)
            .filter(|&n| n <= MAX_REGION_LEN)
            .ok_or(too_big)?;
        Ok(Layout {
            slot_size,
            region_len,
            rings: [
                RingLayout {
                    control_offset: DOWN_CONTROL_OFFSET,
                    slots_offset: down_slots,
                    capacity: config.down_capacity,
                },
                RingLayout {
                    control_offset: UP_CONTROL_OFFSET,
                    slots_offset: up_slots,
                    capacity: config.up_capacity,
                },
            ],
        })
    }

    /// The config this layout was computed from.
    pub fn config(&self) -> RegionConfig {
        RegionConfig {
            down_capacity: self.rings[0].capacity,
            up_capacity: self.rings[1].capacity,
            slot_size: self.slot_size,
        }
    }

    /// The ring for `dir`.
    pub fn ring(&self, dir: Direction) -> &RingLayout {
        &self.rings[dir.index()]
    }

    /// The header that describes this layout.
    pub fn header(&self) -> Header {
        let desc = |r: &RingLayout| RingDesc {
            control_offset: U64::new(r.control_offset as u64),
            slots_offset: U64::new(r.slots_offset as u64),
            capacity: U32::new(r.capacity as u32),
            reserved: [0; 12],
        };
        Header {
            magic: MAGIC,
            abi_version: U32::new(ABI_VERSION),
            header_len: U32::new(HEADER_PAGE as u32),
            region_len: U64::new(self.region_len as u64),
            slot_size: U32::new(self.slot_size as u32),
            record_header_len: U32::new(RECORD_HEADER_LEN as u32),
            rings: [desc(&self.rings[0]), desc(&self.rings[1])],
            reserved: [0; 32],
        }
    }

    /// Validates a header read from a region of `file_len` bytes (outside input).
    ///
    /// Magic and ABI version are checked first, so a region from another program or another
    /// release gets the error that says so; then the layout is recomputed from the sizes and must
    /// match the recorded offsets exactly.
    pub fn from_header(h: &Header, file_len: u64) -> Result<Layout, ShmError> {
        if h.magic != MAGIC {
            return Err(ShmError::BadMagic { found: h.magic });
        }
        if h.abi_version.get() != ABI_VERSION {
            return Err(ShmError::AbiVersion {
                found: h.abi_version.get(),
                expected: ABI_VERSION,
            });
        }
        if h.header_len.get() as usize != HEADER_PAGE
            || h.record_header_len.get() as usize != RECORD_HEADER_LEN
        {
            return Err(ShmError::Layout("header or record header length"));
        }
        let config = RegionConfig {
            down_capacity: h.rings[0].capacity.get() as usize,
            up_capacity: h.rings[1].capacity.get() as usize,
            slot_size: h.slot_size.get() as usize,
        };
        let layout = Layout::new(&config).map_err(|e| match e {
            ShmError::Config(why) => ShmError::Layout(why),
            other => other,
        })?;
        if layout.header().as_bytes() != h.as_bytes() {
            return Err(ShmError::Layout(
                "recorded offsets differ from the computed layout",
            ));
        }
        if layout.region_len as u64 != file_len {
            return Err(ShmError::Layout(
                "region length differs from the memfd's size",
            ));
        }
        Ok(layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout() {
        let l = Layout::new(&RegionConfig::default()).unwrap();
        assert_eq!(l.rings[0].slots_offset, 4096);
        assert_eq!(l.rings[1].slots_offset, 4096 + 4096 * 2048);
        assert_eq!(l.region_len, 4096 + 2 * 4096 * 2048);
        let h = l.header();
        assert_eq!(Layout::from_header(&h, l.region_len as u64), Ok(l));
        assert_eq!(&h.as_bytes()[..8], b"HYPHASHM");
    }

    #[test]
    fn bad_configs() {
        for (d, u, s) in [
            (3, 4, 2048),
            (4, 0, 2048),
            (4, 4, 100),
            (4, 4, 64),
            (1 << 21, 4, 128),
        ] {
            let c = RegionConfig {
                down_capacity: d,
                up_capacity: u,
                slot_size: s,
            };
            assert!(matches!(Layout::new(&c), Err(ShmError::Config(_))), "{c:?}");
        }
        let c = RegionConfig {
            down_capacity: 1 << 20,
            up_capacity: 1 << 20,
            slot_size: 65536,
        };
        assert!(Layout::new(&c).is_err());
    }

    #[test]
    fn header_checks() {
        let l = Layout::new(&RegionConfig::default()).unwrap();
        let len = l.region_len as u64;
        let mut h = l.header();
        h.magic[0] = b'X';
        assert!(matches!(
            Layout::from_header(&h, len),
            Err(ShmError::BadMagic { .. })
        ));
        let mut h = l.header();
        h.abi_version = U32::new(ABI_VERSION + 1);
        assert_eq!(
            Layout::from_header(&h, len),
            Err(ShmError::AbiVersion {
                found: ABI_VERSION + 1,
                expected: ABI_VERSION
            })
        );
        let mut h = l.header();
        h.rings[1].slots_offset = U64::new(4096);
        assert!(matches!(
            Layout::from_header(&h, len),
            Err(ShmError::Layout(_))
        ));
        assert!(matches!(
            Layout::from_header(&l.header(), len + 4096),
            Err(ShmError::Layout(_))
        ));
    }
}
