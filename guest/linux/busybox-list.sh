#!/bin/sh
# busybox-list.sh BUSYBOX INIT
# Prints the mkcpio.py entries of the busybox initramfs (besides
# initramfs-base.list): the binary as /bin/busybox, INIT as /init, and one
# symlink to /bin/busybox per applet at the path busybox itself reports.
set -eu
bb=$1 init=$2
applets=$("$bb" --list-full)
for need in bin/sh bin/mount sbin/poweroff sbin/reboot bin/echo bin/cat bin/ls bin/uname; do
	printf '%s\n' "$applets" | grep -qx "$need" || {
		echo "busybox-list.sh: $bb has no applet $need" >&2; exit 1; }
done
echo "file /init $init 0755 0 0"
for d in bin sbin usr usr/bin usr/sbin root; do echo "dir /$d 0755 0 0"; done
echo "file /bin/busybox $bb 0755 0 0"
printf '%s\n' "$applets" | grep -vx 'bin/busybox' | sort -u |
	while read -r a; do echo "slink /$a /bin/busybox 0777 0 0"; done
