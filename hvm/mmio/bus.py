"""Buses route guest port-I/O and MMIO accesses to devices (as Firecracker's devices/bus.rs).

A device is registered for [base, base+length); overlaps are rejected. A bus turns an address into
(device, offset). An access no device claims reads as all ones and is dropped on write, counted and
logged once per address, and the VM keeps running (as on real hardware, and as QEMU does).
"""
from __future__ import annotations

import bisect
import logging
from collections import Counter
from dataclasses import dataclass

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


class _Bus:
    kind = "bus"
    width = 8  # hex digits used in messages

    def __init__(self) -> None:
        self.ranges: list[BusRange] = []
        self._bases: list[int] = []
        # Exit counters for --stats: accesses per address (port or MMIO address), handled and not.
        self.counts: dict[int, int] = {}
        self.unhandled: Counter[int] = Counter()

    def register(self, base: int, length: int, device: Device) -> None:
        if length <= 0:
            raise BusError(f"{self.kind} range for {device.name} has no length")
        for r in self.ranges:
            if base < r.end and r.base < base + length:
                raise BusError(
                    f"{self.kind} range {base:#x}..{base + length - 1:#x} of {device.name} overlaps "
                    f"{r.base:#x}..{r.end - 1:#x} of {r.device.name}")
        i = bisect.bisect(self._bases, base)
        self.ranges.insert(i, BusRange(base, length, device))
        self._bases.insert(i, base)

    def find(self, addr: int) -> BusRange | None:
        i = bisect.bisect(self._bases, addr) - 1
        if i >= 0:
            r = self.ranges[i]
            if addr < r.end:
                return r
        return None

    def counts_by_device(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for addr, n in self.counts.items():
            r = self.find(addr)
            name = r.device.name if r else "?"
            out[name] = out.get(name, 0) + n
        return out

    def _miss(self, addr: int, size: int, is_write: bool, value: int = 0) -> None:
        self.unhandled[addr] += 1
        if self.unhandled[addr] == 1:
            if is_write:
                log.warning("%s write of %#x (%d bytes) to %#0*x: no device there, dropped",
                            self.kind, value, size, self.width, addr)
            else:
                log.warning("%s read (%d bytes) from %#0*x: no device there, reads as all ones",
                            self.kind, size, self.width, addr)


class PioBus(_Bus):
    """x86 port I/O space (64 K ports). Lookups go through a per-port table: one dict get per exit."""

    kind = "port"
    width = 6

    def __init__(self) -> None:
        super().__init__()
        self._ports: dict[int, tuple[Device, int]] = {}

    def register(self, base: int, length: int, device: Device) -> None:
        if base < 0 or base + length > 0x10000:
            raise BusError(f"port range {base:#x}+{length} of {device.name} is outside 0..0xffff")
        super().register(base, length, device)
        for port in range(base, base + length):
            self._ports[port] = (device, base)

    def read(self, port: int, size: int) -> int:
        entry = self._ports.get(port)
        if entry is None:
            self._miss(port, size, False)
            return (1 << (8 * size)) - 1
        counts = self.counts
        counts[port] = counts.get(port, 0) + 1
        device, base = entry
        return device.read(port - base, size)

    def write(self, port: int, size: int, value: int) -> None:
        entry = self._ports.get(port)
        if entry is None:
            self._miss(port, size, True, value)
            return
        counts = self.counts
        counts[port] = counts.get(port, 0) + 1
        device, base = entry
        device.write(port - base, size, value)


class MmioBus(_Bus):
    """Guest-physical MMIO space: sorted ranges, found by bisection."""

    kind = "mmio"
    width = 10

    def read(self, addr: int, size: int) -> int:
        r = self.find(addr)
        if r is None:
            self._miss(addr, size, False)
            return (1 << (8 * size)) - 1
        counts = self.counts
        counts[addr] = counts.get(addr, 0) + 1
        return r.device.read(addr - r.base, size)

    def write(self, addr: int, size: int, value: int) -> None:
        r = self.find(addr)
        if r is None:
            self._miss(addr, size, True, value)
            return
        counts = self.counts
        counts[addr] = counts.get(addr, 0) + 1
        r.device.write(addr - r.base, size, value)
