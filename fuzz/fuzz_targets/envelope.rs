//! cargo-fuzz target: see `vibstage_fuzz::envelope`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vibstage_fuzz::envelope(data));
