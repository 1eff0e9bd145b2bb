/* fuzz: a seeded fuzzing guest for the `pc` machine (docs/fuzzing.md). A multiboot (v1) ELF32 kernel.
 *
 * Command line (--append), every field optional, numbers decimal or 0x-hex:
 *   seed=N    the xorshift32 seed (default 1): the same seed issues the same accesses
 *   iters=M   how many random operations (default 1000); 0xffffffff runs until the watchdog
 *   ops=MASK  which of the 16 operation slots run (bit i = slot i, default 0xffff; see optable);
 *             iters counts the operations done, so ops=0x700 does M MMIO accesses
 *   skip=P    never touch port P (accesses covering it go to port 0x80): to get past a known bug
 *   ends=1    also issue the writes that end the VM by design (debug-exit, i8042 reset, ACPI S5,
 *             0xcf9/0x92 resets); by default they are defused, so that a run lasts its iterations
 *   checks=MASK  which device checks run every 256 operations (bit n-1 = check n, default all;
 *             checks=0: none; see `checks`)
 * Each iteration picks one operation: a port read or write of 1/2/4 bytes (to a device of the pc
 * machine, or any port), string I/O (rep ins/outs, bounded counts, buffer in RAM, at the end of RAM
 * crossing into nothing, or wholly outside RAM, forwards or backwards), an MMIO read or write of
 * 1/2/4/8 bytes where there is no RAM (the in-kernel LAPIC and IOAPIC excepted), or a register sequence
 * (UART divisor/LCR/FCR/MCR then a THR flood, an i8042 command flood, RTC index/data, fw_cfg selector
 * and data, a pvconsole descriptor and doorbell).
 * Every 256 operations a few checks test what a guest may rely on after the abuse (UART FIFO and
 * interrupt line, i8042 output buffer); a failed one prints "fuzz: check failed: NAME" and exits
 * with 0x50 + its number (status 0xa3, 0xa5, 0xa7).
 * A complete run prints "fuzz: done" on COM1 and writes 0x42 to debug-exit: hvm's status 0x85.
 * A CPU exception (there should be none) writes 0x60 + vector: status 0xc1 + 2 * vector. */
#include "uart.inc"
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000003
        .set DONE_CODE, 0x42            /* -> status 0x85 */
        .set EXC_CODE, 0x60             /* + vector -> status 0xc1 + 2 * vector */
        .set CHECK_CODE, 0x50           /* + check number (1..) -> status 0xa3, 0xa5, ... */
        .set FREE_LO, 0x01000000        /* RAM from 16 MiB up holds nothing of ours: pvconsole may write there */
        .set IOBUF_SIZE, 0x2400
        .set PVCON, 0xe00
        .set NOWHERE_PORT, 0x80         /* where skip= sends accesses */

        .section .text
        .code32
        .p2align 2
mb_header:
        .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

        .globl _start
_start:
        cli
        cld
        mov $stack_top, %esp
        mov %ebx, mbi
        /* An IDT first: any exception then ends the run with its own status instead of a triple fault. */
        mov %cs, %ax
        movzwl %ax, %eax
        shl $16, %eax
        mov %eax, %ebx                  /* selector << 16 */
        xor %ecx, %ecx
1:      mov $irq_stub, %edx
        cmp $32, %ecx
        jae 2f
        lea exc_stubs(,%ecx,8), %edx
2:      mov %edx, %eax
        and $0xffff, %eax
        or %ebx, %eax
        mov %eax, idt(,%ecx,8)
        mov %edx, %eax
        and $0xffff0000, %eax
        or $0x8e00, %eax                /* present, DPL 0, 32-bit interrupt gate */
        mov %eax, idt+4(,%ecx,8)
        inc %ecx
        cmp $256, %ecx
        jb 1b
        lidt idtr
        /* MMX for the 8-byte MMIO accesses: no FPU emulation, no task-switched trap. */
        mov %cr0, %eax
        and $~0xc, %eax                 /* EM, TS */
        or $0x2, %eax                   /* MP */
        mov %eax, %cr0

        UART_INIT

        /* end of RAM from the multiboot info: (mem_upper + 1 MiB) */
        mov mbi, %ebx
        mov $0x08000000, %eax           /* 128 MiB if the loader did not say */
        testl $1, (%ebx)
        jz 3f
        mov 8(%ebx), %eax
        add $1024, %eax
        shl $10, %eax
3:      mov %eax, ram_end

        /* options */
        mov $key_seed, %edi
        call find_opt
        jc 4f
        mov %eax, seed
4:      mov $key_iters, %edi
        call find_opt
        jc 4f
        mov %eax, iters
4:      mov $key_ops, %edi
        call find_opt
        jc 4f
        mov %eax, ops_mask
4:      mov $key_skip, %edi
        call find_opt
        jc 4f
        mov %eax, skip_port
4:      mov $key_ends, %edi
        call find_opt
        jc 4f
        mov %al, ends_ok
4:      mov $key_checks, %edi
        call find_opt
        jc 4f
        mov %al, checks_on

4:      mov $msg_seed, %esi
        call print_rep
        mov seed, %eax
        call print_hex
        mov $msg_iters, %esi
        call print_rep
        mov iters, %eax
        call print_hex
        mov $msg_ops, %esi
        call print_rep
        mov ops_mask, %eax
        call print_hex
        mov $msg_ram, %esi
        call print_rep
        mov ram_end, %eax
        call print_hex
        mov $msg_nl, %esi
        call print_rep

        /* PRNG: a zero state would stay zero */
        mov seed, %eax
        xor $0x9e3779b9, %eax
        jnz 5f
        inc %eax
5:      mov %eax, rng
        call rand
        call rand
        /* fill the string-I/O buffer with random bytes, so that string output sends something */
        xor %ecx, %ecx
6:      call rand
        mov %eax, iobuf(%ecx)
        add $4, %ecx
        cmp $IOBUF_SIZE, %ecx
        jb 6b

        mov iters, %eax
        mov %eax, left
        testw $0xffff, ops_mask         /* no slot at all: every slot */
        jnz main_loop
        movl $0xffff, ops_mask
main_loop:
        mov left, %eax
        test %eax, %eax
        jz done
1:      call rand
        and $15, %eax
        bt %eax, ops_mask
        jnc 1b                          /* a slot ops= leaves out: draw again (iters counts operations) */
        decl left
        call *optable(,%eax,4)
        testb $0xff, left               /* every 256 operations: the device checks */
        jnz main_loop
        cmpb $0, checks_on
        je main_loop
        call checks
        jmp main_loop

done:   call uart_reset
        mov $msg_done, %esi
        call print_rep
        mov $DONE_CODE, %eax
exit:   mov $DEBUG_EXIT, %dx
        out %eax, %dx
        cli
7:      hlt
        jmp 7b

/* COM1 back to a state where a line reaches the console: no loopback, no DLAB, no interrupts */
uart_reset:
        UART_INIT
        mov $COM1 + 4, %dx
        mov $0x03, %al                  /* MCR: DTR, RTS, loopback off */
        out %al, %dx
        mov $COM1 + 1, %dx
        xor %al, %al                    /* IER */
        out %al, %dx
        ret

/* ---- device checks (checks=0 turns them off): what a guest may rely on, after random abuse.
 * A failed check prints "fuzz: check failed: NAME" and exits with CHECK_CODE + n (status 0xa3 + 2(n-1)). */
.macro CHECK_FAIL n, msg
        call uart_reset
        mov $msg_check, %esi
        call print_rep
        mov $\msg, %esi
        call print_rep
        mov $CHECK_CODE + \n, %eax
        jmp exit
.endm
.macro OUTB port, val
        mov $\port, %dx
        mov $\val, %al
        out %al, %dx
.endm
.macro INB port
        mov $\port, %dx
        in %dx, %al
.endm

checks:
        push %ebp
        testb $1, checks_on
        jz 1f
        /* 1. uart-fifo-toggle: turning the FIFOs off empties them, so LSR.DR must read 0 (a set DR would
         *    make the guest read a phantom byte) */
        OUTB COM1 + 1, 0                /* IER off */
        OUTB COM1 + 3, 0x03             /* LCR: 8N1, no DLAB */
        OUTB COM1 + 4, 0x18             /* MCR: loopback, OUT2 */
        OUTB COM1 + 2, 0x07             /* FIFOs on, both cleared */
        OUTB COM1, 0x5a                 /* loops back into the receive FIFO */
        OUTB COM1 + 2, 0x00             /* FIFOs off */
        INB COM1 + 5
        test $1, %al
        jz 1f
        CHECK_FAIL 1, msg_chk_fifo
1:      testb $2, checks_on
        jz 2f
        /* 2. uart-lsr-irq: an overrun raises the receiver-line-status interrupt; reading LSR clears OE,
         *    and the IRQ line must fall with it. The line is read from the in-kernel PIC's IRR, with IRQ 4
         *    level-triggered (ELCR), after re-initialising the PIC the random writes may have scrambled. */
        OUTB COM1 + 1, 0                /* IER off: the line falls before the PIC resets, which clears IRR */
        OUTB 0x20, 0x11                 /* ICW1: edge (ELCR decides), cascade, ICW4 */
        OUTB 0x21, 0x20                 /* ICW2: vectors 0x20.. */
        OUTB 0x21, 0x04                 /* ICW3: slave on IRQ 2 */
        OUTB 0x21, 0x01                 /* ICW4: 8086 mode */
        OUTB 0x21, 0xff                 /* all masked: the check only looks at IRR */
        OUTB 0x4d0, 0x10                /* ELCR: IRQ 4 level-triggered, so IRR follows the line */
        OUTB COM1 + 3, 0x03             /* LCR: 8N1, no DLAB */
        OUTB COM1 + 4, 0x18             /* MCR: loopback, OUT2 (which gates the IRQ) */
        OUTB COM1 + 2, 0x00             /* FIFOs off: a one-byte receiver */
        INB COM1                        /* drain */
        INB COM1
        INB COM1 + 5                    /* clear OE/BI */
        OUTB COM1 + 1, 0x04             /* IER: receiver line status only */
        OUTB COM1, 0x01
        OUTB COM1, 0x02                 /* overrun */
        call pic_irr
        test $0x10, %al
        jz 6f                           /* no line to watch (no irqchip, or no overrun): nothing to check */
        INB COM1 + 5                    /* clears OE: nothing is pending any more */
        call pic_irr
        test $0x10, %al
        jz 6f
        CHECK_FAIL 2, msg_chk_lsr
6:
        OUTB COM1 + 1, 0x00
        OUTB COM1 + 4, 0x08
        OUTB 0x4d0, 0x00
2:      testb $4, checks_on
        jz 5f

        /* 3. i8042-queue: 300 "read command byte" commands with nothing read in between; a controller
         *    with a bounded output buffer (real ones hold one byte) is empty again after 256 reads */
        mov $300, %ebp
3:      OUTB 0x64, 0x20
        dec %ebp
        jnz 3b
        mov $256, %ebp
4:      INB 0x64
        test $1, %al                    /* OBF */
        jz 5f
        INB 0x60
        dec %ebp
        jnz 4b
        INB 0x64
        test $1, %al
        jz 5f
        CHECK_FAIL 3, msg_chk_kbd
5:      pop %ebp
        ret

/* pic_irr: al = the master PIC's interrupt request register */
pic_irr:
        OUTB 0x20, 0x0a                 /* OCW3: read IRR */
        INB 0x20
        ret

/* ---- CPU exceptions: none should happen; if one does, the status names its vector ---- */
        .p2align 3
exc_stubs:
        .set vec, 0
        .rept 32
        .p2align 3
        push $vec
        jmp exc_common
        .set vec, vec + 1
        .endr
exc_common:
        pop %eax
        add $EXC_CODE, %eax
        jmp exit
irq_stub:                               /* interrupts are off; an NMI or a stray vector just returns */
        iret

/* ---- PRNG ---- */
/* rand: eax = next xorshift32 value; nothing else changes */
rand:
        push %edx
        mov rng, %eax
        mov %eax, %edx
        shl $13, %edx
        xor %edx, %eax
        mov %eax, %edx
        shr $17, %edx
        xor %edx, %eax
        mov %eax, %edx
        shl $5, %edx
        xor %edx, %eax
        mov %eax, rng
        pop %edx
        ret

/* randn: ecx = n -> eax uniform-ish in [0, n) (0 when n = 0) */
randn:
        push %edx
        call rand
        mul %ecx
        mov %edx, %eax
        pop %edx
        ret

/* rand_size: ecx = 1, 2 or 4 (1 twice as often) */
rand_size:
        call rand
        and $3, %eax
        movzbl sizes(%eax), %ecx
        ret

/* rand_dir: ebx = 0 (in) or 1 (out) */
rand_dir:
        call rand
        mov %eax, %ebx
        and $1, %ebx
        ret

/* pick_port: edx = a port of a device of the pc machine (3 times in 4) or any port */
pick_port:
        call rand
        test $3, %eax
        jz 1f
        mov $NDEV, %ecx
        call randn
        movzwl devtab(,%eax,4), %edx
        movzwl devtab+2(,%eax,4), %ecx
        inc %ecx                        /* one past the end too */
        call randn
        add %eax, %edx
        ret
1:      call rand
        movzwl %ax, %edx
        ret

/* ---- the access primitives: every port access goes through pio or sio ---- */

/* pio: one port access. edx = port, ecx = size (1/2/4), ebx = 1 out (value eax) / 0 in (-> eax).
 * Preserves every register but eax. */
pio:
        push %edx
        push %esi
        call fix_port
        test %ebx, %ebx
        jz 5f
        cmpb $0, ends_ok
        jne 1f
        call defuse
        cmp $PVCON, %edx
        jne 1f
        cmp $4, %ecx
        jne 1f
        call pv_safe
1:      cmp $1, %ecx
        jne 2f
        out %al, %dx
        jmp 9f
2:      cmp $2, %ecx
        jne 3f
        out %ax, %dx
        jmp 9f
3:      out %eax, %dx
        jmp 9f
5:      cmp $1, %ecx
        jne 6f
        in %dx, %al
        jmp 9f
6:      cmp $2, %ecx
        jne 7f
        in %dx, %ax
        jmp 9f
7:      in %dx, %eax
9:      pop %esi
        pop %edx
        ret

/* fix_port: edx = port, ecx = size, ebx = direction: moves an access covering skip= to NOWHERE_PORT,
 * and (unless ends=1) a write touching debug-exit (0xf4..0xf7) to 0x1f4... Clobbers esi. */
fix_port:
        mov skip_port, %esi
        sub %edx, %esi
        cmp %ecx, %esi
        jae 1f
        mov $NOWHERE_PORT, %edx
1:      cmpb $0, ends_ok
        jne 9f
        test %ebx, %ebx
        jz 9f
        lea -DEBUG_EXIT(%edx), %esi     /* first byte in 0xf4..0xf7 */
        cmp $4, %esi
        jb 2f
        lea -DEBUG_EXIT-1(%edx,%ecx), %esi  /* last byte in 0xf4..0xf7 (an access is at most 4 bytes) */
        cmp $4, %esi
        jae 9f
2:      add $0x100, %edx
9:      ret

/* defuse: eax = value written at port edx (any size): clears, byte by byte, what would end the VM:
 * i8042 command 0xFE (pulse reset) and 0xD1 (write output port: bit 0 low resets) -> 0xFF / 0xD0,
 * ACPI PM1a_CNT SLP_EN (bit 13: byte 0x605 bit 5), 0xcf9 bit 2 (reset), 0x92 bit 0 (fast reset). */
defuse:
        push %ecx
        push %edx
        mov $4, %ecx
1:      cmp $0x64, %dx
        jne 2f
        cmp $0xfe, %al
        je 5f
        cmp $0xd1, %al
        jne 2f
5:      xor $1, %al
2:      cmp $0x605, %dx
        jne 3f
        and $0xdf, %al
3:      cmp $0xcf9, %dx
        jne 4f
        and $0xfb, %al
4:      cmp $0x92, %dx
        jne 6f
        and $0xfe, %al
6:      ror $8, %eax
        inc %dx
        loop 1b
        pop %edx
        pop %ecx
        ret

/* pv_safe: eax = a pvconsole doorbell value -> a descriptor address where the device's 4-byte `used`
 * write cannot land in this program: our descriptor, the last 32 bytes of RAM (the descriptor may
 * cross the end), the PCI hole (no RAM: dropped), or free RAM from 16 MiB. */
pv_safe:
        push %edx
        mov %eax, %edx
        shr $2, %eax
        and $3, %edx
        jnz 1f
        mov $desc, %eax
        jmp 9f
1:      cmp $1, %edx
        jne 2f
        and $31, %eax
        add ram_end, %eax
        sub $32, %eax
        jmp 9f
2:      cmp $2, %edx
        jne 3f
        or $0xc0000000, %eax
        jmp 9f
3:      and $0xfffff, %eax
        add $FREE_LO, %eax
9:      pop %edx
        ret

/* hits_danger: CF=1 if ports [edx, edx+ecx) touch a port where a written byte may end the VM or write
 * guest RAM (pvconsole): string output there cannot be defused byte by byte. Preserves registers. */
hits_danger:
        push %eax
        push %esi
        push %edi
        mov $danger, %esi
1:      movzwl (%esi), %eax
        test %eax, %eax
        jz 8f
        movzwl 2(%esi), %edi
        add %eax, %edi
        cmp %edi, %edx                  /* port >= hi: apart */
        jae 2f
        lea (%edx,%ecx), %edi
        cmp %edi, %eax                  /* lo >= port + size: apart */
        jae 2f
        stc
        jmp 9f
2:      add $4, %esi
        jmp 1b
8:      clc
9:      pop %edi
        pop %esi
        pop %eax
        ret

/* sio: string I/O. edx = port, ecx = element size, ebx = direction, ebp = count, edi = buffer;
 * the caller sets DF for a backwards copy (sio clears it). Clobbers eax, ecx, esi, edi. */
sio:
        push %edx
        mov skip_port, %esi
        sub %edx, %esi
        cmp %ecx, %esi
        jae 1f
        mov $NOWHERE_PORT, %edx
1:      test %ebx, %ebx
        jz 2f
        cmpb $0, ends_ok
        jne 2f
        call hits_danger
        jnc 2f
        mov $COM1, %edx                 /* the bytes go to the UART instead */
2:      mov %ecx, %eax
        mov %ebp, %ecx
        mov %edi, %esi
        test %ebx, %ebx
        jz 5f
        cmp $1, %eax
        jne 3f
        rep outsb
        jmp 9f
3:      cmp $2, %eax
        jne 4f
        rep outsw
        jmp 9f
4:      rep outsl
        jmp 9f
5:      cmp $1, %eax
        jne 6f
        rep insb
        jmp 9f
6:      cmp $2, %eax
        jne 7f
        rep insw
        jmp 9f
7:      rep insl
9:      cld
        pop %edx
        ret

.macro OUTP port, size
        mov $\port, %edx
        mov $\size, %ecx
        mov $1, %ebx
        call pio
.endm
.macro INP port, size
        mov $\port, %edx
        mov $\size, %ecx
        xor %ebx, %ebx
        call pio
.endm

/* ---- operations (optable) ---- */

/* one port access: a device's port or any, random size, direction and value */
op_port:
        call pick_port
        call rand_size
        call rand_dir
        call rand
        jmp pio

/* string I/O: a port, 1..256 elements of 1/2/4 bytes, to/from RAM, the end of RAM or no RAM */
op_sio:
        push %ebp
        call pick_port
        call rand_size
        call rand_dir
        call rand
        and $0xff, %eax
        inc %eax
        mov %eax, %ebp
        call rand
        mov %eax, %esi                  /* r: the buffer's place and the direction flag */
        and $7, %eax
        cmp $5, %eax
        jb 1f
        cmp $7, %eax
        jb 2f
        mov %esi, %edi                  /* wholly outside RAM: just above it, or in the PCI hole */
        shr $8, %edi
        and $0xffff, %edi
        test $8, %esi
        jz 3f
        add $0xd0000000, %edi
        jmp 4f
3:      add ram_end, %edi
        jmp 4f
2:      mov %esi, %edi                  /* the last 512 bytes of RAM: crosses the end if long enough */
        shr $8, %edi
        and $0x1ff, %edi
        neg %edi
        add ram_end, %edi
        dec %edi
        jmp 4f
1:      mov %esi, %edi                  /* our buffer */
        shr $8, %edi
        and $0xfff, %edi
        add $iobuf, %edi
        test $0x7000000, %esi           /* backwards 1 time in 8: from the buffer's upper half */
        jnz 4f
        add $0x1000, %edi
        std
4:      call sio
        pop %ebp
        ret

/* MMIO where there is no RAM: 1/2/4/8 bytes, read or write, possibly across a page boundary */
op_mmio:
        call rand
        mov %eax, %esi                  /* r: mode, size, direction */
        and $3, %eax
        jnz 1f
        mov $0xc0000000, %ecx           /* between the end of RAM and the PCI hole */
        sub ram_end, %ecx
        call randn
        add ram_end, %eax
        jmp 5f
1:      cmp $1, %eax
        jne 2f
        call rand                       /* the PCI hole */
        or $0xc0000000, %eax
        jmp 5f
2:      cmp $2, %eax
        jne 3f
        call rand                       /* a few hot addresses: the same ones again and again */
        and $0x3f, %eax
        add $0xd0000000, %eax
        jmp 5f
3:      call rand                       /* the last bytes of a page: the access may span two pages */
        and $0x0ffff000, %eax
        or $0xd0000ff8, %eax
        mov %esi, %edx
        shr $8, %edx
        and $7, %edx
        add %edx, %eax
5:      cmp $0xfffffff0, %eax
        jbe 6f
        mov $0xfffffff0, %eax
6:      mov %eax, %edi
        /* not the in-kernel IOAPIC (0xfec00000) or LAPIC (0xfee00000): writes there program interrupts */
        shr $21, %eax
        cmp $0x7f6, %eax                /* 0xfec00000..0xfedfffff */
        je 7f
        cmp $0x7f7, %eax                /* 0xfee00000..0xfeffffff */
        je 7f
        lea 7(%edi), %eax
        shr $21, %eax
        cmp $0x7f6, %eax
        je 7f
        cmp $0x7f7, %eax
        jne 8f
7:      xor $0x01000000, %edi
8:      call rand                       /* the value */
        mov %esi, %edx
        shr $4, %edx
        and $7, %edx                    /* bit 0: direction, bits 1-2: size */
        jmp *mmio_ops(,%edx,4)
mmio_r1: movb (%edi), %al
        ret
mmio_w1: movb %al, (%edi)
        ret
mmio_r2: movw (%edi), %ax
        ret
mmio_w2: movw %ax, (%edi)
        ret
mmio_r4: movl (%edi), %eax
        ret
mmio_w4: movl %eax, (%edi)
        ret
mmio_r8: movq (%edi), %mm0
        ret
mmio_w8: mov %eax, qword
        call rand
        mov %eax, qword + 4
        movq qword, %mm0
        movq %mm0, (%edi)
        ret

/* UART: divisor, LCR, FCR, IER, MCR (loopback included) at random, a THR flood, then reads */
op_uart:
        push %ebp
        call rand
        or $0x80, %eax
        OUTP COM1 + 3, 1                /* LCR with DLAB */
        call rand
        OUTP COM1, 1                    /* DLL */
        call rand
        OUTP COM1 + 1, 1                /* DLM */
        call rand
        and $0x7f, %eax
        OUTP COM1 + 3, 1                /* LCR */
        call rand
        OUTP COM1 + 2, 1                /* FCR */
        call rand
        and $0x0f, %eax
        OUTP COM1 + 1, 1                /* IER */
        call rand
        and $0x1f, %eax
        OUTP COM1 + 4, 1                /* MCR */
        call rand                       /* THR flood: 1..256 bytes in one rep outsb */
        and $0xff, %eax
        inc %eax
        mov %eax, %ebp
        mov $COM1, %edx
        mov $1, %ecx
        mov $1, %ebx
        mov $iobuf, %edi
        call sio
        INP COM1 + 5, 1                 /* LSR */
        INP COM1 + 2, 1                 /* IIR */
        INP COM1, 1                     /* RBR */
        INP COM1 + 6, 1                 /* MSR */
        INP COM1 + 5, 1
        call rand                       /* RBR drained by string input: 1..16 bytes */
        and $0xf, %eax
        inc %eax
        mov %eax, %ebp
        mov $COM1, %edx
        mov $1, %ecx
        xor %ebx, %ebx
        mov $iobuf + 0x2000, %edi
        call sio
        pop %ebp
        ret

/* i8042: a flood of 1..32 commands (some with a data byte), never read, then sometimes a drain */
op_kbd:
        push %ebp
        call rand
        and $31, %eax
        inc %eax
        mov %eax, %ebp
1:      call rand
        mov %eax, %esi
        and $15, %eax
        movzbl kbd_cmds(%eax), %eax
        cmp $0xff, %eax
        jne 2f
        call rand                       /* any byte */
2:      OUTP 0x64, 1
        test $0x100, %esi
        jz 3f
        call rand
        OUTP 0x60, 1
3:      dec %ebp
        jnz 1b
        call rand
        test $1, %eax
        jz 5f
        mov $16, %ebp
4:      INP 0x64, 1
        INP 0x60, 1
        dec %ebp
        jnz 4b
5:      pop %ebp
        ret

/* RTC: 1..8 times an index, then the data port with a random size and direction */
op_rtc:
        push %ebp
        call rand
        and $7, %eax
        inc %eax
        mov %eax, %ebp
1:      call rand
        OUTP 0x70, 1
        call rand_size
        call rand_dir
        call rand
        mov $0x71, %edx
        call pio
        dec %ebp
        jnz 1b
        pop %ebp
        ret

/* fw_cfg: select a known or random item, read 1..64 bytes with rep insb, sometimes write data */
op_fwcfg:
        push %ebp
        call rand
        mov %eax, %esi
        and $7, %eax
        movzwl fw_items(,%eax,2), %eax
        cmp $0xffff, %eax
        jne 1f
        call rand
