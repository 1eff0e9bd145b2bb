"""cffi API-mode build script for the vCPU fast loop (run by setuptools at install: cffi_modules in setup.py).

The fast loop is the C half of hvm's run loop. It issues KVM_RUN (cffi releases the GIL for the whole
call) and enters the guest again at once after exits that need no Python: port or MMIO accesses to an
address no device claims, which the bus has already reported once (an OUT/write is dropped, an IN/read
returns all ones, exactly as the bus's miss path does), and exit reasons the VMM asked to resume. Anything
else, and every error or kick (-errno), goes back to the Python loop and its dispatch table. It keeps a
ring of the last exits -- all of them, including the ones Python handled -- for crash reports, and
counts what it handled itself so that the statistics stay exact.

No devices live here: the C side knows only "this address is unclaimed", which Python tells it, and the
machine's table of published port registers (hvm/mmio/published.py): registers of a few generic kinds
that a device keeps in memory this loop can read -- a latch (an OUT of its size stores the value, an IN
returns it) and a clock counter (an IN returns the ticks of CLOCK_MONOTONIC since t0) -- answered here for
accesses of exactly the register's size; any other access goes to the device in Python.
"""
from cffi import FFI

LAST_EXITS = 16
MMIO_SLOTS = 32
PUBLISHED_SLOTS = 16          # published port registers per machine (hvm/mmio/published.py)
TRACE_FLUSH = -10000          # returned (below any -errno) when the trace buffer wants emptying
TRACE_DATA_RESERVE = 4096 + 8 # the most data one exit can move (string port I/O: one page)

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
/* Exit tracing: one record per exit, written after its handler ran (so reads hold what the guest got). */
struct hvm_trace_rec {{
    uint64_t t_ns;          /* CLOCK_MONOTONIC at the exit */
    uint64_t handle_ns;     /* from the exit to the next KVM_RUN */
    uint64_t where;         /* port or guest-physical address */
    uint64_t extra;         /* RIP (want_rip), or an internal error's suberror */
    uint32_t reason;
    uint32_t count;
    uint32_t data_off;      /* into data[] */
    uint32_t data_len;
    uint8_t size, dir, has_extra, pad;
    uint32_t pad2;
}};
struct hvm_trace_buf {{
    struct hvm_trace_rec *recs;
    uint32_t cap, n;
    uint8_t *data;
    uint32_t data_cap, data_n;
    uint64_t flush_ns;      /* ask for a flush when the oldest unflushed record is this old */
    uint64_t first_ns;
    uint32_t want_rip;
    uint32_t open;          /* recs[n-1] went to Python: finish it at the next entry */
}};
/* A published register (hvm/mmio/published.py): the device's Python reads and writes the same memory. */
struct hvm_pubreg {{
    uint64_t value;         /* latch: the value stored */
    int64_t t0_ns;          /* clock: CLOCK_MONOTONIC at count 0 (negative after a restore of a long run) */
    uint64_t hz;            /* clock: ticks per second */
    uint64_t mask;          /* clock: the counter's width */
    uint8_t kind;           /* HVM_PUB_LATCH, HVM_PUB_CLOCK */
    uint8_t size;           /* the access size answered here (1, 2 or 4) */
    uint8_t pad[6];
}};
struct hvm_pubent {{
    uint64_t port;
    struct hvm_pubreg *reg; /* NULL: withdrawn (the device's range was removed) */
}};
/* One per machine, shared by every vCPU's fast loop. Python fills an entry, then sets its bit and n. */
struct hvm_published {{
    uint8_t ports[8192];                    /* bitmap over 64 K ports: some entry has this port */
    uint32_t n;
    uint32_t pad;
    struct hvm_pubent ent[{PUBLISHED_SLOTS}];
}};
struct hvm_fastloop {{
    uint8_t pio_unclaimed[8192];            /* bitmap over 64 K ports */
    uint64_t mmio_unclaimed[{MMIO_SLOTS}];   /* exact addresses */
    uint32_t mmio_unclaimed_n;
    uint64_t resume_mask;                   /* exit reasons < 64 to re-enter at once */
    uint64_t handled[64];                   /* exits the fast loop handled, by reason */
    uint64_t pio_hits[65536];               /* exits it handled, per port (a string I/O exit counts once) */
    uint64_t mmio_hits[{MMIO_SLOTS}];
    struct hvm_exit_rec last[{LAST_EXITS}];
    uint64_t seq;                           /* exits recorded in last[] */
    uint32_t pending_read;                  /* last[] ends with a read Python answers: fill its value in */
    struct hvm_trace_buf *trace;            /* NULL: not tracing */
    struct hvm_published *published;        /* the machine's published registers (NULL: none) */
}};
#define HVM_TRACE_FLUSH ...
#define HVM_PUB_LATCH ...
#define HVM_PUB_CLOCK ...
#define HVM_TRACE_DATA_RESERVE ...
int hvm_fastloop_run(int fd, uintptr_t run, struct hvm_fastloop *f);
void hvm_trace_finish(uintptr_t run, struct hvm_fastloop *f);
"""

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>
#define HVM_LAST_EXITS """ + str(LAST_EXITS) + f"""
#define HVM_TRACE_FLUSH ({TRACE_FLUSH})
#define HVM_TRACE_DATA_RESERVE {TRACE_DATA_RESERVE}
#define HVM_PUB_LATCH 1
#define HVM_PUB_CLOCK 2
""" + CDEF.split("#define HVM_TRACE_FLUSH")[0] + r"""
static uint64_t hvm_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);   /* what Python's time.monotonic_ns() reads */
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Start the trace record of the exit in run, from its ring entry (the data is copied when the exit is
   finished: reads hold what the guest got). */
static void hvm_trace_start(struct hvm_trace_buf *tr, int fd, struct kvm_run *run,
                            const struct hvm_exit_rec *e, uint64_t t)
{
    struct hvm_trace_rec *r = &tr->recs[tr->n++];
    memset(r, 0, sizeof *r);
    if (tr->n == 1)
        tr->first_ns = t;
    r->t_ns = t;
    r->reason = e->reason;
    r->where = e->addr;
    r->size = e->size;
    r->dir = e->dir;
    r->count = e->count;
    if (e->reason == KVM_EXIT_IO)
        r->data_len = (uint32_t)e->size * e->count;
    else if (e->reason == KVM_EXIT_MMIO)
        r->data_len = e->size > 8 ? 8 : e->size;
    if (r->data_len > HVM_TRACE_DATA_RESERVE)   /* KVM moves at most a page per exit; never trust it */
        r->data_len = HVM_TRACE_DATA_RESERVE;
    r->data_off = tr->data_n;
    tr->data_n += r->data_len;
    if (tr->want_rip) {
        struct kvm_regs regs;
        if (ioctl(fd, KVM_GET_REGS, &regs) == 0) {
            r->extra = regs.rip;
            r->has_extra = 1;
        }
    } else if (e->reason == KVM_EXIT_INTERNAL_ERROR) {
        r->extra = run->internal.suberror;
        r->has_extra = 1;
    }
}

/* Finish the newest record: its data as the guest now sees it, and how long handling took. */
static void hvm_trace_end(struct hvm_trace_buf *tr, struct kvm_run *run)
{
    struct hvm_trace_rec *r = &tr->recs[tr->n - 1];
    if (r->data_len) {
        const uint8_t *src = r->reason == KVM_EXIT_IO ? (uint8_t *)run + run->io.data_offset : run->mmio.data;
        memcpy(tr->data + r->data_off, src, r->data_len);
    }
    r->handle_ns = hvm_now() - r->t_ns;
}

void hvm_trace_finish(uintptr_t run_addr, struct hvm_fastloop *f)
{
    if (f->trace && f->trace->open) {
        hvm_trace_end(f->trace, (struct kvm_run *)run_addr);
        f->trace->open = 0;
    }
}

static uint64_t hvm_le(const uint8_t *p, unsigned size)
{
    uint64_t v = 0;
    memcpy(&v, p, size > 8 ? 8 : size);   /* x86 hosts only: little-endian */
    return v;
}

/* The data of the exit in run, as it is there now, into its ring entry (single transfers only). */
static void hvm_take_value(struct hvm_exit_rec *r, struct kvm_run *run)
{
    if (run->exit_reason == KVM_EXIT_IO && run->io.count == 1) {
        r->value = hvm_le((uint8_t *)run + run->io.data_offset, run->io.size);
        r->has_value = 1;
    } else if (run->exit_reason == KVM_EXIT_MMIO) {
        r->value = hvm_le(run->mmio.data, run->mmio.len);
        r->has_value = 1;
    }
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
        if (run->io.direction == KVM_EXIT_IO_OUT)
            hvm_take_value(r, run);
    } else if (run->exit_reason == KVM_EXIT_MMIO) {
        r->dir = run->mmio.is_write;
        r->size = run->mmio.len;
        r->count = 1;
        r->addr = run->mmio.phys_addr;
        if (run->mmio.is_write)
            hvm_take_value(r, run);
    }
    return r;
}

/* Answer a single-transfer port access from the published table; 1 if answered. The semantics of each
   kind are those of hvm/mmio/published.py (Latch, ClockCounter), which the device's Python uses. */
static int hvm_published_io(const struct hvm_published *p, struct kvm_run *run)
{
    uint16_t port = run->io.port;
    if (!(p->ports[port >> 3] & (1u << (port & 7))) || run->io.count != 1)
        return 0;
    uint32_t n = __atomic_load_n(&p->n, __ATOMIC_ACQUIRE);
    for (uint32_t i = 0; i < n && i < """ + str(PUBLISHED_SLOTS) + r"""; i++) {
        struct hvm_pubreg *reg = __atomic_load_n(&p->ent[i].reg, __ATOMIC_ACQUIRE);
        if (p->ent[i].port != port || !reg || reg->size != run->io.size)
            continue;
        uint8_t *data = (uint8_t *)run + run->io.data_offset;
        uint64_t size_mask = run->io.size >= 8 ? ~0ull : (1ull << (8 * run->io.size)) - 1;
        if (reg->kind == HVM_PUB_LATCH) {
            if (run->io.direction == KVM_EXIT_IO_OUT) {
                reg->value = hvm_le(data, run->io.size) & size_mask;
            } else {
                uint64_t v = reg->value;
                memcpy(data, &v, run->io.size);
            }
            return 1;
        }
        if (reg->kind == HVM_PUB_CLOCK && run->io.direction == KVM_EXIT_IO_IN) {
            /* floor((now - t0) * hz / 1e9) & mask, exactly as Python's integers compute it: the difference
               is taken modulo 2^64 (it is in [0, 2^64)) and the product in 128 bits (64 bits overflow after
               ~85 minutes at 3.58 MHz). */
            uint64_t elapsed = hvm_now() - (uint64_t)reg->t0_ns;
            unsigned __int128 ticks = (unsigned __int128)elapsed * reg->hz / 1000000000u;
            uint64_t v = (uint64_t)ticks & reg->mask & size_mask;
            memcpy(data, &v, run->io.size);
            return 1;
        }
        return 0;   /* a clock's writes: the device's Python */
    }
    return 0;
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
        hvm_take_value(&f->last[(f->seq - 1) % HVM_LAST_EXITS], run);
        f->pending_read = 0;
    }
    struct hvm_trace_buf *tr = f->trace;
    if (tr && tr->open) {
        hvm_trace_end(tr, run);
        tr->open = 0;
    }
    for (;;) {
        if (tr && (tr->n >= tr->cap || tr->data_cap - tr->data_n < HVM_TRACE_DATA_RESERVE
                   || (tr->n && hvm_now() - tr->first_ns >= tr->flush_ns)))
            return HVM_TRACE_FLUSH;
        if (ioctl(fd, KVM_RUN, 0) < 0)
            return -errno;
        uint64_t t = tr ? hvm_now() : 0;
        uint32_t reason = run->exit_reason;
        struct hvm_exit_rec *r = hvm_record(f, run);
        if (tr)
            hvm_trace_start(tr, fd, run, r, t);
        if (reason == KVM_EXIT_IO) {
            uint16_t port = run->io.port;
            size_t bytes = (size_t)run->io.size * run->io.count;
            if (f->published && hvm_published_io(f->published, run)) {
                if (run->io.direction == KVM_EXIT_IO_IN)
                    hvm_take_value(r, run);
                f->pio_hits[port]++;
                goto by_c;
            }
            /* claimed, or more than KVM's one-page I/O buffer (left to Python's checks) */
            if (!(f->pio_unclaimed[port >> 3] & (1u << (port & 7))) || bytes > 4096) {
                f->pending_read = run->io.direction == KVM_EXIT_IO_IN;
                goto to_python;
            }
            if (run->io.direction == KVM_EXIT_IO_IN) {
                memset((uint8_t *)run + run->io.data_offset, 0xff, bytes);
                hvm_take_value(r, run);
            }
            f->pio_hits[port]++;
        } else if (reason == KVM_EXIT_MMIO) {
            int slot = hvm_mmio_slot(f, run->mmio.phys_addr);
            if (slot < 0) {
                f->pending_read = !run->mmio.is_write;
                goto to_python;
            }
            if (!run->mmio.is_write) {
                memset(run->mmio.data, 0xff, run->mmio.len > 8 ? 8 : run->mmio.len);
                hvm_take_value(r, run);
            }
            f->mmio_hits[slot]++;
        } else if (reason < 64 && (f->resume_mask >> reason) & 1) {
            /* resumed as asked */
        } else {
            goto to_python;
        }
    by_c:
        r->by_c = 1;
        f->handled[reason]++;
        if (tr)
            hvm_trace_end(tr, run);
        continue;
    to_python:
        if (tr)
            tr->open = 1;
        return (int)reason;
    }
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("hvm.vcpu._fastloop_cffi", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
