#!/usr/bin/env bash
# p2plive across NATs, in network namespaces this script creates and removes (root only).
#
#   wan (bridge, 10.77.0.0/24)
#    ├── node   10.77.0.10      p2plive-node: bootstrap, DHT, circuit relay v2
#    ├── r-pub  10.77.0.20 ── pub  192.168.20.2   publisher, behind a masquerading NAT
#    ├── r-v1   10.77.0.21 ── v1   192.168.21.2   viewer, behind a NAT
#    ├── r-v2   10.77.0.22 ── v2   192.168.22.2   viewer on a thin line (upload-capacity=0,
#    │                                            as on cellular), behind a NAT; its link is
#    │                                            later rate-limited (tc tbf)
#    └── r-v3   10.77.0.23 ── v3   192.168.23.2   viewer whose NAT forwards to the node only
#
# Every peer knows only the node's address and the stream name. Checked:
#   1. every viewer plays, v3 through the relay (it cannot reach any other peer);
#   2. the NAT'd peers learn they are private (AutoNAT) and hold a relay reservation;
#   3. viewers find each other (peers beyond the node) from the node's address alone;
#   4. a viewer with the wrong pre-shared key is refused by a private node;
#   5. with its link limited, v2 steps down a layer while v1 keeps the top layer.
#
# Nothing leaves the namespaces: all addresses are on the veths created here. Bounded: every
# process runs under `timeout`; the namespaces are deleted on exit, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

if ((EUID != 0)); then
    echo "netns-test: skipped: needs root (ip netns, nftables, tc)"
    exit 0
fi
for tool in ip nft tc gst-launch-1.0; do
    command -v "$tool" >/dev/null || { echo "netns-test: $tool missing (scripts/setup.sh installs it)" >&2; exit 1; }
done

target_dir=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --lib --bin p2plive-node
node_bin=$target_dir/debug/p2plive-node
export GST_PLUGIN_PATH=$target_dir/debug
export GST_REGISTRY=$(mktemp -u /tmp/p2plive-netns-registry.XXXXXX.bin)

tag=p2pl$$
work=$(mktemp -d /tmp/p2plive-netns.XXXXXX)
namespaces=()
pids=()

cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 2
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    rm -f "$GST_REGISTRY"
    if [[ ${KEEP_LOGS:-0} == 1 ]]; then echo "logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap "exit 130" INT TERM

ns() { printf '%s-%s' "$tag" "$1"; }
in_ns() { local n=$1; shift; ip netns exec "$(ns "$n")" "$@"; }
add_ns() {
    ip netns add "$(ns "$1")"
    namespaces+=("$(ns "$1")")
    in_ns "$1" ip link set lo up
}

# --- topology ----------------------------------------------------------------------------
add_ns wan
in_ns wan ip link add br0 type bridge
in_ns wan ip link set br0 up

# Plugs namespace $1 into the wan bridge with address $2.
on_wan() {
    local name=$1 addr=$2
    ip link add "w-$name-$$" type veth peer name "b-$name-$$"
    ip link set "w-$name-$$" netns "$(ns "$name")"
    ip link set "b-$name-$$" netns "$(ns wan)"
    in_ns wan ip link set "b-$name-$$" master br0 up
    in_ns "$name" ip link set "w-$name-$$" name wan0
    in_ns "$name" ip addr add "$addr/24" dev wan0
    in_ns "$name" ip link set wan0 up
}

add_ns node
on_wan node 10.77.0.10

# A host behind its own NAT router: router r-$1 (wan $2), host $1 on 192.168.$3.0/24.
behind_nat() {
    local name=$1 wan_addr=$2 net=$3
    add_ns "r-$name"
    add_ns "$name"
    on_wan "r-$name" "$wan_addr"
    ip link add "l-$name-$$" type veth peer name "h-$name-$$"
    ip link set "l-$name-$$" netns "$(ns "r-$name")"
    ip link set "h-$name-$$" netns "$(ns "$name")"
    in_ns "r-$name" ip link set "l-$name-$$" name lan0
    in_ns "r-$name" ip addr add "192.168.$net.1/24" dev lan0
    in_ns "r-$name" ip link set lan0 up
    in_ns "$name" ip link set "h-$name-$$" name eth0
    in_ns "$name" ip addr add "192.168.$net.2/24" dev eth0
    in_ns "$name" ip link set eth0 up
    in_ns "$name" ip route add default via "192.168.$net.1"
    in_ns "r-$name" sysctl -qw net.ipv4.ip_forward=1
    # A home router: outbound connections are masqueraded, nothing unsolicited comes in.
    # Unsolicited packets to the router itself are dropped before conntrack confirms them:
    # an early hole-punching packet would otherwise take the very port mapping the punch
    # needs (Linux then masquerades the outbound packets from another port).
    in_ns "r-$name" nft -f - <<EOF
table ip nat {
    chain postrouting { type nat hook postrouting priority srcnat; oifname "wan0" masquerade; }
}
table ip filter {
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan0" ct state new drop
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan0" oifname "wan0" accept
    }
}
EOF
}

