/* echo: reads bytes from COM1 (polling LSR.DR) and writes them back upper-cased, until it reads 'q';
 * then prints "bye" and halts (status 0). Exercises the UART receive path: stdin, a pipe or a file. */
#include "uart.inc"
        .code16
        .globl _start
_start:
        REAL_MODE_START
1:      mov $COM1_LSR, %dx
2:      in %dx, %al
        test $1, %al            /* LSR.DR: a byte is waiting */
        jz 2b
        mov $COM1, %dx
        in %dx, %al
        cmp $'q', %al
        je 4f
        cmp $'a', %al
        jb 3f
        cmp $'z', %al
        ja 3f
        sub $0x20, %al
3:      out %al, %dx            /* LSR.THRE is always set again by the time we get here */
        jmp 1b
4:      mov $msg, %si
        call puts
        cli
        hlt
puts:
        UART_PUTS_BODY
msg:    .asciz "bye\n"
