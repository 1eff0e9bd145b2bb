"""MC146818 RTC / CMOS at ports 0x70 (index, bit 7 = NMI mask) and 0x71 (data), with the host's
real time (UTC), BCD and 24-hour mode as a PC BIOS leaves it. The clock is read, not set: guest
writes to the time registers are kept as an offset from host time.

What the chip does and this device does too (QEMU's hw/rtc/mc146818rtc.c behaves the same way):

- Update cycle: once a second the time registers advance. Register A's UIP bit (7) reads 1 during the
  244 us (8 cycles of the 32.768 kHz time base) before each update, so a guest that waits for UIP 1 -> 0
  reads the time right after an update. UIP, like the time registers, is computed from the clock on each
  read: no thread runs for it.
- Register A's divider bits DV (4-6): 000, 001 and 010 run the clock (010 is a PC's 32.768 kHz crystal;
  as QEMU, the other two are taken as the same); any other value stops it (11x: divider reset), and when
  the guest starts it again the first update comes half a second later. Register B's SET bit (7) stops the updates while the guest writes the time (and clears
  UIE). While stopped, the time registers are plain CMOS bytes holding the time the clock stopped at and
  whatever the guest writes; the clock runs on from them when it starts again.
- Interrupts: register C's flags PF (periodic, at the rate of register A bits 0-3: 2 Hz .. 8192 Hz), AF
  (alarm: hours/minutes/seconds equal the alarm registers 5/3/1 after an update; an alarm byte
  0xC0-0xFF matches any value) and UF (update ended) are set whatever register B says; IRQF (7) is set
  and IRQ 8 raised when a flag is set whose enable bit (PIE, AIE, UIE in register B) is set. Reading
  register C returns the flags, clears them and lowers IRQ 8 (the ISA line is edge-triggered).
  Flags are also computed from the clock, when register C is read; a timer thread (one per RTC, made the
  first time the guest enables an interrupt, asleep while none is enabled, stopped by close() and held by
  pause()) wakes at the next event that raises IRQ 8. While IRQF is set nothing new can reach the guest,
  so the thread sleeps until register C is read (an 8192 Hz periodic interrupt costs at most one wake-up
  per interrupt the guest takes). `on_alarm` is called (outside the lock) each time the alarm matches with
  AIE set: the ACPI wake-up from S3.

Saved state (save/load): the index, the 128 CMOS bytes (register C's flags included) and that offset, in
whole microseconds. A restored guest's clock is therefore host time plus the offset the guest set, as QEMU's
RTC with its default `-rtc base=utc,clock=host`: wall-clock time goes on while a snapshot sits on disk, as
on a PC that was switched off, and a guest that set its clock away from UTC finds it set so after restore.
Events while the snapshot sat on disk are not delivered; a restored RTC with IRQF set raises IRQ 8 again
and one with an interrupt enabled starts its timer."""
from __future__ import annotations

import logging
import threading
import time

from hvm._types import Callable
from hvm.mmio.device import IrqLine, StateReader, state_lock

log = logging.getLogger(__name__)

RTC_PORT = 0x70
RTC_LEN = 2
RTC_IRQ = 8
REG_SECONDS, REG_MINUTES, REG_HOURS = 0x00, 0x02, 0x04
REG_SECONDS_ALARM, REG_MINUTES_ALARM, REG_HOURS_ALARM = 0x01, 0x03, 0x05
REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_CENTURY = 0x32
TIME_REGS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR, REG_CENTURY)
A_UIP = 0x80
A_DV = 0x70
A_DIVIDER_RESET = 0x60     # DV = 11x
A_RATE = 0x0F
B_SET, B_PIE, B_AIE, B_UIE, B_SQWE = 0x80, 0x40, 0x20, 0x10, 0x08
B_BINARY = 0x04
B_24H = 0x02
C_IRQF, C_PF, C_AF, C_UF = 0x80, 0x40, 0x20, 0x10
C_FLAGS = C_PF | C_AF | C_UF          # the same bits as their enables in register B
CMOS_SIZE = 128
# The guest can walk its clock anywhere in years 1900..9999 (see write()); an offset beyond 10,000 years
# is no state this device makes. In microseconds it fits in 64 bits.
OFFSET_LIMIT_US = 10_000 * 366 * 86400 * 10**6
NS = 10**9
TIME_BASE_HZ = 32768
UIP_NS = 8 * NS // TIME_BASE_HZ       # 244140 ns: UIP reads 1 this long before each update
DAY = 86400
TIMER_MAX_WAIT = 1.0                  # s: the timer looks at the clock at least this often (host clock steps)


