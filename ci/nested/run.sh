#!/usr/bin/env bash
# Runs a test script inside an L1 "host" booted in QEMU TCG with an emulated AMD CPU that has
# SVM and nested paging, so kvm_amd in L1 gives a working /dev/kvm for real Linux guests even
# where the machine's own /dev/kvm cannot run one (shared/reference/nested-kvm-route.md).
#
#   ci/nested/run.sh --script FILE [--with-qemu] [--timeout SECS] [--memory MIB]
#
# L1 is a q35 machine with two NUMA nodes, one CPU each (`-cpu qemu64,+svm,+npt`, `-accel tcg`),
# and MIB of memory split evenly (default 2048), booted from ci/images/l1-host.sh. L1's console
# goes to stdout (carriage returns removed); L1's kernel prints only critical messages there
# (loglevel=3, so its messages do not cut into the script's lines), and /init lists its errors
# after the script (L1-DMESG). Bounded by `timeout` (default 600 s).
#
# QEMU's TCG emulation of nested SVM sometimes loses an IPI sent to an L1 CPU that is running an
# L2 guest; the sender then spins forever. Seen here: automatic NUMA balancing in L1 (two nodes)
# scanning the vmm's own memory and flushing TLBs across its threads (task_numa_work ->
# flush_tlb_mm_range -> smp_call_function_many_cond, a soft lockup of vcpuN). numa_balancing=disable
# removes the usual sender (a host that pins VMs and binds their memory gains nothing from it);
# softlockup_panic=1 turns any other such hang into L1 going down within ~20 s (exit status 125,
# the lockup on the console) instead of a run that hangs until the timeout.
#
# Exit status: the script's; 124 when the time ran out; 125 when L1 never reported a status
# (it did not boot, or the script killed it); 2 for bad usage.
set -euo pipefail
script=""
qemu_flag=()
limit=600
memory=2048
while [ $# -gt 0 ]; do
    case "$1" in
    --script) script=$2; shift 2 ;;
    --with-qemu) qemu_flag=(--with-qemu); shift ;;
    --timeout) limit=$2; shift 2 ;;
    --memory) memory=$2; shift 2 ;;
    -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "nested/run: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -r "$script" ] || { echo "nested/run: --script FILE is required and must be readable" >&2; exit 2; }
case "$memory" in '' | *[!0-9]*) echo "nested/run: --memory takes MiB" >&2; exit 2 ;; esac
command -v qemu-system-x86_64 >/dev/null || { echo "nested/run: qemu-system-x86_64 missing (see ci/packages)" >&2; exit 1; }
root_dir=$(cd "$(dirname "$0")/../.." && pwd)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$root_dir/ci/images/l1-host.sh" --script "$script" --out "$work" "${qemu_flag[@]}" >/dev/null
half=$((memory / 2))
console=$work/console
set +e
# timeout is the direct parent of QEMU, so QEMU itself is killed when the time is up.
timeout --kill-after=10 "$limit" qemu-system-x86_64 \
    -accel tcg -cpu qemu64,+svm,+npt -M q35 -m "$memory" -smp 2 \
    -object "memory-backend-ram,id=m0,size=${half}M" \
    -object "memory-backend-ram,id=m1,size=$((memory - half))M" \
    -numa node,nodeid=0,cpus=0,memdev=m0 -numa node,nodeid=1,cpus=1,memdev=m1 \
    -kernel "$work/vmlinuz" -initrd "$work/initramfs.cpio" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 numa_balancing=disable softlockup_panic=1" \
    -nodefaults -display none -serial stdio -monitor none -no-reboot -net none \
    </dev/null | tr -d '\r' | tee "$console"
status=("${PIPESTATUS[@]}")
set -e
if [ "${status[0]}" = 124 ] || [ "${status[0]}" = 137 ]; then
    echo "nested/run: L1 did not finish within ${limit}s" >&2
    exit 124
fi
rc=$(sed -n 's/.*L1-TEST-EXIT \([0-9][0-9]*\).*/\1/p' "$console" | tail -1)
if [ -z "$rc" ]; then
    echo "nested/run: L1 reported no test status (qemu exit ${status[0]})" >&2
    exit 125
fi
exit "$rc"
