#!/usr/bin/env bash
# Soak run: one publisher (examples/publisher.rs --audio: 640x360 30 fps VP8 at the sink's
# default 2000 kbit/s with three temporal layers, plus Opus audio) and three viewers
# (examples/viewer.rs: decoding both tracks into fakesinks sync=true; viewer1 joins through the
# publisher, each further viewer through the previous one) for 10 minutes over 127.0.0.1.
#
# Every 10 s it samples VmRSS and VmHWM (/proc/PID/status) and the CPU time of every process,
# with each viewer's frame counts and A/V offset, into memory.csv. At the end it stops the
# viewers (each prints a SUMMARY line with the A/V offset at the end and its min / max over
# the run) and the publisher, and prints per process: RSS after warm-up (the first sample at or
# after 60 s), RSS at the end, peak RSS, the RSS slope in MB/h (least squares over the samples
# after warm-up) and a verdict: GROWING when the slope is above 10 MB/h (--max-slope) and RSS
# grew by more than 1 MB from warm-up to the end (--min-growth), else FLAT.
#
#   bash scripts/soak.sh                 # 600 s, warm-up 60 s, a sample every 10 s
#   bash scripts/soak.sh --short         # test run: 60 s, warm-up 20 s, a sample every 5 s
#   bash scripts/soak.sh --duration 3600 --viewers 5
#   bash scripts/soak.sh --help          # every option
#
# Output: target/soak/{memory.csv,soak.md,soak.json}, logs in target/soak/logs/. Builds the
# examples (cargo build --release --examples, at nice 19) when they are missing or older than
# examples/*.rs, or always with BUILD=1. Only 127.0.0.1, mDNS off; every child process is
# stopped when the script ends. Exits non-zero if a process failed or a viewer got no video.
set -euo pipefail

cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1 && [[ -x "${HOME:-/root}/.cargo/bin/cargo" ]]; then
    export PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi
bin_dir=${CARGO_TARGET_DIR:-$PWD/target}/release/examples
stale=0
for program in publisher viewer; do
    if [[ ! -x $bin_dir/$program || examples/$program.rs -nt $bin_dir/$program ]]; then
        stale=1
    fi
done
if [[ ${BUILD:-0} == 1 || $stale == 1 ]]; then
    echo "=== nice -n 19 cargo build --release --examples"
    nice -n 19 cargo build --release --examples
fi

exec python3 scripts/perftools.py soak "$@"
