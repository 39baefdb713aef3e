#!/usr/bin/env bash
# CPU cost of p2plivesink's video encoding: CPU seconds per stream-second of each publisher
# process, for one and for two publishers at once at 360p, 720p and 1080p (30 fps, VP8, the
# sink's default bitrate), "before" (encoder-threads=2, the former fixed setting) and "after"
# (encoder-threads=0, automatic). Each publisher is
#
#   gst-launch-1.0 videotestsrc is-live=true pattern=ball ! video/x-raw,width=W,height=H,framerate=30/1
#       ! p2plivesink topic=benchK mdns=false kademlia=false listen=/ip4/127.0.0.1/tcp/0 encoder-threads=T
#
# with one viewer (`p2plivesrc bootstrap=<its address> decode=false ! fakesink sync=true`);
# after a warm-up the publishers' utime+stime (/proc/PID/stat) is read over a window. A
# benchmark, not a test: run it on a quiet machine.
#
#   bash scripts/bench-encoders.sh                   # every case, 5 s warm-up + 20 s window each (~7 min)
#   bash scripts/bench-encoders.sh --quick           # smoke run: 360p, 1 and 2 publishers, 5 s windows
#   bash scripts/bench-encoders.sh --duration 60 --resolutions 1080p
#   bash scripts/bench-encoders.sh --omit-property   # builds without encoder-threads
#   bash scripts/bench-encoders.sh --help            # every option
#
# Output: a markdown table on stdout and in target/bench-encoders/bench-encoders.{md,json}, logs
# in target/bench-encoders/logs/. Builds the plugin (cargo build --release --lib, at nice 19)
# only when target/release/libgstp2plive.so is missing, or always with BUILD=1.
# Only 127.0.0.1, mDNS and the DHT off; every child process is stopped when the script ends.
set -euo pipefail

cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1 && [[ -x "${HOME:-/root}/.cargo/bin/cargo" ]]; then
    export PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
if [[ ${BUILD:-0} == 1 || ! -f $target_dir/release/libgstp2plive.so ]]; then
    echo "=== nice -n 19 cargo build --release --lib"
    nice -n 19 cargo build --release --lib
fi

exec python3 scripts/perftools.py bench-encoders "$@"
