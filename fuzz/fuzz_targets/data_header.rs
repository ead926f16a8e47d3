//! Data header: parse any datagram; what parses must emit and re-parse to the same header.
#![no_main]

use hypha_proto::wire::data::{Packet, Repr};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(packet) = Packet::new_checked(bytes) else { return };
    let repr = Repr::parse(&packet).expect("a checked packet parses");
    let mut out = vec![0xa5u8; repr.buffer_len() + packet.payload().len()];
    let mut view = Packet::new_unchecked(&mut out[..]);
    repr.emit(&mut view);
    view.payload_mut().copy_from_slice(packet.payload());
    let again = Packet::new_checked(&out[..]).expect("an emitted packet checks");
    assert_eq!(Repr::parse(&again), Ok(repr));
    assert_eq!(again.payload(), packet.payload());
});