1:      OUTP 0x510, 2
        mov %esi, %ebp
        shr $8, %ebp
        and $63, %ebp
        inc %ebp
        mov $0x511, %edx
        mov $1, %ecx
        xor %ebx, %ebx
        mov $iobuf + 0x1000, %edi
        push %esi
        call sio
        pop %esi
        test $0x10000, %esi
        jz 2f
        call rand
        OUTP 0x511, 1
2:      pop %ebp
        ret

/* pvconsole: a descriptor with a buffer in RAM, across its end, beyond 4 GiB or nowhere, a length small,
 * huge or at the limit; then the doorbell (sometimes a wrong size, a read, or a random address) */
op_pvcon:
        call rand
        mov %eax, %esi
        and $3, %eax
        jnz 1f
        call rand                       /* our buffer */
        and $0xfff, %eax
        add $iobuf, %eax
        movl $0, desc + 4
        jmp 4f
1:      cmp $1, %eax
        jne 2f
        call rand                       /* anywhere in 8 GiB */
        mov %eax, desc + 4
        andl $1, desc + 4
        call rand
        jmp 4f
2:      cmp $2, %eax
        jne 3f
        call rand                       /* the end of RAM */
        and $0xff, %eax
        neg %eax
        add ram_end, %eax
        movl $0, desc + 4
        jmp 4f
3:      movl $0, desc + 4               /* address 0 */
        xor %eax, %eax
4:      mov %eax, desc
        call rand
        mov %eax, desc + 12             /* `used`: the device must overwrite it */
        mov %esi, %eax
        shr $2, %eax
        and $3, %eax
        jnz 5f
        call rand                       /* small */
        and $0xff, %eax
        jmp 8f
5:      cmp $1, %eax
        jne 6f
        call rand                       /* anything, mostly huge */
        jmp 8f
6:      cmp $2, %eax
        jne 7f
        mov ram_end, %eax               /* at the limit (1 MiB), the buffer crossing the end of RAM */
        sub $0x1000, %eax
        mov %eax, desc
        movl $0, desc + 4
        mov $0x100000, %eax
        jmp 8f
7:      mov $0x100001, %eax             /* one over the limit */
8:      mov %eax, desc + 8
        mov %esi, %eax
        shr $4, %eax
        and $7, %eax
        jz 9f
        cmp $1, %eax
        je 10f
        cmp $2, %eax
        je 11f
        mov $desc, %eax                 /* the doorbell, as a driver rings it */
        OUTP PVCON, 4
        ret
9:      call rand                       /* a random descriptor address (made safe by pv_safe) */
        OUTP PVCON, 4
        ret
10:     call rand_size                  /* a doorbell of the wrong size (or right: 4 once in 4) */
        mov $desc, %eax
        mov $PVCON, %edx
        mov $1, %ebx
        jmp pio
11:     INP PVCON, 4                    /* the magic */
        ret

/* ---- command line ---- */

/* find_opt: edi = "key=" -> CF=0, eax = its number if the command line has it as a word, else CF=1 */
find_opt:
        push %esi
        push %ecx
        push %edx
        mov mbi, %esi
        testl $4, (%esi)                /* flags.CMDLINE */
        jz 8f
        mov 16(%esi), %esi
        mov %esi, %edx                  /* start of the line */
1:      cmpb $0, (%esi)
        je 8f
        cmp %edx, %esi                  /* a key starts a word */
        je 2f
        cmpb $' ', -1(%esi)
        jne 5f
2:      xor %ecx, %ecx
3:      movb (%edi,%ecx), %al
        test %al, %al
        jz 4f
        cmpb (%esi,%ecx), %al
        jne 5f
        inc %ecx
        jmp 3b
4:      add %ecx, %esi
        call parse_num
        clc
        jmp 9f
5:      inc %esi
        jmp 1b
8:      stc
9:      pop %edx
        pop %ecx
        pop %esi
        ret

/* parse_num: esi -> eax, decimal or 0x-hex, up to the first other character */
parse_num:
        push %ecx
        push %ebx
        xor %eax, %eax
        mov $10, %ebx
        cmpw $0x7830, (%esi)            /* "0x" */
        jne 1f
        add $2, %esi
        mov $16, %ebx
1:      movzbl (%esi), %ecx
        sub $'0', %ecx
        cmp $9, %ecx
        jbe 2f
        cmp $16, %ebx
        jne 9f
        movzbl (%esi), %ecx
        or $0x20, %ecx                  /* lower case */
        sub $'a', %ecx
        cmp $5, %ecx
        ja 9f
        add $10, %ecx
