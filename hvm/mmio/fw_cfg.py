"""QEMU's fw_cfg, I/O-port interface (selector at 0x510, data at 0x511): the few items guests such as
kvm-unit-tests read to learn the CPU count and memory size. An unknown item reads as zeros, as in QEMU."""
from __future__ import annotations

import struct
import threading

from hvm.mmio.device import StateReader, state_lock

FW_CFG_PORT = 0x510
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_KEY_MASK = 0x3FFF   # bit 14 (write) and bit 15 (architecture-specific) are not part of the key


class FwCfg:
    """Register at FW_CFG_PORT with length 2: offset 0 = selector (16-bit write), offset 1 = data (bytes)."""

    name = "fw-cfg"

    def __init__(self, items: dict[int, bytes]):
        self.items = dict(items)   # the machine's description, built from its spec: not saved state
        # Several vCPUs may select and read at once: the selector and position change together.
        self._lock = threading.Lock()
        self._power_on()

    def _power_on(self) -> None:
        self._key = FW_CFG_SIGNATURE   # QEMU's reset selects the signature
        self._selected = self.items.get(self._key, b"")
        self._pos = 0

    # --- device state (hvm.mmio.device) ------------------------------------------------------------
    STATE_FIELDS = ("selector", "position")

    def save(self) -> dict:
        with state_lock(self):
            return {"selector": self._key, "position": self._pos}

    def load(self, state: dict) -> None:
        r = StateReader(self.name, state, self.STATE_FIELDS)
        key = r.integer("selector", 0, FW_CFG_KEY_MASK)
        selected = self.items.get(key, b"")
        pos = r.integer("position", 0, len(selected))
        with state_lock(self):
            self._key, self._selected, self._pos = key, selected, pos

    def reset(self) -> None:
        with state_lock(self):
            self._power_on()

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
                self._key = value & FW_CFG_KEY_MASK
                self._selected = self.items.get(self._key, b"")
                self._pos = 0

    def read(self, offset: int, size: int) -> int:
        if offset != 1:
            return 0
        value = 0
        with self._lock:
            for i in range(size):  # a wider read returns consecutive bytes, as on QEMU
                if self._pos < len(self._selected):
                    value |= self._selected[self._pos] << (8 * i)
                    self._pos += 1   # past the end it stays there (reads are zeros): bounded, and saved as is
        return value
