//! cargo-fuzz target: see `vibstage_fuzz::vib_reader`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vibstage_fuzz::vib_reader(data));
