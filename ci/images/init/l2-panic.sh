#!/bin/sh
# /init of the panic variant of the L2 guest (ci/images/linux-guest.sh --variant panic): boots,
# says so, and crashes the kernel through sysrq, so the VMM's handling of a guest panic is tested.
export PATH=/bin:/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
echo "L2-MARKER-BOOTED uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r) nproc=$(nproc)"
echo "L2-PANIC-NOW"
# Let the interrupt-driven console drain first: the panic's own messages go out by polling and
# would otherwise cut into these lines.
sleep 1
echo c >/proc/sysrq-trigger
# Not reached when the kernel panics.
sleep 2
echo "L2-PANIC-FAILED"
poweroff -f
