//! `cargo fuzz run reassembly`: see `p2plive_fuzz::reassembly`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| p2plive_fuzz::reassembly::run(data));
