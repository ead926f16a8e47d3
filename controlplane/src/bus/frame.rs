//! Bus frames: what the message bus puts inside a decrypted TRANSPORT payload of inner type 0x01
//! (WIRE.md). Relays never see them; they are authenticated by the E2E session, so the checks here
//! guard against bugs and a misbehaving peer, not against forgery.
//!
//! All integers big-endian. Byte 0 is the frame type.
//!
//! DATA_CHUNK (type 0x01), a 56-byte header, then the topic (chunk 0 only), then the chunk's bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | type = 0x01 |
//! | 1 | 1 | flags: bit 0 IS_REPLY (the message answers `reply_to`); other bits 0 |
//! | 2 | 2 | chunk payload length |
//! | 4 | 8 | message id |
//! | 12 | 8 | reply-to message id (0 unless IS_REPLY) |
//! | 20 | 4 | total message length |
//! | 24 | 4 | chunk index |
//! | 28 | 4 | chunk count |
//! | 32 | 4 | offset of this chunk's bytes in the message |
//! | 36 | 1 | topic length (chunk 0 only; 0 on the others) |
//! | 37 | 3 | reserved, 0 |
//! | 40 | 16 | checksum: blake3 of the whole message, truncated to 16 bytes (same in every chunk) |
//! | 56 | .. | topic, then chunk payload |
//!
//! ACK (type 0x02), 24 bytes, then a selective-ack bitmap:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | type = 0x02 |
//! | 1 | 1 | flags: bit 0 COMPLETE (reassembled, checksum verified, delivered), bit 1 FAILED (checksum mismatch: send everything again) |
//! | 2 | 2 | bitmap length in bytes (≤ [`MAX_ACK_BITMAP`]) |
//! | 4 | 8 | message id |
//! | 12 | 4 | cumulative: chunks 0..cumulative have all arrived |
//! | 16 | 4 | echo: the chunk index whose arrival triggered this ack (an RTT sample for the sender) |
//! | 20 | 4 | reserved, 0 |
//! | 24 | .. | bitmap: bit i (LSB first in byte i/8) set = chunk cumulative+1+i has arrived |
//!
//! The sender's chunk size need not be known to the receiver: every chunk carries its offset, and the
//! receiver checks that chunks tile the message exactly (no overlap past the end, consistent totals).

use thiserror::Error;

/// DATA_CHUNK frame type.
pub const TYPE_DATA: u8 = 0x01;
/// ACK frame type.
pub const TYPE_ACK: u8 = 0x02;
/// DATA flag: the message is a reply.
pub const FLAG_IS_REPLY: u8 = 0x01;
/// ACK flag: the whole message arrived and its checksum matched.
pub const FLAG_COMPLETE: u8 = 0x01;
/// ACK flag: the reassembled message failed its checksum and was discarded.
pub const FLAG_FAILED: u8 = 0x02;
/// Length of the DATA_CHUNK header.
pub const DATA_HEADER_LEN: usize = 56;
/// Length of the ACK header.
pub const ACK_HEADER_LEN: usize = 24;
/// Longest selective-ack bitmap in bytes (covers 512 chunks past the cumulative point).
pub const MAX_ACK_BITMAP: usize = 64;
/// Length of the truncated blake3 checksum.
pub const CHECKSUM_LEN: usize = 16;
/// Longest topic.
pub const MAX_TOPIC_LEN: usize = 255;

mod field {
    use core::ops::Range;
    pub(super) const TYPE: usize = 0;
    pub(super) const FLAGS: usize = 1;
    pub(super) const LEN16: Range<usize> = 2..4;
    pub(super) const ID: Range<usize> = 4..12;
    // DATA_CHUNK
    pub(super) const REPLY_TO: Range<usize> = 12..20;
    pub(super) const TOTAL: Range<usize> = 20..24;
    pub(super) const INDEX: Range<usize> = 24..28;
    pub(super) const COUNT: Range<usize> = 28..32;
    pub(super) const OFFSET: Range<usize> = 32..36;
    pub(super) const TOPIC_LEN: usize = 36;
    pub(super) const RESERVED: Range<usize> = 37..40;
    pub(super) const CHECKSUM: Range<usize> = 40..56;
    // ACK
    pub(super) const CUMULATIVE: Range<usize> = 12..16;
    pub(super) const ECHO: Range<usize> = 16..20;
    pub(super) const ACK_RESERVED: Range<usize> = 20..24;
}

