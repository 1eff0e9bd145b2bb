/* vblk: a virtio-blk driver in firmware (tests/test_vblk_firmware.py, the virtio_blk rows of `make bench`):
 * the virtio 1.x virtio-mmio handshake (VERSION_1, and FLUSH when offered), one request queue of 8
 * descriptors, every request a chain header -> data -> status, one QueueNotify per request, then polling
 * the used ring (interrupts suppressed with VRING_AVAIL_F_NO_INTERRUPT).
 *
 * One image, two ways to boot it, so the same guest runs under hvm and under QEMU:
 *  - a flat 32-bit image loaded at 0x100000 (`boot: {image: ..., load: 0x100000, mode: protected}`), and
 *  - a multiboot kernel (`hvm run --kernel`, `qemu-system-x86_64 -M microvm -kernel`): the multiboot
 *    header at +32 carries the a.out-kludge addresses (load at 0x100000, entry at +0), so no ELF is needed
 *    and the header fields below stay at fixed file offsets for a harness to patch.
 * Header (u32 each): +4 iterations (mode 1: the number of requests; 1000 as built)
 *   +8 the device's MMIO base (0xd0000000 as built: hvm's first virtio slot; 0 = scan QEMU microvm's
 *      virtio-mmio transports, 0xfeb00000 + n * 0x200, then hvm's slots, 0xd0000000 + n * 0x1000)
 *   +12 mode: 0 the read/write/flush/checksum test, 1 throughput (sequential reads)
 *   +16 mode 0: sectors read from sector 0 and checksummed (128 as built: 64 KiB), in requests of <= 64 KiB
 *   +20 mode 1: KiB per read request, 1..64 (4 as built)
 *   +24 mode 0: the first sector written (128 as built)   +28 mode 0: sectors written, 1..128 (16 as built)
 * Mode 0: read sectors [0, +16) and print "vblk: sum 0x%08x\n" on COM1, the checksum h over their
 *   little-endian dwords d in order (h = 0; h = rol(h, 5) + d, mod 2^32); then write the pattern (the
 *   dword at disk byte offset o is 0xb10c0000 ^ (o / 4)) to sectors [+24, +24 + +28) in one request,
 *   FLUSH, read them back in one request into another buffer, compare; print "vblk: ok\n".
 * Mode 1: `iterations` reads of +20 KiB each, sequential from sector 0, back to 0 at the end of the disk;
 *   each one request, one notify, polled to completion. Prints "vblk: done\n".
 * Every request's status byte must be VIRTIO_BLK_S_OK and its used length the bytes the device wrote (data
 * + 1 status byte for a read, 1 otherwise). Then the debug-exit write (port 0xf4), the process status
 * (code << 1) | 1:
 *   0 (status 1) done, 1 (status 3) no virtio-blk v2 at the base (or found by the scan),
 *   2 (status 5) features or queue size refused, 3 (status 7) a request not completed (polling bound),
 *   4 (status 9) a request's status not OK, 5 (status 11) the sectors read back differ from the pattern,
 *   6 (status 13) the disk is smaller than the sectors the header names, 7 (status 15) a used length
 *   other than the bytes the device should have written, 8 (status 17) a header field out of range. */
#include "header.inc"
#include "uart.inc"
#include "virtio.inc"
#include "virtio_driver.inc"
        .set F_FLUSH, 1 << 9            /* VIRTIO_BLK_F_FLUSH */
        .set T_IN, 0
        .set T_OUT, 1
        .set T_FLUSH, 4
        .set RQ, 0x200000               /* queue 0, requestq */
        .set REQ, 0x201000              /* the request header: type, reserved, sector (u64) */
        .set STATUS_BYTE, 0x201010
        .set BUF, 0x210000              /* 64 KiB: reads, the pattern */
        .set BUF2, 0x220000             /* 64 KiB: the read-back */
        .set MAX_SECTORS, 128           /* 64 KiB per request */
        .set POLL_LIMIT, 50000000       /* with an ioeventfd the device completes after the notify returns */
        .set MICROVM_BASE, 0xfeb00000
        .set MICROVM_SLOTS, 32
        .set MICROVM_STRIDE, 0x200
        .set HVM_BASE, 0xd0000000
        .set HVM_SLOTS, 8
        .set HVM_STRIDE, 0x1000
        .set PATTERN, 0xb10c0000
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00010000       /* a.out kludge: the addresses below, no ELF */
        .set LOAD, 0x100000
        .code32
        VIRTIO_HEADER                           /* base: HVM_BASE */
