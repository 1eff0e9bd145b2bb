/* bench_pin: the port-I/O IN loop of the benchmark suite (bench/exits.py's exit.pio_lsr, bench/hotpath.py).
 * Real mode, loaded at 0x7c00. Header at fixed offsets, patched by the harness:
 *   +4 iterations (u32, >= 1)    +8 port (u16)
 * Does `iterations` one-byte INs from `port` (one exit each; 0x3fd, COM1's line status register, by default:
 * a read with side effects, so hvm answers it in Python), then writes the last byte read to the debug-exit
 * port 0xf4 (the harness checks it: 0x60, THR and transmitter empty, from hvm's UART and bench/cref alike).
 * Two instructions per iteration, as bench_pio: guest CPL0 code is emulated on the kvm_pvm host. */
#include "header.inc"
        .code16
        PATCHED_HEADER
port:           .word 0x3fd
        .p2align 2
start:
        cli
        mov iterations, %ecx    /* DS = 0 and the image is linked at its load address */
        mov port, %dx
        mov $0xff, %al
        jecxz done
1:      in (%dx), %al
        addr32 loop 1b
done:   out %al, $0xf4
        cli
2:      hlt
        jmp 2b
