# Host side of the virtio-net Linux tests: dnsmasq (DHCP server) from Debian's dnsmasq-base, unpacked
# into build/net/ with the libraries it links that a minimal host may lack (`make net`, included by the
# top-level Makefile; `make test` depends on it). Nothing is installed on the host: build/net/dnsmasq
# runs the unpacked binary with LD_LIBRARY_PATH pointing at the unpacked libraries.

NET := build/net
NET_DEBS := $(NET)/debs
# dnsmasq-base and the libraries of its Depends: that Debian's base system does not have (checked with ldd).
NET_PKGS := dnsmasq-base libnetfilter-conntrack3 libnftables1 libnfnetlink0 libnftnl11
NET_NAMES := $(addprefix $(NET_DEBS)/,$(addsuffix .name,$(NET_PKGS)))

.PHONY: net
net: $(NET)/dnsmasq

$(NET_NAMES): $(NET_DEBS)/%.name:
	mkdir -p $(NET_DEBS)
	guest/linux/fetch-deb.sh $* $(NET_DEBS) $@

$(NET)/dnsmasq: $(NET_NAMES)
	rm -rf $(NET)/root
	for n in $(NET_NAMES); do dpkg-deb -x $(NET_DEBS)/$$(cat $$n) $(NET)/root || exit 1; done
	printf '%s\n' '#!/bin/sh' \
		'# dnsmasq from build/net/root (Debian dnsmasq-base, unpacked by mk/net.mk)' \
		'root=$$(cd "$$(dirname "$$0")" && pwd)/root' \
		'LD_LIBRARY_PATH=$$root/usr/lib/x86_64-linux-gnu exec "$$root/usr/sbin/dnsmasq" "$$@"' >$@.tmp
	chmod +x $@.tmp
	$@.tmp --version >/dev/null
	mv $@.tmp $@