sectors: .long 128
kib:    .long 4
wsector: .long 128
wcount: .long 16
mb_header:                              /* +32 */
        .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
        .long LOAD + (mb_header - _start)       /* header_addr */
        .long LOAD                              /* load_addr */
        .long 0                                 /* load_end_addr: the whole file */
        .long 0                                 /* bss_end_addr: none */
        .long LOAD                              /* entry_addr: _start */
capacity: .long 0
features: .long 0

start:
        cli
        cld
        mov $0x90000, %esp
        UART_INIT
        mov base, %ebx
        test %ebx, %ebx
        jnz 1f
        call scan
1:      call handshake
        mov R_CONFIG + 4(%ebx), %eax            /* capacity: more than 2^32 sectors counts as 2^32 - 1 */
        mov R_CONFIG(%ebx), %edx
        test %eax, %eax
        jz 2f
        mov $0xffffffff, %edx
2:      mov %edx, capacity
        cmpl $1, mode
        je throughput
        ja bad_header

/* mode 0 */
        mov sectors, %eax                       /* the disk holds [0, sectors) and the written range */
        cmp capacity, %eax
        ja too_small
        mov wcount, %eax
        test %eax, %eax
        jz bad_header
        cmp $MAX_SECTORS, %eax
        ja bad_header
        add wsector, %eax
        jc too_small
        cmp capacity, %eax
        ja too_small
        xor %ebp, %ebp                          /* ebp: the checksum */
        xor %edx, %edx                          /* edx: the next sector */
3:      mov sectors, %ecx
        sub %edx, %ecx
        jz 5f
        cmp $MAX_SECTORS, %ecx
        jbe 4f
        mov $MAX_SECTORS, %ecx
4:      push %ecx
        push %edx
        shl $9, %ecx                            /* bytes */
        mov $T_IN, %eax
        mov $BUF, %edi
        call request
        mov (%esp), %edx
        mov 4(%esp), %ecx
        shl $7, %ecx                            /* dwords */
        mov $BUF, %esi
        mov %ebp, %eax
6:      rol $5, %eax
        add (%esi), %eax
        add $4, %esi
        loop 6b
        mov %eax, %ebp
        pop %edx
        pop %ecx
        add %ecx, %edx
        jmp 3b
5:      mov $msg_sum, %esi
        call puts
        mov %ebp, %eax
        call print_hex
        mov $msg_nl, %esi
        call puts
        mov wsector, %edx                       /* the pattern: 0xb10c0000 ^ (disk offset / 4) */
        shl $7, %edx                            /* the first dword's index on the disk */
        mov wcount, %ecx
        shl $7, %ecx
        mov $BUF, %edi
7:      mov %edx, %eax
        xor $PATTERN, %eax
        stosl
        inc %edx
        loop 7b
        mov wcount, %ecx
        shl $9, %ecx
        mov wsector, %edx
        mov $T_OUT, %eax
        mov $BUF, %edi
        call request
        mov $T_FLUSH, %eax
        xor %ecx, %ecx
        xor %edx, %edx
        call request
        mov $BUF2, %edi                         /* the read-back buffer starts as anything but the pattern */
        mov wcount, %ecx
        shl $7, %ecx
        xor %eax, %eax
        rep stosl
        mov wcount, %ecx
        shl $9, %ecx
        mov wsector, %edx
        mov $T_IN, %eax
        mov $BUF2, %edi
        call request
        mov $BUF, %esi
        mov $BUF2, %edi
        mov wcount, %ecx
        shl $7, %ecx
        repe cmpsl
        jne mismatch
        mov $msg_ok, %esi
        call puts
        jmp done

/* mode 1: sequential reads of `kib` KiB */
throughput:
        mov kib, %ecx
        test %ecx, %ecx
        jz bad_header
        cmp $64, %ecx
        ja bad_header
        shl $1, %ecx                            /* sectors per request */
        cmp capacity, %ecx
        ja too_small
        mov %ecx, %esi                          /* esi: sectors per request */
        mov iterations, %ebp
        xor %edx, %edx                          /* edx: the next sector */
        test %ebp, %ebp
        jz 9f
8:      lea (%edx, %esi), %eax                  /* past the end of the disk: from sector 0 again */
        cmp capacity, %eax
        jbe 1f
        xor %edx, %edx
1:      push %edx
        push %esi
        mov %esi, %ecx
        shl $9, %ecx
        mov $T_IN, %eax
        mov $BUF, %edi
        call request
        pop %esi
        pop %edx
        add %esi, %edx
        dec %ebp
        jnz 8b
9:      mov $msg_done, %esi
        call puts

        VIRTIO_EXITS
io_error:
        mov $4, %al
        jmp exit
mismatch:
        mov $5, %al
        jmp exit
too_small:
        mov $6, %al
        jmp exit
bad_length:
        mov $7, %al
        jmp exit
bad_header:
        mov $8, %al
        jmp exit

