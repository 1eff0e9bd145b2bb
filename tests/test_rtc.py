"""The MC146818 RTC's update cycle and interrupts (hvm/mmio/rtc.py): UIP, the divider and SET, register C's
flags and IRQ 8, the alarm with its don't-care values, the periodic rate, the timer thread's bounds, state,
and a guest (firmware/rtc_irq.S) that waits for UIP and takes the alarm and update interrupts through the PIC."""
from __future__ import annotations

import calendar
import threading
import time

import pytest

from conftest import FIRMWARE, run_hvm, write_yaml
from hvm.mmio.device import IrqLine
from hvm.mmio.rtc import RTC_IRQ, Rtc

T0 = calendar.timegm((2024, 1, 1, 12, 0, 0))     # a whole second: 12:00:00 UTC
NO_PF = 0x20     # register A: 32.768 kHz, periodic rate 0 (the chip sets PF at the rate even with PIE off)


class Rig:
    """An RTC on a fake clock, with IRQ 8 recorded; no timer thread (poll() stands for its wake-ups)."""

    def __init__(self, t: float = T0, timer: bool = False, reg_a: int | None = None):
        self.t = t
        self.irqs: list[int] = []
        self.alarms = 0
        self.rtc = Rtc(clock=lambda: self.t, irq=IrqLine(RTC_IRQ, lambda n, level: self.irqs.append(level)),
                       timer=timer)
        self.rtc.on_alarm = self.alarm
        if reg_a is not None:
            self.set(0x0A, reg_a)

    def alarm(self) -> None:
        self.alarms += 1

    def get(self, reg: int) -> int:
        self.rtc.write(0, 1, reg)
        return self.rtc.read(1, 1)

    def set(self, reg: int, value: int) -> None:
        self.rtc.write(0, 1, reg)
        self.rtc.write(1, 1, value)

    def at(self, t: float) -> "Rig":
        self.t = t
        self.rtc.poll()
        return self

    @property
    def level(self) -> bool:
        return self.rtc.irq.level


# --- update cycle ---------------------------------------------------------------------------------------
def test_uip_reads_set_only_in_the_244_us_before_each_update():
    r = Rig()
    for frac, uip in ((0.0, 0), (0.5, 0), (0.9997, 0), (1 - 240e-6, 0x80), (1 - 100e-6, 0x80), (1 - 2e-6, 0x80),
                      (1.0, 0), (1.0001, 0)):
        r.t = T0 + 5 + frac
        assert r.get(0x0A) == 0x26 | uip, frac
    r.t = T0 + 5 + 0.9999                   # in the window the time is still the old second; then it updates
    assert r.get(0x00) == 0x05
    r.t = T0 + 6
    assert r.get(0x00) == 0x06


def test_uip_never_reads_set_while_set_or_the_divider_is_stopped():
    r = Rig()
    r.set(0x0B, 0x82)                       # SET
    r.t = T0 + 1 - 100e-6
    assert r.get(0x0A) == 0x26
    r.set(0x0B, 0x02)
    r.set(0x0A, 0x66)                       # divider reset
    assert r.get(0x0A) == 0x66
    r.t = T0 + 3.5
    r.set(0x0A, 0xA6)                       # UIP is read-only: a written bit 7 is not kept
    assert r.get(0x0A) == 0x26


def test_set_freezes_the_clock_and_it_runs_on_from_what_the_guest_wrote():
    r = Rig(T0 + 0.3)
    r.set(0x0B, 0x92)                       # SET with UIE: SET clears UIE
    assert r.get(0x0B) == 0x82
    r.t = T0 + 3.6
    assert (r.get(0x04), r.get(0x02), r.get(0x00)) == (0x12, 0x00, 0x00)     # stopped at 12:00:00
    r.set(0x00, 0x30)
    r.set(0x02, 0x45)
    r.set(0x04, 0x08)
    assert r.get(0x00) == 0x30              # the bytes written, no update while SET
    r.set(0x0B, 0x02)                       # the clock runs from 08:45:30, the divider's phase (0.6 s) kept
    r.t = T0 + 3.99
    assert (r.get(0x04), r.get(0x02), r.get(0x00)) == (0x08, 0x45, 0x30)
    r.t = T0 + 4.01
    assert r.get(0x00) == 0x31


def test_a_divider_reset_stops_the_clock_and_the_first_update_comes_half_a_second_after_it_ends():
    r = Rig(T0 + 2.25)
    r.set(0x0A, 0x76)                       # DV = 111: reset
    r.t = T0 + 9.9
    assert r.get(0x00) == 0x02
    r.set(0x0A, 0x26)                       # running again from 12:00:02.0
    r.t = T0 + 9.9 + 0.49
    assert r.get(0x00) == 0x02
    r.t = T0 + 9.9 + 0.51
    assert r.get(0x00) == 0x03


