# hvm — build guest firmware, run the default VM, run the tests.
# Everything Python runs in a project virtualenv (.venv, without system site-packages): Debian 12 and
# Ubuntu 24.04 refuse `pip install` into the system Python (PEP 668), and no target needs it activated.
HOST_PYTHON ?= python3
VENV := .venv
PYTHON := $(CURDIR)/$(VENV)/bin/python
STAMP := $(VENV)/.hvm-installed
FW := firmware
FWB := $(FW)/build
FLAT16 := hello ticker echo pvcon count rtc_irq s3 pubregs
FLAT32 := hello32 triple smp vcon vrng vblk pci vmcall msrgp
FLAT64 := hello64 probe testdev64 cpuid64
FW_BINS := $(addprefix $(FWB)/,$(addsuffix .bin,$(FLAT16) modes $(FLAT32) $(FLAT64))) $(FWB)/mbtest.elf

.PHONY: all firmware install run test test-fast bench clean docs-devices

all: firmware

firmware: $(FW_BINS)

$(FWB):
	mkdir -p $@

# Flat binaries: assembled as ELF, linked at their load address, stripped to raw bytes.
$(addprefix $(FWB)/,$(addsuffix .elf,$(FLAT16))): $(FWB)/%.elf: $(FW)/%.S $(FW)/uart.inc $(FW)/header.inc | $(FWB)
	$(CC) -c -x assembler-with-cpp -m32 -I$(FW) -o $(FWB)/$*.o $<
	ld -m elf_i386 -Ttext=0x7c00 -e _start -o $@ $(FWB)/$*.o
# modes switches to 64-bit code, so it is assembled as an x86-64 object (.code16/.code32 inside).
$(FWB)/modes.elf: $(FW)/modes.S $(FW)/uart.inc | $(FWB)
	$(CC) -c -x assembler-with-cpp -m64 -I$(FW) -o $(FWB)/modes.o $<
	ld -m elf_x86_64 -Ttext=0x7c00 -e _start -o $@ $(FWB)/modes.o
$(addprefix $(FWB)/,$(addsuffix .elf,$(FLAT32))): $(FWB)/%.elf: $(FW)/%.S $(FW)/uart.inc $(FW)/virtio.inc $(FW)/virtio_driver.inc | $(FWB)
	$(CC) -c -x assembler-with-cpp -m32 -I$(FW) -o $(FWB)/$*.o $<
	ld -m elf_i386 -Ttext=0x100000 -e _start -o $@ $(FWB)/$*.o
$(addprefix $(FWB)/,$(addsuffix .elf,$(FLAT64))): $(FWB)/%.elf: $(FW)/%.S $(FW)/uart.inc $(FW)/header.inc | $(FWB)
	$(CC) -c -x assembler-with-cpp -m64 -I$(FW) -o $(FWB)/$*.o $<
	ld -m elf_x86_64 -Ttext=0x100000 -e _start -o $@ $(FWB)/$*.o
$(FWB)/%.bin: $(FWB)/%.elf
	objcopy -O binary -j .text $< $@

# The multiboot kernel stays an ELF32, as QEMU's -kernel takes it.
$(FWB)/mbtest.elf: $(FW)/mbtest.S $(FW)/uart.inc $(FW)/print32.inc | $(FWB)
	$(CC) -c -x assembler-with-cpp -m32 -I$(FW) -o $(FWB)/mbtest.o $<
	ld -m elf_i386 -Ttext=0x200000 -e _start -o $@ $(FWB)/mbtest.o

# The virtualenv. A stock Debian/Ubuntu python3 has neither `venv` (ensurepip) nor the C headers the cffi
# modules compile against: they are apt-get installed when missing (python3-venv, python3-dev).
$(PYTHON):
	@$(HOST_PYTHON) mk/python-ready.py || { \
		pkgs="python3-venv python3-dev"; \
		echo "apt-get install -y $$pkgs (for the project virtualenv)"; \
		apt-get install -y $$pkgs || { apt-get update -qq && apt-get install -y $$pkgs; }; \
		$(HOST_PYTHON) mk/python-ready.py --explain; }
	$(HOST_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip

# Install hvm (editable, with its compiled cffi modules) and the test tools into .venv, once. Editable as a
# plain path in a .pth file (pyproject.toml's [tool.setuptools] package-dir says why): no import hook to load
# at every Python start.
$(STAMP): pyproject.toml setup.py hvm/kvm/_cdef.py hvm/kvm/_ioctl_table.py hvm/kvm/_build.py hvm/vcpu/_fastloop_build.py | $(PYTHON)
	$(PYTHON) -m pip install -q -e '.[test]'
	touch $@

# hvm's bytecode, refreshed whenever a source changes: with PYTHONDONTWRITEBYTECODE set (as here) Python
# never writes it, and every module whose .pyc is missing or stale is compiled again at every start.
BYTECODE := hvm/__pycache__/.compiled
$(BYTECODE): $(shell find hvm -name '*.py') | $(STAMP)
	$(PYTHON) -m compileall -q hvm
	touch $@

install: $(STAMP) $(BYTECODE)

# The main job: build everything and boot the default VM, its serial console on this terminal.
run: install firmware
	$(VENV)/bin/hvm run configs/hello.yaml

# Everything, slow tests included: they build their own Linux guests (`make linux`, from Debian packages)
# and compare with QEMU (Debian's qemu-system-x86, installed here when missing).
test: install firmware bench-qemu net
	$(PYTHON) -m pytest -q

test-fast: install firmware
	$(PYTHON) -m pytest -q -m "not slow"

# docs/config.md's device table, from the device registry (hvm/mmio/registry.py)
docs-devices: install
	$(PYTHON) -c "from hvm.mmio import registry; registry.update_doc('docs/config.md')"

clean:
	rm -rf $(VENV) $(FWB) build *.egg-info hvm/kvm/_kvm_cffi*.so hvm/kvm/_kvm_cffi.c hvm/vcpu/_fastloop_cffi*.so hvm/vcpu/_fastloop_cffi.c $(STAMP)
include mk/linux.mk
include mk/bench.mk
include mk/fuzz.mk
include mk/net.mk
