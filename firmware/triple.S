/* triple: a guest that triple-faults. Flat 32-bit protected mode (boot mode: protected), IDT limit 0:
 * UD2 raises #UD, which cannot be delivered (#GP), nor can that (#DF), nor the double fault ->
 * shutdown, which KVM reports as KVM_EXIT_SHUTDOWN. (Done in protected mode because real-mode
 * IDT limits are not checked by every KVM backend.) */
#include "uart.inc"
        .code32
        .globl _start
_start:
        UART_INIT
        mov $msg, %esi
        call puts
        lidt idt_empty
        ud2
        hlt
puts:
        UART_PUTS_BODY
idt_empty:
        .word 0
        .long 0
msg:    .asciz "about to triple fault\n"
