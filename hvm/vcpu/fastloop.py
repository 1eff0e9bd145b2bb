"""The C half of a vCPU's run loop (see _fastloop_build.py): one FastLoop per vCPU.

Python tells it which addresses no device claims (after the bus has reported each one once) and which
exit reasons to resume at once; it gives back what it handled itself -- exit counts, accesses per
port/address -- and the ring of the last exits. Without the compiled module (a source tree that was
never installed), AVAILABLE is False and the vCPU runs its all-Python loop, with the same results.
"""
from __future__ import annotations

import struct
import threading

from hvm.kvm import constants as k

# struct hvm_trace_rec, as laid out by the compiler (checked against ffi.sizeof at start_trace)
_TRACE_REC = struct.Struct("<4Q4I4BI")
TRACE_RECORDS = 32768                # records per buffer (1.75 MiB), and a page of data reserved per exit
TRACE_FLUSH_NS = 50_000_000          # hand records over at least every 50 ms while exits keep coming
_NO_ADDRESS = (1 << 64) - 1          # an MMIO slot a device has claimed since: matches no exit

try:  # built by setup.py (cffi_modules) during `pip install`
    from hvm.vcpu._fastloop_cffi import ffi, lib  # type: ignore[import-not-found]

    AVAILABLE = True
    TRACE_FLUSH = lib.HVM_TRACE_FLUSH    # hvm_fastloop_run's answer when its trace buffer wants emptying
except ImportError:
    ffi = lib = None
    AVAILABLE = False
    TRACE_FLUSH = None


