/* bench_mmio: the MMIO exit loop of the benchmark suite (bench/, `make bench`).
 * Flat 32-bit protected mode (`boot: {mode: protected, load: 0x100000}`; the VMM sets up the GDT,
 * flat segments and CR0.PE). Header at fixed offsets, patched by the harness:
 *   +4 iterations (u32, >= 1)    +8 address (u32; default 0xd0000000, in the PCI hole: no RAM, no device)
 * Does `iterations` 4-byte writes to `address` (one MMIO exit each), then writes 0 to the
 * debug-exit port 0xf4. */
#include "header.inc"
        .code32
        PATCHED_HEADER
address:        .long 0xd0000000
        .p2align 2
start:
        cli
        mov iterations, %ecx
        mov address, %edi
        xor %eax, %eax
        jecxz done
1:      mov %eax, (%edi)
        loop 1b
done:   xor %eax, %eax
        out %al, $0xf4
        cli
2:      hlt
        jmp 2b
