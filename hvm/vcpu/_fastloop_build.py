"""cffi API-mode build script for the vCPU fast loop (run by setuptools at install: cffi_modules in setup.py).

The fast loop is the C half of hvm's run loop. It issues KVM_RUN (cffi releases the GIL for the whole
call) and enters the guest again at once after exits that need no Python: port or MMIO accesses to an
address no device claims, which the bus has already reported once (an OUT/write is dropped, an IN/read
returns all ones, exactly as the bus's miss path does), and exit reasons the VMM asked to resume. Anything
else, and every error or kick (-errno), goes back to the Python loop and its dispatch table. It keeps a
ring of the last exits -- all of them, including the ones Python handled -- for crash reports, and
counts what it handled itself so that the statistics stay exact.

No devices live here: the C side knows only "this address is unclaimed", which Python tells it.
"""
from cffi import FFI

LAST_EXITS = 16
MMIO_SLOTS = 32

CDEF = f"""
struct hvm_exit_rec {{
    uint32_t reason;
    uint8_t dir;            /* I/O direction or MMIO is_write */
    uint8_t size;
    uint8_t has_value;      /* value holds the data moved (count == 1 and known) */
    uint8_t by_c;           /* handled by the fast loop */
    uint32_t count;
    uint64_t addr;          /* port or guest-physical address */
    uint64_t value;
}};
struct hvm_fastloop {{
    uint8_t pio_unclaimed[8192];            /* bitmap over 64 K ports */
    uint64_t mmio_unclaimed[{MMIO_SLOTS}];   /* exact addresses */
    uint32_t mmio_unclaimed_n;
    uint64_t resume_mask;                   /* exit reasons < 64 to re-enter at once */
    uint64_t handled[64];                   /* exits the fast loop handled, by reason */
    uint32_t pio_hits[65536];               /* accesses it handled, per port (rep counts each element) */
    uint64_t mmio_hits[{MMIO_SLOTS}];
    struct hvm_exit_rec last[{LAST_EXITS}];
    uint64_t seq;                           /* exits recorded in last[] */
    uint32_t pending_read;                  /* last[] ends with a read Python answers: fill its value in */
}};
int hvm_fastloop_run(int fd, uintptr_t run, struct hvm_fastloop *f);
"""

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>
#define HVM_LAST_EXITS """ + str(LAST_EXITS) + "\n" + CDEF.replace("int hvm_fastloop_run(int fd, uintptr_t run, struct hvm_fastloop *f);", "") + r"""

static uint64_t hvm_le(const uint8_t *p, unsigned size)
{
    uint64_t v = 0;
    memcpy(&v, p, size > 8 ? 8 : size);   /* x86 hosts only: little-endian */
    return v;
}

/* Record the exit that is in run now; returns its slot. */
static struct hvm_exit_rec *hvm_record(struct hvm_fastloop *f, struct kvm_run *run)
{
    struct hvm_exit_rec *r = &f->last[f->seq++ % HVM_LAST_EXITS];
    memset(r, 0, sizeof *r);
    r->reason = run->exit_reason;
    if (run->exit_reason == KVM_EXIT_IO) {
        r->dir = run->io.direction;
        r->size = run->io.size;
        r->count = run->io.count;
        r->addr = run->io.port;
        if (run->io.direction == KVM_EXIT_IO_OUT && run->io.count == 1) {
            r->value = hvm_le((uint8_t *)run + run->io.data_offset, run->io.size);
            r->has_value = 1;
        }
    } else if (run->exit_reason == KVM_EXIT_MMIO) {
        r->dir = run->mmio.is_write;
        r->size = run->mmio.len;
        r->count = 1;
        r->addr = run->mmio.phys_addr;
        if (run->mmio.is_write) {
            r->value = hvm_le(run->mmio.data, run->mmio.len);
            r->has_value = 1;
        }
    }
    return r;
}

static int hvm_mmio_slot(const struct hvm_fastloop *f, uint64_t addr)
{
    for (uint32_t i = 0; i < f->mmio_unclaimed_n; i++)
        if (f->mmio_unclaimed[i] == addr)
            return (int)i;
    return -1;
}

int hvm_fastloop_run(int fd, uintptr_t run_addr, struct hvm_fastloop *f)
{
    struct kvm_run *run = (struct kvm_run *)run_addr;
    if (f->pending_read) {   /* the previous exit was a read answered by Python: it is in run now */
        struct hvm_exit_rec *r = &f->last[(f->seq - 1) % HVM_LAST_EXITS];
        if (run->exit_reason == KVM_EXIT_IO && run->io.count == 1) {
            r->value = hvm_le((uint8_t *)run + run->io.data_offset, run->io.size);
            r->has_value = 1;
        } else if (run->exit_reason == KVM_EXIT_MMIO) {
            r->value = hvm_le(run->mmio.data, run->mmio.len);
            r->has_value = 1;
        }
        f->pending_read = 0;
    }
    for (;;) {
        if (ioctl(fd, KVM_RUN, 0) < 0)
            return -errno;
        uint32_t reason = run->exit_reason;
        struct hvm_exit_rec *r = hvm_record(f, run);
        if (reason == KVM_EXIT_IO) {
            uint16_t port = run->io.port;
            if (!(f->pio_unclaimed[port >> 3] & (1u << (port & 7)))) {
                f->pending_read = run->io.direction == KVM_EXIT_IO_IN;
                return (int)reason;
            }
            size_t bytes = (size_t)run->io.size * run->io.count;
            if (run->io.direction == KVM_EXIT_IO_IN) {
                memset((uint8_t *)run + run->io.data_offset, 0xff, bytes);
                if (run->io.count == 1) {
                    r->value = run->io.size >= 8 ? ~0ull : (1ull << (8 * run->io.size)) - 1;
                    r->has_value = 1;
                }
            }
            f->pio_hits[port] += run->io.count;
        } else if (reason == KVM_EXIT_MMIO) {
            int slot = hvm_mmio_slot(f, run->mmio.phys_addr);
            if (slot < 0) {
                f->pending_read = !run->mmio.is_write;
                return (int)reason;
            }
            if (!run->mmio.is_write) {
                uint32_t len = run->mmio.len > 8 ? 8 : run->mmio.len;
                memset(run->mmio.data, 0xff, len);
                r->value = len >= 8 ? ~0ull : (1ull << (8 * len)) - 1;
                r->has_value = 1;
            }
            f->mmio_hits[slot]++;
        } else if (reason < 64 && (f->resume_mask >> reason) & 1) {
            /* resumed as asked */
        } else {
            return (int)reason;
        }
        r->by_c = 1;
        f->handled[reason]++;
    }
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("hvm.vcpu._fastloop_cffi", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
