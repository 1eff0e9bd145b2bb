/* pvcon: the same line printed `iterations` times three ways, to measure what paravirtualization saves
 * (docs/paravirt.md, tests/test_pvconsole.py, the console rows of `make bench`).
 * Real mode, loaded at 0x7c00. Header at fixed offsets (the layout of the bench_* images):
 *   +4 iterations (u32)    +8 method (u16): 0 16550 UART, 1 debugcon (port 0xe9), 2 pvconsole (port 0xe00)
 * Exits: 5 (UART init) + per line: 2 per byte (UART: LSR poll, THR) | 1 per byte (debugcon) | 1 (pvconsole),
 * then the debug-exit write: status 1, or 3 if the pvconsole did not take a whole line. */
#include "header.inc"
#include "uart.inc"
        .set DEBUGCON, 0xe9
        .set PVCONSOLE, 0xe00
        .set LINE_LEN, line_end - line
        .code16
        PATCHED_HEADER
method:         .word 0
        .p2align 3
desc:   .long line, 0           /* le64 addr */
        .long LINE_LEN          /* le32 len */
used:   .long 0                 /* le32 used: the device's answer */
start:
        REAL_MODE_START
        mov iterations, %ecx
        jecxz done
next:   mov method, %ax
        cmp $1, %ax
        je by_debugcon
        ja by_pvconsole
        mov $line, %si
        call puts
        jmp again
by_debugcon:                    /* no status to poll: one OUT per byte */
        mov $line, %si
        mov $LINE_LEN, %di
        mov $DEBUGCON, %dx
1:      lodsb
        out %al, %dx
        dec %di
        jnz 1b
        jmp again
by_pvconsole:                   /* the whole line in one OUT: the descriptor's address */
        movl $0, used
        mov $desc, %eax
        mov $PVCONSOLE, %dx
        out %eax, %dx
        cmpl $LINE_LEN, used
        jne failed
again:  dec %ecx
        jnz next
done:   xor %al, %al
        out %al, $DEBUG_EXIT
        jmp halt
failed: mov $1, %al
        out %al, $DEBUG_EXIT
halt:   cli
        hlt
        jmp halt
puts:
        UART_PUTS_BODY
line:   .ascii "one line, printed three ways\n"
line_end:
        .byte 0
