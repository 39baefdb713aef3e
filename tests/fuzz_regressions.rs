//! The fuzz harnesses (fuzz/src/) under plain `cargo test`, no cargo-fuzz needed:
//! - every input saved under `fuzz/regressions/<target>/` (crashes found, minimised) is
//!   replayed, so a fixed bug stays fixed;
//! - each harness also runs on a thousand pseudo-random inputs, so its own checks keep
//!   compiling and passing against the core as it changes.
//!
//!
//! `P2PLIVE_FUZZ_TRACE=1 cargo test --test fuzz_regressions` prints the calls each input
//! makes on the core.

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::path::{Path, PathBuf};

/// A harness: one fuzz case.
type Run = fn(&[u8]);

const TARGETS: [(&str, Run); 5] = [
    ("wire_decode", harness::wire_decode::run),
    ("reassembly", harness::reassembly::run),
    ("playout", harness::playout::run),
    ("subscriber", harness::subscriber::run),
    ("dataplane", harness::dataplane::run),
];

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every input saved under `fuzz/<kind>/<target>/`; returns how many there were.
fn replay(kind: &str, target: &str, run: Run) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let files = inputs(&dir);
    for file in &files {
        let data = std::fs::read(file).expect("readable input");
        eprintln!("{target}: {}", file.display());
        run(&data);
    }
    files.len()
}

/// Deterministic pseudo-random inputs (xorshift), short and long.
fn sweep(run: Run) {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for case in 0..1000 {
        let len = (next() % if case % 10 == 0 { 4096 } else { 512 }) as usize;
        let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        run(&data);
    }
}

fn check(target: &str) {
    let (_, run) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("known target");
    replay("regressions", target, *run);
    sweep(*run);
}

#[test]
fn wire_decode() {
    check("wire_decode");
}

#[test]
fn reassembly() {
    check("reassembly");
}

#[test]
fn playout() {
    check("playout");
}

#[test]
fn subscriber() {
    check("subscriber");
}

#[test]
fn dataplane() {
    check("dataplane");
}
