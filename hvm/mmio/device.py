"""The interface every emulated device speaks, and the IRQ line it may raise.

Devices never import hvm.kvm: they get an IrqLine and byte sinks at construction,
so the same device runs under any accelerator (or in a unit test with no VM at all).
"""
from __future__ import annotations

from typing import Protocol


class Device(Protocol):
    name: str

    def read(self, offset: int, size: int) -> int:
        """A guest read of `size` bytes at `offset` within the device's range."""
        ...

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write of `size` bytes (value little-endian) at `offset`."""
        ...


class IrqLine:
    """A level-triggered interrupt line. The Machine binds it to the VM's irqchip;
    unbound (no irqchip) it only records the level."""

    def __init__(self, irq: int, setter=None):
        self.irq = irq
        self.level = False
        self._setter = setter  # callable(irq, level) or None

    def set_level(self, level: bool) -> None:
        if level == self.level:
            return
        self.level = level
        if self._setter is not None:
            self._setter(self.irq, 1 if level else 0)

    def raise_(self) -> None:
        self.set_level(True)

    def lower(self) -> None:
        self.set_level(False)
