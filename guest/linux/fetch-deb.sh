#!/bin/sh
# fetch-deb.sh PACKAGE DEBDIR NAMEFILE
# Downloads the candidate version of a Debian binary package into DEBDIR with
# `apt-get download` (once: an existing file is reused) and writes the .deb's
# file name into NAMEFILE, so later recipes find it without guessing versions.
set -eu
pkg=$1 dir=$2 out=$3
mkdir -p "$dir"
cd "$dir"
resolve() { apt-get download --print-uris "$pkg" 2>/dev/null | awk 'NR == 1 { print $2 }'; }
name=$(resolve || true)
if [ -z "$name" ]; then
	# No (or stale) package lists yet: refresh them once and retry.
	apt-get update -qq
	name=$(resolve || true)
fi
if [ -z "$name" ]; then
	echo "fetch-deb.sh: cannot resolve Debian package '$pkg'" >&2
	exit 1
fi
if [ ! -s "$name" ]; then
	echo "fetch-deb.sh: apt-get download $pkg -> $dir/$name"
	# apt warns that root downloads unsandboxed; that is expected here.
	apt-get download -q "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true
fi
dpkg-deb --info "$name" >/dev/null
cd - >/dev/null
printf '%s\n' "$name" >"$out"
