# Guest assets for booting Linux under hvm: `make linux`, included by the
# top-level Makefile. Everything comes from Debian packages (apt-get download +
# dpkg-deb -x) and lands in build/linux/; see guest/linux/README.md.
# Every output is a file target, so a second `make linux` does nothing.

ifeq ($(filter grouped-target,$(.FEATURES)),)
$(error mk/linux.mk needs GNU make >= 4.3 (grouped targets))
endif

LX := build/linux
LX_DEBS := $(LX)/debs
LX_G := guest/linux
LX_JOBS ?= 2
LX_PYTHON := $(or $(HOST_PYTHON),python3)
# Host tools the kernel build needs, apt-get installed when missing.
LX_HOST_PKGS := gcc make binutils flex bison bc libelf-dev xz-utils lz4 python3 e2fsprogs

LX_SRC_PKG := linux-source-6.12
LX_SRC := $(LX)/src/$(LX_SRC_PKG)
LX_KOBJ := $(LX)/kbuild-minimal
LX_KMAKE := $(MAKE) -C $(LX_SRC) O=$(abspath $(LX_KOBJ)) ARCH=x86_64 \
	KBUILD_BUILD_USER=hvm KBUILD_BUILD_HOST=hvm

LINUX_OUTPUTS := $(LX)/vmlinux-minimal $(LX)/bzImage-minimal \
	$(LX)/vmlinuz-cloud $(LX)/vmlinuz-cloud.version \
	$(LX)/initramfs.cpio $(LX)/initramfs-ud2.cpio \
	$(LX)/rootfs.ext4 $(LX)/rootfs-ud2.ext4

.PHONY: linux
linux: $(LINUX_OUTPUTS)

$(LX) $(LX_DEBS):
	mkdir -p $@

# Rechecked when this file changes (a package added to the list); order-only for the kernel's .config,
# so the kernel is not rebuilt for it.
$(LX)/.host-tools: mk/linux.mk | $(LX)
	@missing=; for p in $(LX_HOST_PKGS); do \
		dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "apt-get install -y$$missing"; \
		apt-get install -y $$missing || { apt-get update -qq && apt-get install -y $$missing; }; \
	fi
	touch $@

# Download a package once; NAME.name holds the .deb's file name.
LX_NAMES := $(LX_DEBS)/$(LX_SRC_PKG).name $(LX_DEBS)/busybox-static.name
$(LX_NAMES): $(LX_DEBS)/%.name: | $(LX_DEBS)
	$(LX_G)/fetch-deb.sh $* $(LX_DEBS) $@

# --- 1. minimal kernel from linux-source-6.12 ---------------------------------
$(LX)/src/.extracted: $(LX_DEBS)/$(LX_SRC_PKG).name
	rm -rf $(LX)/src $(LX)/pkg-linux-source
	dpkg-deb -x $(LX_DEBS)/$$(cat $<) $(LX)/pkg-linux-source
	mkdir -p $(LX)/src
	tar -C $(LX)/src -xf $(LX)/pkg-linux-source/usr/src/$(LX_SRC_PKG).tar.xz
	test -f $(LX_SRC)/Makefile
	rm -rf $(LX)/pkg-linux-source
	touch $@

# tinyconfig, then the fragment merged with allnoconfig semantics (-n), so that
# nothing beyond tinyconfig and the fragment is switched on; then the check.
$(LX_KOBJ)/.config: $(LX)/src/.extracted $(LX_G)/minimal.config $(LX_G)/check-config.sh | $(LX)/.host-tools
	mkdir -p $(LX_KOBJ)
	$(LX_KMAKE) -s tinyconfig
	cd $(LX_SRC) && ARCH=x86_64 scripts/kconfig/merge_config.sh -n \
		-O $(abspath $(LX_KOBJ)) $(abspath $(LX_KOBJ))/.config \
		$(abspath $(LX_G)/minimal.config) >$(abspath $(LX_KOBJ))/merge_config.log
	$(LX_G)/check-config.sh $(LX_G)/minimal.config $@ || { mv $@ $@.rejected; exit 1; }

$(LX)/vmlinux-minimal $(LX)/bzImage-minimal &: $(LX_KOBJ)/.config
	$(LX_KMAKE) -j$(LX_JOBS) vmlinux bzImage
	$(LX_G)/check-config.sh $(LX_G)/minimal.config $(LX_KOBJ)/.config
	cp $(LX_KOBJ)/vmlinux $(LX)/vmlinux-minimal
	cp $(LX_KOBJ)/arch/x86/boot/bzImage $(LX)/bzImage-minimal

# --- 2. stock Debian cloud kernel ---------------------------------------------
$(LX)/vmlinuz-cloud $(LX)/vmlinuz-cloud.version &: | $(LX_DEBS)
	$(LX_G)/cloud-kernel.sh $(LX) $(LX_DEBS)

# --- 3. busybox initramfs ---------------------------------------------------------
$(LX)/busybox/bin/busybox: $(LX_DEBS)/busybox-static.name
	rm -rf $(LX)/busybox
	dpkg-deb -x $(LX_DEBS)/$$(cat $<) $(LX)/busybox
	touch $@

$(LX)/initramfs.list: $(LX_G)/initramfs-base.list $(LX_G)/busybox-list.sh $(LX_G)/init.sh $(LX)/busybox/bin/busybox
	{ cat $(LX_G)/initramfs-base.list; \
	  $(LX_G)/busybox-list.sh $(LX)/busybox/bin/busybox $(LX_G)/init.sh; } >$@.tmp
	mv $@.tmp $@

# --- 4. ud2 initramfs -------------------------------------------------------------
$(LX)/ud2init: $(LX_G)/ud2init.S | $(LX)
	as --64 -o $(LX)/ud2init.o $<
	ld -static -nostdlib -m elf_x86_64 -e _start -o $@ $(LX)/ud2init.o

$(LX)/initramfs-ud2.list: $(LX_G)/initramfs-base.list $(LX)/ud2init
	{ cat $(LX_G)/initramfs-base.list; echo "file /init $(LX)/ud2init 0755 0 0"; } >$@.tmp
	mv $@.tmp $@

$(LX)/initramfs.cpio $(LX)/initramfs-ud2.cpio: $(LX)/%.cpio: $(LX)/%.list $(LX_G)/mkcpio.py
	$(LX_PYTHON) $(LX_G)/mkcpio.py -o $@ $<

# --- 5. ext4 root-disk images (virtio-blk: root=/dev/vda rw init=/init) -------------
# The same trees as the two initramfs images (from their lists; device nodes left to devtmpfs),
# written into a 32 MiB image by mke2fs -d: no loop mount, no root. Owners are the builder's;
# root_owner makes / root-owned. E2FSPROGS_FAKE_TIME pins the superblock times.
define LX_MKROOTFS
	rm -rf $@.d $@.tmp
	$(LX_PYTHON) $(LX_G)/mkrootdir.py $@.d $<
	E2FSPROGS_FAKE_TIME=$${SOURCE_DATE_EPOCH:-0} mke2fs -q -t ext4 -L hvm-root -E root_owner=0:0 \
		-d $@.d -F $@.tmp 32M
	rm -rf $@.d
	mv $@.tmp $@
endef

$(LX)/rootfs.ext4: $(LX)/initramfs.list $(LX_G)/mkrootdir.py | $(LX)/.host-tools
	$(LX_MKROOTFS)

$(LX)/rootfs-ud2.ext4: $(LX)/initramfs-ud2.list $(LX_G)/mkrootdir.py | $(LX)/.host-tools
	$(LX_MKROOTFS)