def _bcd(v: int) -> int:
    return (v // 10) << 4 | (v % 10)


def _from_bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


def period_ticks(rate: int) -> int:
    """Register A's rate select (bits 0-3) as a period in 32.768 kHz cycles; 0 = no periodic interrupt.
    Rates 1 and 2 give 256 and 128 Hz (as 8 and 9) with a 32.768 kHz time base; 3 is the fastest, 8192 Hz."""
    if rate == 0:
        return 0
    if rate <= 2:
        rate += 7
    return 1 << (rate - 1)


class Rtc:
    name = "rtc"

    def __init__(self, clock: Callable[[], float] = time.time, irq: IrqLine | None = None, *,
                 timer: bool | None = None):
        """`clock`: host UTC seconds. `irq`: IRQ 8 (None: the flags are kept, no line is driven).
        `timer`: whether a thread delivers interrupts on time (default: when there is an IRQ line); without
        it, interrupts come when the guest touches the RTC or poll() is called (unit tests)."""
        self._clock = clock
        self.irq = irq
        self.on_alarm: Callable[[], None] | None = None
        self._lock = threading.Lock()  # several vCPUs and the timer: the index and the register it selects go together
        self._wake = threading.Condition(self._lock)
        self._use_timer = irq is not None if timer is None else timer
        self._thread: threading.Thread | None = None
        self._closed = False
        self._paused = False
        self._alarm_cache: tuple[tuple, int | None] | None = None
        self._alarm_due = False        # the alarm matched with AIE: on_alarm is to be called (outside the lock)
        self.timer_wakeups = 0         # host-side statistic: how often the timer thread looked at the clock
        self._power_on()

    def _power_on(self) -> None:
        self.index = 0
        self.cmos = bytearray(CMOS_SIZE)
        self.cmos[REG_A] = 0x26      # 32.768 kHz time base, 1024 Hz periodic rate; UIP clear
        self.cmos[REG_B] = B_24H     # BCD, 24-hour, no interrupts
        self.cmos[REG_D] = 0x80      # battery good: RAM and time valid
        self.offset_us = 0           # microseconds the guest set the clock away from host time
        self._synced_ns = self._now()   # host time up to which register C's flags are accounted

    @property
    def offset(self) -> float:
        """Seconds the guest set its clock away from host time."""
        return self.offset_us / 1e6

    # --- clock ---------------------------------------------------------------------------------------
    def _now(self) -> int:
        return round(self._clock() * NS)

    def _guest_ns(self, now: int) -> int:
        return now + self.offset_us * 1000

    def _divider_running(self) -> bool:
        return (self.cmos[REG_A] & A_DV) <= 0x20

    def _running(self) -> bool:
        """The clock runs and the registers follow it (no SET, divider running)."""
        return self._divider_running() and not self.cmos[REG_B] & B_SET

    def _encode(self, reg: int, v: int) -> int:
        if reg in (REG_HOURS, REG_HOURS_ALARM) and not self.cmos[REG_B] & B_24H:
            pm = 0x80 if v >= 12 else 0
            v = v % 12 or 12
            return pm | (v if self.cmos[REG_B] & B_BINARY else _bcd(v))
        return v if self.cmos[REG_B] & B_BINARY else _bcd(v)

    def _decode(self, reg: int, byte: int) -> int:
        if reg == REG_HOURS and not self.cmos[REG_B] & B_24H:
            v = byte & 0x7F
            v = v if self.cmos[REG_B] & B_BINARY else _from_bcd(v)
            return v % 12 + (12 if byte & 0x80 else 0)
        return byte if self.cmos[REG_B] & B_BINARY else _from_bcd(byte)

    def _fields(self, guest_s: int) -> dict[int, int]:
        """The time registers' values (not encoded) at guest second `guest_s`."""
        t = time.gmtime(guest_s)
        return {REG_SECONDS: t.tm_sec, REG_MINUTES: t.tm_min, REG_HOURS: t.tm_hour,
                REG_WEEKDAY: (t.tm_wday + 1) % 7 + 1, REG_DAY: t.tm_mday, REG_MONTH: t.tm_mon,
                REG_YEAR: t.tm_year % 100, REG_CENTURY: t.tm_year // 100}

    def _set_offset(self, fields: list[int], phase_ns: int, now: int) -> None:
        """Set the clock to `fields` (year, month, day, hours, minutes, seconds; days, hours, minutes and
        seconds out of range roll over) plus `phase_ns`, if that is a four-digit year: repeated writes cannot
        walk it to where gmtime() or the century byte overflow. Otherwise the clock stays as it was."""
        import calendar  # only when the guest sets the clock: calendar pulls in locale (~3 ms at start-up)

        try:
            seconds = calendar.timegm(tuple(fields) + (0, 0, 0))
            if 1900 <= time.gmtime(seconds + phase_ns // NS).tm_year <= 9999:
                self.offset_us = (seconds * NS + phase_ns - now) // 1000
        except (ValueError, OverflowError, OSError):
            pass

    def _freeze(self, now: int) -> None:
        """The clock stops (SET, or the divider stopped): the time registers keep the time it showed."""
        for reg, v in self._fields(self._guest_ns(now) // NS).items():
            self.cmos[reg] = self._encode(reg, v)

    def _thaw(self, now: int, phase_ns: int) -> None:
        """The clock starts again from the time registers' bytes, `phase_ns` into its first second."""
        c = self.cmos
        fields = [self._decode(REG_CENTURY, c[REG_CENTURY]) * 100 + self._decode(REG_YEAR, c[REG_YEAR]),
                  self._decode(REG_MONTH, c[REG_MONTH]), self._decode(REG_DAY, c[REG_DAY]),
                  self._decode(REG_HOURS, c[REG_HOURS]), self._decode(REG_MINUTES, c[REG_MINUTES]),
                  self._decode(REG_SECONDS, c[REG_SECONDS])]
        self._set_offset(fields, phase_ns, now)
        self._synced_ns = now

    # --- interrupts ----------------------------------------------------------------------------------
    def _alarm_values(self, reg: int, limit: int) -> list[int]:
        """The values (0..limit-1) the alarm register `reg` matches, in the current data mode."""
        byte = self.cmos[reg]
        if byte & 0xC0 == 0xC0:
            return list(range(limit))        # "don't care"
        return [v for v in range(limit) if self._encode(reg, v) == byte]

    def _next_alarm(self, after_s: int) -> int | None:
        """The first guest second > after_s whose time matches the alarm registers (None: never, e.g. an
        alarm byte no time has). The time is UTC: every matching time of day comes once a day."""
        # One entry of cache: the timer asks again on each wake-up (up to 8192 a second) within one second.
        key = (after_s, self.cmos[REG_SECONDS_ALARM], self.cmos[REG_MINUTES_ALARM], self.cmos[REG_HOURS_ALARM],
               self.cmos[REG_B] & (B_BINARY | B_24H))
        if self._alarm_cache is not None and self._alarm_cache[0] == key:
            return self._alarm_cache[1]
        match = self._find_alarm(after_s)
        self._alarm_cache = (key, match)
        return match

    def _find_alarm(self, after_s: int) -> int | None:
        hours = self._alarm_values(REG_HOURS_ALARM, 24)
        minutes = self._alarm_values(REG_MINUTES_ALARM, 60)
        seconds = self._alarm_values(REG_SECONDS_ALARM, 60)
        if not (hours and minutes and seconds):
            return None
        base, tod = after_s - after_s % DAY, after_s % DAY
        cur_h, cur_m = tod // 3600, tod // 60 % 60
        # The lists are sorted: the first candidate past `tod` is the answer, found in < 24 + 60 + 60 steps.
        for day in (0, 1):
            for h in hours:
                if day == 0 and h < cur_h:
                    continue
                for m in minutes:
                    if day == 0 and h == cur_h and m < cur_m:
                        continue
                    for s in seconds:
                        candidate = day * DAY + h * 3600 + m * 60 + s
                        if candidate > tod:
                            return base + candidate
        return None

    def _advance(self, now: int) -> None:
        """Account the events between the last call and `now` in register C (lock held). An alarm match
        with AIE set makes on_alarm due: the caller that takes it (_take_alarm) calls it, without the lock."""
        before, self._synced_ns = self._synced_ns, now
        if now <= before or not self._divider_running():
            return            # (after a host clock step back, events are counted again from there)
        off = self.offset_us * 1000
        ga, gb = before + off, now + off
        new = 0
        period = period_ticks(self.cmos[REG_A] & A_RATE)
        if period and (gb * TIME_BASE_HZ // NS) // period > (ga * TIME_BASE_HZ // NS) // period:
            new |= C_PF
        if not self.cmos[REG_B] & B_SET:       # SET stops the updates, and with them UF and AF
            sa, sb = ga // NS, gb // NS
            if sb > sa:
                new |= C_UF
                match = self._next_alarm(sa)
                if match is not None and match <= sb:
                    new |= C_AF
                    if self.cmos[REG_B] & B_AIE:
                        self._alarm_due = True
        if new:
            self._set_flags(new)

    def _take_alarm(self) -> bool:
        """Whether on_alarm is due (lock held); the caller calls _alarm() once it released the lock."""
        due, self._alarm_due = self._alarm_due, False
        return due

    def _set_flags(self, flags: int) -> None:
        self.cmos[REG_C] |= flags
        if self.cmos[REG_C] & self.cmos[REG_B] & C_FLAGS and not self.cmos[REG_C] & C_IRQF:
            self.cmos[REG_C] |= C_IRQF
            if self.irq is not None:
                self.irq.raise_()

    def _next_event(self, now: int) -> int | None:
        """Host time (ns) of the next event that changes what the guest gets: an enabled flag while IRQF is
        clear, or an alarm with AIE while on_alarm is set. None: nothing will (the timer sleeps)."""
        enabled = self.cmos[REG_B] & C_FLAGS
        if not enabled or not self._divider_running():
            return None
        off = self.offset_us * 1000
        g = now + off
        updating = not self.cmos[REG_B] & B_SET
        due = []
        if self.cmos[REG_C] & C_IRQF:
            # IRQ 8 is up until the guest reads register C: only the alarm's wake-up call can still happen.
            if enabled & B_AIE and updating and self.on_alarm is not None:
                match = self._next_alarm(g // NS)
                if match is not None:
                    due.append(match * NS)
        else:
            period = period_ticks(self.cmos[REG_A] & A_RATE)
            if enabled & B_PIE and period:
                tick = (g * TIME_BASE_HZ // NS // period + 1) * period
                due.append(-(-tick * NS // TIME_BASE_HZ))
            if enabled & B_UIE and updating:
                due.append((g // NS + 1) * NS)
            if enabled & B_AIE and updating:
                match = self._next_alarm(g // NS)
                if match is not None:
                    due.append(match * NS)
        return min(due) - off if due else None

    def poll(self) -> None:
        """Account the events up to now (raising IRQ 8 as they say; on_alarm called): what the timer thread
        does on each wake-up. For tests without the thread."""
        with self._lock:
            self._advance(self._now())
            alarm = self._take_alarm()
        if alarm:
            self._alarm()

    def _alarm(self) -> None:
        callback = self.on_alarm
        if callback is not None:
            try:
                callback()
            except Exception:   # the wake-up is the machine's business: the clock goes on
                log.exception("rtc: on_alarm failed")

    def _rearm(self) -> None:
        """Interrupt settings changed (lock held): start the timer thread the first time an interrupt is
        enabled, and let it compute its next wake-up."""
        if not self._use_timer or self._closed:
            return
        if self._thread is None:
            if not self.cmos[REG_B] & C_FLAGS:
                return
            self._thread = threading.Thread(target=self._timer_main, name="rtc-timer", daemon=True)
            self._thread.start()
        self._wake.notify()

    def _timer_main(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                self.timer_wakeups += 1
                now = self._now()
                alarm = False
                if not self._paused:
                    self._advance(now)
                    alarm = self._take_alarm()
                if not alarm:
                    due = None if self._paused else self._next_event(now)
                    self._wake.wait(None if due is None else min(max(due - now, 0) / NS, TIMER_MAX_WAIT))
                    continue
            self._alarm()

    def pause(self) -> None:
        """The VM pauses: no IRQ 8 until resume() (the flags catch up then, from the clock)."""
        with self._lock:
            self._paused = True
            self._wake.notify()

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._rearm()

    def close(self) -> None:
        """The machine closes: the timer thread ends (joined, bounded)."""
        with self._lock:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)
            if thread.is_alive():
                log.error("close: the RTC timer thread did not stop")

    # --- device state (hvm.mmio.device) ------------------------------------------------------------
    STATE_FIELDS = ("index", "cmos", "offset_us")

    def save(self) -> dict:
        with state_lock(self):
            # Register C as of now (the flags are the clock's). An alarm's on_alarm is left to the timer or
            # the next access: a save (a snapshot, the VM paused) calls nothing of the machine's.
            self._advance(self._now())
            if self._alarm_due:
                self._rearm()
            return {"index": self.index, "cmos": bytes(self.cmos), "offset_us": self.offset_us}

    def load(self, state: dict) -> None:
        r = StateReader(self.name, state, self.STATE_FIELDS)
        index = r.integer("index", 0, CMOS_SIZE - 1)
        cmos = bytearray(r.blob("cmos", CMOS_SIZE, CMOS_SIZE))
        offset_us = r.integer("offset_us", -OFFSET_LIMIT_US, OFFSET_LIMIT_US)
        if cmos[REG_C] & 0x0F:
            raise r.fail("cmos", f"register C is {cmos[REG_C]:#04x}: its bits 0-3 are always 0")
        try:   # the rule write() keeps: a four-digit year, which gmtime() and the century byte can take
            year = time.gmtime(self._clock() + offset_us / 1e6).tm_year
        except (ValueError, OverflowError, OSError):
            year = -1
        if not 1900 <= year <= 9999:
            raise r.fail("offset_us", f"{offset_us} puts the clock outside the years 1900..9999")
        # UIP is computed on each read; hvm before the update cycle kept a guest's write of bit 7 there.
        cmos[REG_A] &= ~A_UIP
        with state_lock(self):
            self.index, self.cmos, self.offset_us = index, cmos, offset_us
            self._synced_ns = self._now()
            self._alarm_due = False
            if self.irq is not None:
                self.irq.set_level(bool(cmos[REG_C] & C_IRQF))
            self._rearm()

    def reset(self) -> None:
        """As a new device: hvm keeps no battery-backed CMOS, so the guest's settings and clock offset go
        (the clock reads host UTC again), interrupts are off and IRQ 8 low."""
        with state_lock(self):
            self._power_on()
            self._alarm_due = False
            if self.irq is not None:
                self.irq.lower()
            self._rearm()

    def wake_reset(self) -> None:
        """The reset a PC's RTC sees on an S3 wake-up (QEMU's mc146818rtc reset): PIE, AIE and SQWE off,
        register C's flags cleared and IRQ 8 low; the clock, its offset and the CMOS bytes are kept (the
        battery-backed part). reset() is the power-on one."""
        with state_lock(self):
            self._advance(self._now())
            self._alarm_due = False
            self.cmos[REG_B] &= ~(B_PIE | B_AIE | B_SQWE)
            self.cmos[REG_C] = 0
            if self.irq is not None:
                self.irq.lower()
            self._rearm()

    # --- guest accesses ------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF  # the index port is write-only
        with self._lock:
            value = self._read_data()
            alarm = self._take_alarm()
        if alarm:
            self._alarm()
        return value

    def _read_data(self) -> int:
        # (every value read back is a byte: cmos[] holds bytes, the time fields are < 100 BCD or binary)
        reg = self.index
        if reg in TIME_REGS:
            if not self._running():
                return self.cmos[reg]
            return self._encode(reg, self._fields(self._guest_ns(self._now()) // NS)[reg])
        if reg == REG_A:
            value = self.cmos[REG_A]
            if self._running() and self._guest_ns(self._now()) % NS >= NS - UIP_NS:
                value |= A_UIP
            return value
        if reg == REG_C:
            self._advance(self._now())
            value, self.cmos[REG_C] = self.cmos[REG_C], 0  # interrupt flags clear on read
            if self.irq is not None:
                self.irq.lower()
            if value & C_IRQF:
                self._rearm()     # the timer slept while IRQF was set
            return value
        return self.cmos[reg]

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self._write(offset, value)
            alarm = self._take_alarm()
        if alarm:
            self._alarm()

    def _write(self, offset: int, value: int) -> None:
        value &= 0xFF   # both ports are 8 bits wide: a wider access carries nothing more for the chip
        if offset == 0:
            self.index = value & 0x7F
            return
        reg = self.index
        if reg in (REG_C, REG_D):
            return  # read-only
        now = self._now()
        # Account what happened under the old settings (time, modes, alarm) before they change.
        self._advance(now)
        if reg in TIME_REGS:
            if not self._running():
                self.cmos[reg] = value      # the clock is stopped: the guest writes the bytes it starts from
            elif reg != REG_WEEKDAY:        # (the weekday follows from the date, as in QEMU)
                self._set_field(reg, value, now)
            else:
                self.cmos[reg] = value
            self._rearm()
            return
        if reg == REG_A:
            was_running, divider_was = self._running(), self._divider_running()
            self.cmos[REG_A] = value & ~A_UIP    # UIP is read-only
            if was_running and not self._running():
                self._freeze(now)
            elif not was_running and self._running():
                # Out of a stopped or reset divider the first update comes half a second later.
                phase = self._guest_ns(now) % NS if divider_was else NS // 2
                self._thaw(now, phase)
            self._rearm()
            return
        if reg == REG_B:
            was_running = self._running()
            if value & B_SET:
                value &= ~B_UIE      # the SET bit going high clears UIE (data sheet; QEMU too)
            self.cmos[REG_B] = value
            if was_running and not self._running():
                self._freeze(now)
            elif not was_running and self._running():
                self._thaw(now, self._guest_ns(now) % NS)    # the divider ran on under SET
            # A flag already set when its interrupt becomes enabled raises IRQ 8 at once; with none, IRQF
            # and the line go down (QEMU does the same).
            if self.cmos[REG_C] & value & C_FLAGS:
                if not self.cmos[REG_C] & C_IRQF:
                    self.cmos[REG_C] |= C_IRQF
                    if self.irq is not None:
                        self.irq.raise_()
            else:
                self.cmos[REG_C] &= ~C_IRQF
                if self.irq is not None:
                    self.irq.lower()
            self._rearm()
            return
        self.cmos[reg] = value
        if reg in (REG_SECONDS_ALARM, REG_MINUTES_ALARM, REG_HOURS_ALARM):
            self._rearm()

    def _set_field(self, reg: int, value: int, now: int) -> None:
        """A time register written while the clock runs: the clock jumps there, the second starting now."""
        v = self._decode(reg, value)
        t = time.gmtime(self._guest_ns(now) // NS)
        fields = [t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec]
        if reg == REG_YEAR:
            fields[0] = (t.tm_year // 100) * 100 + v
        elif reg == REG_CENTURY:
            fields[0] = v * 100 + t.tm_year % 100
        else:
            fields[{REG_MONTH: 1, REG_DAY: 2, REG_HOURS: 3, REG_MINUTES: 4, REG_SECONDS: 5}[reg]] = v
        self._set_offset(fields, 0, now)
        self._synced_ns = now
