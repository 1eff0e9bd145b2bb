/* s3: ACPI S3 (suspend to RAM) and resume, as an OS does it (machine: pc). Real mode, loaded at 0x7c00.
 *
 * Finds the FACS as an OS does (RSDP at 0xE0000 -> RSDT -> its first entry, the FADT -> FIRMWARE_CTRL),
 * writes its own resume code's address to the FACS's firmware waking vector (offset 12), leaves a marker in
 * RAM, and writes SLP_TYP=1 (the DSDT's \_S3) | SLP_EN to PM1a control. The machine sleeps; on a wake-up
 * the firmware (hvm) enters the vector in real mode (CS = vector >> 4, IP = vector & 0xF), and the resume
 * code prints where it was entered, whether the marker survived and the PM1 status it finds.
 *
 * Mode, from BX at boot (boot.regs: {rbx: N}):
 *   0  sleep; something else wakes the machine (QMP system_wakeup, the power button)
 *   1  set the RTC alarm to "every second" (don't-care alarm bytes), AIE and PM1 RTC_EN, then sleep
 *   2  a waking vector above 1 MiB (0x200000): the wake-up must reset the machine
 *   3  no waking vector (0): the wake-up must reset the machine, as SeaBIOS reboots
 * Ends through isa-debug-exit: status 33 after the resume, 35 if the machine did not sleep (the code after
 * the SLP_EN write ran), 37 if the tables were not found. */
#include "uart.inc"
        .code16
        .set PM1_STS, 0x600
        .set PM1_EN, 0x602
        .set PM1_CNT, 0x604
        .set SLP_S3, (1 << 10) | (1 << 13) | 1   /* SLP_TYP=1, SLP_EN, SCI_EN */
        .set MARKER, 0x6000                     /* RAM the resume path checks */
        .set MAGIC, 0x53335253                  /* "SR3S" */
        .set SAVED_CS, 0x6004
        .set SAVED_IP, 0x6006
        .set MODE, 0x6008
        .globl _start
_start:
        cli
        xor %ax, %ax
        mov %ax, %ds
        mov %bx, MODE
        REAL_MODE_START
        mov $msg_boot, %si
        call puts

        /* RSDP at 0xE0000: RSDT address at +16 */
        mov $0xE000, %ax
        mov %ax, %es
        mov %es:16, %eax
        call to_es_di
        mov %es:36(%di), %eax            /* RSDT's first entry: the FADT */
        call to_es_di
        cmpl $0x50434146, %es:(%di)      /* "FACP" */
        jne no_facs
        mov %es:36(%di), %eax            /* FADT FIRMWARE_CTRL: the FACS */
        call to_es_di
        cmpl $0x53434146, %es:(%di)      /* "FACS" */
        jne no_facs

        mov $resume, %eax                /* mode 0, 1: our own resume code */
        mov MODE, %bx
        cmp $2, %bx
        jne 1f
        mov $0x200000, %eax
1:      cmp $3, %bx
        jne 1f
        xor %eax, %eax
1:      mov %eax, %es:12(%di)            /* FACS firmware waking vector */

        cmpw $1, MODE
        jne 1f
        mov $0x01, %al                   /* RTC alarm seconds, minutes, hours: don't care (0xC0-0xFF) */
        call rtc_dont_care
        mov $0x03, %al
        call rtc_dont_care
        mov $0x05, %al
        call rtc_dont_care
        mov $0x0b, %al                   /* register B: AIE */
        out %al, $0x70
        in $0x71, %al
        or $0x20, %al
        out %al, $0x71
        mov $PM1_EN, %dx                 /* RTC_EN */
        mov $(1 << 10), %ax
        out %ax, %dx

1:      movl $MAGIC, MARKER
        mov $msg_sleep, %si
        call puts
        mov $PM1_CNT, %dx
        mov $SLP_S3, %ax
        out %ax, %dx                     /* the machine sleeps here */
        mov $msg_awake, %si
        call puts
        mov $0x11, %al                   /* status 35 */
        jmp exit

no_facs:
        mov $msg_nofacs, %si
        call puts
        mov $0x12, %al                   /* status 37 */
        jmp exit

/* al = CMOS index: write 0xFF there */
rtc_dont_care:
        out %al, $0x70
        mov $0xff, %al
        out %al, $0x71
        ret

/* eax = physical address below 1 MiB -> es:di */
to_es_di:
        mov %eax, %edx
        shr $4, %edx
        mov %dx, %es
        and $0xf, %ax
        mov %ax, %di
        ret

/* The waking vector: entered in real mode with CS:IP from the vector, registers 0, interrupts off. */
resume:
        mov %cs, %ax                     /* where we were entered, before anything changes it */
        call 2f
2:      pop %bx
        sub $(2b - resume), %bx          /* IP of `resume` as entered */
        ljmp $0, $3f                     /* the code is linked for CS = 0 */
3:      xor %cx, %cx
        mov %cx, %ds
        mov %cx, %es
        mov %cx, %ss
        mov $0x7000, %sp
        mov %ax, SAVED_CS
        mov %bx, SAVED_IP
        UART_INIT                        /* devices were reset by the wake-up */
        mov $msg_resumed, %si
        call puts
        mov SAVED_CS, %ax
        call puthex
        mov $':', %al
        call putc
        mov SAVED_IP, %ax
        call puthex
        mov $msg_marker, %si
        call puts
        mov $msg_kept, %si
        cmpl $MAGIC, MARKER
        je 1f
        mov $msg_lost, %si
1:      call puts
        mov $msg_sts, %si
        call puts
        mov $PM1_STS, %dx
        in %dx, %ax
        push %ax
        call puthex
        mov $msg_nl, %si
        call puts
        pop %ax
        mov $PM1_STS, %dx
        out %ax, %dx                     /* write 1s to clear what was set */
        in %dx, %ax
        mov %ax, %cx
        mov $msg_cleared, %si
        call puts
        mov %cx, %ax
        call puthex
        mov $msg_nl, %si
        call puts
        mov $0x10, %al                   /* status 33: resumed */
exit:   out %al, $DEBUG_EXIT
        cli
        hlt

/* ax -> four hex digits */
puthex:
        mov $4, %cx
1:      rol $4, %ax
        push %ax
        and $0xf, %al
        add $'0', %al
        cmp $'9', %al
        jbe 2f
        add $('a' - '9' - 1), %al
2:      push %cx
        call putc
        pop %cx
        pop %ax
        loop 1b
        ret

/* al -> the UART */
putc:
        push %dx
        mov %al, %ah
        mov $COM1_LSR, %dx
1:      in %dx, %al
        test $LSR_THRE, %al
        jz 1b
        mov %ah, %al
        mov $COM1, %dx
        out %al, %dx
        pop %dx
        ret

puts:
        UART_PUTS_BODY

msg_boot:    .asciz "s3: booted\n"
msg_sleep:   .asciz "s3: sleeping\n"
msg_awake:   .asciz "s3: did not sleep\n"
msg_nofacs:  .asciz "s3: no FACS\n"
msg_resumed: .asciz "s3: resumed at "
msg_marker:  .asciz "\ns3: marker "
msg_kept:    .asciz "kept\n"
msg_lost:    .asciz "lost\n"
msg_sts:     .asciz "s3: pm1_sts="
msg_cleared: .asciz "s3: pm1_sts after clear="
msg_nl:      .asciz "\n"
