//! Fuzz target `pack_index`: a pack's opened index and trailer, and the sealed envelope around them.
//! The decoder calls live in `obnam_protocol::fuzzing::pack_index`, shared with the replay test
//! `protocol/tests/fuzz_regressions.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A decoder error is the right answer to garbage; only a panic is a finding.
    let _ = obnam_protocol::fuzzing::pack_index(data);
});
