/* bench_pio: the port-I/O exit loop of the benchmark suite (bench/, `make bench`).
 * Real mode, loaded at 0x7c00. Header at fixed offsets, patched by the harness:
 *   +4 iterations (u32, >= 1)    +8 port (u16)
 * Does `iterations` one-byte OUTs to `port` (one exit each), then writes 0 to the debug-exit port
 * 0xf4 (hvm and bench/cref end there: status 1). Two instructions per iteration, because guest
 * CPL0 code is emulated instruction by instruction on the kvm_pvm host. */
#include "header.inc"
        .code16
        PATCHED_HEADER
port:           .word 0x80
        .p2align 2
start:
        cli
        mov iterations, %ecx    /* DS = 0 and the image is linked at its load address */
        mov port, %dx
        xor %al, %al
        jecxz done
1:      out %al, (%dx)
        addr32 loop 1b
done:   xor %al, %al
        out %al, $0xf4
        cli
2:      hlt
        jmp 2b
