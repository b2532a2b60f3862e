//! Fuzz target `wire_request`: an exchange request from a friend (`msg::Request`), then owner proofs, statements, heads and key slots in it.
//! The decoder calls live in `obnam_protocol::fuzzing::wire_request`, shared with the replay test
//! `protocol/tests/fuzz_regressions.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A decoder error is the right answer to garbage; only a panic is a finding.
    let _ = obnam_protocol::fuzzing::wire_request(data);
});
