"""Buses route guest port-I/O and MMIO accesses to devices (as Firecracker's devices/bus.rs).

A device is registered for [base, base+length); overlaps are rejected. A bus turns an address into
(device, offset). An access no device claims reads as all ones and is dropped on write, counted, and
the VM keeps running (as on real hardware, and as QEMU does).

The bus is also the boundary between a hostile guest and hvm's devices:
- values are masked to the access size on the way in (writes) and out (reads), so no device sees or
  returns more bits than the access has;
- an exception inside a device becomes one DeviceFault naming the device, the address, the access and
  the exception (the vCPU then ends the VM with status 70: a device that raises is a bug in hvm);
- what it keeps per unclaimed address is bounded: exact counts for the first TRACKED_ADDRESSES distinct
  unclaimed MMIO addresses, then one counted "other" bucket (ports: 64 K counters, fixed); and the first
  LOGGED_MISSES distinct unclaimed addresses of each bus are logged, the rest summed up in a line at most
  every SUMMARY_INTERVAL seconds and once at the end (log_summary).

Several vCPU threads use one bus at once. Each vCPU counts its accesses in counters of its own (a
`for_vcpu()` view: the bus's routes, its own hit counts), summed when counts are read, so `--stats` stays
exact with no lock on the hot path and without relying on how CPython schedules threads between bytecodes.
Routes change under the bus's route lock; devices lock their own state (hvm/mmio/*.py).
"""
from __future__ import annotations

import array
import bisect
import logging
import sys
import threading
import time

from hvm._types import Callable, Protocol
from hvm.mmio.device import Device
from hvm.mmio.published import PublishedTable, Register
from hvm.plain import Frozen

log = logging.getLogger(__name__)

TRACKED_ADDRESSES = 64     # distinct unclaimed MMIO addresses counted one by one; the rest share OTHER
LOGGED_MISSES = 8          # distinct unclaimed addresses per bus that get their own warning line
SUMMARY_INTERVAL = 10.0    # seconds between "N more unclaimed accesses ... not logged" lines
OTHER_DISTINCT_LIMIT = 4096  # distinct addresses of the OTHER bucket counted exactly (then "more than")
OTHER = -1                 # the key of the OTHER bucket in hit counts (no address is negative)

# Access size -> mask, indexed by size (KVM's sizes are 1, 2, 4 and, for MMIO, 8).
MASK = [0, 0xFF, 0xFFFF, 0xFFFFFF, 0xFFFFFFFF, (1 << 40) - 1, (1 << 48) - 1, (1 << 56) - 1, (1 << 64) - 1]


class BusError(ValueError):
    """A device registration that conflicts with another one."""


class DeviceFault(Exception):
    """A device raised while handling a guest access: a bug in hvm, never something a guest may cause.
    str() is one line naming the device, the address, the access and the exception."""

    def __init__(self, device: str, kind: str, addr: int, access: str, error: BaseException) -> None:
        self.device, self.kind, self.addr, self.access, self.error = device, kind, addr, access, error
        width = 6 if kind == "port" else 10
        super().__init__(f"device {device} ({kind} {addr:#0{width}x}, {access}) raised "
                         f"{type(error).__name__}: {error}")


class BusRange(Frozen):     # a plain class, not a dataclass: hvm/plain.py says why
    _fields = ("base", "length", "device")

    def __init__(self, base: int, length: int, device: Device):
        self._set(base=base, length=length, device=device)

    @property
    def end(self) -> int:
        return self.base + self.length


class RouteListener(Protocol):
    """Told when an address turns out to be unclaimed (at its first access) and when a device claims
    a range. The vCPU fast loop listens, to handle repeated accesses to unclaimed addresses without Python."""

    def unclaimed(self, addr: int) -> None: ...

    def claimed(self, base: int, length: int) -> None: ...


class _Bus:
    kind = "bus"
    width = 8  # hex digits used in messages

    def __init__(self) -> None:
        self.ranges: list[BusRange] = []
        self._bases: list[int] = []
        # Unclaimed addresses seen and told to the listeners (bounded: ports by 64 K, MMIO by TRACKED_ADDRESSES).
        self._seen: set[int] = set()
        self.listeners: list[RouteListener] = []
        # Registration and the first miss at an address may happen on different threads: the lock makes
        # "claimed" and "unclaimed" reach the listeners in the order the routes really changed.
        self._route_lock = threading.Lock()
        # Accesses counted elsewhere (by the fast loop), merged into counts/unhandled: {addr: n} each.
        self.hit_sources: list[Callable[[], dict[int, int]]] = []
        # Per-vCPU views (for_vcpu): each counts its own accesses; their counts are merged with the bus's.
        self._views: list = []
        # Rate-limited logging of misses: distinct addresses logged, and those that were not.
        self._logged_n = 0
        self._unlogged: set[int] = set()       # at most OTHER_DISTINCT_LIMIT
        self._unlogged_more = False            # the set above overflowed
        self._summary_at = 0.0                 # when the last summary line was written
        self._summarized = 0                   # unlogged accesses the summary lines have reported
        self._summary_lock = threading.Lock()
        # Several vCPUs miss at once: which misses get a line of their own is decided under this lock, so
        # exactly LOGGED_MISSES are logged (the lines themselves are written outside it).
        self._miss_lock = threading.Lock()

    def register(self, base: int, length: int, device: Device) -> None:
        if length <= 0:
            raise BusError(f"{self.kind} range for {device.name} has no length")
        with self._route_lock:
            clash = self.overlapping(base, length)
            if clash:
                r = clash[0]
                raise BusError(
                    f"{self.kind} range {base:#x}..{base + length - 1:#x} of {device.name} overlaps "
                    f"{r.base:#x}..{r.end - 1:#x} of {r.device.name}")
            i = bisect.bisect(self._bases, base)
            self.ranges.insert(i, BusRange(base, length, device))
            self._bases.insert(i, base)
            self._install(base, length, device)
            for listener in self.listeners:   # after the routes are in place
                listener.claimed(base, length)

    def overlapping(self, base: int, length: int) -> list[BusRange]:
        """The registered ranges sharing an address with [base, base+length), in address order."""
        return [r for r in self.ranges if base < r.end and r.base < base + length]

    def unregister(self, base: int, device: Device) -> None:
        """Remove the range at `base` registered for `device` (a PCI BAR that moves or stops decoding):
        its addresses go back to the miss path. A listener that was told the range is claimed keeps
        sending its accesses to Python, where they are served as misses (correct, just not short-cut)."""
        with self._route_lock:
            i = bisect.bisect_left(self._bases, base)
            if i >= len(self.ranges) or self.ranges[i].base != base or self.ranges[i].device is not device:
                raise BusError(f"{self.kind} {base:#x}: no range of {device.name} there to remove")
            r = self.ranges.pop(i)
            del self._bases[i]
            self._uninstall(r.base, r.length)

    def _install(self, base: int, length: int, device: Device) -> None:
        """Route [base, base+length) to the device in the bus's fast lookup structures."""

    def _uninstall(self, base: int, length: int) -> None:
        """Route [base, base+length) back to the miss path."""

    def find(self, addr: int) -> BusRange | None:
        i = bisect.bisect(self._bases, addr) - 1
        if i >= 0:
            r = self.ranges[i]
            if addr < r.end:
                return r
        return None

    # --- faults ----------------------------------------------------------------------------------
    def _fault(self, addr: int, size: int, value: int | None, error: BaseException) -> DeviceFault:
        r = self.find(addr)
        name = r.device.name if r is not None else "(none: the bus's miss path)"
        access = f"{size}-byte read" if value is None else f"{size}-byte write of {value:#x}"
        return DeviceFault(name, self.kind, addr, access, error)

    # --- counts ----------------------------------------------------------------------------------
    def _own_hits(self) -> dict[int, int]:
        raise NotImplementedError

    def _hit_counts(self) -> dict[int, int]:
        hits = self._own_hits()
        for source in [view._own_hits for view in self._views] + self.hit_sources:
            for a, n in source().items():
                hits[a] = hits.get(a, 0) + n
        return hits

    @property
    def counts(self) -> dict[int, int]:
        """Accesses (exits: a string I/O exit counts once) per address that a device handled (for --stats)."""
        return {a: n for a, n in self._hit_counts().items() if a != OTHER and self.find(a) is not None}

    @property
    def unhandled(self) -> dict[int, int]:
        """Accesses per address that no device claimed (the tracked addresses; see `other`)."""
        return {a: n for a, n in self._hit_counts().items() if a != OTHER and self.find(a) is None}

    @property
    def other(self) -> int:
        """Accesses to unclaimed addresses beyond the first TRACKED_ADDRESSES distinct ones (counted together)."""
        return self._hit_counts().get(OTHER, 0)

    def attach(self, listener: RouteListener, hits: Callable[[], dict[int, int]]) -> None:
        """Add a route listener (told at once of the unclaimed addresses seen so far) and its hit counts."""
        with self._route_lock:
            self.listeners.append(listener)
            self.hit_sources.append(hits)
            for addr in sorted(self._seen):
                if self.find(addr) is None:
                    listener.unclaimed(addr)

    def _first_miss(self, addr: int) -> None:
        with self._route_lock:
            self._seen.add(addr)
            if self.find(addr) is not None:
                return   # a device registered meanwhile: the miss was a stale route, nothing to tell
            for listener in self.listeners:
                listener.unclaimed(addr)

    def counts_by_device(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for addr, n in self.counts.items():
            name = self.find(addr).device.name
            out[name] = out.get(name, 0) + n
        return out

    # --- the miss path: an address nobody claims is served by these, so the hot path has no branch for it
    def _miss_read(self, addr: int, size: int) -> int:
        if addr not in self._seen:
            self._new_miss(addr, "%s read (%d bytes) from %s: no device there, reads as all ones", self.kind, size)
        return MASK[size]

    def _miss_write(self, addr: int, size: int, value: int) -> None:
        if addr not in self._seen:
            self._new_miss(addr, "%s write of %#x (%d bytes) to %s: no device there, dropped", self.kind, value, size)

    def _new_miss(self, addr: int, message: str, *args) -> None:
        """The first access to an unclaimed address: tracked, told to the listeners, logged (rate-limited)."""
        self._first_miss(addr)
        self._log_miss(addr, message, *args)

    def _log_miss(self, addr: int, message: str, *args) -> None:
        """`message % (*args, address)` is logged for the first LOGGED_MISSES addresses only: formatted
        then, and never for the accesses after them (a scanning guest makes them by the million)."""
        with self._miss_lock:
            n = self._logged_n = min(self._logged_n + 1, LOGGED_MISSES + 1)
            if n > LOGGED_MISSES:
                if len(self._unlogged) < OTHER_DISTINCT_LIMIT:
                    self._unlogged.add(addr)
                elif addr not in self._unlogged:
                    self._unlogged_more = True
                now = time.monotonic()
                due = now - self._summary_at >= SUMMARY_INTERVAL
                if due and not self._summary_at:
                    self._summary_at = now   # the first summary comes one interval after the last logged miss
                    due = False
        if n <= LOGGED_MISSES:
            log.warning(message, *args, f"{addr:#0{self.width}x}")
            if n == LOGGED_MISSES:
                log.warning("%s: further accesses to unclaimed addresses are not logged one by one "
                            "(a summary follows)", self.kind)
            return
        if due:
            self.log_summary()

    def log_summary(self) -> None:
        """Log one line for the unclaimed accesses not logged one by one since the last such line (if any):
        called at most every SUMMARY_INTERVAL seconds by the miss path, and by the machine when the VM ends."""
        with self._summary_lock:
            with self._miss_lock:   # a copy: vCPUs add to the set meanwhile
                self._summary_at = time.monotonic()
                unlogged, more = list(self._unlogged), self._unlogged_more
            if not unlogged:
                return
            hits = self._hit_counts()
            total = sum(hits.get(a, 0) for a in unlogged if self.find(a) is None) + hits.get(OTHER, 0)
            accesses, self._summarized = total - self._summarized, total
            if accesses <= 0:
                return
            addresses = f"more than {len(unlogged)}" if more else str(len(unlogged))
            log.warning("%d more unclaimed %s accesses not logged (to %s addresses in all)",
                        accesses, self.kind, addresses)


class _PortSet:
    """The set of ports seen, as a fixed 64 KiB map (a set of up to 65536 ints costs ~4 MiB)."""

    __slots__ = ("_bits",)

    def __init__(self) -> None:
        self._bits = bytearray(0x10000)

    def __contains__(self, port: int) -> bool:
        return self._bits[port] != 0

    def add(self, port: int) -> None:
        self._bits[port] = 1

    def __iter__(self):
        # bytearray.find skips the unseen ports in C: every vCPU's attach() walks this set at start-up, and a
        # Python loop over all 65536 entries took 2-4 ms of `hvm run` each time.
        bits = self._bits
        port = bits.find(1)
        while port >= 0:
            yield port
            port = bits.find(1, port + 1)


class _PioAccess:
    """The port-I/O hot path: route by port, count, call the device. PioBus is one (accesses made through
    the bus itself); each vCPU has its own (PioBus.for_vcpu), with the same routes and counters of its own."""

    _hits: list[int]
    _handlers: list[tuple]
    _offsets: array.array
    _fault: Callable[..., DeviceFault]

    # Python 3.11's try costs nothing until something raises: the fault handling is free on the hot path.
    def read(self, port: int, size: int) -> int:
        self._hits[port] += 1
        try:
            return self._handlers[port][0](self._offsets[port], size) & MASK[size]
        except Exception as e:
            raise self._fault(port, size, None, e) from e

    def write(self, port: int, size: int, value: int) -> None:
        self._hits[port] += 1
        value &= MASK[size]
        try:
            self._handlers[port][1](self._offsets[port], size, value)
        except Exception as e:
            raise self._fault(port, size, value, e) from e

    def read_string(self, port: int, size: int, count: int) -> list[int]:
        """`rep ins`: `count` reads of the port in one exit (counted as one access, as the trace counts it)."""
        self._hits[port] += 1
        read, offset, mask = self._handlers[port][0], self._offsets[port], MASK[size]
        try:
            return [read(offset, size) & mask for _ in range(count)]
        except Exception as e:
            raise self._fault(port, size, None, e) from e

    def write_string(self, port: int, size: int, values) -> None:
        """`rep outs`: the values, written one after the other in one exit (counted as one access)."""
        self._hits[port] += 1
        write, offset, mask = self._handlers[port][1], self._offsets[port], MASK[size]
        value = None
        try:
            for value in values:
                write(offset, size, value & mask)
        except Exception as e:
            raise self._fault(port, size, value, e) from e


class PioView(_PioAccess):
    """One vCPU's access to a PioBus: the bus's routes (shared lists, changed in place by registration)
    and a 64 K counter list of its own."""

    def __init__(self, bus: "PioBus") -> None:
        self._hits = [0] * 0x10000
        self._handlers = bus._handlers
        self._offsets = bus._offsets
        self._fault = bus._fault

    def _own_hits(self) -> dict[int, int]:
        return {port: n for port, n in enumerate(self._hits) if n}


def _port_numbers() -> array.array:
    """array("l", range(0x10000)), built from bytes: array() converts a range one int at a time (~2.5 ms of
    every start-up); this writes the low and high byte of every port number in two slice assignments."""
    size = array.array("l").itemsize
    raw = bytearray(size * 0x10000)
    low, high = (0, 1) if sys.byteorder == "little" else (size - 1, size - 2)
    raw[low::size] = bytes(range(256)) * 256
    raw[high::size] = b"".join(bytes((n,)) * 256 for n in range(256))
    ports = array.array("l")
    ports.frombytes(raw)
    return ports


class PioBus(_Bus, _PioAccess):
    """x86 port I/O space (64 K ports). Per port: one (read, write) pair -- by default the shared miss
    handlers -- an offset and a hit counter, in flat sequences: two list indexes and one increment per
    exit, whether a device is there or not. (About 1.5 MiB and a millisecond to build.)"""

    kind = "port"
    width = 6

    def __init__(self) -> None:
        super().__init__()
        self._hits = [0] * 0x10000
        self._seen = _PortSet()
        self._handlers: list[tuple] = [(self._miss_read, self._miss_write)] * 0x10000
        self._offsets = _port_numbers()   # a miss handler gets the port itself
        # Registers devices publish for the vCPUs' C fast loops to answer (hvm/mmio/published.py).
        self.published = PublishedTable()

    def register(self, base: int, length: int, device: Device) -> None:
        if base < 0 or base + length > 0x10000:
            raise BusError(f"port range {base:#x}+{length} of {device.name} is outside 0..0xffff")
        super().register(base, length, device)
        # A device may list registers of its range the fast loop can answer: [(offset, Register)].
        for offset, reg in getattr(device, "published_registers", ()):
            if 0 <= offset < length:
                self.publish(base + offset, reg)

    def publish(self, port: int, reg: Register) -> bool:
        """Let every vCPU's fast loop (those running and those made later: they all read this table) answer
        accesses of reg.size to `port` from `reg`; the device keeps serving every other access. The port
        must be a registered device's. False if the table is full (the device then serves them all)."""
        r = self.find(port)
        if r is None:
            raise BusError(f"port {port:#06x}: no device there to publish a register for")
        return self.published.publish(port, reg)

    def _install(self, base: int, length: int, device: Device) -> None:
        pair = (device.read, device.write)
        for port in range(base, base + length):
            self._handlers[port] = pair
            self._offsets[port] = port - base

    def _uninstall(self, base: int, length: int) -> None:
        self.published.withdraw(base, length)
        miss = (self._miss_read, self._miss_write)
        for port in range(base, base + length):
            self._handlers[port] = miss
            self._offsets[port] = port

    def _own_hits(self) -> dict[int, int]:
        return {port: n for port, n in enumerate(self._hits) if n}

    def for_vcpu(self) -> PioView:
        """A view for one vCPU thread: its accesses counted apart, merged into counts/unhandled."""
        view = PioView(self)
        self._views.append(view)
        return view


class _MmioAccess:
    """The MMIO hot path: the cached route, count, call the device. MmioBus is one; each vCPU has its own
    (MmioBus.for_vcpu): the bus's route cache and route lookup, hit counts of its own."""

    _hits: dict[int, int]
    _routes: dict[int, tuple]
    _route: Callable[[int], tuple]
    _fault: Callable[..., DeviceFault]

    def read(self, addr: int, size: int) -> int:
        route = self._routes.get(addr) or self._route(addr)
        hits, key = self._hits, route[3]
        hits[key] = hits.get(key, 0) + 1
        try:
            return route[0](route[2], size) & MASK[size]
        except Exception as e:
            raise self._fault(addr, size, None, e) from e

    def write(self, addr: int, size: int, value: int) -> None:
        route = self._routes.get(addr) or self._route(addr)
        hits, key = self._hits, route[3]
        hits[key] = hits.get(key, 0) + 1
        value &= MASK[size]
        try:
            route[1](route[2], size, value)
        except Exception as e:
            raise self._fault(addr, size, value, e) from e


class MmioView(_MmioAccess):
    """One vCPU's access to an MmioBus (see PioView)."""

    def __init__(self, bus: "MmioBus") -> None:
        self._hits = {}
        self._routes = bus._routes          # the bus clears it in place when a device registers
        self._route = bus._route
        self._fault = bus._fault

    def _own_hits(self) -> dict[int, int]:
        return dict(self._hits)


class MmioBus(_Bus, _MmioAccess):
    """Guest-physical MMIO space: sorted ranges found by bisection, each address's route cached.

    Routes and counts are kept per address for addresses a device claims (hvm's own ranges bound them)
    and for the first TRACKED_ADDRESSES distinct unclaimed ones; any other unclaimed address shares one
    route, not cached, counted under OTHER."""

    kind = "mmio"
    width = 10

    def __init__(self) -> None:
        super().__init__()
        self._hits: dict[int, int] = {}
        self._routes: dict[int, tuple] = {}
        self._tracked: set[int] = set()       # distinct unclaimed addresses with their own route and count
        self._track_lock = threading.Lock()   # vCPUs miss the route cache at once
        self._other_route = (self._other_read, self._other_write, OTHER, OTHER)

    def _install(self, base: int, length: int, device: Device) -> None:
        self._routes.clear()

    def _uninstall(self, base: int, length: int) -> None:
        self._routes.clear()
        # The range's per-address counts go with it: a range that moves (a PCI BAR the guest places) would
        # otherwise leave counts at every place it sat, without bound (and report them as unclaimed).
        end = base + length
        for hits in [self._hits] + [view._hits for view in self._views]:
            for addr in [a for a in list(hits) if base <= a < end]:   # list(): vCPUs add keys meanwhile
                hits.pop(addr, None)

    def _route(self, addr: int) -> tuple:
        """(read, write, offset, key of the hit count) for an address not in the route cache."""
        r = self.find(addr)
        if r is not None:
            route = (r.device.read, r.device.write, addr - r.base, addr)
        else:
            with self._track_lock:
                if addr not in self._tracked:
                    if len(self._tracked) >= TRACKED_ADDRESSES:
                        return (self._other_read, self._other_write, addr, OTHER)
                    self._tracked.add(addr)
            route = (self._miss_read, self._miss_write, addr, addr)
        self._routes[addr] = route
        return route

    def _other_read(self, addr: int, size: int) -> int:
        self._log_miss(addr, "mmio read (%d bytes) from %s: no device there, reads as all ones", size)
        return MASK[size]

    def _other_write(self, addr: int, size: int, value: int) -> None:
        self._log_miss(addr, "mmio write of %#x (%d bytes) to %s: no device there, dropped", value, size)

    def _own_hits(self) -> dict[int, int]:
        return dict(self._hits)

    def for_vcpu(self) -> MmioView:
        """A view for one vCPU thread: its accesses counted apart, merged into counts/unhandled/other."""
        view = MmioView(self)
        self._views.append(view)
        return view
