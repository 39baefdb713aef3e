//! `cargo fuzz run dataplane`: see `p2plive_fuzz::dataplane`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| p2plive_fuzz::dataplane::run(data));
