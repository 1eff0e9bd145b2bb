/* vcon: a virtio-console driver in a page of firmware: the virtio 1.x virtio-mmio handshake, then the
 * transmit queue (and, in echo mode, the receive queue), polling the used rings (interrupts suppressed
 * with VRING_AVAIL_F_NO_INTERRUPT). The virtio twin of firmware/pvcon.S (docs/paravirt.md, the console
 * rows of `make bench`, tests/test_virtio_console.py).
 * Flat 32-bit protected mode (`boot: {mode: protected, load: 0x100000}`). Header at fixed offsets:
 *   +4 iterations (u32)   +8 the device's MMIO base (u32, 0xd0000000 as built: the first virtio slot)
 *   +12 mode (u32): 0 print the line `iterations` times, one buffer and one notify each;
 *                   1 echo: receive console input, send it back upper-cased, until a 'q', then "bye\n";
 *                   2 print the line `iterations` times, QSIZE (8) buffers per notify (virtio's batching).
 * Exits: 35 MMIO accesses for the handshake (counted in the comments below), then in mode 0 one MMIO write
 * (QueueNotify) per line, in mode 2 one per 8 lines, in mode 1 one per receive buffer posted and one per
 * buffer sent; then the debug-exit write (port 0xf4) with
 *   0 (status 1) done, 1 (status 3) no virtio-console v2 at the base, 2 (status 5) features or queue
 *   size refused, 3 (status 7) a buffer the device did not complete. */
#include "header.inc"
#include "virtio.inc"
#include "virtio_driver.inc"
        .set RXQ, 0x200000              /* queue 0, receiveq */
        .set TXQ, 0x201000              /* queue 1, transmitq */
        .set RXBUF, 0x202000
        .set RXBUF_LEN, 256
        .set TXBUF, 0x203000
        .set POLL_LIMIT, 1000000        /* the device completes a transmit buffer within the notify exit */
        .set DEBUG_EXIT, 0xf4
        .set LINE_LEN, line_end - line
        .set BYE_LEN, bye_end - bye
        .code32
        VIRTIO_HEADER
        VIRTIO_START
        VIRTIO_PROBE 3                          /* probe: 3 reads */
        VIRTIO_ACK_VERSION_1                    /* reset, ACKNOWLEDGE, DRIVER, VERSION_1 offered: 5 */
        VIRTIO_ACCEPT_FEATURES $0               /* accept only VERSION_1, FEATURES_OK read back: 6 */
        xor %edx, %edx                          /* two queues: 10 accesses each */
        mov $RXQ, %edi
        call setup_queue
        mov $1, %edx
        mov $TXQ, %edi
        call setup_queue
        VIRTIO_DRIVER_OK                        /* 1 write: 35 in all */
        mov mode, %eax
        cmp $1, %eax
        je echo
        ja batch
        mov iterations, %ebp
        test %ebp, %ebp
        jz done
1:      mov $line, %eax
        mov $LINE_LEN, %ecx
        call send
        dec %ebp
        jnz 1b
        VIRTIO_EXITS

/* echo: one receive buffer at a time; what arrives goes back upper-cased through send. */
echo:
post:   VQ_DESC RXQ, 0, $RXBUF, $RXBUF_LEN, $D_WRITE      /* descriptor 0: RXBUF, device-writable */
        VQ_PUBLISH_HEAD0 RXQ, 0                 /* the device fills it now or when input comes */
        mov %eax, %ebp                          /* ebp: the receive queue's avail.idx */
3:      cmp RXQ + USED + 2, %bp                 /* no bound: input takes what time it takes (hvm's timeout) */
        jne 3b
        lea -1(%ebp), %eax
        and $QSIZE - 1, %eax
        mov RXQ + USED + 8(,%eax,8), %ecx       /* used.ring[i].len */
        cmp $RXBUF_LEN, %ecx
        ja stuck
        mov $RXBUF, %esi
        mov $TXBUF, %edi
        jecxz 6f
4:      lodsb
        cmp $'q', %al
        je 7f
        cmp $'a', %al
        jb 5f
        cmp $'z', %al
        ja 5f
        sub $0x20, %al
5:      stosb
        loop 4b
6:      mov %edi, %ecx                          /* send what came, then post the buffer again */
        sub $TXBUF, %ecx
        jz post
        mov $TXBUF, %eax
        call send
        jmp post
7:      mov %edi, %ecx                          /* 'q': what came before it, then bye */
        sub $TXBUF, %ecx
        jz 8f
        mov $TXBUF, %eax
        call send
8:      mov $bye, %eax
        mov $BYE_LEN, %ecx
        call send
        jmp done

/* batch: up to QSIZE descriptors of the line made available at once, one notify for all of them. */
batch:  mov iterations, %ebp
1:      test %ebp, %ebp
        jz done
        mov $QSIZE, %edx
        cmp %edx, %ebp
        jae 2f
        mov %ebp, %edx                          /* edx = min(QSIZE, lines left) */
2:      sub %edx, %ebp
        movzwl TXQ + AVAIL + 2, %esi
        xor %edi, %edi
3:      mov %edi, %eax                          /* descriptor k: the line */
        shl $4, %eax
        movl $line, TXQ(%eax)
        movl $0, TXQ + 4(%eax)
        movl $LINE_LEN, TXQ + 8(%eax)
        movw $0, TXQ + 12(%eax)
        mov %esi, %ecx
        and $QSIZE - 1, %ecx
        mov %di, TXQ + AVAIL + 4(,%ecx,2)       /* avail.ring[idx % size] = k */
        inc %esi
        inc %edi
        cmp %edx, %edi
        jb 3b
        mov %si, TXQ + AVAIL + 2                /* publish all of them */
        movl $1, R_QUEUE_NOTIFY(%ebx)           /* one exit for the batch */
        call wait_tx
        jmp 1b

/* send: the %ecx bytes at %eax as one transmit buffer (descriptor 0), one notify, then wait for the
 * used ring. Clobbers eax, ecx, esi. */
send:   VQ_DESC TXQ, 0, %eax, %ecx, $0          /* device-readable, no next */
        VQ_PUBLISH_HEAD0 TXQ, 1                 /* the one exit per buffer */
        mov %eax, %esi
/* wait_tx: until the transmit queue's used.idx is %si (clobbers ecx). */
wait_tx:
        VQ_WAIT_USED TXQ, %si
        ret

        VIRTIO_SETUP_QUEUE_ROUTINE

line:   .ascii "one line, printed three ways\n"
line_end:
bye:    .ascii "bye\n"
bye_end:
