# shellcheck shell=bash
# Shared by ci/images/linux-guest.sh and ci/images/l1-host.sh (sourced, not run).
#
# Needs $root_dir (the repository) and $cache (the image cache, ci/cache/images by default).
# shellcheck disable=SC2154 # root_dir and cache are the sourcing script's

# The one place the guest kernel flavour is chosen: Debian's cloud kernel boots about twice as
# fast as the generic one under TCG and has kvm_amd as a module without extra dependencies
# (shared/reference/nested-kvm-route.md §2).
# shellcheck disable=SC2034 # used by the sourcing scripts
KERNEL_FLAVOUR=cloud-amd64
# Static Rust binaries for the images: glibc linked in (libc6-dev has libc.a), so they run in a
# busybox initramfs with no other libraries.
STATIC_TARGET=x86_64-unknown-linux-gnu

# static_bin PACKAGE BIN: builds BIN statically (release) and prints the path of a stripped
# copy under the cache. The copy keeps a fixed path, so build-initramfs.sh's cache key (which
# hashes source paths and contents) changes only when the binary does.
static_bin() {
    local pkg=$1 bin=$2
    # A target directory of its own: cargo locks its build directory, and these builds run from
    # inside `cargo test` as well as by hand.
    local target_dir=$root_dir/target/static
    RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=$target_dir \
        cargo build --release --locked --quiet -p "$pkg" --bin "$bin" --target "$STATIC_TARGET" \
        --manifest-path "$root_dir/Cargo.toml" >&2 ||
        { echo "images: static build of $bin failed" >&2; return 1; }
    local built=$target_dir/$STATIC_TARGET/release/$bin
    file_is_static "$built" || { echo "images: $built is not statically linked" >&2; return 1; }
    mkdir -p "$cache/stage"
    local staged=$cache/stage/$bin
    strip -o "$staged.tmp" "$built" && mv "$staged.tmp" "$staged"
    echo "$staged"
}

# file_is_static PATH: true when the ELF has no program interpreter (no PT_INTERP).
file_is_static() {
    ! readelf -l "$1" 2>/dev/null | grep -q 'Requesting program interpreter'
}

# with_libs PATH...: prints "SRC:DST" --file arguments for each dynamic binary and every library
# ldd lists for it (the dynamic loader included), each copied to the same path in the image.
with_libs() {
    local bin lib
    for bin in "$@"; do
        echo "$bin:$bin"
        for lib in $(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
            echo "$lib:$lib"
        done
    done | sort -u
}

# use_image DIR: marks a cached image directory as just used (its mtime) and removes all but the
# IMAGES_KEPT most recently used images, so the cache does not grow with every rebuild (each
# L1 image is about 80 MB).
IMAGES_KEPT=8
use_image() {
    touch "$1"
    # shellcheck disable=SC2010,SC2012 # our own directory names: no odd characters
    ls -1dt "$cache"/linux-image-*/ 2>/dev/null | grep -v "\.tmp/$" | tail -n +$((IMAGES_KEPT + 1)) | while read -r old; do
        rm -rf "$old"
    done
}