behind_nat pub 10.77.0.20 20
behind_nat v1 10.77.0.21 21
behind_nat v2 10.77.0.22 22
behind_nat v3 10.77.0.23 23
# v3's network lets it reach the node and nothing else.
in_ns r-v3 nft insert rule ip filter forward iifname "lan0" ip daddr != 10.77.0.10 drop

# --- the node, the publisher, the viewers ------------------------------------------------
start() { # name, log file, command...
    local name=$1 log=$2; shift 2
    # Not through in_ns: a backgrounded shell function is a subshell, and killing it would
    # leave the command running. `ip netns exec` execs timeout, which passes signals on.
    ip netns exec "$(ns "$name")" timeout 150 "$@" >"$work/$log" 2>&1 &
    pids+=($!)
}

start node node.out "$node_bin" --listen /ip4/10.77.0.10/udp/4001/quic-v1,/ip4/10.77.0.10/tcp/4001 \
    --metrics 127.0.0.1:9464
for _ in $(seq 1 50); do grep -q '^/ip4/10.77.0.10/udp/4001/quic-v1/p2p/' "$work/node.out" && break; sleep 0.2; done
# QUIC: a peer's QUIC connections share its listening UDP port, so the address the node
# observes is the NAT mapping a hole punch (DCUtR) can use. Over TCP it would see an
# ephemeral port, which no peer can reach.
boot=$(grep -m1 '^/ip4/10.77.0.10/udp/4001/quic-v1/p2p/' "$work/node.out") || { cat "$work/node.out"; exit 1; }
echo "node: $boot"

common="topic=nat bootstrap=$boot mdns=false listen=/ip4/0.0.0.0/udp/0/quic-v1,/ip4/0.0.0.0/tcp/0"
# Noise: the encoder really spends its bitrate (a still pattern would need a few kbit/s).
start pub pub.log gst-launch-1.0 -m videotestsrc is-live=true pattern=snow \
    ! video/x-raw,width=160,height=120,framerate=15/1 \
    ! p2plivesink $common layers=temporal video-bitrate=1200
sleep 3
# No decoding, and a small picture: five pipelines share two cores (slower ones on CI), and
# the ABR judges arrival times, not pixels.
for v in v1 v2 v3; do
    extra=""
    # The thin line forwards nothing. (A viewer that offers upload and whose download then
    # becomes congested keeps its children: the trees do not yet move them off a parent
    # that is slow but not silent.)
    [[ $v == v2 ]] && extra="upload-capacity=0"
    start "$v" "$v.log" gst-launch-1.0 -m p2plivesrc name=src $common decode=false $extra ! fakesink sync=false
done

