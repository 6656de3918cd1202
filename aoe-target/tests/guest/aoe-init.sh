#!/bin/sh
# /init of the Linux AoE interop guest (aoe-target/tests/linux_interop.rs): Debian's aoe.ko
# against aoe-target e7.1 on eth0. Prints "AOE-CHECK <name> PASS|FAIL" lines the test parses,
# "AOE-PHASE restart-begin" when the host should kill -9 and restart the target, and
# "AOE-DONE" at the end.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in $(cat /etc/modules.order); do
    insmod "/lib/modules/$m" || echo "AOE-LOG insmod $m failed"
done
# The MTU of the tap on the host side, from the kernel command line (aoe_mtu=N).
MTU=1500
for w in $(cat /proc/cmdline); do
    case $w in aoe_mtu=*) MTU=${w#aoe_mtu=} ;; esac
done
ip link set eth0 mtu "$MTU" up || echo "AOE-LOG cannot set MTU $MTU"

say() { echo "AOE-$*"; }
check() {
    name=$1
    shift
    if "$@"; then say "CHECK $name PASS"; else say "CHECK $name FAIL"; fi
}

D=/dev/etherd/e7.1
i=0
while [ ! -b $D ] && [ $i -lt 150 ]; do
    [ $((i % 10)) -eq 0 ] && echo eth0 >/dev/etherd/discover 2>/dev/null
    sleep 0.2
    i=$((i + 1))
done
check discovery test -b $D
SIZE=$(cat "/sys/block/etherd!e7.1/size" 2>/dev/null)
say "SIZE $SIZE"
say "PAYLOAD $(cat "/sys/block/etherd!e7.1/payload" 2>/dev/null)"

# Write one block of random data with O_DIRECT at block index $3, read it back, compare.
rw() {
    f=$1 bs=$2 at=$3
    dd if=/dev/urandom of=/tmp/$f bs=$bs count=1 2>/dev/null &&
        dd if=/tmp/$f of=$D bs=$bs count=1 seek=$at oflag=direct 2>/dev/null &&
        dd if=$D of=/tmp/$f.back bs=$bs count=1 skip=$at iflag=direct 2>/dev/null &&
        cmp /tmp/$f /tmp/$f.back
}
check write-1k rw w1k 1024 3
check write-3k rw w3k 3072 5
check write-17-sectors rw w17 8704 7
check write-1m rw w1m 1048576 2
check last-sector rw wlast 512 $((SIZE - 1))

past_end() {
    out=$(dd if=$D of=/tmp/past bs=512 skip=$SIZE count=1 iflag=direct 2>&1) || return 1
    echo "$out" | grep -q "^0+0 records in" || return 1
    out=$(dd if=$D of=/tmp/past bs=512 skip=$((SIZE - 1)) count=2 iflag=direct 2>&1) || return 1
    echo "$out" | grep -q "^1+0 records in"
}
check read-past-end past_end

thin_zeros() {
    dd if=/dev/zero of=/tmp/zero bs=1048576 count=1 2>/dev/null &&
        dd if=$D of=/tmp/thin bs=1048576 count=1 skip=48 iflag=direct 2>/dev/null &&
        cmp /tmp/zero /tmp/thin
}
check thin-zeros thin_zeros

# The host kills the target with SIGKILL and restarts it while this write is in flight.
dd if=/dev/urandom of=/tmp/big bs=1048576 count=24 2>/dev/null
say "PHASE restart-begin"
check restart-inflight-write dd if=/tmp/big of=$D bs=1048576 count=24 seek=20 oflag=direct
restart_readback() {
    dd if=$D of=/tmp/big.back bs=1048576 count=24 skip=20 iflag=direct 2>/dev/null &&
        cmp /tmp/big /tmp/big.back
}
check restart-readback restart_readback
earlier() {
    for f in "w1k 1024 3" "w3k 3072 5" "w17 8704 7" "w1m 1048576 2"; do
        set -- $f
        dd if=$D of=/tmp/$1.again bs=$2 count=1 skip=$3 iflag=direct 2>/dev/null &&
            cmp /tmp/$1 /tmp/$1.again || return 1
    done
}
check restart-earlier-intact earlier
say "DONE"
poweroff -f
