"""Buses route guest port-I/O and MMIO accesses to devices (as Firecracker's devices/bus.rs).

A device is registered for [base, base+length); overlaps are rejected. A bus turns an address into
(device, offset). An access no device claims reads as all ones and is dropped on write, counted and
logged once per address, and the VM keeps running (as on real hardware, and as QEMU does).
"""
from __future__ import annotations

import array
import bisect
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Protocol

from hvm.mmio.device import Device

log = logging.getLogger(__name__)


class BusError(ValueError):
    """A device registration that conflicts with another one."""


@dataclass(frozen=True)
class BusRange:
    base: int
    length: int
    device: Device

    @property
    def end(self) -> int:
        return self.base + self.length


class RouteListener(Protocol):
    """Told when an address turns out to be unclaimed (after its one log line) and when a device claims
    a range. The vCPU fast loop listens, to handle repeated accesses to unclaimed addresses without Python."""

    def unclaimed(self, addr: int) -> None: ...

    def claimed(self, base: int, length: int) -> None: ...


class _Bus:
    kind = "bus"
    width = 8  # hex digits used in messages

    def __init__(self) -> None:
        self.ranges: list[BusRange] = []
        self._bases: list[int] = []
        self._logged: set[int] = set()
        self.listeners: list[RouteListener] = []
        # Registration and the first miss at an address may happen on different threads: the lock makes
        # "claimed" and "unclaimed" reach the listeners in the order the routes really changed.
        self._route_lock = threading.Lock()
        # Accesses counted elsewhere (by the fast loop), merged into counts/unhandled: {addr: n} each.
        self.hit_sources: list[Callable[[], dict[int, int]]] = []

    def register(self, base: int, length: int, device: Device) -> None:
        if length <= 0:
            raise BusError(f"{self.kind} range for {device.name} has no length")
        with self._route_lock:
            for r in self.ranges:
                if base < r.end and r.base < base + length:
                    raise BusError(
                        f"{self.kind} range {base:#x}..{base + length - 1:#x} of {device.name} overlaps "
                        f"{r.base:#x}..{r.end - 1:#x} of {r.device.name}")
            i = bisect.bisect(self._bases, base)
            self.ranges.insert(i, BusRange(base, length, device))
            self._bases.insert(i, base)
            self._install(base, length, device)
            for listener in self.listeners:   # after the routes are in place
                listener.claimed(base, length)

    def _install(self, base: int, length: int, device: Device) -> None:
        """Route [base, base+length) to the device in the bus's fast lookup structures."""

    def find(self, addr: int) -> BusRange | None:
        i = bisect.bisect(self._bases, addr) - 1
        if i >= 0:
            r = self.ranges[i]
            if addr < r.end:
                return r
        return None

    def _own_hits(self) -> dict[int, int]:
        raise NotImplementedError

    def _hit_counts(self) -> dict[int, int]:
        hits = self._own_hits()
        for source in self.hit_sources:
            for a, n in source().items():
                hits[a] = hits.get(a, 0) + n
        return hits

    @property
    def counts(self) -> dict[int, int]:
        """Accesses per address that a device handled (for --stats)."""
        return {a: n for a, n in self._hit_counts().items() if self.find(a) is not None}

    @property
    def unhandled(self) -> dict[int, int]:
        """Accesses per address that no device claimed."""
        return {a: n for a, n in self._hit_counts().items() if self.find(a) is None}

    def attach(self, listener: RouteListener, hits: Callable[[], dict[int, int]]) -> None:
        """Add a route listener (told at once of the unclaimed addresses seen so far) and its hit counts."""
        with self._route_lock:
            self.listeners.append(listener)
            self.hit_sources.append(hits)
            for addr in sorted(self._logged):
                if self.find(addr) is None:
                    listener.unclaimed(addr)

    def _first_miss(self, addr: int) -> None:
        with self._route_lock:
            self._logged.add(addr)
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

    # An address nobody claims is served by these two, so the hot path has no branch for it.
    def _miss_read(self, addr: int, size: int) -> int:
        if addr not in self._logged:
            log.warning("%s read (%d bytes) from %#0*x: no device there, reads as all ones",
                        self.kind, size, self.width, addr)
            self._first_miss(addr)
        return (1 << (8 * size)) - 1

    def _miss_write(self, addr: int, size: int, value: int) -> None:
        if addr not in self._logged:
            log.warning("%s write of %#x (%d bytes) to %#0*x: no device there, dropped",
                        self.kind, value, size, self.width, addr)
            self._first_miss(addr)


class PioBus(_Bus):
    """x86 port I/O space (64 K ports). Per port: one (read, write) pair -- by default the shared miss
    handlers -- an offset and a hit counter, in flat sequences: two list indexes and one increment per
    exit, whether a device is there or not. (About 1.5 MiB and a millisecond to build.)"""

    kind = "port"
    width = 6

    def __init__(self) -> None:
        super().__init__()
        self._hits = [0] * 0x10000
        self._handlers: list[tuple] = [(self._miss_read, self._miss_write)] * 0x10000
        self._offsets = array.array("l", range(0x10000))   # a miss handler gets the port itself

    def register(self, base: int, length: int, device: Device) -> None:
        if base < 0 or base + length > 0x10000:
            raise BusError(f"port range {base:#x}+{length} of {device.name} is outside 0..0xffff")
        super().register(base, length, device)

    def _install(self, base: int, length: int, device: Device) -> None:
        pair = (device.read, device.write)
        for port in range(base, base + length):
            self._handlers[port] = pair
            self._offsets[port] = port - base

    def _own_hits(self) -> dict[int, int]:
        return {port: n for port, n in enumerate(self._hits) if n}

    def read(self, port: int, size: int) -> int:
        self._hits[port] += 1
        return self._handlers[port][0](self._offsets[port], size)

    def write(self, port: int, size: int, value: int) -> None:
        self._hits[port] += 1
        self._handlers[port][1](self._offsets[port], size, value)


class MmioBus(_Bus):
    """Guest-physical MMIO space: sorted ranges found by bisection, each address's route cached."""

    kind = "mmio"
    width = 10

    def __init__(self) -> None:
        super().__init__()
        self._hits: dict[int, int] = {}
        self._routes: dict[int, tuple] = {}

    def _install(self, base: int, length: int, device: Device) -> None:
        self._routes.clear()

    def _route(self, addr: int) -> tuple:
        route = self._routes.get(addr)
        if route is None:
            r = self.find(addr)
            route = (r.device.read, r.device.write, addr - r.base) if r else (self._miss_read, self._miss_write, addr)
            self._routes[addr] = route
        return route

    def _own_hits(self) -> dict[int, int]:
        return dict(self._hits)

    def read(self, addr: int, size: int) -> int:
        read, _, offset = self._route(addr)
        hits = self._hits
        hits[addr] = hits.get(addr, 0) + 1
        return read(offset, size)

    def write(self, addr: int, size: int, value: int) -> None:
        _, write, offset = self._route(addr)
        hits = self._hits
        hits[addr] = hits.get(addr, 0) + 1
        write(offset, size, value)
