/* bench_hlt: the HLT exit loop of the benchmark suite (bench/, `make bench`).
 * Real mode, loaded at 0x7c00, run without an in-kernel irqchip so that every HLT exits to the VMM,
 * which enters the guest again right after it. Header at +4: iterations (u32, >= 1), patched by the
 * harness. Ends with a write of 0 to the debug-exit port 0xf4. */
#include "header.inc"
        .code16
        PATCHED_HEADER
        .p2align 2
start:
        cli
        mov iterations, %ecx
        jecxz done
1:      hlt
        addr32 loop 1b
done:   xor %al, %al
        out %al, $0xf4
        cli
2:      hlt
        jmp 2b
