//! cargo-fuzz target: see `vibstage_fuzz::request_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vibstage_fuzz::request_body(data));
