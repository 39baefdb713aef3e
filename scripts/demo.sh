#!/usr/bin/env bash
# A publisher and two viewers on this machine, over 127.0.0.1 only, mDNS off:
#
#   publisher  <--  viewer1 (bootstraps from the publisher)  <--  viewer2 (bootstraps from viewer1)
#
# Runs for DURATION seconds (default 15), stops everything, prints each viewer's summary and
# exits non-zero if a viewer received no video frame. With $DISPLAY or $WAYLAND_DISPLAY set
# the viewers open windows (autovideosink), else they render into fakesinks.
# Logs: <cargo target dir>/demo/{publisher,viewer1,viewer2}.log
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$(pwd)

DURATION=${DURATION:-15}
if [[ ! $DURATION =~ ^[0-9]+$ ]] || ((DURATION < 1)); then
    echo "demo: DURATION must be a whole number of seconds >= 1 (got '$DURATION')" >&2
    exit 2
fi
# Bounded waits, in seconds.
STARTUP_TIMEOUT=30
STOP_TIMEOUT=6

# A rustup toolchain that is installed but not on PATH (non-login shells).
if ! command -v cargo >/dev/null 2>&1 && [[ -x "${HOME:-/root}/.cargo/bin/cargo" ]]; then
    export PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi

echo "=== setup"
bash scripts/setup.sh

echo "=== cargo build --release --lib --examples"
cargo build --release --lib --examples

target_dir=${CARGO_TARGET_DIR:-$repo/target}
bin_dir=$target_dir/release/examples
log_dir=$target_dir/demo
rm -rf "$log_dir"
mkdir -p "$log_dir"

topic="demo-$$"
display_args=()
if [[ -n ${DISPLAY:-} || -n ${WAYLAND_DISPLAY:-} ]]; then
    display_args=(--display)
    echo "demo: display found, viewers open windows"
else
    echo "demo: no display, viewers render into fakesinks"
fi
# Each process also stops by itself a while after the demo should have ended, in case this
# script is killed without running its cleanup.
safety_duration=$((DURATION + 60))

declare -A pids=()

alive() { kill -0 "$1" 2>/dev/null; }

# wait_gone SECONDS PID...: true once all PIDs have exited, false if one is still running
# after SECONDS.
wait_gone() {
    local tenths=$(($1 * 10)) pid running
    shift
    while true; do
        running=0
        for pid in "$@"; do
            if alive "$pid"; then
                running=1
            fi
        done
        ((running)) || return 0
        ((tenths > 0)) || return 1
        sleep 0.1
        tenths=$((tenths - 1))
    done
}

# stop NAME...: SIGTERM, a bounded wait, then SIGKILL; reaps the processes.
stop() {
    local name pid
    local -a stopping=()
    for name in "$@"; do
        pid=${pids[$name]:-}
        [[ -n $pid ]] || continue
        stopping+=("$pid")
        if alive "$pid"; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    ((${#stopping[@]} > 0)) || return 0
    wait_gone "$STOP_TIMEOUT" "${stopping[@]}" || true
    for name in "$@"; do
        pid=${pids[$name]:-}
        [[ -n $pid ]] || continue
        if alive "$pid"; then
            echo "demo: $name (pid $pid) did not stop within ${STOP_TIMEOUT}s, killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
        unset "pids[$name]"
    done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if ((${#pids[@]} > 0)); then
        stop "${!pids[@]}"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME ARGS...: runs an example in the background, output to $log_dir/NAME.log.
start() {
    local name=$1 program=$2
    shift 2
    "$bin_dir/$program" "$@" >"$log_dir/$name.log" 2>&1 &
    pids[$name]=$!
    echo "demo: started $name (pid ${pids[$name]}): $program $*"
}

# listening_addr NAME: waits for the `LISTENING <multiaddr>` line of NAME and prints the address.
listening_addr() {
    local name=$1 log=$log_dir/$1.log addr tenths=$((STARTUP_TIMEOUT * 10))
    while ((tenths > 0)); do
        addr=$(sed -n 's/^LISTENING //p' "$log" | head -n 1)
        if [[ -n $addr ]]; then
            printf '%s\n' "$addr"
            return 0
        fi
        if ! alive "${pids[$name]}"; then
            echo "demo: $name exited before it listened; its log:" >&2
            tail -n 30 "$log" >&2
            return 1
        fi
        sleep 0.1
        tenths=$((tenths - 1))
    done
    echo "demo: $name printed no LISTENING line within ${STARTUP_TIMEOUT}s; its log:" >&2
    tail -n 30 "$log" >&2
    return 1
}

common=(--topic "$topic" --listen "/ip4/127.0.0.1/udp/0/quic-v1,/ip4/127.0.0.1/tcp/0")

start publisher publisher "${common[@]}" --audio --duration "$safety_duration"
publisher_addr=$(listening_addr publisher)
echo "demo: publisher listens on $publisher_addr"

start viewer1 viewer "${common[@]}" --name viewer1 --bootstrap "$publisher_addr" \
    --duration "$safety_duration" "${display_args[@]}"
viewer1_addr=$(listening_addr viewer1)
echo "demo: viewer1 listens on $viewer1_addr"

start viewer2 viewer "${common[@]}" --name viewer2 --bootstrap "$viewer1_addr" \
    --duration "$safety_duration" "${display_args[@]}"
viewer2_addr=$(listening_addr viewer2)
echo "demo: viewer2 listens on $viewer2_addr"

echo "=== running for ${DURATION}s (topic $topic)"
for ((t = 1; t <= DURATION; t++)); do
    sleep 1
    for name in publisher viewer1 viewer2; do
        if ! alive "${pids[$name]}"; then
            echo "demo: $name exited early; its log:" >&2
            tail -n 30 "$log_dir/$name.log" >&2
            exit 1
        fi
    done
    if ((t % 5 == 0 || t == DURATION)); then
        for name in viewer1 viewer2; do
            line=$(grep '^PROGRESS ' "$log_dir/$name.log" | tail -n 1 || true)
            echo "  ${line:-$name: no progress yet}"
        done
    fi
done

echo "=== stopping"
# The publisher sends EOS when it stops; viewers that receive it exit by themselves.
stop publisher
if wait_gone "$STOP_TIMEOUT" "${pids[viewer1]}" "${pids[viewer2]}"; then
    echo "demo: both viewers ended by themselves"
fi
stop viewer1 viewer2

echo "=== results (logs in $log_dir)"
failed=0
for name in viewer1 viewer2; do
    log=$log_dir/$name.log
    summary=$(grep "^SUMMARY $name " "$log" | tail -n 1 || true)
    stats=$(grep "^STATS $name " "$log" | tail -n 1 || true)
    if [[ -z $summary ]]; then
        echo "$name: no SUMMARY line; last lines of its log:"
        tail -n 30 "$log"
        failed=1
        continue
    fi
    echo "$summary"
    echo "${stats:-STATS $name (none printed)}"
    frames=$(sed -n 's/.* video_frames=\([0-9]*\).*/\1/p' <<<"$summary")
    if [[ -z $frames || $frames -eq 0 ]]; then
        echo "demo: $name received no video frames" >&2
        failed=1
    fi
done

if ((failed)); then
    echo "=== demo FAILED" >&2
    exit 1
fi
echo "=== demo ok: both viewers received video"
