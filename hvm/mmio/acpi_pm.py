"""ACPI fixed-hardware power management registers at QEMU's PIIX4 addresses (base 0x600):
PM1a event block (status/enable), PM1a control block (SCI_EN, sleep type and enable: S5 = power off)
and the 3.579545 MHz PM timer at 0x608, which guests (kvm-unit-tests, Linux) use as a clock."""
from __future__ import annotations

import threading
import time
from typing import Callable

PM_BASE = 0x600
PM_LEN = 12
PM1_EVT = 0x0     # 2 bytes status, 2 bytes enable
PM1_CNT = 0x4     # 2 bytes
PM_TMR = 0x8      # 4 bytes
PM_TIMER_HZ = 3579545
SCI_EN = 1 << 0
SLP_EN = 1 << 13
SLP_TYP_SHIFT = 10
S5_SLEEP_TYPE = 5  # what the DSDT's \_S5 package tells the guest to write
TMR_STS = 1 << 0


class AcpiPm:
    name = "acpi-pm"

    def __init__(self, on_poweroff: Callable[[], None] | None = None, clock_ns: Callable[[], int] = time.monotonic_ns):
        self._on_poweroff = on_poweroff
        self._clock = clock_ns
        self._t0 = clock_ns()
        self.pm1_sts = 0
        self.pm1_en = 0
        self.pm1_cnt = SCI_EN  # no SMI_CMD in the FADT: the machine is always in ACPI mode
        # Several vCPUs: read-modify-writes of the registers are atomic; poweroff is called unlocked.
        self._lock = threading.Lock()

    def timer(self) -> int:
        """24-bit counter at 3.579545 MHz since the machine started (FADT does not set TMR_VAL_EXT)."""
        return ((self._clock() - self._t0) * PM_TIMER_HZ // 1_000_000_000) & 0xFFFFFF

    def read(self, offset: int, size: int) -> int:
        if offset >= PM_TMR:
            return self.timer() >> (8 * (offset - PM_TMR)) & ((1 << (8 * size)) - 1)
        with self._lock:
            regs = self.pm1_sts | self.pm1_en << 16 | self.pm1_cnt << 32
        return (regs >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            poweroff = self._write(offset, size, value)
        if poweroff and self._on_poweroff:
            self._on_poweroff()

    def _write(self, offset: int, size: int, value: int) -> bool:
        """Returns True when the write asks for S5 (power off)."""
        if offset == PM1_EVT and size >= 2:
            self.pm1_sts &= ~(value & 0xFFFF)  # write 1 to clear
            if size == 4:
                self.pm1_en = value >> 16
        elif offset == PM1_EVT + 2:
            self.pm1_en = value & 0xFFFF
        elif offset == PM1_CNT:
            value &= 0xFFFF
            self.pm1_cnt = (value & ~SLP_EN) | SCI_EN
            return bool(value & SLP_EN) and (value >> SLP_TYP_SHIFT) & 7 == S5_SLEEP_TYPE
        return False
