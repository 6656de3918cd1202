#!/bin/sh
# Boot time from VMM process start to the guest's /init (its "L2-MARKER-BOOTED" line) and to the
# VMM's exit after the guest powers off, for QEMU -M q35, QEMU -M microvm and, once it boots
# Linux, our vmm: same kernel, initramfs, 2 vCPUs, 512 MiB. Run inside L1 on the nested route,
#   ci/nested/run.sh --script ci/nested/boot-times.sh --with-qemu
# or directly where /dev/kvm runs real guests, with VMM, QEMU, L2_KERNEL and L2_STREAM set.
# vmm runs twice per round: with --prefault off (as QEMU, which faults guest RAM in lazily) and
# with its default prefault ("vmm-prefault").
# Times come from /proc/uptime (10 ms steps). RUNS (default 3) rounds, one line per boot:
#   BOOT <vmm> run=<i> init_s=<start to /init> guest_s=<the guest kernel's uptime at /init>
#        exit_s=<start to exit> rc=<exit status> [rss_mib=<vmm: RSS beyond guest RAM>]
# init_s - guest_s is what comes before the guest kernel's clock starts (the VMM's set-up, the
# firmware where there is one, and the kernel's decompression).
: "${QEMU:?} ${L2_KERNEL:?} ${L2_STREAM:?}"
RUNS=${RUNS:-3}
CMD="console=ttyS0 quiet panic=-1 stream_size=64K stream_passes=2"
out=$(mktemp)

since() { awk -v a="$1" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN {printf "%.2f", b - a}'; }

# boot NAME RUN CMD...: runs CMD, timestamping the guest's /init marker as it arrives.
boot() {
    name=$1 run=$2
    shift 2
    t0=$(cut -d' ' -f1 /proc/uptime)
    { "$@" 2>&1; echo "EXIT $?"; } | while IFS= read -r line; do
        case "$line" in
        *L2-MARKER-BOOTED*)
            echo "init $(since "$t0")"
            echo "guest $(echo "$line" | sed -n 's/.*uptime=\([0-9.]*\).*/\1/p')"
            ;;
        *'"vmm_overhead_bytes":'*)
            echo "rss $(echo "$line" | sed -n 's/.*"vmm_overhead_bytes": *\([0-9]*\).*/\1/p')"
            ;;
        "EXIT "*) echo "exit $(since "$t0") ${line#EXIT }" ;;
        esac
    done >"$out"
    init=$(awk '$1 == "init" {print $2}' "$out")
    exit_s=$(awk '$1 == "exit" {print $2}' "$out")
    rc=$(awk '$1 == "exit" {print $3}' "$out")
    guest=$(awk '$1 == "guest" {print $2}' "$out")
    rss=$(awk '$1 == "rss" && $2 != "" {printf " rss_mib=%.1f", $2 / 1048576}' "$out")
    echo "BOOT $name run=$run init_s=${init:-none} guest_s=${guest:-none} exit_s=$exit_s rc=$rc$rss"
}

qemu() {
    "$QEMU" -M "$1" -accel kvm -cpu host -m 512 -smp 2 -kernel "$L2_KERNEL" -initrd "$L2_STREAM" \
        -append "$CMD" -nodefaults -no-user-config -display none -serial stdio -monitor none \
        -no-reboot </dev/null
}

i=1
while [ "$i" -le "$RUNS" ]; do
    boot qemu-q35 "$i" qemu q35
    boot qemu-microvm "$i" qemu microvm
    if [ -n "${VMM:-}" ] && "$VMM" --help 2>/dev/null | grep -qE -- '^ +--kernel '; then
        # Like for like with QEMU's default (no -mem-prealloc): guest RAM faulted in by the guest.
        boot vmm "$i" "$VMM" --json --prefault off --kernel "$L2_KERNEL" --initramfs "$L2_STREAM" \
            --cmdline "$CMD" --numa-nodes 1 --vcpus 2 --memory 512M
        # vmm's default: all guest RAM faulted in on its node first.
        boot vmm-prefault "$i" "$VMM" --json --kernel "$L2_KERNEL" --initramfs "$L2_STREAM" \
            --cmdline "$CMD" --numa-nodes 1 --vcpus 2 --memory 512M
    fi
    i=$((i + 1))
done
rm -f "$out"
