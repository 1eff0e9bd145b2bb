/* vmcall: VMCALL, then VMMCALL, each with RAX = -1 (no such KVM hypercall), in flat 32-bit protected mode
 * (boot mode: protected) with an IDT whose #UD handler skips the 3-byte instruction. Prints "vmcall: ret=X"
 * or "vmcall: #UD" per instruction, then exits through isa-debug-exit (port 0xf4) with 0x11.
 * On the kvm_pvm backend neither instruction is a hypercall: KVM's fix-hypercall quirk re-patches the
 * instruction with the same bytes and re-executes it forever (no exit to the VMM); hvm disables that
 * quirk there, so the guest sees #UD (tests/test_hypercall.py). */
#include "uart.inc"
        .code32
        .globl _start
_start:
        UART_INIT
        /* IDT entry 6 (#UD): a 32-bit interrupt gate to ud_handler through the CS hvm set up */
        mov $ud_handler, %eax
        mov %ax, idt + 6 * 8
        shr $16, %eax
        mov %ax, idt + 6 * 8 + 6
        mov %cs, %ax
        mov %ax, idt + 6 * 8 + 2
        movw $0x8e00, idt + 6 * 8 + 4
        lidt idtr

        movb $0, ud_seen
        mov $-1, %eax
        .byte 0x0f, 0x01, 0xc1          /* VMCALL */
        mov $m_vmcall, %esi
        call report

        movb $0, ud_seen
        mov $-1, %eax
        .byte 0x0f, 0x01, 0xd9          /* VMMCALL */
        mov $m_vmmcall, %esi
        call report

        mov $0x11, %eax
        out %eax, $0xf4
        cli
        hlt

/* print ESI's name, then "#UD" or "ret=" and the low byte of EAX in hex */
report:
        mov %eax, ret_val
        call puts
        cmpb $0, ud_seen
        je 1f
        mov $m_ud, %esi
        jmp puts
1:      mov $m_ret, %esi
        call puts
        mov ret_val, %eax
        shr $4, %eax
        call hexdigit
        mov ret_val, %eax
        call hexdigit
        mov $m_nl, %esi
        jmp puts
hexdigit:
        and $15, %eax
        movb hex(%eax), %al
        mov $0x3f8, %dx
        out %al, %dx
        ret

/* resume after the 3-byte instruction: drop the frame and jump (the backend cannot emulate a 32-bit IRET) */
ud_handler:
        movb $1, ud_seen
        mov (%esp), %eax
        add $12, %esp
        add $3, %eax
        jmp *%eax

puts:
        UART_PUTS_BODY

        .p2align 3
idt:    .fill 8 * 8, 1, 0
idtr:   .word 8 * 8 - 1
        .long idt
ud_seen: .byte 0
        .p2align 2
ret_val: .long 0
hex:    .ascii "0123456789abcdef"
m_vmcall:  .asciz "vmcall: "
m_vmmcall: .asciz "vmmcall: "
m_ud:   .asciz "#UD\n"
m_ret:  .asciz "ret="
m_nl:   .asciz "\n"
