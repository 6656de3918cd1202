#!/bin/sh
# /init of the L1 "host" (ci/images/l1-host.sh), booted by ci/nested/run.sh in QEMU TCG with an
# SVM CPU: loads kvm_amd (a nested /dev/kvm), runs the test script built into the image
# (/test.sh) and reports its exit status as "L1-TEST-EXIT <status>", then powers off.
# The script finds what it needs in the environment: VMM, L2_KERNEL, L2_STREAM, L2_PANIC and,
# in images built with --with-qemu, QEMU.
export PATH=/bin:/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev # /dev/kvm appears here once kvm is loaded
mount -t tmpfs tmp /tmp
echo "L1-MARKER-BOOTED uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r) nproc=$(nproc)"
while read -r m; do
    insmod "/lib/modules/$m" || echo "L1-INSMOD-FAILED $m"
done </etc/modules.order
nested=$(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null)
if [ -c /dev/kvm ]; then kvm=present; else kvm=missing; fi
echo "L1-KVM $kvm nested=${nested:-none} uptime=$(cut -d' ' -f1 /proc/uptime)"
export VMM=/usr/bin/vmm L2_KERNEL=/l2/vmlinuz L2_STREAM=/l2/stream.cpio L2_PANIC=/l2/panic.cpio
[ -x /usr/bin/qemu-system-x86_64 ] && export QEMU=/usr/bin/qemu-system-x86_64
echo "L1-TEST-BEGIN"
sh /test.sh
rc=$?
# The kernel's errors during the run (the console shows only critical ones), for diagnosis.
dmesg -r | grep '^<[0-3]>' | tail -n 40 | sed 's/^/L1-DMESG /'
echo "L1-TEST-EXIT $rc uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
