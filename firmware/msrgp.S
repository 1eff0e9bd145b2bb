/* msrgp: RDMSR and WRMSR(0) of SPEC_CTRL (0x48), PRED_CMD (0x49), FLUSH_CMD (0x10b), in flat 32-bit protected
 * mode (boot mode: protected) with a #GP handler that skips the 2-byte instruction. Prints one line per access,
 * "rdmsr 48: #GP" or "rdmsr 48: ok", then exits through isa-debug-exit (port 0xf4) with 0x11.
 * The guest's CPUID offers none of these MSRs here, so each access must raise #GP (tests/test_feature_msrs.py). */
#include "uart.inc"
        .code32
        .globl _start
_start:
        UART_INIT
        mov $gp_handler, %eax           /* IDT entry 13: a 32-bit interrupt gate */
        mov %ax, idt + 13 * 8
        shr $16, %eax
        mov %ax, idt + 13 * 8 + 6
        mov %cs, %ax
        mov %ax, idt + 13 * 8 + 2
        movw $0x8e00, idt + 13 * 8 + 4
        lidt idtr

        mov $msrs, %edi
next:   mov (%edi), %ecx
        test %ecx, %ecx
        jz done
        mov %ecx, cur_msr
        movb $0, gp_seen
        rdmsr
        mov $m_rd, %esi
        call report
        movb $0, gp_seen
        mov cur_msr, %ecx
        xor %eax, %eax
        xor %edx, %edx
        wrmsr
        mov $m_wr, %esi
        call report
        add $4, %edi
        jmp next
done:   mov $0x11, %eax
        out %eax, $0xf4
        cli
        hlt

/* "<ESI> <cur_msr in hex>: #GP|ok\n" */
report:
        call puts
        mov cur_msr, %eax
        shr $8, %eax
        call hexdigit
        mov cur_msr, %eax
        shr $4, %eax
        call hexdigit
        mov cur_msr, %eax
        call hexdigit
        mov $m_gp, %esi
        cmpb $0, gp_seen
        jne puts
        mov $m_ok, %esi
        jmp puts
hexdigit:
        and $15, %eax
        movb hex(%eax), %al
        mov $0x3f8, %dx
        out %al, %dx
        ret

/* #GP pushes an error code: EIP is at 4(%esp). Drop the frame and jump past the 2-byte instruction (the
 * backend cannot emulate a 32-bit IRET). */
gp_handler:
        movb $1, gp_seen
        mov 4(%esp), %eax
        add $16, %esp
        add $2, %eax
        jmp *%eax

puts:
        UART_PUTS_BODY

        .p2align 3
idt:    .fill 16 * 8, 1, 0
idtr:   .word 16 * 8 - 1
        .long idt
msrs:   .long 0x48, 0x49, 0x10b, 0
cur_msr: .long 0
gp_seen: .byte 0
hex:    .ascii "0123456789abcdef"
m_rd:   .asciz "rdmsr "
m_wr:   .asciz "wrmsr "
m_gp:   .asciz ": #GP\n"
m_ok:   .asciz ": ok\n"
