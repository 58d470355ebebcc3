//! cargo-fuzz target: see `vibstage_fuzz::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vibstage_fuzz::config(data));
