/* rtc_irq: the MC146818 RTC's update cycle and interrupts, seen by a real-mode guest (machine: pc).
 * 1. Waits for register A's UIP to read 1 and then 0 (as SeaBIOS and Linux do before reading the time);
 *    prints "uip 1->0". A clock that never shows UIP fails after ~200000 reads.
 * 2. Sets the alarm 2 s ahead (seconds only: minutes and hours 0xFF, "don't care"), enables AIE and
 *    waits with HLT for IRQ 8 through the PIC (slave input 0, vector 0x70 as the BIOS programs it). The
 *    handler reads register C (which lowers IRQ 8) and sends the EOIs; prints "alarm C=xx" with that value.
 * 3. The same with UIE: "update C=xx".
 * Then "rtc ok" and isa-debug-exit with 1 (status 3); a failure prints "fail: ..." and writes 2 (status 5).
 * The periodic rate is set to 0 (no PF), so C reads IRQF|AF|UF = b0 and IRQF|UF = 90. */
#include "uart.inc"
        .set RTC_INDEX, 0x70
        .set RTC_DATA, 0x71
        .set IRQ8_VECTOR, 0x70

.macro RTC_READ reg
        mov $\reg, %al
        out %al, $RTC_INDEX
        in $RTC_DATA, %al
.endm
.macro RTC_WRITE reg
        mov %al, %ah
        mov $\reg, %al
        out %al, $RTC_INDEX
        mov %ah, %al
        out %al, $RTC_DATA
.endm

        .code16
        .globl _start
_start:
        REAL_MODE_START
        movw $irq8, IRQ8_VECTOR * 4
        movw $0, IRQ8_VECTOR * 4 + 2
        mov $0xfb, %al          /* master PIC: only the cascade (no PIT ticks waking the HLTs) */
        out %al, $0x21
        mov $0xfe, %al          /* slave PIC: IRQ 8 only */
        out %al, $0xa1

        /* 1. UIP 0 -> 1 -> 0 */
        mov $200000, %ecx
1:      RTC_READ 0x0a
        test $0x80, %al
        jnz 2f
        dec %ecx
        jnz 1b
        jmp fail_uip
2:      RTC_READ 0x0a
        test $0x80, %al
        jz 3f
        dec %ecx
        jnz 2b
        jmp fail_uip
3:      mov $msg_uip, %si
        call puts

        /* 2. the alarm */
        mov $0x20, %al          /* A: 32.768 kHz, no periodic rate */
        RTC_WRITE 0x0a
        mov $0x06, %al          /* B: binary, 24 h, no interrupts */
        RTC_WRITE 0x0b
        RTC_READ 0x00           /* seconds, just updated */
        add $2, %al
        cmp $60, %al
        jb 4f
        sub $60, %al
4:      RTC_WRITE 0x01          /* seconds alarm */
        mov $0xff, %al
        RTC_WRITE 0x03          /* minutes: don't care */
        mov $0xff, %al
        RTC_WRITE 0x05          /* hours: don't care */
        RTC_READ 0x0c           /* clear the flags */
        movb $0, flag
        mov $0x26, %al          /* B: AIE */
        RTC_WRITE 0x0b
        call wait_irq
        mov $msg_alarm, %si
        call puts
        call print_c

        /* 3. update-ended */
        mov $0x06, %al
        RTC_WRITE 0x0b
        RTC_READ 0x0c
        movb $0, flag
        mov $0x16, %al          /* B: UIE */
        RTC_WRITE 0x0b
        call wait_irq
        mov $0x06, %al
        RTC_WRITE 0x0b
        mov $msg_update, %si
        call puts
        call print_c

        mov $msg_ok, %si
        call puts
        mov $1, %al
        out %al, $DEBUG_EXIT
        cli
        hlt

fail_uip:
        mov $msg_fail_uip, %si
        call puts
        mov $2, %al
        out %al, $DEBUG_EXIT
        cli
        hlt

/* HLT with interrupts on until the handler has run; the watchdog (--timeout) bounds it. */
wait_irq:
        sti
1:      hlt
        cmpb $0, flag
        je 1b
        cli
        ret

irq8:   push %ax
        RTC_READ 0x0c           /* register C: the flags; lowers IRQ 8 */
        mov %al, cval
        movb $1, flag
        mov $0x20, %al          /* EOI to the slave, then the master */
        out %al, $0xa0
        out %al, $0x20
        pop %ax
        iret

/* "xx\n": cval in hex */
print_c:
        mov cval, %al
        shr $4, %al
        call hexdigit
        mov %al, hexbuf
        mov cval, %al
        and $0x0f, %al
        call hexdigit
        mov %al, hexbuf + 1
        mov $hexbuf, %si
        call puts
        ret
hexdigit:
        add $'0', %al
        cmp $'9', %al
        jbe 1f
        add $'a' - '9' - 1, %al
1:      ret

puts:
        UART_PUTS_BODY

flag:   .byte 0
cval:   .byte 0
hexbuf: .asciz "xx\n"
msg_uip:        .asciz "uip 1->0\n"
msg_alarm:      .asciz "alarm C="
msg_update:     .asciz "update C="
msg_ok:         .asciz "rtc ok\n"
msg_fail_uip:   .asciz "fail: UIP never went 1 -> 0\n"
