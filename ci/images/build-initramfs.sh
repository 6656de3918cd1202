#!/usr/bin/env bash
# Builds a Debian kernel + busybox initramfs for booting a Linux guest in tests (QEMU TCG or
# our VMM). Generic: the caller chooses the kernel flavour, the modules, extra files and /init.
#
#   ci/images/build-initramfs.sh --flavour cloud-amd64 --modules "aoe virtio_net virtio_pci" \
#       --init path/to/init.sh [--file SRC:DST ...] [--cache DIR]
#
# Prints the directory holding `vmlinuz` and `initramfs.cpio` (uncompressed newc). The
# directory is under the cache (default ci/cache/images, ignored by git) and named after the
# kernel package version and a hash of every input, so a rebuild happens only when something
# changes. Uses only apt-get download, dpkg -x, busybox-static, cpio and kmod (depmod and
# modprobe --show-depends), after nested-kvm-route.md §1-3.
#
# The initramfs holds /bin/busybox with a link per applet, /lib/modules/*.ko and
# /etc/modules.order (insmod in that order: dependencies first), the /init given, and the
# extra files. The /init script must mount what it needs (proc, sys, devtmpfs).
set -euo pipefail

flavour=cloud-amd64
modules=""
init=""
cache=""
files=()
while [ $# -gt 0 ]; do
    case "$1" in
    --flavour) flavour=$2; shift 2 ;;
    --modules) modules=$2; shift 2 ;;
    --init) init=$2; shift 2 ;;
    --file) files+=("$2"); shift 2 ;;
    --cache) cache=$2; shift 2 ;;
    -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "build-initramfs: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$init" ] || { echo "build-initramfs: --init is required" >&2; exit 2; }
[ -r "$init" ] || { echo "build-initramfs: cannot read $init" >&2; exit 2; }
root_dir=$(cd "$(dirname "$0")/../.." && pwd)
cache=${cache:-$root_dir/ci/cache/images}
mkdir -p "$cache/debs"
for tool in apt-get apt-cache dpkg dpkg-deb cpio depmod modprobe; do
    command -v "$tool" >/dev/null || { echo "build-initramfs: $tool missing (see ci/packages)" >&2; exit 1; }
done
busybox=/bin/busybox
[ -x "$busybox" ] || { echo "build-initramfs: $busybox missing (package busybox-static)" >&2; exit 1; }

meta="linux-image-$flavour"
pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$pkg" ]; then
    apt-get update -qq >/dev/null
    pkg=$(apt-cache depends "$meta" | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
[ -n "$pkg" ] || { echo "build-initramfs: no kernel package behind $meta" >&2; exit 1; }
version=$(apt-cache policy "$pkg" | awk '/Candidate:/{print $2; exit}')

# Key: kernel package + version, and a hash of this script, the module list, /init and extras.
key_input=$( {
    echo "$pkg $version $modules"
    cat "$0" "$init"
    for f in "${files[@]}"; do echo "$f"; cat "${f%%:*}"; done
} | sha256sum | cut -c1-16)
out="$cache/$pkg-$version-$key_input"
if [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.cpio" ]; then
    echo "$out"
    exit 0
fi

deb=$(ls "$cache/debs/${pkg}_${version//:/%3a}"_*.deb 2>/dev/null | head -1 || true)
if [ -z "$deb" ]; then
    (cd "$cache/debs" && apt-get download "$pkg=$version" >/dev/null 2>&1) ||
        { echo "build-initramfs: apt-get download $pkg=$version failed" >&2; exit 1; }
    deb=$(ls "$cache/debs/${pkg}"_*.deb | head -1)
fi
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
kpkg=$work/kpkg
dpkg -x "$deb" "$kpkg"
kver=${pkg#linux-image-}
depmod -b "$kpkg" "$kver" # the .deb ships no modules.dep

rootfs=$work/root
mkdir -p "$rootfs"/{bin,sbin,etc,proc,sys,dev,tmp,lib/modules}
cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$busybox" --list); do
    [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
done
: >"$rootfs/etc/modules.order"
for m in $modules; do
    for ko in $(modprobe -d "$kpkg" -S "$kver" --show-depends "$m" | awk '$1=="insmod"{print $2}'); do
        name=$(basename "$ko")
        if ! grep -qx "$name" "$rootfs/etc/modules.order"; then
            cp "$ko" "$rootfs/lib/modules/$name"
            echo "$name" >>"$rootfs/etc/modules.order"
        fi
    done
done
install -m 0755 "$init" "$rootfs/init"
for f in "${files[@]}"; do
    src=${f%%:*}
    dst=${f#*:}
    mkdir -p "$rootfs/$(dirname "$dst")"
    cp -L "$src" "$rootfs/$dst"
done

mkdir -p "$out.tmp"
cp "$kpkg/boot/vmlinuz-$kver" "$out.tmp/vmlinuz"
(cd "$rootfs" && find . -print0 | cpio --null -o -H newc --quiet) >"$out.tmp/initramfs.cpio"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out"
