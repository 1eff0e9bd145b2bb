# The benchmark suite (bench/, docs/performance.md): included from the top-level Makefile.
#   make bench           every benchmark, a few minutes: one markdown table, raw figures in bench/results/
#   make bench QUICK=1   tiny iteration counts, well under a minute (what tests/test_bench.py runs)
#   make bench-tcg       only the tcg-vs-kvm rows (bench/tcg.py): the same guests under both accelerators
BENCH_FW16 := bench_pio bench_pin bench_hlt
BENCH_FW32 := bench_mmio
BENCH_FW64 := bench_cpl
BENCH_BINS := $(addprefix $(FWB)/,$(addsuffix .bin,$(BENCH_FW16) $(BENCH_FW32) $(BENCH_FW64)))
BENCH_BUILD := bench/build
CREF := $(BENCH_BUILD)/cref

.PHONY: bench bench-build bench-qemu bench-hotpath bench-tcg

# Guest loops: flat binaries like the other firmware (real mode at 0x7c00, protected mode at 1 MiB).
$(addprefix $(FWB)/,$(addsuffix .elf,$(BENCH_FW16))): $(FWB)/%.elf: $(FW)/%.S $(FW)/header.inc | $(FWB)
	$(CC) -c -x assembler-with-cpp -m32 -I$(FW) -o $(FWB)/$*.o $<
	ld -m elf_i386 -Ttext=0x7c00 -e _start -o $@ $(FWB)/$*.o
$(addprefix $(FWB)/,$(addsuffix .elf,$(BENCH_FW32))): $(FWB)/%.elf: $(FW)/%.S $(FW)/header.inc | $(FWB)
	$(CC) -c -x assembler-with-cpp -m32 -I$(FW) -o $(FWB)/$*.o $<
	ld -m elf_i386 -Ttext=0x100000 -e _start -o $@ $(FWB)/$*.o
# The compute loop of the kvm-vs-tcg rows (bench/tcg.py): 64-bit, at 1 MiB, CPL0 or CPL3.
$(addprefix $(FWB)/,$(addsuffix .elf,$(BENCH_FW64))): $(FWB)/%.elf: $(FW)/%.S $(FW)/header.inc | $(FWB)
	$(CC) -c -x assembler-with-cpp -m64 -I$(FW) -o $(FWB)/$*.o $<
	ld -m elf_x86_64 -Ttext=0x100000 -e _start -o $@ $(FWB)/$*.o

# They are firmware like the rest: tests/test_fastloop.py runs them too.
firmware: $(BENCH_BINS)

# The C reference VMM.
$(BENCH_BUILD):
	mkdir -p $@
$(CREF): bench/cref.c | $(BENCH_BUILD)
	$(CC) -O2 -Wall -Wextra -o $@ $<

# QEMU is the reference for start-up, memory and kvm-unit-tests (Debian's package).
bench-qemu:
	@command -v qemu-system-x86_64 >/dev/null 2>&1 || apt-get install -y qemu-system-x86 \
		|| (apt-get update && apt-get install -y qemu-system-x86)

# What the suite runs (tests/test_bench.py builds this much; `bench` also installs hvm and QEMU).
bench-build: firmware $(CREF)

bench: install bench-build bench-qemu
	$(PYTHON) -m bench $(if $(QUICK),--quick)

# Binary translation beside hardware assist: the same guests under accel tcg and kvm (docs/performance.md).
bench-tcg: install bench-build
	$(PYTHON) -m bench --only tcg $(if $(QUICK),--quick)

# Where an exit's time goes: hvm's run loop beside C and stripped-down Python loops (docs/performance.md).
bench-hotpath: install bench-build
	$(PYTHON) -m bench.hotpath
