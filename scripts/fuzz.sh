#!/usr/bin/env bash
# cargo-fuzz targets of the sans-IO core (fuzz/; see fuzz/README.md).
#
#   bash scripts/fuzz.sh                 # check: build every target, replay the saved
#                                        # regressions, a short fixed-seed run of each (CI)
#   bash scripts/fuzz.sh run [SECONDS] [TARGET...]
#                                        # fuzz each target for SECONDS (default 600), one
#                                        # after the other, growing fuzz/corpus/<target>
#
# Installs cargo-fuzz when missing. Runs on the stable toolchain: cargo-fuzz needs unstable
# compiler flags (sanitizers, coverage), which RUSTC_BOOTSTRAP=1 enables. Crashes are saved
# under fuzz/artifacts/<target>/; a run exits non-zero at the first one.
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$(pwd)

if ! command -v cargo >/dev/null 2>&1 && [[ -x "${HOME:-/root}/.cargo/bin/cargo" ]]; then
    export PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi

CARGO_FUZZ_VERSION=0.13.2
TARGETS=(wire_decode reassembly playout subscriber dataplane)
# Inputs run per target in the check, from an empty corpus with a fixed seed: the same
# inputs on every run of one build, so the check cannot pass or fail by luck. About 10 s
# each; `dataplane` drives a whole data plane per input (~1.7 ms), so it runs fewer.
SMOKE_RUNS=${FUZZ_SMOKE_RUNS:-100000}
DATAPLANE_SMOKE_RUNS=${FUZZ_DATAPLANE_SMOKE_RUNS:-20000}

export RUSTC_BOOTSTRAP=1
# The fuzz crate is its own workspace with its own instrumented build: never share the main
# build's target directory, whose artifacts it would only invalidate.
export CARGO_TARGET_DIR=$repo/fuzz/target

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

# Runs one target with libFuzzer options; `cargo fuzz run` builds it first if needed.
fuzz_run() {
    local target=$1
    shift
    mkdir -p "fuzz/corpus/$target"
    cargo fuzz run "$target" "fuzz/corpus/$target" -- "$@"
}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

mode=${1:-check}
case $mode in
    check)
        cargo fuzz build
        for target in "${TARGETS[@]}"; do
            regressions=fuzz/regressions/$target
            if [[ -d $regressions ]] && [[ -n $(ls -A "$regressions") ]]; then
                echo "fuzz: $target: replaying $regressions"
                # Files (not a corpus directory): each runs once, nothing is fuzzed.
                cargo fuzz run "$target" "$regressions"/*
            fi
            runs=$SMOKE_RUNS
            if [[ $target == dataplane ]]; then
                runs=$DATAPLANE_SMOKE_RUNS
            fi
            echo "fuzz: $target: $runs runs, seed 1"
            rm -rf "$scratch"
            mkdir -p "$scratch"
            cargo fuzz run "$target" "$scratch" -- -seed=1 -runs="$runs"
        done
        ;;
    run)
        seconds=${2:-600}
        shift $(($# < 2 ? $# : 2))
        targets=("$@")
        if ((${#targets[@]} == 0)); then
            targets=("${TARGETS[@]}")
        fi
        for target in "${targets[@]}"; do
            echo "fuzz: $target: ${seconds}s"
            fuzz_run "$target" -max_total_time="$seconds" -print_final_stats=1
        done
        ;;
    *)
        echo "usage: $0 [check | run [SECONDS] [TARGET...]]" >&2
        exit 2
        ;;
esac
