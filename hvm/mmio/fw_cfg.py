"""QEMU's fw_cfg, I/O-port interface (selector at 0x510, data at 0x511): the few items guests such as
kvm-unit-tests read to learn the CPU count and memory size. An unknown item reads as zeros, as in QEMU."""
from __future__ import annotations

import struct
import threading

FW_CFG_PORT = 0x510
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MAX_CPUS = 0x0F


class FwCfg:
    """Register at FW_CFG_PORT with length 2: offset 0 = selector (16-bit write), offset 1 = data (bytes)."""

    name = "fw-cfg"

    def __init__(self, items: dict[int, bytes]):
        self.items = dict(items)
        self._selected = b""
        self._pos = 0
        # Several vCPUs may select and read at once: the selector and position change together.
        self._lock = threading.Lock()

    @classmethod
    def for_machine(cls, ram_size: int, cpus: int) -> "FwCfg":
        return cls({
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", 1),      # traditional interface only, no DMA
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
            FW_CFG_NOGRAPHIC: struct.pack("<H", 1),
            FW_CFG_NB_CPUS: struct.pack("<H", cpus),
            FW_CFG_MAX_CPUS: struct.pack("<H", cpus),
        })

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            with self._lock:
                self._selected = self.items.get(value & 0xFFFF & 0x3FFF, b"")
                self._pos = 0

    def read(self, offset: int, size: int) -> int:
        if offset != 1:
            return 0
        value = 0
        with self._lock:
            for i in range(size):  # a wider read returns consecutive bytes, as on QEMU
                byte = self._selected[self._pos] if self._pos < len(self._selected) else 0
                self._pos += 1
                value |= byte << (8 * i)
        return value
