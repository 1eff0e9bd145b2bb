/* hello64: a flat 64-bit program for `boot: {mode: long}`; hvm sets up GDT, page tables, PAE, EFER, PG.
 * Prints one line if EFER.LMA is set, then halts. */
#include "uart.inc"
        .code64
        .globl _start
_start:
        mov $0xc0000080, %ecx
        rdmsr
        test $0x400, %eax       /* EFER.LMA */
        jz 1f
        UART_INIT
        lea msg(%rip), %rsi
        call puts
1:      cli
        hlt
puts:
        UART_PUTS_BODY
msg:    .asciz "long mode, set up by hvm: hello\n"
