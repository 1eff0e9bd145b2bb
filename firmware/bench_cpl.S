/* bench_cpl: the compute loop of the benchmark suite's kvm-vs-tcg rows (bench/tcg.py, `make bench`), at
 * CPL0 or at CPL3. A flat 64-bit image (boot mode: long, load 0x100000). Header at fixed offsets, patched
 * by the harness (the layout of the bench_* images, firmware/header.inc):
 *   +4 iterations (u32, >= 1)    +8 ring (u32): 0 run the loop at CPL0, 3 drop to CPL3 first
 * The loop is `dec %rcx; jnz` (two instructions per iteration, as `hvm doctor`'s probe), then the guest
 * writes its CS to port 0x80 (no device there: the low two bits are the ring the loop ran in; tests check it)
 * and 0 to the debug-exit port 0xf4 (status 1). Exits: exactly these two port writes.
 *
 * It takes no exception and no interrupt, so that it runs the same under tcg, where Unicorn cannot deliver
 * them through an IDT: ring 3 is entered by IRETQ (no TSS needed: nothing returns to ring 0), with IOPL 3
 * in RFLAGS so that the OUT to the debug-exit port is allowed at CPL3; HLT would #GP there, so after the
 * OUT the guest spins (the VM has ended by then). */
#include "header.inc"
        .set DEBUG_EXIT, 0xf4
        .set REPORT, 0x80
        .set KCODE, 0x08
        .set KDATA, 0x10
        .set UDATA, 0x20
        .set UCODE, 0x28
        .set HVM_PML4, 0x1000           /* hvm's long-mode identity map (hvm/boot/cpu_modes.py) */
        .set HVM_PDPT, 0x2000
        .set HVM_PD, 0x3000

        .code64
        PATCHED_HEADER
ring:           .long 0
        .p2align 3
start:
        cli
        lea stack_top(%rip), %rsp
        LOAD_OWN_GDT64
        mov iterations(%rip), %ecx
        cmpl $3, ring(%rip)
        jne loop
        /* let CPL3 run the first 2 MiB (this image, its stack): U/S in hvm's identity map */
        orq $4, HVM_PML4
        orq $4, HVM_PDPT
        orq $4, HVM_PD
        mov %cr3, %rax
        mov %rax, %cr3
        pushq $(UDATA | 3)
        lea ustack_top(%rip), %rax
        push %rax
        pushq $0x3002                   /* IF = 0, IOPL = 3 */
        pushq $(UCODE | 3)
        lea loop(%rip), %rax
        push %rax
        iretq
        .p2align 4
loop:   dec %rcx
        jnz loop
        mov %cs, %eax
        out %eax, $REPORT
        xor %eax, %eax
        out %al, $DEBUG_EXIT            /* allowed at CPL3 too: IOPL 3 */
2:      pause
        jmp 2b

        .p2align 3
gdt:    .quad 0
        .quad 0x00af9a000000ffff        /* 0x08 kernel code, 64-bit */
        .quad 0x00cf92000000ffff        /* 0x10 kernel data */
        .quad 0                         /* 0x18 unused */
        .quad 0x00cff2000000ffff        /* 0x20 user data */
        .quad 0x00affa000000ffff        /* 0x28 user code, 64-bit */
gdt_end:
gdt_desc:
        .word gdt_end - gdt - 1
        .quad gdt
        .p2align 4
        .skip 512
stack_top:
        .skip 512
ustack_top:
