//! `cargo fuzz run subscriber`: see `p2plive_fuzz::subscriber`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| p2plive_fuzz::subscriber::run(data));
