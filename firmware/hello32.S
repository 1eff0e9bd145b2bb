/* hello32: a flat 32-bit program for `boot: {mode: protected}`; hvm sets up the GDT and CR0.PE.
 * Prints one line, then halts. */
#include "uart.inc"
        .code32
        .globl _start
_start:
        mov %cr0, %eax
        test $1, %eax           /* CR0.PE must be set by the VMM */
        jz 1f
        UART_INIT
        mov $msg, %esi
        call puts
1:      cli
        hlt
puts:
        UART_PUTS_BODY
msg:    .asciz "protected mode, set up by hvm: hello\n"
