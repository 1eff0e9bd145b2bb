/* mbtest: a multiboot (v1) ELF32 kernel, booted as QEMU's -kernel boots one.
 * Checks the multiboot magic, prints what the multiboot info says (memory, command line,
 * memory map), prints with string I/O (rep outsb: many bytes, few exits), reads and writes an
 * MMIO address and a port where no device lives (all ones back, VM keeps running), then exits
 * through the debug-exit port with the code given on its command line as "exit=N" (default 0),
 * so the process status is (N << 1) | 1. */
#include "uart.inc"
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000003       /* page-align modules, want memory info */
        .set NO_DEVICE_MMIO, 0xd0000000 /* in the PCI hole: no RAM, no device */
        .set NO_DEVICE_PORT, 0x2fd      /* COM2's LSR: no COM2 on this machine */

        .section .text
        .code32
        .p2align 2
mb_header:
        .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

        .globl _start
_start:
        cli
        mov $stack_top, %esp
        mov %ebx, mbi
        cmp $0x2BADB002, %eax
        je 1f
        mov $0xbad, %eax        /* no multiboot magic: exit code 0xbad -> status 0x75b & 0xff */
        jmp exit
1:      UART_INIT
        mov $msg_magic, %esi
        call print_rep

        mov mbi, %ebx
        mov $msg_mem, %esi
        call print_rep
        mov 8(%ebx), %eax       /* mem_upper, KiB */
        call print_hex
        mov $msg_kib, %esi
        call print_rep

        mov $msg_cmdline, %esi
        call print_rep
        testl $4, (%ebx)        /* flags.CMDLINE */
        jz 2f
        mov 16(%ebx), %esi
        call print_rep
2:      mov $msg_nl, %esi
        call print_rep

        mov $msg_mmap, %esi
        call print_rep
        xor %eax, %eax
        testl $0x40, (%ebx)     /* flags.MMAP: count the entries */
        jz 4f
        mov 48(%ebx), %esi      /* mmap_addr */
        mov 44(%ebx), %ecx      /* mmap_length */
        add %esi, %ecx
3:      cmp %ecx, %esi
        jae 4f
        inc %eax
        add (%esi), %esi        /* entry size (excluding the size field itself) */
        add $4, %esi
        jmp 3b
4:      call print_hex
        mov $msg_nl, %esi
        call print_rep

        movl $0x12345678, NO_DEVICE_MMIO    /* dropped by hvm */
        mov NO_DEVICE_MMIO, %eax            /* reads as all ones */
        push %eax
        mov $msg_mmio, %esi
        call print_rep
        pop %eax
        call print_hex
        mov $msg_nl, %esi
        call print_rep

        mov $NO_DEVICE_PORT, %dx
        xor %eax, %eax
        inb %dx, %al                        /* reads as 0xff */
        push %eax
        mov $msg_port, %esi
        call print_rep
        pop %eax
        call print_hex
        mov $msg_nl, %esi
        call print_rep

        /* string input: SCR := 0x5a, then rep insb 4 bytes from SCR (KVM may batch them in one exit) */
        mov $COM1 + 7, %dx
        mov $0x5a, %al
        outb %al, %dx
        mov $scratch, %edi
        mov $4, %ecx
        rep insb
        mov $msg_ins, %esi
        call print_rep
        mov scratch, %eax
        call print_hex
        mov $msg_nl, %esi
        call print_rep

        /* exit=N on the command line -> N, else 0 */
        xor %eax, %eax
        mov mbi, %ebx
        testl $4, (%ebx)
        jz exit
        mov 16(%ebx), %esi
5:      cmpb $0, (%esi)
        je exit
        cmpl $0x74697865, (%esi)            /* "exit" */
        jne 6f
        cmpb $'=', 4(%esi)
        je 7f
6:      inc %esi
        jmp 5b
7:      add $5, %esi
8:      movzbl (%esi), %ecx
        sub $'0', %ecx
        cmp $9, %ecx
        ja exit
        imul $10, %eax
        add %ecx, %eax
        inc %esi
        jmp 8b

exit:
        push %eax
        mov $msg_bye, %esi
        call print_rep
        pop %eax
        mov $DEBUG_EXIT, %dx
        outl %eax, %dx
        cli
9:      hlt
        jmp 9b

#include "print32.inc"

        .section .data
msg_magic:   .asciz "multiboot: magic ok\n"
msg_mem:     .asciz "mem_upper: "
msg_kib:     .asciz " KiB\n"
msg_cmdline: .asciz "cmdline: "
msg_mmap:    .asciz "mmap entries: "
msg_mmio:    .asciz "mmio read with no device: "
msg_port:    .asciz "port read with no device: "
msg_ins:     .asciz "rep insb from the UART scratch register: "
msg_bye:     .asciz "exiting through port 0xf4\n"
msg_nl:      .asciz "\n"
        .p2align 2
mbi:         .long 0
scratch:     .long 0

        .section .bss
        .p2align 4
stack:       .skip 4096
stack_top:
