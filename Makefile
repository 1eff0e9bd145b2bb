# hvm — build guest firmware, run the default VM, run the tests.
PYTHON ?= python3
FW := firmware
FWB := $(FW)/build
FLAT16 := hello ticker echo pvcon
FLAT32 := hello32 triple
FLAT64 := hello64 probe
FW_BINS := $(addprefix $(FWB)/,$(addsuffix .bin,$(FLAT16) modes $(FLAT32) $(FLAT64))) $(FWB)/mbtest.elf
STAMP := .venv-installed

.PHONY: all firmware install run test test-fast bench clean

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
$(addprefix $(FWB)/,$(addsuffix .elf,$(FLAT32))): $(FWB)/%.elf: $(FW)/%.S $(FW)/uart.inc | $(FWB)
	$(CC) -c -x assembler-with-cpp -m32 -I$(FW) -o $(FWB)/$*.o $<
	ld -m elf_i386 -Ttext=0x100000 -e _start -o $@ $(FWB)/$*.o
$(addprefix $(FWB)/,$(addsuffix .elf,$(FLAT64))): $(FWB)/%.elf: $(FW)/%.S $(FW)/uart.inc | $(FWB)
	$(CC) -c -x assembler-with-cpp -m64 -I$(FW) -o $(FWB)/$*.o $<
	ld -m elf_x86_64 -Ttext=0x100000 -e _start -o $@ $(FWB)/$*.o
$(FWB)/%.bin: $(FWB)/%.elf
	objcopy -O binary -j .text $< $@

# The multiboot kernel stays an ELF32, as QEMU's -kernel takes it.
$(FWB)/mbtest.elf: $(FW)/mbtest.S $(FW)/uart.inc | $(FWB)
	$(CC) -c -x assembler-with-cpp -m32 -I$(FW) -o $(FWB)/mbtest.o $<
	ld -m elf_i386 -Ttext=0x200000 -e _start -o $@ $(FWB)/mbtest.o

# Install hvm (editable, with its compiled cffi modules) and the test tools, once.
$(STAMP): pyproject.toml setup.py hvm/kvm/_cdef.py hvm/kvm/_build.py hvm/vcpu/_fastloop_build.py
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
	hvm run configs/hello.yaml

# Everything, slow tests included: they build their own Linux guests (`make linux`, from Debian packages)
# and compare with QEMU (Debian's qemu-system-x86, installed here when missing).
test: install firmware bench-qemu
	$(PYTHON) -m pytest -q

test-fast: install firmware
	$(PYTHON) -m pytest -q -m "not slow"

clean:
	rm -rf $(FWB) build *.egg-info hvm/kvm/_kvm_cffi*.so hvm/kvm/_kvm_cffi.c hvm/vcpu/_fastloop_cffi*.so hvm/vcpu/_fastloop_cffi.c $(STAMP)
include mk/linux.mk
include mk/bench.mk
include mk/fuzz.mk