/// Why bytes are not a valid bus frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Shorter than the header its type needs.
    #[error("bus frame truncated")]
    Truncated,
    /// The first byte is no known frame type.
    #[error("unknown bus frame type {0:#04x}")]
    UnknownType(u8),
    /// Lengths in the header don't match the bytes that follow.
    #[error("bus frame length mismatch")]
    LengthMismatch,
    /// Reserved bits or bytes are set.
    #[error("bus frame has reserved bits set")]
    Reserved,
    /// The chunk's index, count, offset and length contradict each other or the total.
    #[error("bus chunk geometry is inconsistent")]
    BadGeometry,
}

/// A DATA_CHUNK, borrowed from the frame bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataChunk<'a> {
    /// Message id.
    pub id: u64,
    /// The message this one answers, if it is a reply.
    pub reply_to: Option<u64>,
    /// Total message length.
    pub total_len: u32,
    /// Index of this chunk.
    pub index: u32,
    /// Number of chunks in the message.
    pub count: u32,
    /// Offset of `data` in the message.
    pub offset: u32,
    /// Topic (chunk 0 only; empty elsewhere).
    pub topic: &'a [u8],
    /// Truncated blake3 of the whole message.
    pub checksum: [u8; CHECKSUM_LEN],
    /// This chunk's bytes.
    pub data: &'a [u8],
}

/// An ACK, borrowed from the frame bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack<'a> {
    /// Message id.
    pub id: u64,
    /// Reassembled and checksum-verified.
    pub complete: bool,
    /// Checksum mismatch: the receiver discarded everything.
    pub failed: bool,
    /// Chunks `0..cumulative` have arrived.
    pub cumulative: u32,
    /// The chunk whose arrival triggered this ack.
    pub echo: u32,
    /// Selective acks beyond `cumulative` (bit i = chunk cumulative+1+i).
    pub bitmap: &'a [u8],
}

impl Ack<'_> {
    /// Whether chunk `index` is acknowledged by this ack.
    pub fn acks(&self, index: u32) -> bool {
        if index < self.cumulative {
            return true;
        }
        let Some(rel) = index.checked_sub(self.cumulative.saturating_add(1)) else {
            return false;
        };
        let byte = (rel / 8) as usize;
        self.bitmap
            .get(byte)
            .is_some_and(|b| b & (1 << (rel % 8)) != 0)
    }
}

