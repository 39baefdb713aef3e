//! Fuzz harnesses of the sans-IO core, one module per cargo-fuzz target (`fuzz_targets/`).
//!
//! Each `run(data)` turns the fuzzer's bytes into calls on the core, as the viewer drives
//! it, and asserts the core's promises; a panic is a finding. The main crate's
//! `tests/fuzz_regressions.rs` includes this file by path and replays the saved inputs of
//! `fuzz/regressions/<target>/` through the same functions.

pub mod dataplane;
pub mod input;
pub mod playout;
pub mod reassembly;
pub mod subscriber;
pub mod wire_decode;

/// Prints one call a harness makes on the core to stderr when `P2PLIVE_FUZZ_TRACE` is set,
/// so that a crash input reads as the call sequence that fails. Paths are relative
/// (`super::`), not `crate::`, because the main crate's tests include these files as a module.
pub fn trace(call: std::fmt::Arguments<'_>) {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ENABLED.get_or_init(|| std::env::var_os("P2PLIVE_FUZZ_TRACE").is_some()) {
        eprintln!("{call}");
    }
}
