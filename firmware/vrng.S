/* vrng: a virtio-rng driver in firmware (tests/test_virtio_rng.py): the virtio 1.x virtio-mmio handshake,
 * then `iterations` requests of 64 bytes of entropy through the request queue, polling its used ring
 * (interrupts suppressed with VRING_AVAIL_F_NO_INTERRUPT).
 * Flat 32-bit protected mode (`boot: {mode: protected, load: 0x100000}`). Header at fixed offsets:
 *   +4 iterations (u32)   +8 the device's MMIO base (u32, 0xd0000000 as built: the first virtio slot)
 *   +12 mode (u32): 0 the requests;
 *                   1 first a hostile request (a buffer in the PCI hole, 0xc0000000): the device must
 *                     refuse it with DEVICE_NEEDS_RESET and complete nothing; then reset, the whole
 *                     handshake again, and the requests.
 * Each request: the buffer zeroed, made available, one QueueNotify; the device must return it used with
 * length 64 and not 64 zero bytes (odds 2^-512 of a false alarm). Then the debug-exit write (port 0xf4):
 *   0 (status 1) done, 1 (status 3) no virtio-rng v2 at the base, 2 (status 5) features or queue size
 *   refused, 3 (status 7) a request not completed or with another length, 4 (status 9) the hostile request
 *   was not refused, 5 (status 11) a buffer came back all zeros. */
#include "header.inc"
#include "virtio.inc"
        .set RQ, 0x200000               /* queue 0, requestq */
        .set BUF, 0x201000
        .set BUF_LEN, 64
        .set HOLE, 0xc0000000           /* the PCI hole: no guest RAM */
        .set POLL_LIMIT, 1000000        /* the device completes a request within the notify exit */
        .set DEBUG_EXIT, 0xf4
        .code32
        PATCHED_HEADER
base:   .long 0xd0000000
mode:   .long 0
start:
        cli
        cld
        mov $0x90000, %esp
        mov base, %ebx
        call handshake
        cmpl $1, mode
        jne requests
        mov $HOLE, %eax                         /* the hostile request */
        call post
        mov R_STATUS(%ebx), %eax
        test $S_NEEDS_RESET, %eax
        jz not_refused
        cmpw $0, RQ + USED + 2                  /* and nothing completed */
        jne not_refused
        call handshake                          /* starts with a reset (status 0) */
requests:
        mov iterations, %ebp
        test %ebp, %ebp
        jz done
1:      mov $BUF, %edi                          /* zero the buffer */
        xor %eax, %eax
        mov $BUF_LEN / 4, %ecx
        rep stosl
        mov $BUF, %eax
        call post
        mov $POLL_LIMIT, %ecx                   /* until used.idx == avail.idx */
        mov RQ + AVAIL + 2, %dx
2:      cmp RQ + USED + 2, %dx
        je 3f
        loop 2b
        jmp stuck
3:      dec %edx
        and $QSIZE - 1, %edx
        cmpl $BUF_LEN, RQ + USED + 8(,%edx,8)   /* used.ring[i].len */
        jne stuck
        mov $BUF, %esi                          /* any bit set in the 64 bytes? */
        xor %eax, %eax
        mov $BUF_LEN / 4, %ecx
4:      or (%esi), %eax
        add $4, %esi
        loop 4b
        test %eax, %eax
        jz zeros
        dec %ebp
        jnz 1b
done:   xor %eax, %eax
exit:   out %al, $DEBUG_EXIT
        cli
5:      hlt
        jmp 5b
no_device:
        mov $1, %al
        jmp exit
refused:
        mov $2, %al
        jmp exit
stuck:  mov $3, %al
        jmp exit
not_refused:
        mov $4, %al
        jmp exit
zeros:  mov $5, %al
        jmp exit

/* post: descriptor 0 = BUF_LEN device-writable bytes at %eax, made available, one notify. */
post:   mov %eax, RQ
        movl $0, RQ + 4
        movl $BUF_LEN, RQ + 8
        movw $2, RQ + 12                        /* VIRTQ_DESC_F_WRITE, no next */
        movzwl RQ + AVAIL + 2, %eax
        mov %eax, %ecx
        and $QSIZE - 1, %ecx
        movw $0, RQ + AVAIL + 4(,%ecx,2)        /* avail.ring[idx % size] = 0 */
        inc %eax
        mov %ax, RQ + AVAIL + 2                 /* publish (x86 keeps the stores in order) */
        movl $0, R_QUEUE_NOTIFY(%ebx)
        ret

/* handshake: probe, reset, ACKNOWLEDGE, DRIVER, VERSION_1 only, FEATURES_OK, queue 0, DRIVER_OK. */
handshake:
        mov R_MAGIC(%ebx), %eax
        cmp $MAGIC, %eax
        jne no_device
        mov R_VERSION(%ebx), %eax
        cmp $2, %eax
        jne no_device
        mov R_DEVICE_ID(%ebx), %eax
        cmp $4, %eax
        jne no_device
        movl $0, R_STATUS(%ebx)
        movl $S_ACK, R_STATUS(%ebx)
        movl $S_ACK | S_DRIVER, R_STATUS(%ebx)
        movl $1, R_DEV_FEATURES_SEL(%ebx)       /* VIRTIO_F_VERSION_1 (bit 32) offered */
        mov R_DEV_FEATURES(%ebx), %eax
        test $1, %eax
        jz refused
        movl $0, R_DRV_FEATURES_SEL(%ebx)       /* accept only VERSION_1 */
        movl $0, R_DRV_FEATURES(%ebx)
        movl $1, R_DRV_FEATURES_SEL(%ebx)
        movl $1, R_DRV_FEATURES(%ebx)
        movl $S_ACK | S_DRIVER | S_FEATURES_OK, R_STATUS(%ebx)
        mov R_STATUS(%ebx), %eax
        test $S_FEATURES_OK, %eax
        jz refused
        mov $RQ, %edi                           /* the queue's memory zeroed: indices 0 again */
        xor %eax, %eax
        mov $USED / 4 + 0x40, %ecx
        rep stosl
        movw $1, RQ + AVAIL                     /* VRING_AVAIL_F_NO_INTERRUPT: this driver polls */
        movl $0, R_QUEUE_SEL(%ebx)
        mov R_QUEUE_NUM_MAX(%ebx), %eax
        cmp $QSIZE, %eax
        jb refused
        movl $QSIZE, R_QUEUE_NUM(%ebx)
        movl $RQ, R_QUEUE_DESC(%ebx)
        movl $0, R_QUEUE_DESC + 4(%ebx)
        movl $RQ + AVAIL, R_QUEUE_DRIVER(%ebx)
        movl $0, R_QUEUE_DRIVER + 4(%ebx)
        movl $RQ + USED, R_QUEUE_DEVICE(%ebx)
        movl $0, R_QUEUE_DEVICE + 4(%ebx)
        movl $1, R_QUEUE_READY(%ebx)
        movl $S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK, R_STATUS(%ebx)
        ret
