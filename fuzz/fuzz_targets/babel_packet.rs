//! Babel packets (RFC 8966): parse, re-emit, re-parse; the TLVs must come back equal.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hypha_proto::babel::fuzzing::fuzz_packet(data);
});
