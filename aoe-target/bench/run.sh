#!/usr/bin/env bash
# aoe-target benchmark (not part of the test suite): our target against vblade on a veth pair
# between two namespaces, same backing file, target pinned to CPU 0 and load generator
# (aoe-bench) to CPU 1, at MTU 1500 and 9000; plus fio on the backing file itself.
#
#   sudo aoe-target/bench/run.sh [--seconds 5] [--size 1G] [--file /var/tmp/aoe-bench.img]
#                                [--mode all|durable|cached] [--mtu "1500 9000"]
#                                [--workloads "randread,4K,32 randwrite,4K,32"]
#
# Modes compared like with like:
#   durable: aoe-target (default: O_DIRECT, acks once durable)  vs  vblade -d -s  vs  fio direct
#   cached:  aoe-target --writeback (page cache)                vs  vblade (buffered)
# Prints a Markdown table and writes every raw result (JSON lines) to target/aoe-bench-results.jsonl.
# The target's CPU time per request comes from /proc/<pid>/stat (utime+stime) around each run.
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds=5
size=1G
file=/var/tmp/aoe-bench.img
mode=all
mtus="1500 9000"
workloads=("randread 4K 1" "randread 4K 32" "randwrite 4K 1" "randwrite 4K 32" "read 1M 4" "write 1M 4")
while [ $# -gt 0 ]; do
    case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --file) file=$2; shift 2 ;;
    --mode) mode=$2; shift 2 ;;
    --mtu) mtus=$2; shift 2 ;;
    --workloads) read -r -a ws <<<"$2"; workloads=("${ws[@]//,/ }"); shift 2 ;;
    *) echo "usage: $0 [--seconds N] [--size SIZE] [--file PATH] [--mode all|durable|cached] [--mtu \"1500 9000\"] [--workloads \"rw,bs,qd ...\"]" >&2; exit 2 ;;
    esac
done
for t in vblade fio taskset python3; do
    command -v $t >/dev/null || { echo "bench: $t missing (apt-get install vblade fio util-linux python3)" >&2; exit 1; }
done
# AOE_BIN: a directory holding other aoe-target/aoe-bench binaries (A/B against a build).
if [ -n "${AOE_BIN:-}" ]; then
    bin=$AOE_BIN
else
    cargo build --release -p aoe-target --bins >/dev/null
    bin=$PWD/target/release
fi
out=$PWD/target/aoe-bench-results.jsonl
: >"$out"

ns_t=aoebenchT$$
ns_i=aoebenchI$$
pid=""
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    ip netns del "$ns_t" 2>/dev/null || true
    ip netns del "$ns_i" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$ns_t"
ip netns add "$ns_i"
ip link add bt netns "$ns_t" type veth peer name bi netns "$ns_i"

# A fully written backing file, so reads hit real blocks (not unwritten extents).
if [ ! -s "$file" ]; then
    echo "writing $size of random data to $file" >&2
    count=$(python3 -c "import sys; s='$size'; m={'K':1,'M':1<<10,'G':1<<20}; print(int(s[:-1])*m[s[-1]]//1024)")
    dd if=/dev/urandom of="$file" bs=1M count="$count" oflag=direct status=none
fi

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

run_target() { # name mtu cmd...
    local name=$1 mtu=$2
    shift 2
    # Same start for every target of a mode: the cached runs begin with the file in the page
    # cache (the durable runs' O_DIRECT writes drop it), the durable ones without it.
    case $name in
    *writeback* | *buffered*) dd if="$file" of=/dev/null bs=1M status=none ;;
    *) sync; echo 1 >/proc/sys/vm/drop_caches ;;
    esac
    ip netns exec "$ns_t" taskset -c 0 "$@" >/dev/null 2>&1 &
    pid=$!
    sleep 1
    local tpid
    tpid=$(pgrep -P "$pid" | head -1 || true)
    tpid=${tpid:-$pid}
    for w in "${workloads[@]}"; do
        set -- $w
        local before after
        before=$(cpu_ticks "$tpid")
        res=$(ip netns exec "$ns_i" taskset -c 1 timeout 120 "$bin/aoe-bench" --iface bi --shelf 9 --slot 9 \
            --rw "$1" --bs "$2" --qd "$3" --duration "$seconds" --ramp 1 --json || echo '{}')
        after=$(cpu_ticks "$tpid")
        python3 - "$name" "$mtu" "$before" "$after" "$hz" "$res" >>"$out" <<'PY'