def test_twelve_hour_mode_reads_and_writes_the_pm_bit():
    r = Rig(T0 + 3600 * 3)                  # 15:00
    r.set(0x0B, 0x00)                       # BCD, 12-hour
    assert r.get(0x04) == 0x83              # 3 PM
    r.set(0x04, 0x11)                       # 11 AM
    r.set(0x0B, 0x02)
    assert r.get(0x04) == 0x11


# --- interrupts -----------------------------------------------------------------------------------------
def test_update_ended_interrupt_raises_irq8_and_reading_c_clears_it_and_lowers_the_line():
    r = Rig(T0 + 0.5, reg_a=NO_PF)
    r.set(0x0B, 0x12)                       # UIE
    r.at(T0 + 0.99)
    assert r.irqs == [] and not r.level
    r.at(T0 + 1.0)
    assert r.irqs == [1]
    assert r.get(0x0C) == 0x90              # IRQF | UF
    assert r.irqs == [1, 0] and not r.level
    assert r.get(0x0C) == 0x00
    r.at(T0 + 5.5)                          # several updates while IRQF was clear: one edge
    assert r.irqs == [1, 0, 1] and r.get(0x0C) == 0x90


def test_flags_are_set_without_their_enables_and_enabling_one_that_is_set_raises_at_once():
    r = Rig(T0 + 0.5)
    r.set(0x0A, 0x2F)                       # 2 Hz periodic rate, PIE off
    r.at(T0 + 1.2)
    assert r.irqs == []
    r.set(0x0B, 0x12)                       # UIE: UF is already set
    assert r.irqs == [1]
    r.set(0x0B, 0x02)                       # nothing enabled: IRQF and the line go down
    assert r.irqs == [1, 0]
    assert r.get(0x0C) == 0x50              # PF | UF, no IRQF


@pytest.mark.parametrize("rate, hz", [(0, 0), (15, 2), (6, 1024), (1, 256), (3, 8192)])
def test_periodic_interrupt_rate(rate, hz):
    r = Rig(T0)
    r.set(0x0A, 0x20 | rate)
    r.set(0x0B, 0x42)                       # PIE
    step = 1 / 32768
    edges = 0
    for i in range(1, 32769):               # one second, each 32.768 kHz cycle; the guest takes each interrupt
        r.at(T0 + i * step)
        if r.level:
            edges += 1
            assert r.get(0x0C) & 0xC0 == 0xC0
    assert edges == hz


def test_alarm_with_dont_care_hours_and_minutes():
    r = Rig(T0 + 0.5, reg_a=NO_PF)
    r.set(0x01, 0x05)                       # at second 05 of any minute of any hour
    r.set(0x03, 0xFF)
    r.set(0x05, 0xC0)
    r.set(0x0B, 0x22)                       # AIE
    r.at(T0 + 4.99)
    assert r.irqs == [] and r.alarms == 0
    r.at(T0 + 5.0)
    assert r.irqs == [1] and r.alarms == 1
    assert r.get(0x0C) == 0xB0              # IRQF | AF | UF (UF set, not enabled)
    r.at(T0 + 65.0)                         # passes 12:01:05 once
    assert r.alarms == 2 and r.get(0x0C) == 0xB0


def test_alarm_with_exact_values_and_every_second():
    r = Rig(T0 + 0.5, reg_a=NO_PF)
    r.set(0x05, 0x12)
    r.set(0x03, 0x01)
    r.set(0x01, 0x00)                       # 12:01:00
    r.set(0x0B, 0x22)
    r.at(T0 + 59.99)
    assert r.alarms == 0 and not r.level
    r.at(T0 + 60.0)
    assert r.alarms == 1 and r.level
    r.get(0x0C)
    r.set(0x01, 0xC0)
    r.set(0x03, 0xC0)
    r.set(0x05, 0xC0)                       # every second
    for s in range(61, 64):
        r.at(T0 + s)
        assert r.get(0x0C) == 0xB0
    assert r.alarms == 4


def test_an_alarm_without_aie_sets_af_but_neither_raises_nor_wakes():
    r = Rig(T0 + 0.5)
    r.set(0x01, 0x02)
    r.set(0x03, 0xC0)
    r.set(0x05, 0xC0)
    r.at(T0 + 3)
    assert r.irqs == [] and r.alarms == 0
    assert r.get(0x0C) == 0x70              # PF (1024 Hz, PIE off) | AF | UF


