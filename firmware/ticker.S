/* ticker: prints "tick" lines forever with a delay loop between them: a guest that never ends
 * by itself, for the watchdog, pause/resume and stop. Real mode at 0x7c00. Always run it bounded. */
#include "uart.inc"
        .code16
        .globl _start
_start:
        REAL_MODE_START
1:      mov $msg, %si
        call puts
        mov $20000, %ecx
2:      dec %ecx
        jnz 2b
        jmp 1b
puts:
        UART_PUTS_BODY
msg:    .asciz "tick\n"
