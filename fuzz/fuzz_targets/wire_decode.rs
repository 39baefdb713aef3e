//! `cargo fuzz run wire_decode`: see `p2plive_fuzz::wire_decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| p2plive_fuzz::wire_decode::run(data));
