"""ACPI fixed-hardware power management registers at QEMU's PIIX4 addresses (base 0x600):
PM1a event block (status/enable), PM1a control block (SCI_EN, sleep type and enable: S5 = power off,
S3 = suspend to RAM) and the 3.579545 MHz PM timer at 0x608, which guests (kvm-unit-tests, Linux) use as a clock.

S3 (as QEMU's acpi_pm1_cnt_write): SLP_TYP = S3_SLEEP_TYPE with SLP_EN calls on_suspend (Machine: the vCPUs
stop, RAM and devices are kept); the Machine's wake-up then calls wake(reason), which sets WAK_STS and the
status bit of what woke the machine (RTC_STS for the RTC alarm, PWRBTN_STS for the power button or a QMP
system_wakeup, which QEMU also reports as a power button press).

The fixed-feature power button (QMP system_powerdown): press_power_button() sets PWRBTN_STS; while
PWRBTN_EN is set too, the SCI (IRQ 9, level-triggered, active high: the FADT's SCI_INT and the MADT's
override) is raised, and it stays raised until the guest clears the status bit (write 1) or the enable
bit. The FADT leaves its PWR_BUTTON flag clear, which tells the guest the fixed-feature button exists."""
from __future__ import annotations

import threading
import time

from hvm._types import Callable
from hvm.mmio.device import IrqLine, StateReader
from hvm.mmio.published import ClockCounter

PM_BASE = 0x600
PM_LEN = 12
PM1_EVT = 0x0     # 2 bytes status, 2 bytes enable
PM1_CNT = 0x4     # 2 bytes
PM_TMR = 0x8      # 4 bytes
PM_TIMER_HZ = 3579545
SCI_IRQ = 9       # FADT SCI_INT (hvm/boot/acpi.py)
SCI_EN = 1 << 0
SLP_EN = 1 << 13
SLP_TYP_SHIFT = 10
S5_SLEEP_TYPE = 5  # what the DSDT's \_S5 package tells the guest to write
S3_SLEEP_TYPE = 1  # the DSDT's \_S3 (QEMU's PIIX4 DSDT gives 1 for S3 too)
TMR_STS = 1 << 0
PWRBTN_STS = 1 << 8   # PM1 status; the enable register has PWRBTN_EN at the same bit
PWRBTN_EN = 1 << 8
RTC_STS = 1 << 10     # PM1 status; RTC_EN at the same bit of the enable register
RTC_EN = 1 << 10
WAK_STS = 1 << 15     # set by the wake-up from a sleeping state (S3)
# Wake reasons (Machine.wakeup) -> the PM1 status bits the wake sets, as QEMU's acpi_notify_wakeup.
WAKE_STATUS = {"rtc": WAK_STS | RTC_STS, "powerbutton": WAK_STS | PWRBTN_STS, "qmp": WAK_STS | PWRBTN_STS}
# The events this device can raise an SCI for (TMR_STS is never set: timer overflow is not modelled).
SCI_EVENTS = TMR_STS | PWRBTN_STS | RTC_STS
TIMER_NS_LIMIT = (1 << 63) - 1


