/* smp: two vCPUs hammering the same ports, for exact --stats counts with several vCPUs (tests/test_smp.py).
 * A flat 32-bit image (`boot: {mode: protected}`, `vcpus: 2`). vCPU 0 copies a real-mode trampoline to
 * 0x8000 and starts vCPU 1 with INIT + SIPI (vector 0x08) through its in-kernel LAPIC. The trampoline
 * enters protected mode on hvm's GDT (0x500: CS 0x10, DS 0x18). Then each vCPU runs `iterations` times:
 *   IN 0x64 (i8042 status), OUT 0x510 (fw_cfg selector, 16-bit), OUT 0x80 (no device: the C fast loop's),
 *   a 4-byte MMIO write to 0xd0000000 (no device there either), and a `lock incl` of the word at +12
 * and counts itself done; vCPU 0 waits for both, writes 0 to the debug-exit port (status 1 when the VM has
 * one) and halts with interrupts off, as vCPU 1 does. Counts: 2 * iterations for each of the four, exactly. */
#include "header.inc"
        .set LAPIC_SVR, 0xfee000f0
        .set LAPIC_ICR_LO, 0xfee00300
        .set LAPIC_ICR_HI, 0xfee00310
        .set TRAMPOLINE, 0x8000
        .set MMIO_HOLE, 0xd0000000      /* in the PCI hole: MMIO that no device claims */
        .code32
        PATCHED_HEADER
halt_sti:       .long 0                 /* at +8: nonzero = vCPU 0 ends in `sti; hlt` (PICs masked), not `cli; hlt` */
shared:         .long 0                 /* at +12: `lock incl` by both vCPUs each round: 2 * iterations at the end */
ap_kvm_features: .long 0                /* at +16: vCPU 1's CPUID 0x40000001 EAX (KVM paravirtual features) */
ap_leaf1_ebx:   .long 0                 /* at +20: vCPU 1's CPUID 1 EBX (bits 31..24: its initial APIC id) */
start:
        mov $0x18, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $bsp_stack_top, %esp
        /* the trampoline to 0x8000 */
        mov $trampoline, %esi
        mov $TRAMPOLINE, %edi
        mov $(trampoline_end - trampoline), %ecx
        cld
        rep movsb
        movl $0x1ff, LAPIC_SVR          /* LAPIC software-enabled, spurious vector 0xff */
        movl $(1 << 24), LAPIC_ICR_HI   /* destination: APIC id 1 */
        movl $0x4500, LAPIC_ICR_LO      /* INIT, level assert */
        movl $(1 << 24), LAPIC_ICR_HI
        movl $(0x4600 | (TRAMPOLINE >> 12)), LAPIC_ICR_LO   /* STARTUP at 0x8000 */
        call hammer
1:      cmpl $2, done                   /* both vCPUs finished their loop */
        je 2f
        pause
        jmp 1b
2:      xor %eax, %eax
        out %eax, $0xf4                 /* debug-exit, if the VM has one */
        cmpl $0, halt_sti
        jne 6f
5:      cli
        hlt
        jmp 5b
6:      mov $0xff, %al                  /* both 8259s masked: no interrupt will come, but hvm cannot know */
        out %al, $0x21
        out %al, $0xa1
        sti
7:      hlt
        jmp 7b

/* The loop both vCPUs run (needs no stack: no call inside). */
hammer:
        mov iterations, %ecx
3:      in $0x64, %al
        mov $0x510, %dx
        xor %eax, %eax
        out %ax, %dx
        out %al, $0x80
        mov %eax, MMIO_HOLE
        lock incl shared
        loop 3b
        lock incl done
        ret

ap32:
        mov $0x18, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $ap_stack_top, %esp
        mov $0x40000001, %eax
        cpuid
        mov %eax, ap_kvm_features
        mov $1, %eax
        cpuid
        mov %ebx, ap_leaf1_ebx
        call hammer
4:      cli
        hlt
        jmp 4b

        .p2align 2
done:   .long 0
ap_stack: .fill 64, 1, 0
ap_stack_top:
bsp_stack: .fill 64, 1, 0
bsp_stack_top:

/* Runs at 0x8000 in real mode (CS = 0x0800, IP = 0): position-independent offsets from `trampoline`. */
        .code16
trampoline:
        cli
        mov %cs, %ax
        mov %ax, %ds
        lgdtl (gdtr - trampoline)
        mov %cr0, %eax
        or $1, %eax
        mov %eax, %cr0
        ljmpl $0x10, $ap32
        .p2align 2
gdtr:   .word 0xff
        .long 0x500
trampoline_end:
