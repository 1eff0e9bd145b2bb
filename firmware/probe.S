/* probe: tiny measurements for `hvm doctor`. A flat 64-bit image (boot mode: long, load 0x100000).
 * hvm passes the probe number in RDI and an iteration count in RSI. Results are 32-bit writes to
 * port 0x80 (the POST port): 1 = loop starts, 2 = loop ends, (TAG << 8) | CS for "handler TAG ran
 * with this CS" (the low two bits of CS are the privilege level it ran at). Every probe ends by
 * writing 0 to the debug-exit port 0xf4.
 *   0 pio      RSI port writes                      5 sysenter from CPL3
 *   1 cpl0     RSI loop iterations at CPL0          6 lock cmpxchg16b at CPL0
 *   2 cpl3     RSI loop iterations at CPL3          7 xsave/xrstor at CPL0
 *   3 syscall  from CPL3                            8 int3 at CPL0 (64-bit mode)
 *   4 int 0x80 from CPL3                            9 fwait at CPL0
 *                                                  10 cpuid: reports leaf 1 ECX, then leaf 7.0 EBX
 *  11 movbe   stores/loads at CPL0, reports the results (see p_movbe), then #PF of an unmapped page
 *  12 clac    stac, then clac: reports RFLAGS.AC read back by pushf as ('A' << 8) | AC after each
 *  13 clwb    clwb of a mapped byte, then of an unmapped page
 *  14 xgetbv  CR4.OSXSAVE, XCR0 = 3, xgetbv(0) -> EAX, EDX; xgetbv(5); xgetbv(0) with OSXSAVE clear
 *  15 rdpru   rdpru (ECX = 0)
 *  16 intn    int $0x81 at CPL0: 'N' from the handler, then 1 if the pushed RIP is the next instruction
 *  17 avx     XCR0 = 7; vmovdqa m->ymm0, ymm0->ymm15, vmovntdq ymm15->m, vzeroall, vmovdqa ymm15->m; reports
 *             the first and last dword of each stored copy; then a misaligned vmovdqa: #GP
 *  18 mmx     CR0.EM/TS clear, fninit; movq rax->mm0; FSW; movq mm0->m (two
 *             dwords); movq m->mm1, movq mm1->rax (two dwords); movd ecx->mm2, movq mm2->rax (two dwords)
 *  19 npstack CR0.WP; 2-4 MiB read-only; RSP = 0x300000; int $0x82 through a not-present gate: the #NP's frame
 *             cannot be written, so the CPU raises #PF (handler on IST1): 'P', CR2, error code
 * In 11-16 #UD/#GP/#PF report their tag (then #UD the RIP's low dword; #PF CR2 as two dwords, error code;
 * #GP the error code) and resume at RESUME.
 * Tags: 'S' syscall entry, 'I' int 0x80 gate, 'E' sysenter entry, 'U' #UD, 'G' #GP, 'P' #PF,
 * 'B' #BP, 'K' the instruction under test completed, 'W' an instruction without visible effect passed. */
#include "header.inc"
        .set REPORT, 0x80
        .set DEBUG_EXIT, 0xf4
        .set KCODE, 0x08
        .set KDATA, 0x10
        .set UDATA, 0x20
        .set UCODE, 0x28
        .set TSSSEL, 0x30
        .set HVM_PML4, 0x1000
        .set HVM_PDPT, 0x2000
        .set HVM_PD, 0x3000

        .code64
        .globl _start
_start:
        mov $kstack_top, %rsp
        mov %rdi, %r12                  /* probe number */
        mov %rsi, %r13                  /* iterations */
        LOAD_OWN_GDT64
        /* TSS: RSP0 = kernel stack, descriptor base patched in */
        lea tss(%rip), %rax
        lea kstack_top(%rip), %rbx
        mov %rbx, 4(%rax)
        mov %ax, gdt_tss + 2(%rip)
        shr $16, %rax
        mov %al, gdt_tss + 4(%rip)
        mov %ah, gdt_tss + 7(%rip)
        shr $16, %rax
        mov %eax, gdt_tss + 8(%rip)
        mov $TSSSEL, %ax
        ltr %ax
        /* IDT: every vector to `unexpected`, then the ones we watch */
        lea idt(%rip), %rdi
        lea unexpected(%rip), %rsi
        mov $256, %ecx