class FastLoop:
    """The fast loop's state for one vCPU (a C struct this object owns)."""

    def __init__(self, fd: int, run_address: int) -> None:
        if not AVAILABLE:
            raise RuntimeError("hvm's fast loop is not compiled (pip install -e . builds it)")
        self.fd = fd
        self.run_address = run_address
        self.state = ffi.new("struct hvm_fastloop *")
        self.slots = len(self.state.mmio_unclaimed)
        self._mmio: list[int] = []         # the address of each slot, in slot order (never reused)
        # Route updates come from any thread (a vCPU that missed first, or whoever registers a device);
        # the C side only reads what they write.
        self._lock = threading.Lock()
        self.run = lib.hvm_fastloop_run   # (fd, run address, state) -> exit reason, or -errno
        self.tracing = False

    # --- what Python tells the C side --------------------------------------------------------------
    def port_unclaimed(self, port: int) -> None:
        """From now on accesses to this port are handled in C: OUT dropped, IN all ones."""
        with self._lock:
            self.state.pio_unclaimed[port >> 3] |= 1 << (port & 7)

    def ports_claimed(self, base: int, length: int) -> None:
        """A device now owns these ports: send their exits to Python again."""
        with self._lock:
            for port in range(base, base + length):
                self.state.pio_unclaimed[port >> 3] &= ~(1 << (port & 7)) & 0xFF

    def mmio_unclaimed(self, addr: int) -> None:
        """From now on accesses to this exact address are handled in C (while slots last)."""
        with self._lock:
            n = self.state.mmio_unclaimed_n
            if addr in self._mmio or n >= self.slots:
                return
            self._mmio.append(addr)
            self.state.mmio_unclaimed[n] = addr
            self.state.mmio_unclaimed_n = n + 1   # after the slot is written: C reads n, then the slots

    def mmio_claimed(self, base: int, length: int) -> None:
        """A device now owns [base, base+length): its slots stop matching (a tombstone no guest address
        can equal), and keep their counts, as the bus keeps the counts of a claimed address."""
        with self._lock:
            for i, a in enumerate(self._mmio):
                if base <= a < base + length:
                    self.state.mmio_unclaimed[i] = _NO_ADDRESS

    def use_published(self, table) -> None:
        """Answer the machine's published port registers (a PublishedTable, hvm/mmio/published.py) in C.
        The table is the machine's for its whole life: registers published later are seen at once."""
        pointer = table.pointer
        self._published = table          # the C struct lives as long as this loop reads it
        self.state.published = pointer if pointer is not None else ffi.NULL

    def resume_on(self, reason: int) -> None:
        """Enter the guest again at once after exits of this reason (counted, never seen by Python)."""
        self.state.resume_mask |= 1 << reason

    # --- exit tracing in C ------------------------------------------------------------------------
    def start_trace(self, want_rip: bool, records: int | None = None) -> None:
        """Record every exit in C from now on (collect them with take_trace)."""
        records = records or TRACE_RECORDS
        if ffi.sizeof("struct hvm_trace_rec") != _TRACE_REC.size:
            raise RuntimeError("struct hvm_trace_rec does not have the expected layout")
        tr = self._trace = ffi.new("struct hvm_trace_buf *")
        self._recs = ffi.new("struct hvm_trace_rec[]", records)
        data_cap = records * 16 + 2 * lib.HVM_TRACE_DATA_RESERVE
        self._data = ffi.new("uint8_t[]", data_cap)
        tr.recs, tr.cap = self._recs, records
        tr.data, tr.data_cap = self._data, data_cap
        tr.flush_ns = TRACE_FLUSH_NS
        tr.want_rip = want_rip
        self.state.trace = tr
        self.tracing = True

    def stop_trace(self) -> None:
        """Record no more exits (take_trace what is recorded first). Only while the vCPU does not run."""
        self.state.trace = ffi.NULL
        self.tracing = False

    def take_trace(self, t0_ns: int, vcpu: int) -> list[tuple]:
        """The records written so far, as the raw tuples of hvm/trace/record.py; empties the buffer. Called
        by the vCPU's own thread between runs, so the exit Python handled last is over: finish it first."""
        tr = self._trace
        lib.hvm_trace_finish(self.run_address, self.state)
        raw = ffi.buffer(self._recs, tr.n * _TRACE_REC.size)
        data = ffi.buffer(self._data, tr.data_n)
        io, mmio = k.EXIT_IO, k.EXIT_MMIO
        out = []
        for t, handle, where, extra, reason, count, off, length, size, direction, has_extra, _, _ in \
                _TRACE_REC.iter_unpack(raw):
            ext = extra if has_extra else None
            if reason == io or reason == mmio:
                out.append((t - t0_ns, vcpu, reason, where, size, direction, count, data[off:off + length], handle, ext))
            else:
                out.append((t - t0_ns, vcpu, reason, None, 0, 0, 0, b"", handle, ext))
        tr.n = tr.data_n = 0
        return out

    # --- what it gives back ------------------------------------------------------------------------
    def handled(self) -> list[int]:
        """Exits the C side handled, indexed by exit reason."""
        return list(self.state.handled)

    def port_hits(self) -> dict[int, int]:
        # Straight from C's fixed per-port counters (only ports it handled count there): no Python set
        # of the ports seen, which a guest touching all 64 K ports would grow to megabytes per vCPU.
        return {p: n for p, n in enumerate(ffi.unpack(self.state.pio_hits, 0x10000)) if n}

    def mmio_hits(self) -> dict[int, int]:
        with self._lock:
            addrs = tuple(self._mmio)
        return {a: n for i, a in enumerate(addrs) if (n := self.state.mmio_hits[i])}

    def last_exits(self) -> list[tuple]:
        """The ring of the last exits, oldest first, as the Python loop records them:
        (EXIT_IO, port, direction, size, count, value|None), (EXIT_MMIO, addr, is_write, size, 1, value|None),
        or (reason,)."""
        s = self.state
        n = len(s.last)
        out = []
        for seq in range(max(0, s.seq - n), s.seq):
            r = s.last[seq % n]
            value = r.value if r.has_value else None
            if r.reason == k.EXIT_IO:
                out.append((k.EXIT_IO, r.addr, r.dir, r.size, r.count, value))
            elif r.reason == k.EXIT_MMIO:
                out.append((k.EXIT_MMIO, r.addr, r.dir, r.size, 1, value))
            else:
                out.append((r.reason,))
        return out
