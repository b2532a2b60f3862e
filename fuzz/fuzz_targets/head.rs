//! Fuzz target `head`: a signed head (verified against its owner), a head body and a snapshot record.
//! The decoder calls live in `obnam_protocol::fuzzing::head`, shared with the replay test
//! `protocol/tests/fuzz_regressions.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A decoder error is the right answer to garbage; only a panic is a finding.
    let _ = obnam_protocol::fuzzing::head(data);
});