2:      call set_gate
        add $16, %rdi
        loop 2b
        mov $6, %eax;    lea h_ud(%rip), %rsi;   call gate_n
        mov $13, %eax;   lea h_gp(%rip), %rsi;   call gate_n
        mov $14, %eax;   lea h_pf(%rip), %rsi;   call gate_n
        mov $3, %eax;    lea h_bp(%rip), %rsi;   call gate_n
        mov $0x80, %eax; lea h_int80(%rip), %rsi; call gate_n
        mov $0x81, %eax; lea h_int81(%rip), %rsi; call gate_n
        orb $0x60, idt + 0x80 * 16 + 5(%rip)     /* int 0x80 gate: DPL 3 */
        lidt idt_desc(%rip)
        /* let CPL3 touch the first 2 MiB: set U/S in hvm's identity map */
        orq $4, HVM_PML4
        orq $4, HVM_PDPT
        orq $4, HVM_PD
        mov %cr3, %rax
        mov %rax, %cr3

        lea table(%rip), %rax
        cmp $19, %r12
        ja done
        jmp *(%rax,%r12,8)

p_pio:  mov %r13, %rcx
1:      out %al, $REPORT
        dec %rcx
        jnz 1b
        jmp done

/* set CR4.OSXSAVE, then XCR0 = xcr0 (clobbers rax, rcx, rdx) */
.macro ENABLE_XSAVE xcr0
        mov %cr4, %rax
        or $(1 << 18), %rax             /* CR4.OSXSAVE */
        mov %rax, %cr4
        xor %ecx, %ecx
        mov $\xcr0, %eax
        xor %edx, %edx
        xsetbv
.endm

/* report 1, spin R13 iterations of dec+jnz, report 2, finish */
.macro TIMED_LOOP
        mov $1, %eax
        out %eax, $REPORT
        mov %r13, %rcx
1:      dec %rcx
        jnz 1b
        mov $2, %eax
        out %eax, $REPORT
        jmp done
.endm

p_cpl0: TIMED_LOOP

p_cpl3: lea u_loop(%rip), %rax
        jmp to_user
u_loop: TIMED_LOOP                      /* IOPL 3: port I/O is allowed at CPL3 */

p_syscall:
        mov $0xc0000080, %ecx           /* EFER.SCE */
        rdmsr
        or $1, %eax
        wrmsr
        mov $0xc0000081, %ecx           /* STAR: kernel CS 0x08, user base 0x18 */
        xor %eax, %eax
        mov $0x00180008, %edx
        wrmsr
        mov $0xc0000082, %ecx           /* LSTAR */
        lea h_syscall(%rip), %rax
        mov %rax, %rdx
        shr $32, %rdx
        wrmsr
        lea u_syscall(%rip), %rax
        jmp to_user
u_syscall:
        syscall
        jmp done

p_int80:
        lea u_int80(%rip), %rax
        jmp to_user
u_int80:
        int $0x80
        jmp done

p_sysenter:
        mov $0x174, %ecx                /* SYSENTER_CS */
        mov $KCODE, %eax
        xor %edx, %edx
        wrmsr
        mov $0x175, %ecx                /* SYSENTER_ESP */
        lea kstack_top(%rip), %rax
        xor %edx, %edx
        wrmsr
        mov $0x176, %ecx                /* SYSENTER_EIP */
        lea h_sysenter(%rip), %rax
        mov %rax, %rdx
        shr $32, %rdx
        wrmsr
        lea u_sysenter(%rip), %rax
        jmp to_user
u_sysenter:
        sysenter
        jmp done

p_cx16: xor %eax, %eax
        xor %edx, %edx
        xor %ebx, %ebx
        xor %ecx, %ecx
        lea cx16buf(%rip), %rdi
        lock cmpxchg16b (%rdi)
        jmp completed

p_xsave:
        ENABLE_XSAVE 3                  /* XCR0 = x87 | SSE */
        lea xsavebuf(%rip), %rdi
        mov $3, %eax
        xor %edx, %edx
        xsave (%rdi)
        xrstor (%rdi)
        jmp completed

p_int3: int3
        jmp completed                   /* reached only if #BP returned here */

p_fwait:
        fwait
        jmp completed

p_cpuid:
        mov $1, %eax
        xor %ecx, %ecx
        cpuid
        mov %ecx, %eax
        out %eax, $REPORT
        mov $7, %eax
        xor %ecx, %ecx
        cpuid
        mov %ebx, %eax
        out %eax, $REPORT
        jmp done

/* MOVBE. Reports: the qword a 64-bit store of 0x1122334455667788 left (low, high dword); a 64-bit load of
 * it back (low, high); a 32-bit load of bytes 4-7 into RDX=-1 (low, high: zero-extended); a 16-bit load of
 * bytes 0-1 into RSI=-1 (low dword: upper bits kept); a RIP-relative 32-bit store of 0x55667788 (the dword
 * left); a 16-bit store of 0x7788 through GS with SIB and disp32 (the word left); an REX.B/REX.X form
 * (r9 + r10*8 - 8) 32-bit load; then a store to an unmapped address: #PF. */
p_movbe:
        lea RESUME_MOVBE(%rip), %rax
        mov %rax, resume(%rip)
        movabs $0x1122334455667788, %rax
        lea movbuf(%rip), %rdi
        movbe %rax, (%rdi)
        mov (%rdi), %rbx
        call report64
        movbe (%rdi), %rbx
        call report64
        mov $-1, %rdx
        movbe 4(%rdi), %edx
        mov %rdx, %rbx
        call report64
        mov $-1, %rsi
        movbe (%rdi), %si
        mov %esi, %eax
        out %eax, $REPORT
        mov $0x55667788, %eax
        movbe %eax, movbuf2(%rip)
        mov movbuf2(%rip), %eax
        out %eax, $REPORT
        mov $0xc0000101, %ecx           /* GS base = movbuf3 - 0x1000 */
        lea movbuf3 - 0x1000(%rip), %rax
        mov %rax, %rdx
        shr $32, %rdx
        wrmsr
        mov $0x7788, %eax
        mov $0x100, %ecx
        movbe %ax, %gs:0xe00(,%rcx,2)
        movzwl movbuf3(%rip), %eax
        out %eax, $REPORT
        lea movbuf + 8(%rip), %r9
        mov $-2, %r10
        movbe 8(%r9,%r10,8), %r11d      /* movbuf - 8: bytes 0-3 of movbuf */
        mov %r11d, %eax
        out %eax, $REPORT
        movabs $0x0000700000000000, %rdi
        movbe %eax, 0x10(%rdi)          /* not mapped: #PF, CR2 = 0x700000000010, error code 2 (write) */
        jmp done                        /* not reached */
RESUME_MOVBE:
        jmp completed

/* RBX as two reports: low dword, high dword */
report64:
        mov %ebx, %eax
        out %eax, $REPORT
        mov %rbx, %rax
        shr $32, %rax
        out %eax, $REPORT
        ret

p_clac: lea completed(%rip), %rax
        mov %rax, resume(%rip)
        stac
        call report_ac
        clac
        call report_ac
        jmp completed
report_ac:
        pushfq
        pop %rax
        shr $18, %eax
        and $1, %eax
        or $('A' << 8), %eax
        out %eax, $REPORT
        ret

p_clwb: lea 1f(%rip), %rax
        mov %rax, resume(%rip)
        lea movbuf(%rip), %rdi
        clwb 8(%rdi)
        mov $('W' << 8), %eax
        out %eax, $REPORT
1:      lea completed(%rip), %rax
        mov %rax, resume(%rip)
        movabs $0x0000700000000000, %rdi
        clwb (%rdi)                     /* not mapped: #PF (read), if the CPU has CLWB */
        jmp completed

p_xgetbv:
        lea 1f(%rip), %rax
        mov %rax, resume(%rip)
        ENABLE_XSAVE 3                  /* XCR0 = x87 | SSE */
        mov $-1, %rax
        mov $-1, %rdx
        xor %ecx, %ecx
        xgetbv
        out %eax, $REPORT
        mov %edx, %eax
        out %eax, $REPORT
        mov $5, %ecx
        xgetbv                          /* no XCR5: #GP(0) */
