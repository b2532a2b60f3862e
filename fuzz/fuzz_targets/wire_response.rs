//! Fuzz target `wire_response`: an exchange response from a friend (`msg::Response`), then heads, key slots and audit proofs in it.
//! The decoder calls live in `obnam_protocol::fuzzing::wire_response`, shared with the replay test
//! `protocol/tests/fuzz_regressions.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A decoder error is the right answer to garbage; only a panic is a finding.
    let _ = obnam_protocol::fuzzing::wire_response(data);
});
