#!/usr/bin/env bash
# The whole check: install what is missing, then formatting, lints, all tests, and the meson
# build/install of the plugin. Stops at the first failure with a non-zero exit.
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$(pwd)

# A rustup toolchain that is installed but not on PATH (non-login shells).
if ! command -v cargo >/dev/null 2>&1 && [[ -x "${HOME:-/root}/.cargo/bin/cargo" ]]; then
    export PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi

suite_start=$SECONDS
section_start=$SECONDS
section_name=""

end_section() {
    if [[ -n $section_name ]]; then
        printf '=== %s: ok (%ds)\n' "$section_name" "$((SECONDS - section_start))"
    fi
}
section() {
    end_section
    section_name=$1
    section_start=$SECONDS
    printf '\n=== %s\n' "$section_name"
}
on_exit() {
    local rc=$?
    if ((rc != 0)) && [[ -n $section_name ]]; then
        printf '\n=== FAILED: %s (exit %d, after %ds)\n' "$section_name" "$rc" "$((SECONDS - suite_start))" >&2
    fi
    if [[ -n ${meson_tmp:-} ]]; then
        rm -rf "$meson_tmp"
    fi
    if [[ -n ${results_tmp:-} ]]; then
        rm -rf "$results_tmp"
    fi
}
trap on_exit EXIT

section "setup (scripts/setup.sh)"
bash scripts/setup.sh

section "cargo fmt --all -- --check"
cargo fmt --all -- --check

section "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

section "cargo test --all-targets"
results_tmp=$(mktemp -d)
cargo test --all-targets 2>&1 | tee "$results_tmp/cargo-test.log"

# The mesh benchmark, tiny, so that it cannot rot: it must run to the end and write its JSON
# (no timing is asserted; the figures of a loaded CI machine mean nothing). Both smoke runs
# use the dev profile: `cargo test --all-targets` has just built these binaries that way,
# whereas an optimised build would compile every dependency again with LTO (most of the
# suite's time on a clean machine) for figures nobody reads.
section "cargo bench --profile dev --bench mesh (smoke: 3 viewers, 2 s per mode)"
smoke_dir=${CARGO_TARGET_DIR:-$repo/target}/bench-smoke
rm -rf "$smoke_dir"
cargo bench --profile dev --bench mesh -- --viewers 3 --duration 2s --warmup 2s --max-wall 120s \
    --json "$smoke_dir/out.json"
for output in out.json out.md out-latency-cdf-n3.svg out-amplification.svg out-publisher-upload.svg; do
    if [[ ! -s $smoke_dir/$output ]]; then
        echo "mesh bench smoke run did not write $output" >&2
        exit 1
    fi
done
grep -q '"mode": "unicast"' "$smoke_dir/out.json"

# The simulator, tiny (both data planes, 40 viewers, 2 s window), for the same reason; and
# its determinism from the command line: the same seed twice, byte-identical JSON.
section "cargo bench --profile dev --bench sim (smoke: 40 viewers, 2 s window, run twice)"
for run in a b; do
    cargo bench --profile dev --bench sim -- --viewers 40 --mode p2plive,flood --duration 2s --ramp 1s \
        --warmup 1s --seed 3 --quiet --json "$smoke_dir/sim-$run.json"
done
for output in sim-a.json sim-a.md sim-a-delay-cdf-n40.svg sim-a-amplification.svg sim-a-publisher-upload.svg; do
    if [[ ! -s $smoke_dir/$output ]]; then
        echo "sim smoke run did not write $output" >&2
        exit 1
    fi
done
grep -q '"mode": "flood"' "$smoke_dir/sim-a.json"
if ! cmp -s "$smoke_dir/sim-a.json" "$smoke_dir/sim-b.json"; then
    echo "p2plive-sim: the same seed gave different JSON" >&2
    diff "$smoke_dir/sim-a.json" "$smoke_dir/sim-b.json" | head -20 >&2
    exit 1
fi

# The cargo-fuzz targets of the core (fuzz/), so that they cannot rot either: they must
# build, replay their saved crashes and survive a short fixed-seed run each. Installs
# cargo-fuzz on a fresh machine; the long runs are `bash scripts/fuzz.sh run`.
section "fuzz targets (scripts/fuzz.sh: build, regressions, short fixed-seed runs)"
bash scripts/fuzz.sh

section "NAT traversal in network namespaces (scripts/netns-test.sh; root only)"
bash scripts/netns-test.sh

# meson drives cargo in the dev profile with cargo's own target directory, so it reuses what
# `cargo test` just built instead of compiling the crate a second time.
section "meson setup/compile/test/install (buildtype=debug, reusing cargo's target dir)"
meson_tmp=$(mktemp -d)
target_dir=${CARGO_TARGET_DIR:-$repo/target}
meson setup "$meson_tmp/build" "$repo" --buildtype=debug -Dcargo-target-dir="$target_dir"
meson compile -C "$meson_tmp/build"
meson test -C "$meson_tmp/build" --print-errorlogs | tee "$results_tmp/meson-test.log"
DESTDIR="$meson_tmp/dest" meson install -C "$meson_tmp/build" --no-rebuild
installed=$(find "$meson_tmp/dest" -path '*/gstreamer-1.0/libgstp2plive.so' -print -quit)
if [[ -z $installed ]]; then
    echo "meson install did not install gstreamer-1.0/libgstp2plive.so" >&2
    exit 1
fi
echo "installed ${installed#"$meson_tmp/dest"}"
installed_node=$(find "$meson_tmp/dest" -path '*/bin/p2plive-node' -print -quit)
if [[ -z $installed_node ]] || ! "$installed_node" --help >/dev/null; then
    echo "meson install did not install a working bin/p2plive-node" >&2
    exit 1
fi
echo "installed ${installed_node#"$meson_tmp/dest"}"

end_section
section_name=""
printf '\n=== all checks passed in %ds\n' "$((SECONDS - suite_start))"

# One closing line over every test run above: cargo's per-target "test result:" lines plus
# meson's test summary.
awk '
    /^test result: / {
        for (i = 1; i < NF; i++) {
            if ($(i + 1) ~ /^passed/) passed += $i
            if ($(i + 1) ~ /^failed/) failed += $i
            if ($(i + 1) ~ /^ignored/) skipped += $i
        }
    }
    /^Ok: / { passed += $2 }
    /^Fail: / { failed += $2 }
    /^Skipped: / { skipped += $2 }
    END { printf "tests: %d passed, %d failed, %d skipped\n", passed, failed, skipped }
' "$results_tmp/cargo-test.log" "$results_tmp/meson-test.log"
