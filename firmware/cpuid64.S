/* cpuid64: prints the CPUID a guest sees (boot: {mode: long}), one line:
 * "cpuid: vendor=GenuineIntel 1.ecx=... 1.edx=... 7.ebx=... 7.ecx=... 80000001.ecx=... 80000001.edx=..."
 * (each register as 8 hex digits), then exits through debug-exit with 0. Tests compare it with the
 * -cpu/cpu: model they gave. */
#include "uart.inc"

/* PUT_LEAF leaf, first, msg1, second, msg2: CPUID leaf (sub-leaf 0), print msg1 and the 32-bit register first,
 * then msg2 and the 64-bit register second (pushed across the first call) */
.macro PUT_LEAF leaf, first, msg1, second, msg2
        mov $\leaf, %eax
        xor %ecx, %ecx
        cpuid
        push \second
        lea \msg1(%rip), %rsi
        mov \first, %eax
        call put_named
        pop %rax
        lea \msg2(%rip), %rsi
        call put_named
.endm

        .code64
        .globl _start
_start:
        LONG_MODE_START
        xor %eax, %eax
        cpuid
        mov %ebx, vendor(%rip)
        mov %edx, vendor+4(%rip)
        mov %ecx, vendor+8(%rip)
        lea msg_vendor(%rip), %rsi
        call puts
        PUT_LEAF 1, %ecx, msg_1ecx, %rdx, msg_1edx
        PUT_LEAF 7, %ebx, msg_7ebx, %rcx, msg_7ecx
        PUT_LEAF 0x80000001, %ecx, msg_8ecx, %rdx, msg_8edx
        lea msg_nl(%rip), %rsi
        call puts
        xor %eax, %eax
        mov $DEBUG_EXIT, %dx
        out %eax, %dx
        hlt

/* put_named: print the string at rsi, then eax as 8 hex digits */
put_named:
        push %rax
        call puts
        pop %rax
        lea hexbuf(%rip), %rdi
        mov $8, %ecx
1:      rol $4, %eax
        mov %eax, %edx
        and $0xf, %edx
        lea hexdigits(%rip), %rsi
        mov (%rsi,%rdx), %dl
        mov %dl, (%rdi)
        inc %rdi
        loop 1b
        lea hexbuf(%rip), %rsi
        call puts
        ret
puts:
        UART_PUTS_BODY
msg_vendor: .ascii "cpuid: vendor="
vendor:     .asciz "????????????"
msg_1ecx:   .asciz " 1.ecx="
msg_1edx:   .asciz " 1.edx="
msg_7ebx:   .asciz " 7.ebx="
msg_7ecx:   .asciz " 7.ecx="
msg_8ecx:   .asciz " 80000001.ecx="
msg_8edx:   .asciz " 80000001.edx="
msg_nl:     .asciz "\n"
hexdigits:  .ascii "0123456789abcdef"
hexbuf:     .asciz "00000000"
        .p2align 4
        .skip 512
stack_top:
