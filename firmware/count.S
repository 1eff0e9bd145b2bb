/* count: prints 0, 1, 2, ... one decimal number per line, with a delay loop between lines: a guest whose
 * output shows at once whether anything was lost or repeated (snapshot/restore tests). Real mode at 0x7c00.
 * The count runs forever, or, when EDI is non-zero at entry (YAML boot.regs: {rdi: N}), up to N-1: then it
 * prints "done" and writes 0x15 to the debug-exit port (hvm status 43). The counter lives in EBP. */
#include "uart.inc"
        .code16
        .globl _start
        .set DELAY, 8000
_start:
        REAL_MODE_START
        xor %ebp, %ebp
1:      mov %ebp, %eax          /* digits written backwards into buf, then printed by puts */
        mov $buf_end, %si
        dec %si
        movb $0, (%si)
        dec %si
        movb $'\n', (%si)
        mov $10, %ecx
2:      xor %edx, %edx
        div %ecx
        add $'0', %dl
        dec %si
        mov %dl, (%si)
        test %eax, %eax
        jnz 2b
        call puts
        inc %ebp
        test %edi, %edi
        jz 3f
        cmp %edi, %ebp
        jae 4f
3:      mov $DELAY, %ecx
5:      dec %ecx
        jnz 5b
        jmp 1b
4:      mov $done, %si
        call puts
        mov $DEBUG_EXIT, %dx
        mov $0x15, %eax
        out %eax, %dx
        cli
        hlt
puts:
        UART_PUTS_BODY
done:   .asciz "done\n"
buf:    .space 16
buf_end:
