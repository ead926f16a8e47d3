//! Bus frame: parse any bytes; what parses must emit and re-parse to the same frame.
#![no_main]

use hypha_controlplane::bus::frame::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(frame) = Frame::parse(bytes) else { return };
    let mut out = vec![0xa5u8; 3];
    match frame {
        Frame::Data(c) => c.emit(&mut out),
        Frame::Ack(a) => a.emit(&mut out),
    }
    assert_eq!(Frame::parse(&out), Ok(frame));
    assert_eq!(out, bytes);
});
