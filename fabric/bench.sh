#!/usr/bin/env bash
# The fabric bench (issue 7 "Performance"): one veth pair between two network namespaces.
#   - request/response round trip p50/p99, 64-byte payloads, one in flight:
#     fabric (`fabric ping`, authenticated, reliable, exactly-once) vs raw AF_PACKET vs UDP vs TCP;
#   - authenticated frames per second: seal+open on one core, and sealed frames sent by one core
#     and verified by another;
#   - loss recovery at 1% random drop on each side's ingress (nftables): fabric vs TCP p99.
# The round trips run twice, pinned the same way for every protocol: each end on its own CPU
# (client CPU 0, servers CPU 1: the shape of two hosts, which decides the p50 goal) and both ends
# on CPU 0 (nothing overlaps: the sum of both ends' CPU work per round trip shows).
# Needs root, iproute2, nftables, util-linux (taskset). Usage: fabric/bench.sh [COUNT]   (default 10000)
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${1:-10000}
cargo build --release -p fabric --bins >/dev/null 2>&1 || cargo build --release -p fabric --bins
BIN=$PWD/target/release
A=fbenchA$$; B=fbenchB$$; VA=fbva$$; VB=fbvb$$
TMP=$(mktemp -d)
cleanup() {
    for ns in $A $B; do
        for p in $(ip netns pids $ns 2>/dev/null); do kill -9 $p 2>/dev/null || true; done
        ip netns del $ns 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
ip netns add $A; ip netns add $B
ip link add $VA type veth peer name $VB
ip link set $VA netns $A; ip link set $VB netns $B
ip -n $A addr add 198.18.0.1/24 dev $VA; ip -n $B addr add 198.18.0.2/24 dev $VB
for ns in $A $B; do ip -n $ns link set lo up; done
ip -n $A link set $VA up; ip -n $B link set $VB up
inA() { ip netns exec $A "$@"; }
inB() { ip netns exec $B "$@"; }
$BIN/fabric keygen > $TMP/key
echo "# fabric bench: $(date -u +%FT%TZ), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), $COUNT round trips per figure"

field() { sed "s/.*\"$1\":\([0-9]*\).*/\1/"; }
median() { sort -n "$1" | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
range() { sort -n "$1" | awk 'NR==1{lo=$1} {hi=$1} END {print lo "-" hi}'; }
measure() { # name, command printing JSON with p50_us/p99_us; appends to $TMP/name.{p50,p99}
    local name=$1; shift
    local j; j=$("$@" | tr -d '\n ')
    field p50_us <<<"$j" >>"$TMP/$name.p50"
    field p99_us <<<"$j" >>"$TMP/$name.p99"
}
show() { # label, name
    printf '%-40s p50 %5s µs [%s]   p99 %7s µs [%s]\n' "$1" "$(median $TMP/$2.p50)" "$(range $TMP/$2.p50)" \
        "$(median $TMP/$2.p99)" "$(range $TMP/$2.p99)"
}
fabric_ping() { client $BIN/fabric --iface $VA --key-file $TMP/key --json --timeout-ms 10000 ping hostb --count "$COUNT" --window 1; }
start_servers() {
    inB env RUST_LOG=warn $BIN/fabricd --iface $VB --name hostb --key-file $TMP/key --monitor-interval-secs 0 >$TMP/fabricd.log 2>&1 &
    inB $BIN/fabric-bench udp-echo --addr 198.18.0.2:7001 & inB $BIN/fabric-bench tcp-echo --addr 198.18.0.2:7002 &
    sleep 0.5
}
start_servers
loss() { # pct: nftables random drop on both ingress sides (fabric 0x88b5 and IPv4)
    for ns in $A $B; do
        local dev=$VA; [ $ns = $B ] && dev=$VB
        ip netns exec $ns nft delete table netdev benchloss 2>/dev/null || true
        [ "$1" = 0 ] && continue
        ip netns exec $ns nft -f - <<NFT
table netdev benchloss {
    chain in {
        type filter hook ingress device "$dev" priority 0;
        meta protocol { ip, 0x88b5 } numgen random mod 100 < $1 counter drop;
    }
}
NFT
    done
}
REPS=${REPS:-5}
CLIENT_CPU=0
client() { inA taskset -c "$CLIENT_CPU" "$@"; }
pin_servers() { # CPU: moves every thread of every process in namespace B there
    for p in $(ip netns pids $B); do taskset -a -p -c "$1" "$p" >/dev/null; done
}
round_trips() { # title, client CPU, server CPU, file prefix
    CLIENT_CPU=$2
    pin_servers "$3"
    echo "## round trip, 64-byte payload, one in flight, no loss, $1: median [range] of $REPS runs, interleaved"
    for rep in $(seq "$REPS"); do
        measure "$4fabric" fabric_ping
        measure "$4raw" client $BIN/fabric-bench raw-ping --iface $VA --count "$COUNT"
        measure "$4udp" client $BIN/fabric-bench udp-ping --addr 198.18.0.2:7001 --count "$COUNT"
        measure "$4tcp" client $BIN/fabric-bench tcp-ping --addr 198.18.0.2:7002 --count "$COUNT"
    done
    show "fabric (AEAD, reliable, exactly-once)" "$4fabric"
    show "raw AF_PACKET ping-pong" "$4raw"
    show "UDP" "$4udp"
    show "TCP (TCP_NODELAY)" "$4tcp"
    echo "fabric p50 / raw p50 = $(awk -v f="$(median "$TMP/$4fabric.p50")" -v r="$(median "$TMP/$4raw.p50")" 'BEGIN {printf "%.2f", f / r}') ($1)"
}
ip netns exec $B $BIN/fabric-bench raw-echo --iface $VB & RAWECHO=$!
sleep 0.2
round_trips "each end on its own CPU (client CPU 0, server CPU 1)" 0 1 ""
round_trips "both ends on CPU 0" 0 0 one_cpu_
kill $RAWECHO 2>/dev/null || true
CLIENT_CPU=0
pin_servers 1

echo "## loss recovery: 1% random drop on each side's ingress (nftables), median [range] of $REPS runs"
loss 1
for rep in $(seq "$REPS"); do
    measure fabric_loss fabric_ping
    measure tcp_loss client $BIN/fabric-bench tcp-ping --addr 198.18.0.2:7002 --count "$COUNT"
done
loss 0
show "fabric, 1% loss" fabric_loss
show "TCP, 1% loss (Linux defaults)" tcp_loss

# Stop the servers: fabricd would also take the flood below (same EtherType and key).
for p in $(ip netns pids $B); do kill $p 2>/dev/null || true; done
sleep 0.3
echo "## authenticated frames per second (64-byte payloads)"
$BIN/fabric-bench crypto --secs 2 | sed 's/^/crypto, one core: /'
ip netns exec $B taskset -c 1 $BIN/fabric-bench sink --iface $VB --key-file $TMP/key --secs 5 > $TMP/sink.json &
SINK=$!
sleep 0.3
inA taskset -c 0 $BIN/fabric-bench flood --iface $VA --key-file $TMP/key --secs 3 | sed 's/^/sender, CPU0: /'
wait $SINK
sed 's/^/receiver, CPU1: /' $TMP/sink.json