class AcpiPm:
    name = "acpi-pm"

    def __init__(self, on_poweroff: Callable[[], None] | None = None, clock_ns: Callable[[], int] = time.monotonic_ns,
                 sci: IrqLine | None = None, on_suspend: Callable[[], None] | None = None):
        self._on_poweroff = on_poweroff
        self.on_suspend = on_suspend
        self._clock = clock_ns
        # The PM timer is a published clock counter (hvm/mmio/published.py): with the real clock the vCPUs'
        # fast loops answer its 4-byte reads in C from the same t0; an injected clock (tests) keeps it here.
        real = clock_ns is time.monotonic_ns
        self._tmr = ClockCounter(PM_TIMER_HZ, 24, 4, in_c=real)
        self.published_registers = [(PM_TMR, self._tmr)] if real else []
        self.sci = sci or IrqLine(SCI_IRQ)
        # PM1 registers are written by vCPUs and by press_power_button() from another thread (QMP)
        self._lock = threading.Lock()
        self._power_on()

    def _power_on(self) -> None:
        self._t0 = self._clock()
        self.pm1_sts = 0
        self.pm1_en = 0
        self.pm1_cnt = SCI_EN  # no SMI_CMD in the FADT: the machine is always in ACPI mode

    def timer(self) -> int:
        """24-bit counter at 3.579545 MHz since the machine started (FADT does not set TMR_VAL_EXT)."""
        return self._tmr.count(self._clock())

    @property
    def _t0(self) -> int:
        return self._tmr.t0_ns

    @_t0.setter
    def _t0(self, t: int) -> None:
        self._tmr.t0_ns = t

    def _update_sci(self) -> None:
        self.sci.set_level(bool(self.pm1_sts & self.pm1_en & SCI_EVENTS))

    def press_power_button(self) -> None:
        """The ACPI power button (QMP system_powerdown): PWRBTN_STS, and the SCI if the guest enabled it.
        Safe from any thread."""
        with self._lock:
            self.pm1_sts |= PWRBTN_STS
            self._update_sci()

    def wake(self, reason: str) -> None:
        """After the machine's wake-up reset (Machine.wakeup): WAK_STS and the reason's status bit, which the
        resumed guest reads (and clears) as on a real board. Safe from any thread."""
        with self._lock:
            self.pm1_sts |= WAKE_STATUS[reason]
            self._update_sci()

    # --- device state (hvm.mmio.device) ------------------------------------------------------------
    # The PM timer is saved as the nanoseconds it has counted: a restored timer counts on from there, as
    # the vCPUs' restored kvmclock and TSC do, so a guest's clock sources keep agreeing. The SCI level is
    # not saved: it follows from status and enable, and load() drives the line to it.
    STATE_FIELDS = ("pm1_sts", "pm1_en", "pm1_cnt", "timer_ns")

    def save(self) -> dict:
        with self._lock:
            return {"pm1_sts": self.pm1_sts, "pm1_en": self.pm1_en, "pm1_cnt": self.pm1_cnt,
                    "timer_ns": self._clock() - self._t0}

    def load(self, state: dict) -> None:
        r = StateReader(self.name, state, self.STATE_FIELDS)
        sts, en = r.integer("pm1_sts", 0, 0xFFFF), r.integer("pm1_en", 0, 0xFFFF)
        cnt = r.integer("pm1_cnt", 0, 0xFFFF)
        if not cnt & SCI_EN or cnt & SLP_EN:
            raise r.fail("pm1_cnt", f"{cnt:#x}: SCI_EN is always set and SLP_EN never kept")
        elapsed = r.integer("timer_ns", 0, TIMER_NS_LIMIT)
        with self._lock:
            self.pm1_sts, self.pm1_en, self.pm1_cnt = sts, en, cnt
            self._t0 = self._clock() - elapsed
            self._update_sci()

    def reset(self) -> None:
        with self._lock:
            self._power_on()
            self._update_sci()

    # --- guest side ----------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset >= PM_TMR:
            return self.timer() >> (8 * (offset - PM_TMR)) & ((1 << (8 * size)) - 1)
        with self._lock:
            regs = self.pm1_sts | self.pm1_en << 16 | self.pm1_cnt << 32
        return (regs >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        poweroff = suspend = False
        with self._lock:
            if offset == PM1_EVT and size >= 2:
                self.pm1_sts &= ~(value & 0xFFFF)  # write 1 to clear
                if size == 4:
                    self.pm1_en = (value >> 16) & 0xFFFF
            elif offset == PM1_EVT + 2:
                self.pm1_en = value & 0xFFFF
            elif offset == PM1_CNT:
                value &= 0xFFFF
                self.pm1_cnt = (value & ~SLP_EN) | SCI_EN
                sleep_type = (value >> SLP_TYP_SHIFT) & 7 if value & SLP_EN else None
                poweroff = sleep_type == S5_SLEEP_TYPE
                suspend = sleep_type == S3_SLEEP_TYPE
            self._update_sci()
        # outside the lock: they stop the machine (other sleep types are ignored, as QEMU does)
        if poweroff and self._on_poweroff:
            self._on_poweroff()
        elif suspend and self.on_suspend:
            self.on_suspend()
