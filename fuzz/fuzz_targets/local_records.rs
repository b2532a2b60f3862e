//! Fuzz target `local_records`: the node's own redb records (`local.rs`).
//! The decoder calls live in `obnam_protocol::fuzzing::local_records`, shared with the replay test
//! `protocol/tests/fuzz_regressions.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A decoder error is the right answer to garbage; only a panic is a finding.
    let _ = obnam_protocol::fuzzing::local_records(data);
});