1:      lea 2f(%rip), %rax
        mov %rax, resume(%rip)
        mov %cr4, %rax
        and $~(1 << 18), %rax
        mov %rax, %cr4
        xor %ecx, %ecx
        xgetbv                          /* CR4.OSXSAVE clear: #UD */
2:      jmp completed

p_rdpru:
        lea completed(%rip), %rax
        mov %rax, resume(%rip)
        xor %ecx, %ecx
        rdpru
        mov $('W' << 8), %eax
        out %eax, $REPORT
        jmp completed

p_avx:  lea completed(%rip), %rax
        mov %rax, resume(%rip)
        ENABLE_XSAVE 7                  /* XCR0 = x87 | SSE | AVX */
        lea ysrc(%rip), %rdi
        vmovdqa (%rdi), %ymm0
        vmovdqa %ymm0, %ymm15
        vmovntdq %ymm15, ydst(%rip)
        mov ydst(%rip), %eax
        out %eax, $REPORT
        mov ydst + 28(%rip), %eax
        out %eax, $REPORT
        vzeroall
        vmovdqa %ymm15, ydst(%rip)
        mov ydst(%rip), %eax
        out %eax, $REPORT
        mov ydst + 28(%rip), %eax
        out %eax, $REPORT
        vmovdqa 16(%rdi), %ymm1         /* not 32-byte aligned: #GP(0) */
        jmp done

p_mmx:  lea completed(%rip), %rax
        mov %rax, resume(%rip)
        mov %cr0, %rax
        and $~0xc, %rax                 /* CR0.EM, CR0.TS */
        mov %rax, %cr0
        fninit                          /* (x87 loads such as fld1 are emulation failures on kvm_pvm) */
        mov $0x1122334455667788, %rax
        movq %rax, %mm0
        fnstsw %ax
        out %eax, $REPORT
        movq %mm0, mmdst(%rip)
        mov mmdst(%rip), %eax
        out %eax, $REPORT
        mov mmdst + 4(%rip), %eax
        out %eax, $REPORT
        movq mmsrc(%rip), %mm1
        movq %mm1, %rax
        out %eax, $REPORT
        shr $32, %rax
        out %eax, $REPORT
        mov $0xaabbccdd99887766, %rcx
        movd %ecx, %mm2
        movq %mm2, %rax
        out %eax, $REPORT
        shr $32, %rax
        out %eax, $REPORT
        jmp completed

p_npstack:
        lea 1f(%rip), %rax
        mov %rax, resume(%rip)
        lea kstack_top(%rip), %rax
        mov %rax, tss + 0x24(%rip)          /* IST1 */
        orb $1, idt + 14 * 16 + 4(%rip)     /* #PF through IST1 */
        andb $0x7f, idt + 0x82 * 16 + 5(%rip)   /* gate 0x82 not present */
        mov %cr0, %rax
        or $(1 << 16), %rax                 /* CR0.WP */
        mov %rax, %cr0
        andq $~2, HVM_PD + 8                /* 2-4 MiB read-only */
        mov %cr3, %rax
        mov %rax, %cr3
        mov %rsp, %rbx
        mov $0x300000, %rsp
        int $0x82
1:      mov %rbx, %rsp
        orq $2, HVM_PD + 8
        mov %cr3, %rax
        mov %rax, %cr3
        jmp completed

p_intn: int $0x81
intn_next:
        jmp completed

completed:
        mov %cs, %eax
        or $('K' << 8), %eax
        out %eax, $REPORT
done:   xor %eax, %eax
        out %eax, $DEBUG_EXIT
        cli
        hlt
        jmp done

/* iretq to CPL3 at RAX with IOPL 3 */
to_user:
        pushq $(UDATA | 3)
        lea ustack_top(%rip), %rbx
        push %rbx
        pushq $0x3002                   /* IF=0, IOPL=3 */
        pushq $(UCODE | 3)
        push %rax
        iretq

.macro HANDLER name, tag
\name:
        mov %cs, %eax
        or $(\tag << 8), %eax
        out %eax, $REPORT
        jmp done
