//! Interim view of the 20-byte control-frame envelope (WIRE.md, types 0x02..=0x05).
//!
//! The codec proper belongs to `hypha_proto::wire::control` (being written on the `ident` branch);
//! this module exists only so the link layer can be built and tested meanwhile, and is deleted when
//! that lands. Keep its surface to what the link layer calls: `parse`, `write`, the type constants.

use super::MalformedFrame;

/// Envelope length.
pub(crate) const LEN: usize = 20;
/// Handshake message 1.
pub(crate) const LINK_INIT: u8 = 0x02;
/// Handshake message 2.
pub(crate) const LINK_RESP: u8 = 0x03;
/// Handshake message 3.
pub(crate) const LINK_FINISH: u8 = 0x04;
/// AEAD-protected frame.
pub(crate) const LINK_DATA: u8 = 0x05;
/// The only version.
pub(crate) const VERSION: u8 = 1;

/// A checked envelope and its body.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Envelope<'a> {
    pub(crate) frame_type: u8,
    pub(crate) sender: u32,
    pub(crate) receiver: u32,
    pub(crate) counter: u64,
    /// The 20 envelope bytes (the AAD of LINK_DATA).
    pub(crate) header: &'a [u8],
    pub(crate) body: &'a [u8],
}

fn be_u32(b: &[u8]) -> u32 {
    b.iter().fold(0u32, |a, &x| (a << 8) | u32::from(x))
}

fn be_u64(b: &[u8]) -> u64 {
    b.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x))
}

/// Checks type range, version and exact body length.
pub(crate) fn parse(datagram: &[u8]) -> Result<Envelope<'_>, MalformedFrame> {
    let (header, body) = datagram
        .split_at_checked(LEN)
        .ok_or(MalformedFrame::Truncated)?;
    let frame_type = header.first().copied().ok_or(MalformedFrame::Truncated)?;
    if !(LINK_INIT..=LINK_DATA).contains(&frame_type) {
        return Err(MalformedFrame::FrameType(frame_type));
    }
    let version = header.get(1).copied().ok_or(MalformedFrame::Truncated)?;
    if version != VERSION {
        return Err(MalformedFrame::Version(version));
    }
    let len = header
        .get(2..4)
        .map(be_u32)
        .ok_or(MalformedFrame::Truncated)?;
    if len as usize != body.len() {
        return Err(MalformedFrame::Length);
    }
    Ok(Envelope {
        frame_type,
        sender: header
            .get(4..8)
            .map(be_u32)
            .ok_or(MalformedFrame::Truncated)?,
        receiver: header
            .get(8..12)
            .map(be_u32)
            .ok_or(MalformedFrame::Truncated)?,
        counter: header
            .get(12..20)
            .map(be_u64)
            .ok_or(MalformedFrame::Truncated)?,
        header,
        body,
    })
}

/// Appends an envelope to `out`; the caller appends `body_len` body bytes.
pub(crate) fn write(
    out: &mut Vec<u8>,
    frame_type: u8,
    sender: u32,
    receiver: u32,
    counter: u64,
    body_len: u16,
) {
    out.push(frame_type);
    out.push(VERSION);
    out.extend_from_slice(&body_len.to_be_bytes());
    out.extend_from_slice(&sender.to_be_bytes());
    out.extend_from_slice(&receiver.to_be_bytes());
    out.extend_from_slice(&counter.to_be_bytes());
}
