//! Control-frame envelope: parse any datagram; what parses must emit to the same bytes.
#![no_main]

use hypha_proto::wire::control::{Packet, Repr};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(packet) = Packet::new_checked(bytes) else { return };
    let repr = Repr::parse(&packet).expect("a checked frame parses");
    let mut out = vec![0xa5u8; repr.buffer_len()];
    let mut view = Packet::new_unchecked(&mut out[..]);
    repr.emit(&mut view);
    view.body_mut().copy_from_slice(packet.body());
    let again = Packet::new_checked(&out[..]).expect("an emitted frame checks");
    assert_eq!(Repr::parse(&again), Ok(repr));
    assert_eq!(out, bytes);
});
