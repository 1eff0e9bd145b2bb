"""QEMU's pc-testdev, as kvm-unit-tests use it: a 4-byte scratch port at 0xe0 (what is written reads
back), a flush-page port at 0xe4 (accepted, nothing to flush here), and 24 ports at 0x2000 that set
ISA/IOAPIC interrupt line levels."""
from __future__ import annotations

import threading
from typing import Callable

from hvm.mmio.device import StateReader
from hvm.mmio.registry import DeviceType

TESTDEV_PORT = 0xE0
TESTDEV_LEN = 8
TESTDEV_IRQ_PORT = 0x2000
TESTDEV_IRQ_LINES = 24


class PcTestDev:
    name = "pc-testdev"

    def __init__(self) -> None:
        self.data = 0
        self._lock = threading.Lock()   # partial writes are read-modify-writes; several vCPUs may make them

    # --- device state (hvm.mmio.device): the scratch register (the flush-page port keeps nothing)
    def save(self) -> dict:
        return {"data": self.data}

    def load(self, state: dict) -> None:
        self.data = StateReader(self.name, state, ("data",)).integer("data", 0, 0xFFFFFFFF)

    def reset(self) -> None:
        self.data = 0

    def read(self, offset: int, size: int) -> int:
        if offset < 4:
            return (self.data >> (8 * offset)) & ((1 << (8 * size)) - 1)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 4:
            # The register is 4 bytes: a wide write near its end (offset 2, size 4) keeps only what lands
            # in it, so the value stays what save() may give and load() takes.
            mask = (((1 << (8 * size)) - 1) << (8 * offset)) & 0xFFFFFFFF
            with self._lock:
                self.data = (self.data & ~mask) | ((value << (8 * offset)) & mask)


class PcTestDevIrq:
    """Port 0x2000 + n sets interrupt line n to the written value (0 or not 0)."""

    name = "pc-testdev-irq"

    def __init__(self, set_line: Callable[[int, int], None] | None):
        self._set_line = set_line
        self.levels = 0   # bit n: the level the guest last set on line n

    # --- device state (hvm.mmio.device): the line levels. KVM's irqchip state does not carry the levels
    # of the lines into it, so load() sets again every line whose level differs from this device's view.
    def save(self) -> dict:
        return {"levels": self.levels}

    def load(self, state: dict) -> None:
        self._drive(StateReader(self.name, state, ("levels",)).integer("levels", 0, (1 << TESTDEV_IRQ_LINES) - 1))

    def reset(self) -> None:
        self._drive(0)

    def _drive(self, levels: int) -> None:
        changed, self.levels = self.levels ^ levels, levels
        for line in range(TESTDEV_IRQ_LINES):
            if changed >> line & 1 and self._set_line is not None:
                self._set_line(line, levels >> line & 1)

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        level = 1 if value else 0
        self.levels = (self.levels & ~(1 << offset)) | (level << offset)
        if self._set_line is not None:
            self._set_line(offset, level)


def _create(ctx, props: dict) -> PcTestDev:
    device = PcTestDev()
    ctx.pio.register(TESTDEV_PORT, TESTDEV_LEN, device)
    ctx.pio.register(TESTDEV_IRQ_PORT, TESTDEV_IRQ_LINES, PcTestDevIrq(ctx.irq_setter))
    return device


DEVICE = DeviceType(
    name="testdev", aliases=("pc-testdev",), create=_create,
    help="QEMU's pc-testdev for kvm-unit-tests: scratch port 0xe0, flush-page port 0xe4, IRQ lines at 0x2000",
    ports=lambda p: [(TESTDEV_PORT, TESTDEV_LEN), (TESTDEV_IRQ_PORT, TESTDEV_IRQ_LINES)])
