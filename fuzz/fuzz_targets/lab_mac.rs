//! RFC 8967 MAC verification in lab mode: arbitrary datagrams, and signed arbitrary bodies.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hypha_controlplane::lab::mac::fuzzing::fuzz_verify(data);
});
