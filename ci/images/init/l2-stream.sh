#!/bin/sh
# /init of the L2 Linux guest (ci/images/linux-guest.sh --variant stream): shows the vNUMA shape
# the guest sees, runs our STREAM program on every CPU, then powers off. Every line the checks
# read starts with "L2-" (searched within the line: firmware may print escapes before it).
#
# Kernel parameters with '=' that the kernel does not know reach /init as environment variables:
# stream_passes=N and stream_size=SIZE are handed to guest-stream (--passes, --array-size);
# hold=SECS keeps the guest up that long after STREAM (so the host can look at the VMM's threads
# and memory while it still runs).
export PATH=/bin:/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "L2-MARKER-BOOTED uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r) nproc=$(nproc)"
echo "L2-HYPERVISOR $(dmesg | grep -o 'Hypervisor detected: .*' | head -1)"
# The PC's CMOS clock as the guest found it (rtc-cmos) and the guest's own clock, in seconds.
echo "L2-RTC name=$(cat /sys/class/rtc/rtc0/name 2>/dev/null || echo none) since_epoch=$(cat /sys/class/rtc/rtc0/since_epoch 2>/dev/null || echo none) date=$(date +%s)"
echo "L2-NUMACTL-BEGIN"
numactl -H
echo "L2-NUMACTL-END rc=$?"
for n in /sys/devices/system/node/node[0-9]*; do
    [ -d "$n" ] || continue
    kb=$(awk '/MemTotal/ {print $4}' "$n/meminfo")
    echo "L2-SYSFS-NODE ${n##*/node} cpulist=$(cat "$n/cpulist") distance=$(tr ' ' ',' <"$n/distance") memtotal_kb=$kb"
done
# RAM per node as the kernel took it from e820 and SRAT ("Early memory node ranges").
dmesg | sed -n 's/.* node  *\([0-9][0-9]*\): \[mem \(0x[0-9a-f]*\)-\(0x[0-9a-f]*\)\].*/L2-MEMRANGE \1 \2 \3/p'
echo "L2-STREAM-BEGIN"
guest-stream ${stream_passes:+--passes "$stream_passes"} ${stream_size:+--array-size "$stream_size"}
echo "L2-STREAM-END rc=$?"
if [ -n "${hold:-}" ]; then
    echo "L2-HOLD $hold"
    sleep "$hold"
fi
echo "L2-POWEROFF"
poweroff -f