/// A parsed bus frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A chunk of a message.
    Data(DataChunk<'a>),
    /// An acknowledgement.
    Ack(Ack<'a>),
}

fn be16(b: &[u8], r: core::ops::Range<usize>) -> Result<u16, FrameError> {
    let s = b.get(r).ok_or(FrameError::Truncated)?;
    let a: [u8; 2] = s.try_into().map_err(|_| FrameError::Truncated)?;
    Ok(u16::from_be_bytes(a))
}
fn be32(b: &[u8], r: core::ops::Range<usize>) -> Result<u32, FrameError> {
    let s = b.get(r).ok_or(FrameError::Truncated)?;
    let a: [u8; 4] = s.try_into().map_err(|_| FrameError::Truncated)?;
    Ok(u32::from_be_bytes(a))
}
fn be64(b: &[u8], r: core::ops::Range<usize>) -> Result<u64, FrameError> {
    let s = b.get(r).ok_or(FrameError::Truncated)?;
    let a: [u8; 8] = s.try_into().map_err(|_| FrameError::Truncated)?;
    Ok(u64::from_be_bytes(a))
}

impl<'a> Frame<'a> {
    /// Parses and checks a frame. Never panics; every byte is treated as hostile.
    pub fn parse(b: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        let ty = *b.get(field::TYPE).ok_or(FrameError::Truncated)?;
        match ty {
            TYPE_DATA => parse_data(b).map(Frame::Data),
            TYPE_ACK => parse_ack(b).map(Frame::Ack),
            other => Err(FrameError::UnknownType(other)),
        }
    }
}

fn parse_data(b: &[u8]) -> Result<DataChunk<'_>, FrameError> {
    if b.len() < DATA_HEADER_LEN {
        return Err(FrameError::Truncated);
    }
    let flags = *b.get(field::FLAGS).ok_or(FrameError::Truncated)?;
    if flags & !FLAG_IS_REPLY != 0 {
        return Err(FrameError::Reserved);
    }
    if b.get(field::RESERVED)
        .ok_or(FrameError::Truncated)?
        .iter()
        .any(|&x| x != 0)
    {
        return Err(FrameError::Reserved);
    }
    let data_len = usize::from(be16(b, field::LEN16)?);
    let id = be64(b, field::ID)?;
    let reply_raw = be64(b, field::REPLY_TO)?;
    let total_len = be32(b, field::TOTAL)?;
    let index = be32(b, field::INDEX)?;
    let count = be32(b, field::COUNT)?;
    let offset = be32(b, field::OFFSET)?;
    let topic_len = usize::from(*b.get(field::TOPIC_LEN).ok_or(FrameError::Truncated)?);
    let mut checksum = [0u8; CHECKSUM_LEN];
    checksum.copy_from_slice(b.get(field::CHECKSUM).ok_or(FrameError::Truncated)?);
    let rest = b.get(DATA_HEADER_LEN..).ok_or(FrameError::Truncated)?;
    if rest.len() != topic_len + data_len {
        return Err(FrameError::LengthMismatch);
    }
    let (topic, data) = rest.split_at(topic_len);
    let reply_to = if flags & FLAG_IS_REPLY != 0 {
        Some(reply_raw)
    } else if reply_raw != 0 {
        return Err(FrameError::Reserved);
    } else {
        None
    };
    // Geometry: count ≥ 1, index < count, the chunk lies inside the message, only chunk 0 has a
    // topic, an empty chunk only for an empty message, and the last chunk ends the message.
    let end = u64::from(offset) + data_len as u64;
    let geometry_ok = count >= 1
        && index < count
        && end <= u64::from(total_len)
        && (index == 0 || topic_len == 0)
        && (index == 0) == (offset == 0)
        && (data_len > 0 || total_len == 0)
        && (index + 1 == count) == (end == u64::from(total_len))
        && (total_len > 0 || count == 1);
    if !geometry_ok {
        return Err(FrameError::BadGeometry);
    }
    Ok(DataChunk {
        id,
        reply_to,
        total_len,
        index,
        count,
        offset,
        topic,
        checksum,
        data,
    })
}

fn parse_ack(b: &[u8]) -> Result<Ack<'_>, FrameError> {
    if b.len() < ACK_HEADER_LEN {
        return Err(FrameError::Truncated);
    }
    let flags = *b.get(field::FLAGS).ok_or(FrameError::Truncated)?;
    if flags & !(FLAG_COMPLETE | FLAG_FAILED) != 0 || flags == FLAG_COMPLETE | FLAG_FAILED {
        return Err(FrameError::Reserved);
    }
    if be32(b, field::ACK_RESERVED)? != 0 {
        return Err(FrameError::Reserved);
    }
    let bitmap_len = usize::from(be16(b, field::LEN16)?);
    if bitmap_len > MAX_ACK_BITMAP {
        return Err(FrameError::LengthMismatch);
    }
    let bitmap = b.get(ACK_HEADER_LEN..).ok_or(FrameError::Truncated)?;
    if bitmap.len() != bitmap_len {
        return Err(FrameError::LengthMismatch);
    }
    Ok(Ack {
        id: be64(b, field::ID)?,
        complete: flags & FLAG_COMPLETE != 0,
        failed: flags & FLAG_FAILED != 0,
        cumulative: be32(b, field::CUMULATIVE)?,
        echo: be32(b, field::ECHO)?,
        bitmap,
    })
}

impl DataChunk<'_> {
    /// Bytes [`DataChunk::emit`] writes.
    pub fn buffer_len(&self) -> usize {
        DATA_HEADER_LEN + self.topic.len() + self.data.len()
    }

    /// Writes the frame into `buf` (cleared first). The caller guarantees `data.len() ≤ u16::MAX`
    /// and `topic.len() ≤ 255` (the bus checks both when a message is pushed).
    pub fn emit(&self, buf: &mut Vec<u8>) {
        buf.clear();
        buf.push(TYPE_DATA);
        buf.push(if self.reply_to.is_some() {
            FLAG_IS_REPLY
        } else {
            0
        });
        buf.extend_from_slice(&(self.data.len() as u16).to_be_bytes());
        buf.extend_from_slice(&self.id.to_be_bytes());
        buf.extend_from_slice(&self.reply_to.unwrap_or(0).to_be_bytes());
        buf.extend_from_slice(&self.total_len.to_be_bytes());
        buf.extend_from_slice(&self.index.to_be_bytes());
        buf.extend_from_slice(&self.count.to_be_bytes());
        buf.extend_from_slice(&self.offset.to_be_bytes());
        buf.push(self.topic.len() as u8);
        buf.extend_from_slice(&[0; 3]);
        buf.extend_from_slice(&self.checksum);
        buf.extend_from_slice(self.topic);
        buf.extend_from_slice(self.data);
    }
}

