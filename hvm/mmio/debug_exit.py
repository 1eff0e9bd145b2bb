"""QEMU's isa-debug-exit: a guest write of V ends the VM with process status (V << 1) | 1."""
from __future__ import annotations


from hvm._types import Callable
from hvm.mmio.device import Stateless

DEFAULT_PORT = 0xF4
DEFAULT_SIZE = 4


class DebugExit(Stateless):
    name = "debug-exit"

    def __init__(self, on_exit: Callable[[int], None]):
        self._on_exit = on_exit

    # No device state (Stateless): a write ends the VM at once
    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        # As QEMU: the exit status is (value << 1) | 1, truncated by the OS to 8 bits.
        self._on_exit(((value << 1) | 1) & 0xFF)
