#!/bin/sh
# The Linux-guest checks of vmm/tests/it/linux_guest.rs, run on a host with a /dev/kvm that
# runs real guests: inside L1 on the nested route (ci/nested/run.sh), or on the machine itself
# on the direct route. POSIX sh (busybox in L1). The test reads the output; this script only
# runs things and prints what it saw, each run as
#
#   CHECK-BEGIN <name>
#   ... (CONSOLE <vmm stdout line>, STDERR <line>, PROC-VCPU <thread> <cpus allowed>,
#        PROC-NUMA-MAPS <numa_maps line bound to a node>, ...)
#   CHECK-END <name> rc=<exit status>
#
# Environment: VMM, L2_KERNEL, L2_STREAM, L2_PANIC (ci/images/linux-guest.sh), QEMU (optional:
# the same guest under QEMU as the L2 VMM; its shape is QEMU_LAYOUT in linux_guest.rs),
# CMDLINE (the guest kernel command line), RUN_2NODE and RUN_4NODE (vmm layout arguments,
# split on spaces), LIMIT (seconds per run).
: "${VMM:?} ${L2_KERNEL:?} ${L2_STREAM:?} ${L2_PANIC:?} ${CMDLINE:?} ${RUN_2NODE:?} ${RUN_4NODE:?}"
LIMIT=${LIMIT:-240}
SCRATCH=$(mktemp -d)

# Seconds since boot, as a decimal (busybox has no date +%N).
now() { cut -d' ' -f1 /proc/uptime; }

# watch NAME PID MARK: until PID exits, once MARK shows in its console and its vcpu threads
# exist, print their allowed CPUs and its memory mappings bound to a node (the placement seen
# from the host).
watch() {
    sampled=0
    while [ "$sampled" = 0 ] && kill -0 "$2" 2>/dev/null; do
        if grep -q "$3" "$SCRATCH/$1.out" 2>/dev/null; then
            for t in /proc/"$2"/task/*; do
                comm=$(cat "$t/comm" 2>/dev/null)
                case "$comm" in
                vcpu*) echo "PROC-VCPU $comm $(awk '/^Cpus_allowed_list:/ {print $2}' "$t/status")" ;;
                esac
            done >"$SCRATCH/vcpus"
            if [ -s "$SCRATCH/vcpus" ]; then
                cat "$SCRATCH/vcpus"
                grep ' bind:' "/proc/$2/numa_maps" | sed 's/^/PROC-NUMA-MAPS /'
                sampled=1
            fi
        fi
        sleep 0.1
    done
    [ "$sampled" = 1 ] || echo "SAMPLE-MISSED $3"
}

# run NAME MARK CMD...: runs CMD bounded by LIMIT, watching it when MARK is not "-".
run() {
    name=$1 mark=$2
    shift 2
    echo "CHECK-BEGIN $name"
    echo "COMMAND $*" | cut -c1-400
    t0=$(now)
    "$@" >"$SCRATCH/$name.out" 2>"$SCRATCH/$name.err" &
    pid=$!
    # The guard must not keep this script's stdout open (the caller reads it to the end), and
    # takes its sleep with it when it is stopped.
    (
        sleep "$LIMIT" &
        s=$!
        trap 'kill $s 2>/dev/null; exit 0' TERM
        wait $s
        kill -9 "$pid" 2>/dev/null && echo "KILLED after ${LIMIT}s" >>"$SCRATCH/$name.err"
    ) >/dev/null 2>&1 &
    guard=$!
    [ "$mark" = - ] || watch "$name" "$pid" "$mark"
    wait "$pid"
    rc=$?
    kill "$guard" 2>/dev/null
    wait "$guard"
    echo "SECONDS $(awk -v a="$t0" -v b="$(now)" 'BEGIN {printf "%.2f", b - a}')"
    tr -d '\r' <"$SCRATCH/$name.out" | sed 's/^/CONSOLE /'
    sed 's/^/STDERR /' "$SCRATCH/$name.err"
    echo "CHECK-END $name rc=$rc"
}

echo "CHECK-BEGIN host"
modules=""
for m in kvm_amd kvm_intel; do
    [ -d "/sys/module/$m" ] && modules="$modules $m"
done
echo "KVM-MODULES$modules"
echo "CPU-FLAGS $(grep -o -w -m1 -e svm -e vmx /proc/cpuinfo | head -1)"
numactl -H | sed 's/^/NUMACTL /'
echo "CHECK-END host rc=0"

if [ -n "${QEMU:-}" ]; then
    run qemu-l2 - "$QEMU" -accel kvm -cpu host -M q35 -m 512 -smp 2 \
        -object memory-backend-ram,id=m0,size=256M -object memory-backend-ram,id=m1,size=256M \
        -numa node,nodeid=0,cpus=0,memdev=m0 -numa node,nodeid=1,cpus=1,memdev=m1 \
        -numa dist,src=0,dst=1,val=20 -numa dist,src=1,dst=0,val=20 \
        -kernel "$L2_KERNEL" -initrd "$L2_STREAM" -append "$CMDLINE" \
        -nodefaults -display none -serial stdio -monitor none -no-reboot
fi

# shellcheck disable=SC2086 # the layout arguments are meant to split
run vmm-2node L2-HOLD "$VMM" --kernel "$L2_KERNEL" --initramfs "$L2_STREAM" --cmdline "$CMDLINE" $RUN_2NODE
# shellcheck disable=SC2086
run vmm-4node L2-HOLD "$VMM" --kernel "$L2_KERNEL" --initramfs "$L2_STREAM" --cmdline "$CMDLINE" $RUN_4NODE
run vmm-panic - "$VMM" --kernel "$L2_KERNEL" --initramfs "$L2_PANIC" --cmdline "$CMDLINE" --numa-nodes 2 --memory 256M

# Bad input: each must fail with one clear error line.
head -c 1048576 /dev/urandom >"$SCRATCH/random.bin"
head -c 65536 "$L2_KERNEL" >"$SCRATCH/truncated.bzImage"
# An initramfs larger than the guest's memory (sparse: costs no space).
dd if=/dev/zero of="$SCRATCH/huge.cpio" bs=1M count=0 seek=96 2>/dev/null
long=$(head -c 8192 /dev/zero | tr '\0' x)
small="--numa-nodes 1 --memory 64M"
# shellcheck disable=SC2086
{
    run bad-missing-kernel - "$VMM" --kernel "$SCRATCH/no-such-bzImage" --initramfs "$L2_STREAM" $small
    run bad-random-kernel - "$VMM" --kernel "$SCRATCH/random.bin" --initramfs "$L2_STREAM" $small
    run bad-truncated-kernel - "$VMM" --kernel "$SCRATCH/truncated.bzImage" --initramfs "$L2_STREAM" $small
    run bad-huge-initramfs - "$VMM" --kernel "$L2_KERNEL" --initramfs "$SCRATCH/huge.cpio" $small
    run bad-long-cmdline - "$VMM" --kernel "$L2_KERNEL" --initramfs "$L2_STREAM" --cmdline "$long" $small
}
rm -rf "$SCRATCH"
