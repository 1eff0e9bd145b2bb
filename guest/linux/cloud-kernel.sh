#!/bin/sh
# cloud-kernel.sh OUTDIR DEBDIR
# Resolves the versioned package behind Debian's meta-package
# linux-image-cloud-amd64, downloads it (fetch-deb.sh), extracts it and writes
# OUTDIR/vmlinuz-cloud (its /boot/vmlinuz-*, a bzImage) and
# OUTDIR/vmlinuz-cloud.version (key=value lines).
set -eu
out=$1 debs=$2
here=$(dirname "$0")
meta=linux-image-cloud-amd64
resolve() {
	apt-cache depends "$meta" 2>/dev/null |
		awk '$1 ~ /^\|?Depends:$/ && $2 ~ /^linux-image-/ { print $2; exit }'
}
pkg=$(resolve || true)
if [ -z "$pkg" ]; then
	apt-get update -qq
	pkg=$(resolve || true)
fi
[ -n "$pkg" ] || { echo "cloud-kernel.sh: cannot resolve what $meta depends on" >&2; exit 1; }
echo "cloud-kernel.sh: $meta -> $pkg"
"$here/fetch-deb.sh" "$pkg" "$debs" "$debs/cloud-kernel.name"
deb=$debs/$(cat "$debs/cloud-kernel.name")
x=$out/pkg-cloud-kernel
rm -rf "$x"
dpkg-deb -x "$deb" "$x"
set -- "$x"/boot/vmlinuz-*
[ $# -eq 1 ] && [ -s "$1" ] || { echo "cloud-kernel.sh: no single /boot/vmlinuz-* in $deb" >&2; exit 1; }
release=${1##*/vmlinuz-}
{
	echo "package=$pkg"
	echo "version=$(dpkg-deb -f "$deb" Version)"
	echo "release=$release"
	echo "meta=$meta $(apt-cache policy "$meta" 2>/dev/null | awk '/Candidate:/ { print $2; exit }')"
	echo "deb=$(basename "$deb")"
} >"$out/vmlinuz-cloud.version.tmp"
cp "$1" "$out/vmlinuz-cloud.tmp"
rm -rf "$x"
mv "$out/vmlinuz-cloud.version.tmp" "$out/vmlinuz-cloud.version"
mv "$out/vmlinuz-cloud.tmp" "$out/vmlinuz-cloud"