impl Ack<'_> {
    /// Writes the frame into `buf` (cleared first). `bitmap` must be at most [`MAX_ACK_BITMAP`] bytes.
    pub fn emit(&self, buf: &mut Vec<u8>) {
        buf.clear();
        buf.push(TYPE_ACK);
        let mut flags = 0;
        if self.complete {
            flags |= FLAG_COMPLETE;
        }
        if self.failed {
            flags |= FLAG_FAILED;
        }
        buf.push(flags);
        let bitmap = self.bitmap.get(..MAX_ACK_BITMAP).unwrap_or(self.bitmap);
        buf.extend_from_slice(&(bitmap.len() as u16).to_be_bytes());
        buf.extend_from_slice(&self.id.to_be_bytes());
        buf.extend_from_slice(&self.cumulative.to_be_bytes());
        buf.extend_from_slice(&self.echo.to_be_bytes());
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(bitmap);
    }
}

/// The truncated blake3 checksum of a whole message.
pub fn checksum(message: &[u8]) -> [u8; CHECKSUM_LEN] {
    let h = blake3::hash(message);
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&h.as_bytes()[..CHECKSUM_LEN]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk<'a>(data: &'a [u8], topic: &'a [u8]) -> DataChunk<'a> {
        DataChunk {
            id: 0x0102_0304_0506_0708,
            reply_to: Some(9),
            total_len: data.len() as u32,
            index: 0,
            count: 1,
            offset: 0,
            topic,
            checksum: checksum(data),
            data,
        }
    }

    #[test]
    fn data_round_trip() {
        let c = chunk(b"hello", b"tp");
        let mut buf = vec![0xa5; 3];
        c.emit(&mut buf);
        assert_eq!(buf.len(), c.buffer_len());
        assert_eq!(Frame::parse(&buf), Ok(Frame::Data(c)));
        // Every truncation fails cleanly.
        for n in 0..buf.len() {
            assert!(Frame::parse(&buf[..n]).is_err(), "prefix {n}");
        }
    }

    #[test]
    fn ack_round_trip_and_bits() {
        let bitmap = [0b0000_0101u8, 0x80];
        let a = Ack {
            id: 7,
            complete: false,
            failed: false,
            cumulative: 10,
            echo: 12,
            bitmap: &bitmap,
        };
        let mut buf = Vec::new();
        a.emit(&mut buf);
        let Ok(Frame::Ack(p)) = Frame::parse(&buf) else {
            panic!("ack did not parse");
        };
        assert_eq!(p, a);
        assert!(p.acks(0) && p.acks(9));
        assert!(!p.acks(10));
        assert!(p.acks(11) && !p.acks(12) && p.acks(13));
        assert!(p.acks(26) && !p.acks(27) && !p.acks(1000));
    }

    #[test]
    fn rejects_bad_geometry_and_reserved() {
        let data = [1u8; 10];
        let mut c = chunk(&data, b"");
        c.index = 1; // index ≥ count
        let mut buf = Vec::new();
        c.emit(&mut buf);
        assert_eq!(Frame::parse(&buf), Err(FrameError::BadGeometry));
        let c = chunk(&data, b"");
        c.emit(&mut buf);
        buf[38] = 1;
        assert_eq!(Frame::parse(&buf), Err(FrameError::Reserved));
        c.emit(&mut buf);
        buf.push(0);
        assert_eq!(Frame::parse(&buf), Err(FrameError::LengthMismatch));
        assert_eq!(Frame::parse(&[0x09]), Err(FrameError::UnknownType(9)));
        assert_eq!(Frame::parse(&[]), Err(FrameError::Truncated));
    }
}