.endm
        HANDLER h_syscall, 'S'
        HANDLER h_int80, 'I'
        HANDLER h_sysenter, 'E'
/* #UD/#GP/#PF: with RESUME set, report and go on there (RESUME cleared); else report and finish */
h_ud:   pushq $0
        mov $'U', %eax
        jmp fault
h_gp:   mov $'G', %eax
        jmp fault
h_pf:   mov $'P', %eax
fault:  shl $8, %eax
        mov %cs, %bx
        or %bx, %ax
        out %eax, $REPORT
        cmpq $0, resume(%rip)
        je done
        cmp $(('P' << 8) | KCODE), %eax
        jne 1f
        mov %cr2, %rax
        out %eax, $REPORT
        shr $32, %rax
        out %eax, $REPORT
1:      cmp $(('U' << 8) | KCODE), %eax
        je 2f
        mov (%rsp), %eax                /* the error code */
        out %eax, $REPORT
        jmp 3f
2:      mov 8(%rsp), %rax               /* #UD: the faulting RIP (low dword) */
        out %eax, $REPORT
3:      add $8, %rsp
        mov resume(%rip), %rax
        mov %rax, (%rsp)
        movq $0, resume(%rip)
        iretq
/* int $0x81: 'N', then 1 if the return RIP is the instruction after the INT */
h_int81:
        mov %cs, %eax
        or $('N' << 8), %eax
        out %eax, $REPORT
        lea intn_next(%rip), %rax
        cmp %rax, (%rsp)
        sete %al
        movzbl %al, %eax
        out %eax, $REPORT
        iretq
        HANDLER unexpected, 'X'
h_bp:   mov %cs, %eax
        or $('B' << 8), %eax
        out %eax, $REPORT
        iretq                           /* back after the int3: the 'K' report follows */

/* interrupt gate for vector EAX -> handler RSI */
gate_n: lea idt(%rip), %rdi
        shl $4, %rax
        add %rax, %rdi
/* 64-bit interrupt gate at RDI -> handler RSI, DPL 0 */
set_gate:
        mov %rsi, %rax
        mov %ax, (%rdi)
        movw $KCODE, 2(%rdi)
        movw $0x8e00, 4(%rdi)
        shr $16, %rax
        mov %ax, 6(%rdi)
        shr $16, %rax
        mov %eax, 8(%rdi)
        movl $0, 12(%rdi)
        ret

        .p2align 3
table:  .quad p_pio, p_cpl0, p_cpl3, p_syscall, p_int80, p_sysenter, p_cx16, p_xsave, p_int3, p_fwait, p_cpuid
        .quad p_movbe, p_clac, p_clwb, p_xgetbv, p_rdpru, p_intn, p_avx, p_mmx, p_npstack

        .p2align 3
gdt:    .quad 0
        .quad 0x00af9a000000ffff        /* 0x08 kernel code, 64-bit */
        .quad 0x00cf92000000ffff        /* 0x10 kernel data */
        .quad 0x00cffa000000ffff        /* 0x18 user code, 32-bit (SYSRET compat slot) */
        .quad 0x00cff2000000ffff        /* 0x20 user data */
        .quad 0x00affa000000ffff        /* 0x28 user code, 64-bit */
gdt_tss:
        .quad 0x0000890000000067        /* 0x30 TSS, base patched at run time */
        .quad 0
gdt_end:
gdt_desc:
        .word gdt_end - gdt - 1
        .quad gdt
idt_desc:
        .word 256 * 16 - 1
        .quad idt

resume: .quad 0
        .p2align 5
ysrc:   .long 0x11111111, 2, 3, 4, 5, 6, 7, 0x88888888
ydst:   .skip 32
mmsrc:  .quad 0x8070605040302010
mmdst:  .quad 0
        .p2align 4
movbuf: .quad 0, 0
movbuf2: .quad 0
movbuf3: .quad 0
        .p2align 4
cx16buf: .quad 0, 0
        .p2align 6
xsavebuf: .skip 1024
tss:    .skip 104
        .p2align 12
idt:    .skip 4096
        .skip 4096
kstack_top:
        .skip 4096
ustack_top:
