/* pci: enumerates PCI bus 0 through configuration mechanism #1 (0xCF8/0xCFC) and exercises pci-testdev
 * (tests/test_pci.py). Flat 32-bit protected mode (`boot: {mode: protected, load: 0x100000}`, machine pc).
 * Prints, on COM1:
 *   pci 00:DD.0 VVVV:DDDD class CCCCCC     for every device of bus 0 (function 0)
 *   bus1 XXXXXXXX / disabled XXXXXXXX      a read of bus 1, and one with the enable bit clear (all ones)
 *   ecam XXXXXXXX XXXXXXXX XXXXXXXX        through ECAM at 0xe0000000: 00:00.0's and 00:01.0's IDs, and
 *                                          00:01.0's offset 0x100 (no extended space: all ones)
 * and, when a 1b36:0005 was found:
 *   bar0 XXXXXXXX bar1 XXXXXXXX            its BARs as the firmware (hvm) assigned them
 *   size0 XXXXXXXX size1 XXXXXXXX          what reads back after writing all ones (then restored)
 *   mem NAME offset XXXXXXXX data XX count XXXXXXXX    each BAR0 test after 16 writes of its data
 *   io NAME offset XXXXXXXX data XX count XXXXXXXX     each BAR1 test, through ports
 *   off XXXXXXXX on XXXXXXXX               BAR0+16 with memory decoding off (command 0), then on again
 *   moved XXXXXXXX old XXXXXXXX            BAR0+16 once BAR0 is moved to 0xc8000000, and at the old place
 * then writes 0 to the debug-exit port (status 1). */
#include "uart.inc"
        .set CONFIG_ADDRESS, 0xcf8
        .set CONFIG_DATA, 0xcfc
        .set TESTDEV, 0x8000            /* scratch: the config address of pci-testdev (0: none) */
        .set MOVED, 0xc8000000
        .set ECAM, 0xe0000000

/* BAR_FIELD label, offset, fn: print the string at label, then call fn with eax = pci-testdev's config address
 * (edi) + offset */
.macro BAR_FIELD label, offset, fn
        mov $\label, %esi
        call puts
        lea \offset(%edi), %eax
        call \fn
.endm

        .code32
        .globl _start
_start:
        mov $0x90000, %esp
        UART_INIT
        movl $0, TESTDEV
        xor %ebp, %ebp                  /* device number */
scan:   mov %ebp, %edi
        shl $11, %edi
        or $0x80000000, %edi            /* function 0 of device ebp, register 0 */
        mov %edi, %eax
        call cfg_read
        cmp $0xffffffff, %eax
        je next
        mov %eax, %ebx
        mov $s_pci, %esi
        call puts
        mov %ebp, %eax
        mov $2, %ecx
        call hex
        mov $s_fn0, %esi
        call puts
        movzwl %bx, %eax
        mov $4, %ecx
        call hex
        mov $':', %al
        call putc
        mov %ebx, %eax
        shr $16, %eax
        mov $4, %ecx
        call hex
        mov $s_class, %esi
        call puts
        lea 8(%edi), %eax
        call cfg_read
        shr $8, %eax
        mov $6, %ecx
        call hex
        call newline
        cmp $0x00051b36, %ebx
        jne next
        mov %edi, TESTDEV
next:   inc %ebp
        cmp $32, %ebp
        jb scan

        mov $s_bus1, %esi
        call puts
        mov $0x80010000, %eax
        call cfg_read
        call hex8
        mov $s_disabled, %esi
        call puts
        mov $0x00000800, %eax           /* device 1 with the enable bit clear */
        call cfg_read
        call hex8
        call newline

        /* ECAM (MMCONFIG): 00:00.0 and 00:01.0's IDs, and 00:01.0's first extended dword */
        mov $s_ecam, %esi
        call puts
        mov ECAM, %eax
        call hex8
        mov $' ', %al
        call putc
        mov ECAM + 0x8000, %eax
        call hex8
        mov $' ', %al
        call putc
        mov ECAM + 0x8100, %eax
        call hex8
        call newline

        mov TESTDEV, %edi
        test %edi, %edi
        jz done

        /* the BARs as assigned, and the sizing protocol */
        BAR_FIELD s_bar0, 0x10, cfg_read
        mov %eax, %ebx                  /* ebx = BAR0 */
        call hex8
        BAR_FIELD s_bar1, 0x14, cfg_read
        mov %eax, %ebp                  /* ebp = BAR1 */
        call hex8
        call newline
        BAR_FIELD s_size0, 0x10, size_bar
        BAR_FIELD s_size1, 0x14, size_bar
        call newline

        /* BAR0's tests: memory accesses */
        and $0xfffffff0, %ebx
        xor %ecx, %ecx
memtest:
        movb %cl, (%ebx)                /* start test ecx */
        movzbl 8(%ebx), %eax            /* data */
        mov 4(%ebx), %edx               /* offset */
        push %ecx
        mov $16, %ecx
1:      movb %al, (%ebx,%edx)
        loop 1b
        mov $s_mem, %esi
        call puts
        lea 16(%ebx), %esi              /* the name, read from the device */
        call puts
        mov $s_offset, %esi
        call puts
        mov 4(%ebx), %eax
        call hex8
        mov $s_data, %esi
        call puts
        movzbl 8(%ebx), %eax
        mov $2, %ecx
        call hex
        mov $s_count, %esi
        call puts
        mov 12(%ebx), %eax
        call hex8
        call newline
        pop %ecx
        inc %ecx
        cmp $3, %ecx
        jb memtest

        /* BAR1's tests: port accesses */
        and $0xfffc, %ebp
        xor %ecx, %ecx
iotest: mov %ebp, %edx
        mov %cl, %al
        out %al, %dx                    /* start test ecx */
        push %ecx
        mov $s_io, %esi
        call puts
        lea 16(%ebp), %edx
2:      in %dx, %al                     /* the name, a byte at a time */
        test %al, %al
        jz 3f
        push %edx
        call putc
        pop %edx
        inc %edx
        jmp 2b
3:      lea 8(%ebp), %edx
        in %dx, %al
        mov %al, %bl                    /* data */
        lea 4(%ebp), %edx
        in %dx, %eax
        mov %eax, %edi                  /* offset */
        lea (%ebp,%edi), %edx
        mov %bl, %al
        mov $16, %ecx
4:      out %al, %dx
        loop 4b
        mov $s_offset, %esi
        call puts
        mov %edi, %eax
        call hex8
        mov $s_data, %esi
        call puts
        movzbl %bl, %eax
        mov $2, %ecx
        call hex
        mov $s_count, %esi
        call puts
        lea 12(%ebp), %edx
        in %dx, %eax
        call hex8
        call newline
        pop %ecx
        inc %ecx
        cmp $3, %ecx
        jb iotest

        /* decode enable: memory decoding off, then on again (a test is running: BAR0+16 is its name) */
        mov TESTDEV, %edi
        lea 0x10(%edi), %eax
        call cfg_read
        and $0xfffffff0, %eax
        mov %eax, %ebx                  /* ebx = BAR0 base */
        movb $0, (%ebx)                 /* test 0 again: "mmio-no-eventfd" */
        lea 4(%edi), %eax
        mov $0, %ecx
        call cfg_write                  /* command: no decoding */
        mov $s_off, %esi
        call puts
        mov 16(%ebx), %eax
        call hex8
        lea 4(%edi), %eax
        mov $3, %ecx
        call cfg_write                  /* command: I/O and memory */
        mov $s_on, %esi
        call puts
        mov 16(%ebx), %eax
        call hex8
        call newline

        /* move BAR0 */
        lea 0x10(%edi), %eax
        mov $MOVED, %ecx
        call cfg_write
        mov $s_moved, %esi
        call puts
        mov MOVED + 16, %eax
        call hex8
        mov $s_old, %esi
        call puts
        mov 16(%ebx), %eax
        call hex8
        call newline

done:   mov $DEBUG_EXIT, %dx
        xor %eax, %eax
        out %eax, %dx
        cli
        hlt

/* eax = config address -> eax = the dword there */
cfg_read:
        mov $CONFIG_ADDRESS, %dx
        out %eax, %dx
        mov $CONFIG_DATA, %dx
        in %dx, %eax
        ret

/* write ecx at config address eax */
cfg_write:
        mov $CONFIG_ADDRESS, %dx
        out %eax, %dx
        mov $CONFIG_DATA, %dx
        mov %ecx, %eax
        out %eax, %dx
        ret

/* eax = a BAR's config address: print what reads back after all ones, then restore the BAR */
size_bar:
        push %ebx
        mov %eax, %ebx
        call cfg_read
        push %eax                       /* the BAR */
        mov %ebx, %eax
        mov $0xffffffff, %ecx
        call cfg_write
        mov %ebx, %eax
        call cfg_read
        call hex8
        mov %ebx, %eax
        pop %ecx
        call cfg_write
        pop %ebx
        ret

newline:
        mov $'\n', %al
/* al to COM1 (clobbers edx, preserves eax's byte) */
putc:   push %eax
        mov $COM1_LSR, %dx
1:      in %dx, %al
        test $LSR_THRE, %al
        jz 1b
        pop %eax
        mov $COM1, %dx
        out %al, %dx
        ret

/* the NUL-terminated string at esi (in RAM or in an MMIO BAR: read a byte at a time) */
puts:   push %eax
1:      movb (%esi), %al
        test %al, %al
        jz 2f
        call putc
        inc %esi
        jmp 1b
2:      pop %eax
        ret

hex8:   mov $8, %ecx
/* the low ecx hex digits of eax */
hex:    push %ebx
        push %eax
        mov %eax, %ebx
        mov $8, %eax
        sub %ecx, %eax
        shl $2, %eax
        push %ecx
        mov %eax, %ecx
        rol %cl, %ebx                   /* skip the digits not printed */
        pop %ecx
1:      rol $4, %ebx
        mov %ebx, %eax
        and $0xf, %eax
        movb hexdigits(%eax), %al
        push %edx
        call putc
        pop %edx
        loop 1b
        pop %eax
        pop %ebx
        ret

hexdigits:  .ascii "0123456789abcdef"
s_pci:      .asciz "pci 00:"
s_fn0:      .asciz ".0 "
s_class:    .asciz " class "
s_bus1:     .asciz "bus1 "
s_disabled: .asciz " disabled "
s_bar0:     .asciz "bar0 "
s_bar1:     .asciz " bar1 "
s_size0:    .asciz "size0 "
s_size1:    .asciz " size1 "
s_mem:      .asciz "mem "
s_io:       .asciz "io "
s_offset:   .asciz " offset "
s_data:     .asciz " data "
s_count:    .asciz " count "
s_off:      .asciz "off "
s_on:       .asciz " on "
s_moved:    .asciz "moved "
s_old:      .asciz " old "
s_ecam:     .asciz "ecam "
