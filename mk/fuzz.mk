# Fuzzing (docs/fuzzing.md): included from the top-level Makefile.
#   make fuzz    the guest-side fuzzer (firmware/fuzz.S) for many seeds and minutes, and every
#                `fuzz`-marked test with the long Hypothesis profile (HVM_FUZZ=long)
.PHONY: fuzz

# The fuzzing guest is a multiboot ELF32 like mbtest: its seed and iteration count come from --append.
$(FWB)/fuzz.elf: $(FW)/fuzz.S $(FW)/uart.inc $(FW)/print32.inc | $(FWB)
	$(CC) -c -x assembler-with-cpp -m32 -I$(FW) -o $(FWB)/fuzz.o $<
	ld -m elf_i386 -Ttext=0x200000 -e _start -o $@ $(FWB)/fuzz.o

firmware: $(FWB)/fuzz.elf

fuzz: install firmware
	HVM_FUZZ=long $(PYTHON) -m pytest -q -m fuzz