def test_an_alarm_byte_no_time_has_never_matches():
    r = Rig(T0 + 0.5, reg_a=NO_PF)
    r.set(0x01, 0x60)                       # BCD 60 seconds
    r.set(0x03, 0xC0)
    r.set(0x05, 0xC0)
    r.set(0x0B, 0x22)
    r.at(T0 + 200)
    assert r.alarms == 0 and not r.level


def test_the_alarm_is_compared_in_binary_mode_and_twelve_hour_mode():
    r = Rig(T0 + 3600 * 13 + 0.5, reg_a=NO_PF)           # 01:00:00 the next day... 12:00 + 13 h = 01:00
    r.set(0x0B, 0x24)                       # binary, 12-hour, AIE
    r.set(0x05, 0x81)                       # 1 PM
    r.set(0x03, 0xFF)
    r.set(0x01, 0x03)
    r.at(T0 + 3600 * 13 + 10)
    assert r.alarms == 0                    # it is 1 AM
    r.at(T0 + 3600 * 25 + 3)                # 13:00:03
    assert r.alarms == 1 and r.level


# --- state ----------------------------------------------------------------------------------------------
def test_state_keeps_the_flags_and_a_restored_rtc_raises_irq8_again():
    a = Rig(T0 + 0.5, reg_a=NO_PF)
    a.set(0x0B, 0x12)
    a.at(T0 + 1.0)
    state = a.rtc.save()
    assert state["cmos"][0x0C] == 0x90
    b = Rig(T0 + 1.0)
    b.rtc.load(state)
    assert b.irqs == [1] and b.rtc.save() == state
    assert b.get(0x0C) == 0x90 and b.irqs == [1, 0]
    b.rtc.reset()
    assert b.get(0x0B) == 0x02 and b.get(0x0C) == 0x00


def test_a_state_from_before_the_update_cycle_loads():
    """hvm before the update cycle saved the same three fields, and kept a guest's write of UIP (0xA6)."""
    old = Rig().rtc.save()
    cmos = bytearray(old["cmos"])
    cmos[0x0A] = 0xA6
    r = Rig(T0 + 0.5)
    r.rtc.load({**old, "cmos": bytes(cmos)})
    assert r.get(0x0A) == 0x26 and r.get(0x00) == 0x00


def test_a_state_with_reserved_register_c_bits_is_refused():
    r = Rig()
    state = r.rtc.save()
    cmos = bytearray(state["cmos"])
    cmos[0x0C] = 0x01
    with pytest.raises(ValueError, match="^device rtc: state field 'cmos': register C is 0x01: its bits 0-3"):
        r.rtc.load({**state, "cmos": bytes(cmos)})


# --- the timer thread -------------------------------------------------------------------------------------
def rtc_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "rtc-timer")


def test_the_timer_delivers_update_interrupts_on_time_and_close_ends_it():
    base = rtc_threads()
    levels: list[tuple[float, int]] = []
    rtc = Rtc(irq=IrqLine(RTC_IRQ, lambda n, level: levels.append((time.time(), level))))
    try:
        assert rtc_threads() == base        # no thread until an interrupt is enabled
        rtc.write(0, 1, 0x0A)
        rtc.write(1, 1, 0x20)               # no periodic rate
        rtc.write(0, 1, 0x0B)
        rtc.write(1, 1, 0x12)               # UIE
        assert rtc_threads() == base + 1
        deadline = time.time() + 2.5
        while time.time() < deadline:
            if rtc.irq.level:
                rtc.write(0, 1, 0x0C)
                assert rtc.read(1, 1) == 0x90
            time.sleep(0.002)
        raised = [t for t, level in levels if level]
        assert len(raised) in (2, 3)
        for t in raised:                    # each soon after a whole second (a loaded host: 150 ms)
            assert t % 1 < 0.15, raised
    finally:
        rtc.close()
    assert rtc_threads() == base


def test_reprogramming_quickly_makes_one_thread_and_pause_holds_it():
    base = rtc_threads()
    rtc = Rtc(irq=IrqLine(RTC_IRQ, lambda n, level: None))
    try:
        for i in range(2000):
            rtc.write(0, 1, 0x0A)
            rtc.write(1, 1, 0x20 | (i % 16))
            rtc.write(0, 1, 0x0B)
            rtc.write(1, 1, 0x42 if i % 2 else 0x02)
        assert rtc_threads() == base + 1
        rtc.write(0, 1, 0x0A)
        rtc.write(1, 1, 0x23)               # 8192 Hz
        rtc.write(0, 1, 0x0B)
        rtc.write(1, 1, 0x42)
        rtc.pause()
        rtc.write(0, 1, 0x0C)
        rtc.read(1, 1)
        time.sleep(0.2)
        assert not rtc.irq.level            # paused: IRQ 8 stays down
        rtc.resume()
        time.sleep(0.2)
        assert rtc.irq.level
        # IRQF up and nobody reads C: the thread sleeps instead of counting 8192 Hz
        wakeups = rtc.timer_wakeups
        time.sleep(0.3)
        assert rtc.timer_wakeups - wakeups <= 2
    finally:
        rtc.close()
    assert rtc_threads() == base


# --- a guest ---------------------------------------------------------------------------------------------
def test_guest_waits_for_uip_and_takes_the_alarm_and_update_interrupts(tmp_path):
    cfg = write_yaml(tmp_path, f"boot: {{image: {FIRMWARE / 'rtc_irq.bin'}}}\nmemory: 4M\nmachine: pc\n"
                               "devices:\n  debug_exit: true\n")
    r = run_hvm("run", str(cfg), "--timeout", "10", timeout=30)
    assert r.out.splitlines() == ["uip 1->0", "alarm C=b0", "update C=90", "rtc ok"], (r.out, r.stderr)
    assert r.status == 3, r.stderr          # isa-debug-exit: (1 << 1) | 1


def test_a_restored_rtc_with_an_interrupt_enabled_starts_its_timer():
    a = Rig(time.time(), reg_a=NO_PF)
    a.set(0x0B, 0x12)                       # UIE
    state = a.rtc.save()
    base = rtc_threads()
    rtc = Rtc(irq=IrqLine(RTC_IRQ, lambda n, level: None))
    try:
        rtc.load(state)
        assert rtc_threads() == base + 1
        deadline = time.time() + 1.5
        while not rtc.irq.level and time.time() < deadline:
            time.sleep(0.01)
        assert rtc.irq.level                # the next update raised IRQ 8
    finally:
        rtc.close()


def test_a_save_calls_no_alarm_callback_and_the_next_access_does():
    """A snapshot (VM paused, the machine's locks held) must not call into the machine: the alarm the save
    accounted is called by the timer or the next access."""
    r = Rig(T0 + 0.5, reg_a=NO_PF)
    r.set(0x01, 0x02)
    r.set(0x03, 0xC0)
    r.set(0x05, 0xC0)
    r.set(0x0B, 0x22)
    r.t = T0 + 2.5
    state = r.rtc.save()
    assert state["cmos"][0x0C] == 0xB0 and r.alarms == 0 and r.irqs == [1]
    r.rtc.poll()
    assert r.alarms == 1
    r.rtc.poll()
    assert r.alarms == 1


def test_a_guest_waiting_for_the_update_interrupt_gets_it_after_snapshot_and_restore(tmp_path):
    """Saved while the guest HLTs for the update-ended interrupt (UIE set): the restored RTC starts its timer
    (or raises IRQ 8 again, when the update came before the save) and the guest runs on to its end."""
    from hvm.config import load_config
    from hvm.console import Console
    from hvm.machine import Machine

    cfg = write_yaml(tmp_path, f"boot: {{image: {FIRMWARE / 'rtc_irq.bin'}}}\nmemory: 4M\nmachine: pc\n"
                               "timeout: 20\n")
    snap = tmp_path / "vm.snap"
    base = rtc_threads()
    with Machine(load_config(cfg), console=Console("none", "none", open_now=False)) as vm:
        vm.start()
        vm.wait_for_console(b"alarm C=b0\n", timeout=15)
        time.sleep(0.2)                     # into its HLT (the update comes ~1 s after the alarm)
        vm.snapshot(snap)
        assert vm.rtc is not None and vm.rtc.save()["cmos"][0x0B] & 0x30     # AIE or UIE: an interrupt waited for
        assert rtc_threads() == base + 1
        vm.stop()
    assert rtc_threads() == base, "close() left the RTC's timer thread running"
    with Machine.restore(snap, console=Console("none", "none", open_now=False), timeout=10) as vm:
        vm.start()
        result = vm.wait(15)
        out = bytes(vm.console.history).decode()
    assert out.endswith("update C=90\nrtc ok\n") and result.status == 3, (out, result)


def test_wake_reset_keeps_the_clock_and_cmos_and_turns_the_alarm_off():
    r = Rig(T0 + 0.5, reg_a=NO_PF)
    r.set(0x09, 0x30)                       # the guest set the year 2030
    r.set(0x40, 0x5A)
    r.set(0x01, 0xC0)
    r.set(0x03, 0xC0)
    r.set(0x05, 0xC0)
    r.set(0x0B, 0x72)                       # PIE, AIE, UIE
    r.at(T0 + 1.6)                          # (writing the year started a second at T0 + 0.5)
    assert r.level and r.alarms == 1
    r.rtc.wake_reset()
    assert not r.level and r.get(0x0B) == 0x12 and r.get(0x0C) == 0x00
    assert r.get(0x09) == 0x30 and r.get(0x40) == 0x5A
