"""A prototype, for measurement only: KVM_RUN's inner loop in C, returning to Python only for exits that
need it (`python -m bench.hotpath` runs it as the `c-inner` variant; hvm does not use it).

hvm_fast_run() enters the guest again at once after a port-I/O exit to a port no device claims (an OUT
is dropped, an IN reads all ones, as hvm's PioBus does; each is counted per port), and returns the exit
reason of anything else, or -errno (EINTR: a kick). The Python side keeps the dispatch table, the devices
and the stop/pause protocol. Built with cffi (API mode, GIL released during the call) into bench/build/.
"""
from __future__ import annotations

import importlib
import sys

from bench.common import BENCH_BUILD

MODULE = "_hvm_bench_fastloop"

CDEF = """
int hvm_fast_run(int fd, uintptr_t run, uintptr_t claimed_bitmap, uintptr_t unclaimed_counts,
                 unsigned long long *handled);
"""

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

int hvm_fast_run(int fd, uintptr_t run_addr, uintptr_t claimed_bitmap, uintptr_t unclaimed_counts,
                 unsigned long long *handled)
{
    struct kvm_run *run = (struct kvm_run *)run_addr;
    const uint8_t *claimed = (const uint8_t *)claimed_bitmap;   /* 65536 bits: a device owns the port */
    uint32_t *unclaimed = (uint32_t *)unclaimed_counts;         /* 65536 counters */
    for (;;) {
        if (ioctl(fd, KVM_RUN, 0) < 0)
            return -errno;
        if (run->exit_reason != KVM_EXIT_IO)
            return (int)run->exit_reason;
        uint16_t port = run->io.port;
        if (claimed[port >> 3] & (1u << (port & 7)))
            return KVM_EXIT_IO;
        if (run->io.direction == KVM_EXIT_IO_IN)
            memset((uint8_t *)run + run->io.data_offset, 0xff, (size_t)run->io.size * run->io.count);
        unclaimed[port]++;
        (*handled)++;
    }
}
"""


def load():
    """(ffi, lib) of the compiled prototype, building it on first use."""
    BENCH_BUILD.mkdir(parents=True, exist_ok=True)
    if str(BENCH_BUILD) not in sys.path:
        sys.path.insert(0, str(BENCH_BUILD))
    try:
        mod = importlib.import_module(MODULE)
    except ImportError:
        from cffi import FFI

        builder = FFI()
        builder.cdef(CDEF)
        builder.set_source(MODULE, SOURCE)
        builder.compile(tmpdir=str(BENCH_BUILD), verbose=False)
        importlib.invalidate_caches()
        mod = importlib.import_module(MODULE)
    return mod.ffi, mod.lib
