#!/usr/bin/env bash
# Builds the L1 "host" for the nested route (ci/nested/run.sh): Debian's cloud-amd64 kernel
# with kvm_amd, and an initramfs with numactl, our static `vmm`, the L2 guest images
# (linux-guest.sh, both variants) and a test script that /init runs (ci/images/init/l1.sh).
#
#   ci/images/l1-host.sh --script FILE --out DIR [--with-qemu] [--cache DIR]
#
# --script FILE  the test to run inside L1 as /test.sh (POSIX sh; busybox). /init exports
#                VMM, L2_KERNEL, L2_STREAM, L2_PANIC (and QEMU) and prints "L1-TEST-EXIT <status>".
# --out DIR      where `vmlinuz` and `initramfs.cpio` for this script are written.
# --with-qemu    also put Debian's qemu-system-x86_64 (its libraries and firmware) into L1, to
#                run it as the L2 VMM (the route check of nested-kvm-route.md §5).
#
# Everything but the script is one cached archive (build-initramfs.sh: keyed by the kernel
# package version and a hash of every input); the script is appended as a second newc archive
# (the kernel unpacks concatenated archives in order), so a new script costs no rebuild.
set -euo pipefail
script=""
out=""
qemu=0
cache=""
while [ $# -gt 0 ]; do
    case "$1" in
    --script) script=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --with-qemu) qemu=1; shift ;;
    --cache) cache=$2; shift 2 ;;
    -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "l1-host: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -r "$script" ] || { echo "l1-host: --script FILE is required and must be readable" >&2; exit 2; }
[ -n "$out" ] || { echo "l1-host: --out DIR is required" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
root_dir=$(cd "$here/../.." && pwd)
cache=${cache:-$root_dir/ci/cache/images}
# shellcheck source=ci/images/lib.sh
. "$here/lib.sh"

l2_stream=$("$here/linux-guest.sh" --variant stream --cache "$cache")
l2_panic=$("$here/linux-guest.sh" --variant panic --cache "$cache")
vmm=$(static_bin vmm vmm)
files=(
    "$vmm:/usr/bin/vmm"
    "$l2_stream/vmlinuz:/l2/vmlinuz"
    "$l2_stream/initramfs.cpio:/l2/stream.cpio"
    "$l2_panic/initramfs.cpio:/l2/panic.cpio"
)
mapfile -t -O "${#files[@]}" files < <(with_libs "$(command -v numactl)")
if [ "$qemu" = 1 ]; then
    q=$(command -v qemu-system-x86_64) || { echo "l1-host: qemu-system-x86_64 missing (see ci/packages)" >&2; exit 1; }
    mapfile -t -O "${#files[@]}" files < <(with_libs "$q")
    # Debian's QEMU searches /usr/share/qemu:/usr/share/seabios; -nodefaults needs no option ROMs;
    # -M microvm boots with qboot (bios-microvm.bin).
    for fw in /usr/share/seabios/bios-256k.bin /usr/share/qemu/linuxboot_dma.bin /usr/share/qemu/kvmvapic.bin \
        /usr/share/qemu/bios-microvm.bin; do
        files+=("$fw:$fw")
    done
fi
args=()
for f in "${files[@]}"; do args+=(--file "$f"); done
base=$("$here/build-initramfs.sh" --flavour "$KERNEL_FLAVOUR" --modules kvm-amd \
    --init "$here/init/l1.sh" --cache "$cache" "${args[@]}")
use_image "$base"

mkdir -p "$out"
ln -f "$base/vmlinuz" "$out/vmlinuz" 2>/dev/null || cp "$base/vmlinuz" "$out/vmlinuz"
extra=$(mktemp -d)
trap 'rm -rf "$extra"' EXIT
install -m 0755 "$script" "$extra/test.sh"
{
    cat "$base/initramfs.cpio"
    (cd "$extra" && echo ./test.sh | cpio -o -H newc --quiet)
} >"$out/initramfs.cpio"
echo "$out"