2:      imul %ebx, %eax
        add %ecx, %eax
        inc %esi
        jmp 1b
9:      pop %ebx
        pop %ecx
        ret

#include "print32.inc"

        .section .data
        .p2align 2
/* 16 operation slots, picked uniformly: ops=MASK selects them */
optable:
        .long op_port, op_port, op_port, op_port, op_port, op_port      /* 0-5 */
        .long op_sio, op_sio                                            /* 6-7 */
        .long op_mmio, op_mmio, op_mmio                                 /* 8-10 */
        .long op_uart, op_kbd, op_rtc, op_fwcfg, op_pvcon               /* 11-15 */
mmio_ops:
        .long mmio_r1, mmio_w1, mmio_r2, mmio_w2, mmio_r4, mmio_w4, mmio_r8, mmio_w8
/* the pc machine's ports (base, length): hvm's devices, KVM's in-kernel ones, and neighbours */
devtab:
        .word 0x3f8, 8          /* COM1 16550 */
        .word 0x70, 2           /* RTC/CMOS */
        .word 0x60, 1           /* i8042 data */
        .word 0x64, 1           /* i8042 status/command */
        .word 0x510, 2          /* fw_cfg */
        .word 0x600, 64         /* ACPI PM (12 ports) and beyond */
        .word 0xe0, 8           /* pc-testdev */
        .word 0x2000, 24        /* pc-testdev IRQ lines */
        .word 0xe9, 1           /* debugcon */
        .word 0xe00, 4          /* pvconsole */
        .word 0xf4, 4           /* debug-exit (writes defused) */
        .word 0x20, 2           /* PIC master (in-kernel) */
        .word 0xa0, 2           /* PIC slave */
        .word 0x4d0, 2          /* ELCR */
        .word 0x40, 4           /* PIT (in-kernel) */
        .word 0x61, 1           /* speaker / PIT gate */
        .word 0x2f8, 8          /* COM2: absent */
        .word 0xcf8, 8          /* PCI configuration: absent */
        .word 0x80, 1           /* POST */
        .word 0x92, 1           /* port A (fast reset, defused) */
        .set NDEV, (. - devtab) / 4
/* ports where string output is not issued (a byte may end the VM or make pvconsole write RAM) */
danger:
        .word DEBUG_EXIT, 4, 0x64, 1, 0x605, 1, 0xcf9, 1, 0x92, 1, PVCON, 4, 0, 0
fw_items:
        .word 0x00, 0x01, 0x03, 0x04, 0x05, 0x0f, 0x19, 0xffff          /* 0xffff: random */
kbd_cmds:                                                               /* 0xff: any byte */
        .byte 0x20, 0x60, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xad
        .byte 0xae, 0xd0, 0xd1, 0xfe, 0xaa, 0x20, 0xff, 0xff
sizes:  .byte 1, 2, 4, 1
key_seed:    .asciz "seed="
key_iters:   .asciz "iters="
key_ops:     .asciz "ops="
key_skip:    .asciz "skip="
key_ends:    .asciz "ends="
key_checks:  .asciz "checks="
msg_check:   .asciz "fuzz: check failed: "
msg_chk_fifo: .asciz "uart-fifo-toggle (LSR.DR set after the FIFOs were turned off)\n"
msg_chk_lsr: .asciz "uart-lsr-irq (IRQ 4 still high after LSR cleared the overrun)\n"
msg_chk_kbd: .asciz "i8042-queue (output buffer still full after 300 commands and 256 reads)\n"
msg_seed:    .asciz "fuzz: seed="
msg_iters:   .asciz " iters="
msg_ops:     .asciz " ops="
msg_ram:     .asciz " ram_end="
msg_done:    .asciz "fuzz: done\n"
msg_nl:      .asciz "\n"
        .p2align 2
mbi:         .long 0
ram_end:     .long 0
seed:        .long 1
iters:       .long 1000
ops_mask:    .long 0xffff
skip_port:   .long 0xffffffff
left:        .long 0
rng:         .long 0
ends_ok:     .byte 0
checks_on:   .byte 0xff
        .p2align 3
idtr:        .word 256 * 8 - 1
             .long idt
        .p2align 3
qword:       .quad 0
        .p2align 4
desc:        .quad 0            /* pvconsole descriptor: addr, len, used */
             .long 0, 0

        .section .bss
        .p2align 4
idt:         .skip 256 * 8
iobuf:       .skip IOBUF_SIZE
stack:       .skip 4096
stack_top:
