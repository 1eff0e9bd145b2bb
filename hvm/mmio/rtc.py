"""MC146818 RTC / CMOS at ports 0x70 (index, bit 7 = NMI mask) and 0x71 (data), with the host's
real time (UTC), BCD and 24-hour mode as a PC BIOS leaves it. The clock is read, not set: guest
writes to the time registers are kept as an offset from host time.

Saved state (save/load): the index, the 128 CMOS bytes and that offset, in whole microseconds. A restored
guest's clock is therefore host time plus the offset the guest set, as QEMU's RTC with its default
`-rtc base=utc,clock=host`: wall-clock time goes on while a snapshot sits on disk, as on a PC that was
switched off, and a guest that set its clock away from UTC finds it set so after restore."""
from __future__ import annotations

import threading
import time
from typing import Callable

from hvm.mmio.device import StateReader, state_lock

RTC_PORT = 0x70
RTC_LEN = 2
REG_SECONDS, REG_MINUTES, REG_HOURS = 0x00, 0x02, 0x04
REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_CENTURY = 0x32
B_24H = 0x02
B_BINARY = 0x04
CMOS_SIZE = 128
# The guest can walk its clock anywhere in years 1900..9999 (see write()); an offset beyond 10,000 years
# is no state this device makes. In microseconds it fits in 64 bits.
OFFSET_LIMIT_US = 10_000 * 366 * 86400 * 10**6


def _bcd(v: int) -> int:
    return (v // 10) << 4 | (v % 10)


def _from_bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


class Rtc:
    name = "rtc"

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._lock = threading.Lock()  # several vCPUs: the index and the register it selects go together
        self._power_on()

    def _power_on(self) -> None:
        self.index = 0
        self.cmos = bytearray(CMOS_SIZE)
        self.cmos[REG_A] = 0x26      # 32.768 kHz time base, 1024 Hz periodic rate; UIP clear
        self.cmos[REG_B] = B_24H     # BCD, 24-hour, no interrupts
        self.cmos[REG_D] = 0x80      # battery good: RAM and time valid
        self.offset_us = 0           # microseconds the guest set the clock away from host time

    @property
    def offset(self) -> float:
        """Seconds the guest set its clock away from host time."""
        return self.offset_us / 1e6

    # --- device state (hvm.mmio.device) ------------------------------------------------------------
    STATE_FIELDS = ("index", "cmos", "offset_us")

    def save(self) -> dict:
        with state_lock(self):
            return {"index": self.index, "cmos": bytes(self.cmos), "offset_us": self.offset_us}

    def load(self, state: dict) -> None:
        r = StateReader(self.name, state, self.STATE_FIELDS)
        index = r.integer("index", 0, CMOS_SIZE - 1)
        cmos = r.blob("cmos", CMOS_SIZE, CMOS_SIZE)
        offset_us = r.integer("offset_us", -OFFSET_LIMIT_US, OFFSET_LIMIT_US)
        try:   # the rule write() keeps: a four-digit year, which gmtime() and the century byte can take
            year = time.gmtime(self._clock() + offset_us / 1e6).tm_year
        except (ValueError, OverflowError, OSError):
            year = -1
        if not 1900 <= year <= 9999:
            raise r.fail("offset_us", f"{offset_us} puts the clock outside the years 1900..9999")
        with state_lock(self):
            self.index, self.cmos, self.offset_us = index, bytearray(cmos), offset_us

    def reset(self) -> None:
        """As a new device: hvm keeps no battery-backed CMOS, so the guest's settings and clock offset go
        (the clock reads host UTC again)."""
        with state_lock(self):
            self._power_on()

    def _time_field(self, reg: int) -> int:
        t = time.gmtime(self._clock() + self.offset)
        values = {REG_SECONDS: t.tm_sec, REG_MINUTES: t.tm_min, REG_HOURS: t.tm_hour,
                  REG_WEEKDAY: (t.tm_wday + 1) % 7 + 1, REG_DAY: t.tm_mday, REG_MONTH: t.tm_mon,
                  REG_YEAR: t.tm_year % 100, REG_CENTURY: t.tm_year // 100}
        v = values[reg]
        return v if self.cmos[REG_B] & B_BINARY else _bcd(v)

    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF  # the index port is write-only
        with self._lock:
            return self._read_data()

    def _read_data(self) -> int:
        # (every value read back is a byte: cmos[] holds bytes, the time fields are < 100 BCD or binary)
        reg = self.index
        if reg in (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR, REG_CENTURY):
            return self._time_field(reg)
        if reg == REG_C:
            value, self.cmos[REG_C] = self.cmos[REG_C], 0  # interrupt flags clear on read
            return value
        return self.cmos[reg]

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self._write(offset, value)

    def _write(self, offset: int, value: int) -> None:
        value &= 0xFF   # both ports are 8 bits wide: a wider access carries nothing more for the chip
        if offset == 0:
            self.index = value & 0x7F
            return
        reg = self.index
        if reg in (REG_C, REG_D):
            return  # read-only
        if reg in (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_DAY, REG_MONTH, REG_YEAR):
            # Setting the clock: keep it as an offset from host time.
            v = value if self.cmos[REG_B] & B_BINARY else _from_bcd(value)
            now = time.gmtime(self._clock() + self.offset)
            fields = [now.tm_year, now.tm_mon, now.tm_mday, now.tm_hour, now.tm_min, now.tm_sec]
            pos = {REG_YEAR: 0, REG_MONTH: 1, REG_DAY: 2, REG_HOURS: 3, REG_MINUTES: 4, REG_SECONDS: 5}[reg]
            fields[pos] = (now.tm_year // 100) * 100 + v if reg == REG_YEAR else v
            import calendar  # only when the guest sets the clock: calendar pulls in locale (~3 ms at start-up)

            try:
                offset = calendar.timegm(tuple(fields) + (0, 0, 0)) - self._clock()
                # Out-of-range fields roll over (day 0x99...): keep the clock within four-digit years, so
                # that repeated writes cannot walk it to where gmtime() or the century byte overflow.
                if 1900 <= time.gmtime(self._clock() + offset).tm_year <= 9999:
                    self.offset_us = round(offset * 1e6)
            except (ValueError, OverflowError, OSError):
                pass
            return
        self.cmos[reg] = value & 0xFF
