#!/bin/sh
# check-config.sh FRAGMENT DOTCONFIG
# Fails, listing every offender, unless each "CONFIG_X=y" line of FRAGMENT is
# exactly "CONFIG_X=y" in DOTCONFIG and each "# CONFIG_X is not set" line is
# not enabled (=y or =m) there. Kconfig silently drops an option whose
# dependencies are missing; this catches that.
set -eu
frag=$1 conf=$2
missing= stray=
for sym in $(sed -n 's/^\(CONFIG_[A-Za-z0-9_]*\)=y$/\1/p' "$frag"); do
	grep -qx "$sym=y" "$conf" || missing="$missing $sym"
done
for sym in $(sed -n 's/^# \(CONFIG_[A-Za-z0-9_]*\) is not set$/\1/p' "$frag"); do
	if grep -q "^$sym=[ym]$" "$conf"; then stray="$stray $sym"; fi
done
if [ -n "$missing$stray" ]; then
	[ -z "$missing" ] || echo "check-config: requested =y but not =y in $conf:$missing" >&2
	[ -z "$stray" ] || echo "check-config: requested off but enabled in $conf:$stray" >&2
	echo "check-config: add the missing dependencies to $frag" >&2
	exit 1
fi
echo "check-config: all $(grep -c '^CONFIG_.*=y$' "$frag") =y and $(grep -c '^# CONFIG_.* is not set$' "$frag") off options of $frag hold in $conf"