/* request: type eax, sector edx, ecx bytes at edi (ecx = 0: no data descriptor, e.g. FLUSH). Builds the
 * chain in descriptors 0..2, makes it available, notifies, polls the used ring, checks the status byte
 * and the used length. Clobbers eax, ecx, edx, edi. */
request:
        mov %eax, REQ
        movl $0, REQ + 4
        mov %edx, REQ + 8
        movl $0, REQ + 12
        movb $0xff, STATUS_BYTE
        VQ_DESC RQ, 0, $REQ, $16, $D_NEXT       /* descriptor 0: the header, device-readable */
        movw $1, RQ + 14
        VQ_DESC RQ, 2, $STATUS_BYTE, $1, $D_WRITE       /* descriptor 2: the status byte, device-writable */
        movw $0, RQ + 46
        jecxz 1f
        VQ_DESC RQ, 1, %edi, %ecx, $D_NEXT      /* descriptor 1: the data; a read fills it: device-writable */
        cmp $T_IN, %eax
        jne 2f
        movw $D_NEXT | D_WRITE, RQ + 28
2:      movw $2, RQ + 30
        movw $1, RQ + 14                        /* header -> data -> status */
        jmp 3f
1:      movw $2, RQ + 14                        /* header -> status */
3:      xor %edi, %edi                          /* edi: the used length the device must report */
        cmp $T_IN, %eax
        jne 4f
        mov %ecx, %edi
4:      inc %edi
        VQ_PUBLISH_HEAD0 RQ, 0
        VQ_WAIT_USED RQ, %ax, pause             /* until used.idx == avail.idx */
        dec %eax
        and $QSIZE - 1, %eax
        cmpl $0, RQ + USED + 4(,%eax,8)         /* used.ring[i].id: the head, descriptor 0 */
        jne bad_length
        cmp RQ + USED + 8(,%eax,8), %edi        /* used.ring[i].len */
        jne bad_length
        cmpb $0, STATUS_BYTE                    /* VIRTIO_BLK_S_OK */
        jne io_error
        ret

/* scan: ebx = the first virtio-mmio transport with a virtio-blk behind it, QEMU microvm's then hvm's. */
scan:   mov $MICROVM_BASE, %ebx
        mov $MICROVM_SLOTS, %ecx
        mov $MICROVM_STRIDE, %edx
        call scan_slots
        jz 1f
        mov $HVM_BASE, %ebx
        mov $HVM_SLOTS, %ecx
        mov $HVM_STRIDE, %edx
        call scan_slots
        jnz no_device
1:      ret
/* ecx slots from ebx, edx apart: ZF set and ebx the slot when one holds a virtio-blk. */
scan_slots:
1:      cmpl $MAGIC, R_MAGIC(%ebx)
        jne 2f
        cmpl $2, R_DEVICE_ID(%ebx)
        je 3f
2:      add %edx, %ebx
        loop 1b
        or $1, %ecx                             /* ZF clear: none */
3:      ret

/* handshake: probe, reset, ACKNOWLEDGE, DRIVER, VERSION_1 (and FLUSH if offered), FEATURES_OK, queue 0,
 * DRIVER_OK (27 MMIO accesses). */
handshake:
        VIRTIO_PROBE 2
        VIRTIO_ACK_VERSION_1
        movl $0, R_DEV_FEATURES_SEL(%ebx)
        mov R_DEV_FEATURES(%ebx), %eax
        and $F_FLUSH, %eax
        mov %eax, features
        VIRTIO_ACCEPT_FEATURES %eax
        VIRTIO_ONE_QUEUE_DRIVER_OK RQ
        ret

        VIRTIO_SETUP_QUEUE_ROUTINE

/* puts: the NUL-terminated string at esi to COM1 with one rep outsb. Clobbers eax, ecx, edx, esi, edi. */
puts:   mov %esi, %edi
        xor %eax, %eax
        mov $-1, %ecx
        repne scasb
        not %ecx
        dec %ecx
        mov $COM1, %dx
        rep outsb
        ret
/* print_hex: eax as 0x%08x. */
print_hex:
        mov %eax, %edx
        mov $hexbuf + 2, %edi
        mov $8, %ecx
1:      rol $4, %edx
        mov %edx, %eax
        and $0xf, %eax
        movb hexdigits(%eax), %al
        stosb
        loop 1b
        mov $hexbuf, %esi
        jmp puts

hexdigits: .ascii "0123456789abcdef"
hexbuf:    .asciz "0x00000000"
msg_sum:   .asciz "vblk: sum "
msg_nl:    .asciz "\n"
msg_ok:    .asciz "vblk: ok\n"
msg_done:  .asciz "vblk: done\n"
