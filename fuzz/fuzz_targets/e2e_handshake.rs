//! E2E handshake: any bytes into `SessionManager::handle_packet` (with a handshake of its own
//! pending); it returns an error or handles the packet, and never panics.
#![no_main]

use hypha_controlplane::e2e::{E2eConfig, SessionManager};
use hypha_proto::key::SecretKey;
use hypha_proto::time::Instant;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // First byte: bit 0 puts our address in the destination field (so the fuzzer needn't guess it),
    // bit 1 delivers the packet twice (replay path), bit 2 starts a handshake of our own first (the
    // RESP path; it costs three DH operations, so only when asked).
    let Some((&mode, bytes)) = input.split_first() else { return };
    let mut m = SessionManager::new(E2eConfig::new(SecretKey::from_bytes([0x11; 32])), Instant::ZERO);
    let peer = SecretKey::from_bytes([0x22; 32]).public_key();
    if mode & 4 != 0 {
        let _ = m.connect(Instant::ZERO, peer.address(), Some(peer));
    }
    let mut packet = bytes.to_vec();
    if mode & 1 != 0 && packet.len() >= 48 {
        packet[32..48].copy_from_slice(&m.address().octets());
    }
    let now = Instant::from_secs(1);
    let _ = m.handle_packet(now, &packet);
    if mode & 2 != 0 {
        let _ = m.handle_packet(now, &packet);
    }
    let mut buf = Vec::new();
    while m.poll_transmit(&mut buf).is_some() {}
    while m.poll_event().is_some() {}
    if let Some(t) = m.poll_timeout() {
        m.handle_timeout(t);
    }
});
