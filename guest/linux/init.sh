#!/bin/sh
# /init of the hvm busybox initramfs (build/linux/initramfs.cpio).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# CONFIG_DEVTMPFS_MOUNT does not cover an initramfs root: mount it here
# (harmless "busy" error if something already did).
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "hvm-guest: init started"
echo "hvm-guest: $(uname -srm)"
# A shell on the console. cttyhack gives it a controlling tty (job control,
# ^C) and setsid a session of its own; without them, a plain shell.
if command -v setsid >/dev/null && command -v cttyhack >/dev/null; then
	exec setsid cttyhack sh
fi
exec sh
