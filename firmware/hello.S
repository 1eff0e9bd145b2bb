/* hello: the smallest useful guest. Real mode, loaded at 0x7c00 like a boot sector.
 * Prints one line through the UART and halts with interrupts off, which ends the VM with status 0.
 * Exits taken: 5 (UART init) + 2 per byte (LSR poll + THR write) + 1 HLT. */
#include "uart.inc"
        .code16
        .globl _start
_start:
        REAL_MODE_START
        mov $msg, %si
        call puts
        cli
        hlt
        jmp _start              /* not reached: no interrupt can wake a cli;hlt */
puts:
        UART_PUTS_BODY
msg:    .asciz "Hello from real mode!\n"