# The last p2plive-stats field $2 of log $1. One awk, no pipeline: with pipefail, a reader
# that stops early (head, grep -m1) would fail the script with SIGPIPE.
stat() {
    awk -v field="$2" '
        /p2plive-stats/ { last = $0 }
        END {
            n = split(last, parts, /[,;] */)
            for (i = 1; i <= n; i++) {
                sub(/^ +/, "", parts[i])
                if (index(parts[i], field "=(") == 1) {
                    value = substr(parts[i], length(field) + 2)
                    sub(/^\([a-z0-9]*\)/, "", value)
                    gsub(/["\\ ]/, "", value)
                    print value
                    exit
                }
            }
        }' "$work/$1"
}
failures=0
check() { # description, condition...
    local what=$1; shift
    if "$@"; then echo "ok: $what"; else echo "FAILED: $what"; failures=$((failures + 1)); fi
}
gt() { [[ -n ${1:-} && $1 -gt $2 ]]; }

sleep 20
echo "--- after 20 s (load: $(cut -d' ' -f1-3 /proc/loadavg))"
for v in v1 v2 v3; do
    echo "$v: frames-output=$(stat "$v.log" frames-output) layer=$(stat "$v.log" layer) connected-peers=$(stat "$v.log" connected-peers) reachability=$(stat "$v.log" reachability) hole-punches=$(stat "$v.log" hole-punches) tree-parents=$(stat "$v.log" tree-parents)"
done
echo "pub: reachability=$(stat pub.log reachability) connected-peers=$(stat pub.log connected-peers)"
metrics=$(in_ns node timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/9464; printf "GET /metrics HTTP/1.0\r\n\r\n" >&3; cat <&3' || true)
grep -E '^p2plive_(relay|connected)' <<<"$metrics" || true

# Seconds from a viewer's start to its first frame: the p2plive-stats message (one a second)
# that first counts an output frame.
first_frame_s() {
    awk '/p2plive-stats/ { n++; if ($0 !~ /frames-output=\(guint64\)0,/) { print n; exit } }' "$work/$1"
}
for v in v1 v2 v3; do
    secs=$(first_frame_s "$v.log")
    check "$v: first frame ${secs:-never} s after it started (behind its NAT)" gt "$((15 - ${secs:-99}))" 0
done

first=()
for v in v1 v2 v3; do first+=("$(stat "$v.log" frames-output)"); done
sleep 5
for i in 0 1 2; do
    v=v$((i + 1))
    now=$(stat "$v.log" frames-output)
    check "$v plays (frames-output ${first[$i]:-none} -> ${now:-none} in 5 s; 3.75 fps at layer 0)" gt "$(( ${now:-0} - ${first[$i]:-0} ))" 10
done
check "v3 (reaches the node only) knows it is private" test "$(stat v3.log reachability)" = private
check "the publisher knows it is private" test "$(stat pub.log reachability)" = private
check "the node holds relay reservations" grep -Eq '^p2plive_relay_reservations [1-9]' <<<"$metrics"
check "the node relays circuits" grep -Eq '^p2plive_relay_circuits [1-9]' <<<"$metrics"
for v in v1 v2; do
    check "$v found peers beyond the node" gt "$(stat "$v.log" connected-peers)" 1
done
check "hole punching made direct connections (v1 and v2)" gt "$(( $(stat v1.log hole-punches) + $(stat v2.log hole-punches) ))" 0

# --- a private node refuses a viewer with another key --------------------------------------
"$node_bin" --generate-psk "$work/a.key" >/dev/null
"$node_bin" --generate-psk "$work/b.key" >/dev/null
start node private.out "$node_bin" --listen /ip4/10.77.0.10/tcp/4002 --metrics off --psk-file "$work/a.key"
for _ in $(seq 1 50); do grep -q '^/ip4/10.77.0.10/tcp/4002/p2p/' "$work/private.out" && break; sleep 0.2; done
private=$(grep -m1 '^/ip4/10.77.0.10/tcp/4002/p2p/' "$work/private.out")
in_ns v1 timeout 15 gst-launch-1.0 -m p2plivesrc topic=private bootstrap="$private" mdns=false \
    psk-file="$work/b.key" ! fakesink >"$work/wrong-key.log" 2>&1 || true
check "a viewer with the wrong key is refused and told why" grep -q 'private network' "$work/wrong-key.log"
check "... and never connects" test "$(stat wrong-key.log connected-peers)" = 0

# --- a constrained viewer steps down, the others keep the top layer ------------------------
# Layers: 0, 1, 2 (temporal: a quarter, half, all of the frame rate). The viewers may have
# stepped down while the trees formed over relayed connections; they probe back up.
top=2
for _ in $(seq 1 60); do
    [[ $(stat v1.log layer) == "$top" && $(stat v2.log layer) == "$top" ]] && break
    sleep 1
done
echo "layers before the limit: v1=$(stat v1.log layer) v2=$(stat v2.log layer)"
check "v1 and v2 play the top layer before the limit" test "$(stat v1.log layer)$(stat v2.log layer)" = "$top$top"
v1_changes=$(stat v1.log layer-changes)
# v2's download: 350 kbit/s, less than even the lowest layer with its keyframes.
in_ns r-v2 tc qdisc add dev lan0 root tbf rate 350kbit burst 16kb latency 400ms
sleep 25
echo "after 25 s at 350 kbit/s: v1 layer=$(stat v1.log layer) (changes $v1_changes -> $(stat v1.log layer-changes)), v2 layer=$(stat v2.log layer) frames-output=$(stat v2.log frames-output)"
check "the constrained viewer v2 stepped down" gt "$top" "$(stat v2.log layer)"
check "v1 keeps the top layer" test "$(stat v1.log layer)" = "$top"

if ((failures > 0)); then
    echo "netns-test: $failures check(s) failed; logs:"
    for f in "$work"/*.out "$work"/*.log; do echo "== $f"; grep -v p2plive-stats "$f" | tail -15; done
    exit 1
fi
echo "netns-test: all checks passed"