import json, sys
name, mtu, before, after, hz, res = sys.argv[1:]
r = json.loads(res) if res.strip() else {}
r["target"] = name
r["mtu"] = int(mtu)
cpu = (int(after) - int(before)) / int(hz)
r["target_cpu_s"] = cpu
ios = r.get("ios", 0)
# The counter covers the ramp too; requests done in the ramp are not in `ios`, so this
# slightly overstates CPU per request. Same rule for every target.
r["target_cpu_us_per_req"] = cpu * 1e6 / ios if ios else None
print(json.dumps(r))
PY
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=""
}

for mtu in $mtus; do
    ip -n "$ns_t" link set bt mtu $mtu up
    ip -n "$ns_i" link set bi mtu $mtu up
    sleep 1
    if [ "$mode" != cached ]; then
        run_target "aoe-target durable" $mtu "$bin/aoe-target" --iface bt --shelf 9 --slot 9 --file "$file" --probe-ms 0
        run_target "vblade -d -s" $mtu vblade -b 64 -d -s 9 9 bt "$file"
    fi
    if [ "$mode" != durable ]; then
        run_target "aoe-target --writeback" $mtu "$bin/aoe-target" --iface bt --shelf 9 --slot 9 --file "$file" --writeback --probe-ms 0
        run_target "vblade (buffered)" $mtu vblade -b 64 9 9 bt "$file"
    fi
done

# fio on the backing file itself: direct, io_uring; writes with O_DSYNC (durable).
[ "$mode" = cached ] && workloads=()
for w in "${workloads[@]}"; do
    set -- $w
    sync=""
    case $1 in *write) sync="--sync=dsync" ;; esac
    res=$(taskset -c 1 fio --name=b --filename="$file" --direct=1 --ioengine=io_uring --rw="$1" \
        --bs="$2" --iodepth="$3" --runtime="$seconds" --ramp_time=1 --time_based $sync \
        --output-format=json 2>/dev/null)
    python3 - "$1" "$2" "$3" "$res" >>"$out" <<'PY'
import json, sys
rw, bs, qd, res = sys.argv[1:]
j = json.loads(res)["jobs"][0]
side = j["write"] if "write" in rw else j["read"]
pct = side["clat_ns"].get("percentile", {})
mult = {"K": 1024, "M": 1 << 20}[bs[-1]]
print(json.dumps({"target": "fio direct io_uring", "mtu": 0, "rw": rw, "bs": int(bs[:-1]) * mult,
    "qd": int(qd), "iops": side["iops"], "mb_s": side["bw_bytes"] / 1e6,
    "lat_us": {"p50": pct.get("50.000000", 0) / 1000, "p99": pct.get("99.000000", 0) / 1000},
    "target_cpu_us_per_req": None}))
PY
done

python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| target | MTU | workload | IOPS | MB/s | p50 us | p99 us | target CPU us/req | retransmits |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if "iops" not in r:
        print(f"| {r['target']} | {r['mtu']} | (failed) | | | | | | |")
        continue
    bs = r["bs"]
    bs = f"{bs >> 20}M" if bs >= 1 << 20 else f"{bs >> 10}K"
    cpu = r.get("target_cpu_us_per_req")
    cpu = f"{cpu:.1f}" if cpu is not None else "-"
    rt = r.get("session", {}).get("retransmits", "-")
    mtu = r["mtu"] or "-"
    print(f"| {r['target']} | {mtu} | {r['rw']} {bs} QD{r['qd']} | {r['iops']:.0f} | {r['mb_s']:.1f} | "
          f"{r['lat_us']['p50']:.0f} | {r['lat_us']['p99']:.0f} | {cpu} | {rt} |")
PY
