//! `cargo fuzz run playout`: see `p2plive_fuzz::playout`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| p2plive_fuzz::playout::run(data));
