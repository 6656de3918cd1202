#!/usr/bin/env bash
# Builds the L2 Linux guest: Debian's cloud-amd64 kernel and a busybox initramfs with numactl
# (and its libraries) and our static STREAM program `guest-stream` (vmm/guest/src/bin).
#
#   ci/images/linux-guest.sh [--variant stream|panic] [--cache DIR]
#
# --variant stream (default): /init (ci/images/init/l2-stream.sh) prints the shape the guest
#   sees (numactl -H, /sys/devices/system/node/node*/{cpulist,meminfo,distance}, the kernel's
#   memory ranges per node), runs guest-stream and powers off (`poweroff -f`).
# --variant panic: /init (ci/images/init/l2-panic.sh) panics the kernel (sysrq 'c').
#
# Prints the directory holding `vmlinuz` and `initramfs.cpio`: built by build-initramfs.sh under
# the cache (ci/cache/images, ignored by git), keyed by the kernel package version and a hash of
# every input (scripts, /init, binaries), so an unchanged image is not rebuilt.
set -euo pipefail
variant=stream
cache=""
while [ $# -gt 0 ]; do
    case "$1" in
    --variant) variant=$2; shift 2 ;;
    --cache) cache=$2; shift 2 ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "linux-guest: unknown argument $1" >&2; exit 2 ;;
    esac
done
here=$(cd "$(dirname "$0")" && pwd)
root_dir=$(cd "$here/../.." && pwd)
cache=${cache:-$root_dir/ci/cache/images}
# shellcheck source=ci/images/lib.sh
. "$here/lib.sh"

case "$variant" in
stream | panic) init=$here/init/l2-$variant.sh ;;
*) echo "linux-guest: unknown variant $variant (stream or panic)" >&2; exit 2 ;;
esac
command -v numactl >/dev/null || { echo "linux-guest: numactl missing (see ci/packages)" >&2; exit 1; }

files=()
if [ "$variant" = stream ]; then
    stream=$(static_bin vmm-guest guest-stream)
    files+=("$stream:/bin/guest-stream")
    mapfile -t -O "${#files[@]}" files < <(with_libs "$(command -v numactl)")
fi
args=()
for f in "${files[@]}"; do args+=(--file "$f"); done
image=$("$here/build-initramfs.sh" --flavour "$KERNEL_FLAVOUR" --init "$init" --cache "$cache" "${args[@]}")
use_image "$image"
echo "$image"
