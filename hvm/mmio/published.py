"""Published port registers: device registers the vCPUs' C fast loop answers without Python.

A device keeps such a register in a small C struct (struct hvm_pubreg, hvm/vcpu/_fastloop_build.py) that
its own Python reads and writes, and publishes it at a port (PioBus.publish, or a device's
`published_registers`). The machine's PublishedTable lists them; every vCPU's fast loop gets a pointer to
it. The fast loop then answers accesses of exactly the register's size there; any other access (another
size, a clock's writes, `rep` string I/O) goes to the device's read/write as before. Save, load, reset,
accel tcg and the all-Python loop all go through the same register object, so there is one value.

The kinds are generic -- no device has code in C. Each kind's semantics are written twice: here (the
methods below, used by the device's Python) and in hvm_published_io (C); tests/test_published_regs.py runs
the same guest both ways and compares.
- Latch: an OUT of `size` bytes stores the value, an IN of `size` returns it (the 16550's scratch register).
- ClockCounter: an IN of `size` returns floor((CLOCK_MONOTONIC ns - t0_ns) * hz / 1e9) & mask; OUTs go to
  the device's Python (the ACPI PM timer). Published only by a device whose clock is time.monotonic_ns.

Without the compiled fast loop the registers are plain Python objects with the same fields.
"""
from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

LATCH = 1   # HVM_PUB_LATCH
CLOCK = 2   # HVM_PUB_CLOCK
NS_PER_S = 1_000_000_000
_INT64 = (-(1 << 63), (1 << 63) - 1)


class _Fields:
    """struct hvm_pubreg's fields, when the C module is not compiled."""

    __slots__ = ("value", "t0_ns", "hz", "mask", "kind", "size")

    def __init__(self) -> None:
        self.value = self.t0_ns = self.hz = self.mask = self.kind = self.size = 0


_ffi: list = []


def _cffi():
    """The fast loop's cffi module's ffi, or None if it is not compiled. Imported at first use: hvm.vcpu's
    package imports the buses, which import this module."""
    if not _ffi:
        try:  # built by setup.py with the fast loop (hvm/vcpu/_fastloop_build.py)
            from hvm.vcpu._fastloop_cffi import ffi  # type: ignore[import-not-found]
        except ImportError:
            ffi = None
        _ffi.append(ffi)
    return _ffi[0]


def _new_fields(in_c: bool):
    return _cffi().new("struct hvm_pubreg *") if in_c else _Fields()


class Register:
    """A register in memory the fast loop can read (the C struct, or _Fields)."""

    kind = 0

    def __init__(self, size: int, in_c: bool = True) -> None:
        if size not in (1, 2, 4):
            raise ValueError(f"a published register is 1, 2 or 4 bytes, not {size}")
        # in_c=False: a register the device never publishes (plain Python fields, no C range limits).
        self.in_c = in_c and _cffi() is not None
        self.c = _new_fields(self.in_c)
        self.c.kind = self.kind
        self.c.size = size
        self.size = size


class Latch(Register):
    """A value the guest stores and reads back (an OUT of `size` bytes stores it, an IN returns it)."""

    kind = LATCH

    def __init__(self, size: int = 1, value: int = 0) -> None:
        super().__init__(size)
        self._mask = (1 << (8 * size)) - 1
        self.value = value

    @property
    def value(self) -> int:
        return self.c.value

    @value.setter
    def value(self, v: int) -> None:
        self.c.value = v & self._mask


class ClockCounter(Register):
    """A free-running counter: floor((now_ns - t0_ns) * hz / 1e9) & mask, read with an IN of `size`."""

    kind = CLOCK

    def __init__(self, hz: int, bits: int, size: int = 4, t0_ns: int = 0, in_c: bool = True) -> None:
        super().__init__(size, in_c)
        if not 0 < hz < 1 << 40 or not 0 < bits <= 8 * size:
            raise ValueError(f"clock counter of {hz} Hz and {bits} bits does not fit {size} bytes")
        self.c.hz = hz
        self.c.mask = (1 << bits) - 1
        self.t0_ns = t0_ns

    @property
    def t0_ns(self) -> int:
        return self.c.t0_ns

    @t0_ns.setter
    def t0_ns(self, t: int) -> None:
        # The C side keeps it in an int64 (its difference to now is taken modulo 2^64, exact while the
        # true difference is in [0, 2^64)); a saved elapsed time is bounded to 2^63 - 1 ns by the device.
        if self.in_c and not _INT64[0] <= t <= _INT64[1]:
            raise ValueError(f"clock counter start {t} ns is outside the signed 64-bit range")
        self.c.t0_ns = t

    def count(self, now_ns: int) -> int:
        """The counter at now_ns (what the fast loop returns at that instant of CLOCK_MONOTONIC)."""
        return (now_ns - self.c.t0_ns) * self.c.hz // NS_PER_S & self.c.mask


class PublishedTable:
    """A machine's published registers (at most `capacity`; beyond that a register stays Python-only).
    One table per machine; every vCPU's fast loop reads it through `pointer` (fixed for the machine's life)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._regs: list[Register | None] = []    # keeps the C structs alive while the table points to them
        self._ports: list[int] = []
        self._retired: list[Register] = []        # withdrawn: a vCPU may still be reading them
        ffi = _cffi()
        if ffi is not None:
            self._c = ffi.new("struct hvm_published *")
            self.capacity = len(self._c.ent)
        else:
            self._c = None
            self.capacity = 0

    @property
    def pointer(self):
        """The struct hvm_published * for struct hvm_fastloop.published (None without the C module)."""
        return self._c

    def publish(self, port: int, reg: Register) -> bool:
        """Answer accesses of reg.size to `port` from `reg` in C; False if the table is full (or there is
        no C module): the device then serves them in Python, with the same result."""
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port:#x} is outside 0..0xffff")
        with self._lock:
            if any(p == port and r is not None and r.size == reg.size for p, r in zip(self._ports, self._regs)):
                raise ValueError(f"port {port:#x} already has a published {reg.size}-byte register")
            c = self._c
            n = len(self._regs)
            if c is None:
                return False        # no fast loop to answer it
            if not reg.in_c:
                raise ValueError(f"port {port:#x}: the register was made Python-only (in_c=False)")
            if n >= self.capacity:
                log.debug("published register table full: port %#x stays in Python", port)
                return False
            self._regs.append(reg)
            self._ports.append(port)
            c.ent[n].port = port
            c.ent[n].reg = reg.c
            c.ports[port >> 3] |= 1 << (port & 7)
            c.n = n + 1            # after the entry: the C side reads n, then the entries
            return True

    def withdraw(self, base: int, length: int) -> None:
        """Ports [base, base+length) are no longer a device's: their entries stop answering (the struct stays
        alive, as a vCPU may be reading it)."""
        with self._lock:
            c = self._c
            for i, port in enumerate(self._ports):
                if base <= port < base + length and self._regs[i] is not None:
                    c.ent[i].reg = _cffi().NULL
                    self._retired.append(self._regs[i])
                    self._regs[i] = None
            live = {p for p, r in zip(self._ports, self._regs) if r is not None}
            for port in range(base, base + length):
                if port not in live and c is not None:
                    c.ports[port >> 3] &= ~(1 << (port & 7)) & 0xFF

    def published(self) -> dict[int, Register]:
        """{port: register} of the entries in use (several sizes at one port: the last)."""
        with self._lock:
            return {p: r for p, r in zip(self._ports, self._regs) if r is not None}
