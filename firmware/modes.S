/* modes: walks the CPU from real mode to protected mode to long mode by itself
 * (lgdt, CR0.PE, CR4.PAE, EFER.LME via wrmsr, CR0.PG), printing a line in each mode, then halts.
 * Loaded flat at 0x7c00 in real mode. Page tables (identity map of 1 GiB, 2 MiB pages) at 0x70000. */
#include "uart.inc"
        .set PML4, 0x70000
        .set PDPT, 0x71000
        .set PD,   0x72000
        .set MSR_EFER, 0xc0000080

        .code16
        .globl _start
_start:
        REAL_MODE_START
        mov $msg_real, %si
        call puts16
        lgdtl gdt_desc
        mov %cr0, %eax
        or $1, %eax             /* CR0.PE */
        mov %eax, %cr0
        ljmpl $0x08, $pm32

puts16:
        UART_PUTS_BODY

        .code32
pm32:
        mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $0x7000, %esp
        mov $msg_prot, %esi
        call puts32
        /* identity-map the first GiB: PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] = i * 2 MiB */
        mov $PML4, %edi
        xor %eax, %eax
        mov $3 * 4096 / 4, %ecx
        rep stosl
        movl $PDPT | 3, PML4
        movl $PD | 3, PDPT
        mov $PD, %edi
        mov $0x83, %eax         /* present, writable, 2 MiB page */
        mov $512, %ecx
1:      mov %eax, (%edi)
        add $0x200000, %eax
        add $8, %edi
        loop 1b
        mov %cr4, %eax
        or $0x20, %eax          /* CR4.PAE */
        mov %eax, %cr4
        mov $PML4, %eax
        mov %eax, %cr3
        mov $MSR_EFER, %ecx
        rdmsr
        or $0x100, %eax         /* EFER.LME */
        wrmsr
        mov %cr0, %eax
        or $0x80000000, %eax    /* CR0.PG: with LME set this activates long mode */
        mov %eax, %cr0
        ljmp $0x18, $lm64

puts32:
        UART_PUTS_BODY

        .code64
lm64:
        mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $0x7000, %rsp
        mov $MSR_EFER, %ecx
        rdmsr
        test $0x400, %eax       /* EFER.LMA: the CPU says it is in long mode */
        jz 2f
        mov $msg_long, %rsi
        call puts64
2:      cli
        hlt
        jmp 2b

puts64:
        UART_PUTS_BODY

        .p2align 3
gdt:    .quad 0
        .quad 0x00cf9a000000ffff    /* 0x08: 32-bit code */
        .quad 0x00cf92000000ffff    /* 0x10: data */
        .quad 0x00af9a000000ffff    /* 0x18: 64-bit code */
gdt_desc:
        .word gdt_desc - gdt - 1
        .long gdt
msg_real: .asciz "real mode: hello\n"
msg_prot: .asciz "protected mode: hello\n"
msg_long: .asciz "long mode: hello (EFER.LMA=1)\n"
