//! Shared-memory record: decode any slot; what decodes must encode and decode to the same record.
#![no_main]

use hypha_proto::shm::Record;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|slot: &[u8]| {
    let Ok((meta, record)) = Record::decode(slot) else { return };
    let mut out = vec![0xa5u8; record.encoded_len()];
    let n = record.encode(meta, &mut out).expect("a decoded record fits its own length");
    assert_eq!(n, out.len());
    assert_eq!(Record::decode(&out), Ok((meta, record)));
});
