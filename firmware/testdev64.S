/* testdev64: pc-testdev from a 64-bit guest (boot: {mode: long}; hvm identity-maps the first 4 GiB).
 * Writes and reads the iomem MMIO region at 0xff000000 with 1-, 2-, 4- and 8-byte accesses (aligned,
 * unaligned, narrow into wide, at the region's end, string moves), the scratch register's byte view at
 * port 0xe8, and the flush-page port 0xe4 on a RAM page (its contents must survive). Prints "testdev: ok"
 * or "testdev: FAIL <check number>", then exits through debug-exit with 0 (ok) or the check number. */
#include "uart.inc"
        .set IOMEM, 0xff000000
        .set IOMEM_END, 0xff010000

/* CHECK n: fail with check number n unless %rax == %rbx */
.macro CHECK n
        mov $\n, %ecx
        cmp %rbx, %rax
        jne fail
.endm

        .code64
        .globl _start
_start:
        LONG_MODE_START
        mov $IOMEM, %edi
        /* 1: an 8-byte write reads back as 8, 4, 2 and 1 bytes */
        movabs $0x1122334455667788, %rax
        mov %rax, (%rdi)
        mov (%rdi), %rax
        movabs $0x1122334455667788, %rbx
        CHECK 1
        mov 4(%rdi), %eax
        mov $0x11223344, %ebx
        CHECK 2
        movzwl 2(%rdi), %eax
        mov $0x5566, %ebx
        CHECK 3
        movzbl 1(%rdi), %eax
        mov $0x77, %ebx
        CHECK 4
        /* 5: a 1-byte and a 2-byte write into the 8-byte value */
        movb $0xaa, 3(%rdi)
        movw $0xbbcc, 6(%rdi)
        mov (%rdi), %rax
        movabs $0xbbcc3344aa667788, %rbx
        CHECK 5
        /* 6: unaligned 4- and 8-byte accesses */
        movl $0xcafef00d, 0x101(%rdi)
        mov 0x100(%rdi), %rax
        movabs $0x000000cafef00d00, %rbx
        CHECK 6
        movabs $0x0102030405060708, %rax
        mov %rax, 0x205(%rdi)
        mov 0x205(%rdi), %rax
        movabs $0x0102030405060708, %rbx
        CHECK 7
        /* 8: the last 8 bytes of the region */
        mov $IOMEM_END, %edx       /* (an absolute disp32 would sign-extend: use a base register) */
        movabs $0x8877665544332211, %rax
        mov %rax, -8(%rdx)
        mov -8(%rdx), %rax
        movabs $0x8877665544332211, %rbx
        CHECK 8
        movzwl -2(%rdx), %eax
        mov $0x8877, %ebx
        CHECK 9
        /* 10: a string move RAM -> iomem and a compare back */
        lea pattern(%rip), %rsi
        lea 0x400(%rdi), %rdi
        mov $16, %ecx
        cld
        rep movsb
        mov $IOMEM + 0x400, %esi
        lea pattern(%rip), %rdi
        mov $16, %ecx
        repe cmpsb
        setne %al
        movzbl %al, %eax
        xor %ebx, %ebx
        CHECK 10
        /* 11: the scratch register at 0xe0, byte by byte at 0xe8..0xeb */
        mov $0xdeadbeef, %eax
        out %eax, $0xe0
        in $0xe8, %al
        movzbl %al, %eax
        mov $0xef, %ebx
        CHECK 11
        in $0xeb, %al
        movzbl %al, %eax
        mov $0xde, %ebx
        CHECK 12
        mov $0x55, %al
        out %al, $0xea
        in $0xe0, %eax
        mov $0xde55beef, %ebx
        CHECK 13
        /* 14: flush a RAM page (the one holding `pattern`): it reads and writes as before */
        lea flushme(%rip), %rdx
        movq $0x5a5a, (%rdx)
        mov %edx, %eax
        out %eax, $0xe4
        mov (%rdx), %rax
        mov $0x5a5a, %ebx
        CHECK 14
        movq $0x6b6b, (%rdx)
        mov (%rdx), %rax
        mov $0x6b6b, %ebx
        CHECK 15
        lea msg_ok(%rip), %rsi
        call puts
        xor %eax, %eax
        mov $DEBUG_EXIT, %dx
        out %eax, %dx
        hlt
fail:   push %rcx
        lea msg_fail(%rip), %rsi
        call puts
        pop %rax
        push %rax
        lea hexdigits(%rip), %rbx  /* the check number as one hex digit */
        movzbl %al, %eax
        mov (%rbx,%rax), %al
        mov %al, digit(%rip)
        lea digit(%rip), %rsi
        call puts
        pop %rax
        mov $DEBUG_EXIT, %dx
        out %eax, %dx
        hlt
puts:
        UART_PUTS_BODY
pattern: .ascii "iomem is memory!"
msg_ok:  .asciz "testdev: ok\n"
msg_fail: .asciz "testdev: FAIL "
digit:   .asciz "?\n"
hexdigits: .ascii "0123456789abcdef"
        .p2align 12
flushme: .quad 0
        .p2align 4
        .skip 512
stack_top:
