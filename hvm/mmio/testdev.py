"""QEMU's pc-testdev, as kvm-unit-tests use it: a 4-byte scratch port at 0xe0 (what is written reads
back), a flush-page port at 0xe4 (accepted, nothing to flush here), and 24 ports at 0x2000 that set
ISA/IOAPIC interrupt line levels."""
from __future__ import annotations

import threading
from typing import Callable

TESTDEV_PORT = 0xE0
TESTDEV_LEN = 8
TESTDEV_IRQ_PORT = 0x2000
TESTDEV_IRQ_LINES = 24


class PcTestDev:
    name = "pc-testdev"

    def __init__(self) -> None:
        self.data = 0
        self._lock = threading.Lock()   # partial writes are read-modify-writes; several vCPUs may make them

    def read(self, offset: int, size: int) -> int:
        if offset < 4:
            return (self.data >> (8 * offset)) & ((1 << (8 * size)) - 1)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 4:
            mask = ((1 << (8 * size)) - 1) << (8 * offset)
            with self._lock:
                self.data = (self.data & ~mask) | ((value << (8 * offset)) & mask)


class PcTestDevIrq:
    """Port 0x2000 + n sets interrupt line n to the written value (0 or not 0)."""

    name = "pc-testdev-irq"

    def __init__(self, set_line: Callable[[int, int], None] | None):
        self._set_line = set_line

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if self._set_line is not None:
            self._set_line(offset, 1 if value else 0)
