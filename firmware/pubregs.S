/* pubregs: the published port registers (hvm/mmio/published.py; tests/test_published_regs.py).
 * Real mode at 0x7c00, header patched by the test (firmware/header.inc): +4 iterations (u32, >= 1),
 * +8 verbose (u16: 0 as built).
 * 1. COM1's scratch register (0x3ff, a published latch): `iterations` one-byte OUT/IN pairs of a sequence
 *    of values; prints "S <checksum> <mismatches>".
 * 2. A word OUT of 0xabcd and a word IN at 0x3ff (not the latch's size: the UART's Python keeps the low
 *    byte), then a byte IN; prints "W <word> <byte>".
 * 3. The ACPI PM timer (0x608, a published clock counter): a 4-byte IN, a 2-byte IN (Python's path),
 *    a 4-byte IN; checks that the 2-byte value lies between the others, which are less than 0x8000 ticks
 *    apart (ok = 1); prints "T <ok>", or with verbose "T <t1> <t2> <t3> <ok>" (timing-dependent values).
 * Then writes 0 to the debug-exit port (status 1). Every line has a fixed width, so every run takes the
 * same number of exits. No LSR polling: hvm's UART transmits at once. */
#include "header.inc"
        .code16
        PATCHED_HEADER
verbose:        .word 0
        .p2align 2
start:
        cli
        xor %ax, %ax
        mov %ax, %ds
        mov %ax, %ss
        mov $0x7c00, %sp
        mov iterations, %ecx
        xor %esi, %esi          /* checksum: rol 5, add each value read */
        xor %edi, %edi          /* reads that differ from the value written */
        mov $0x3ff, %dx
        mov $0x11, %bl
1:      mov %bl, %al
        out %al, (%dx)
        in (%dx), %al
        cmp %bl, %al
        je 2f
        inc %edi
2:      movzbl %al, %eax
        rol $5, %esi
        add %eax, %esi
        add $37, %bl
        addr32 loop 1b
        mov $'S', %al
        call putc
        mov %esi, %eax
        call hex32
        mov %edi, %eax
        call hex32
        call newline

        mov $0x3ff, %dx
        mov $0xabcd, %ax
        out %ax, (%dx)
        xor %eax, %eax
        in (%dx), %ax
        mov %eax, %esi
        xor %eax, %eax
        in (%dx), %al
        mov %eax, %edi
        mov $'W', %al
        call putc
        mov %esi, %eax
        call hex32
        mov %edi, %eax
        call hex32
        call newline

        mov $0x608, %dx
        in (%dx), %eax
        mov %eax, %esi
        xor %eax, %eax
        in (%dx), %ax
        mov %eax, %edi
        in (%dx), %eax
        mov %eax, %ebp
        mov %ebp, %eax          /* t3 - t1, 24 bits */
        sub %esi, %eax
        and $0xffffff, %eax
        mov %edi, %ecx          /* t2 - t1, 16 bits */
        sub %esi, %ecx
        and $0xffff, %ecx
        xor %ebx, %ebx
        cmp $0x8000, %eax
        jae 4f
        cmp %eax, %ecx
        ja 4f
        inc %ebx
4:      mov $'T', %al
        call putc
        cmpw $0, verbose
        je 5f
        mov %esi, %eax
        call hex32
        mov %edi, %eax
        call hex32
        mov %ebp, %eax
        call hex32
5:      mov %ebx, %eax
        call hex32
        call newline

        xor %al, %al
        out %al, $0xf4
        cli
3:      hlt
        jmp 3b

/* " " and %eax as 8 hex digits on COM1. */
hex32:  push %cx
        push %eax
        mov $' ', %al
        call putc
        pop %eax
        mov $8, %cx
1:      rol $4, %eax
        push %eax
        and $0xf, %al
        add $'0', %al
        cmp $'9', %al
        jbe 2f
        add $7, %al
2:      call putc
        pop %eax
        loop 1b
        pop %cx
        ret

newline:
        mov $'\n', %al
putc:   push %dx
        mov $0x3f8, %dx
        out %al, (%dx)
        pop %dx
        ret
