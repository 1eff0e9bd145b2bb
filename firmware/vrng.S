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
#include "virtio_driver.inc"
        .set RQ, 0x200000               /* queue 0, requestq */
        .set BUF, 0x201000
        .set BUF_LEN, 64
        .set HOLE, 0xc0000000           /* the PCI hole: no guest RAM */
        .set POLL_LIMIT, 1000000        /* the device completes a request within the notify exit */
        .set DEBUG_EXIT, 0xf4
        .code32
        VIRTIO_HEADER
        VIRTIO_START
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
        mov %eax, %edx                          /* until used.idx == avail.idx */
        VQ_WAIT_USED RQ, %dx
        dec %edx
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
        VIRTIO_EXITS
not_refused:
        mov $4, %al
        jmp exit
zeros:  mov $5, %al
        jmp exit

/* post: descriptor 0 = BUF_LEN device-writable bytes at %eax, made available, one notify (1 write).
 * Leaves avail.idx in %eax. */
post:   VQ_DESC RQ, 0, %eax, $BUF_LEN, $D_WRITE         /* no next */
        VQ_PUBLISH_HEAD0 RQ, 0
        ret

/* handshake: probe, reset, ACKNOWLEDGE, DRIVER, VERSION_1 only, FEATURES_OK, queue 0, DRIVER_OK
 * (25 MMIO accesses). */
handshake:
        VIRTIO_PROBE 4
        VIRTIO_ACK_VERSION_1
        VIRTIO_ACCEPT_FEATURES $0
        VIRTIO_ONE_QUEUE_DRIVER_OK RQ
        ret

        VIRTIO_SETUP_QUEUE_ROUTINE
