"""Published port registers (hvm/mmio/published.py): COM1's scratch register (a latch) and the ACPI PM timer
(a clock counter) answered by the C fast loop, with the guest-visible values, exit counts, statistics and
traces of the all-Python loop and of accel tcg. The guest is firmware/pubregs.S. Checked on the kvm_pvm
host; nothing here depends on the backend."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import FIRMWARE
from hvm import Machine
from hvm.config import FlatBoot, VmSpec
from hvm.console import Console
from hvm.kvm import constants as k
from hvm.mmio.acpi_pm import PM_TIMER_HZ, AcpiPm
from hvm.mmio.bus import BusError, PioBus
from hvm.mmio.published import ClockCounter, Latch, PublishedTable
from hvm.mmio.uart16550 import SerialUart
from hvm.vcpu import fastloop

needs_c = pytest.mark.skipif(not fastloop.AVAILABLE, reason="the fast loop is not compiled (pip install -e .)")

PRINTED = 20 + 20 + 38          # console bytes: "S x x\n", "W x x\n", "T x x x x\n" (one OUT exit each)
MASK24 = 0xFFFFFF


def image(tmp_path: Path, iterations: int) -> Path:
    from bench.exits import patch_header

    # verbose: the timer values themselves on the console (tests/test_tcg.py runs the image as built)
    return patch_header(FIRMWARE / "pubregs.bin", tmp_path / f"pubregs-{iterations}.bin", iterations, 1,
                        arg_as_built=0)


def spec_for(tmp_path: Path, iterations: int, accel: str = "kvm", timeout: float = 20) -> VmSpec:
    return VmSpec(name="pubregs", boot=FlatBoot(image(tmp_path, iterations), 0x7C00, 0x7C00, "real"),
                  memory=4 << 20, timeout=timeout, machine="pc", accel=accel)


def expected_checksum(iterations: int) -> int:
    """What the guest's loop computes when every SCR read returns the byte written just before."""
    s, b = 0, 0x11
    for _ in range(iterations):
        s = (((s << 5) | (s >> 27)) & 0xFFFFFFFF) + b & 0xFFFFFFFF
        b = (b + 37) & 0xFF
    return s


def parse(text: str) -> dict[str, list[int]]:
    return {line.split()[0]: [int(w, 16) for w in line.split()[1:]] for line in text.splitlines()}


def run(spec: VmSpec, fast_loop: bool, before=None):
    with Machine(spec, console=Console("none", "none"), fast_loop=fast_loop) as vm:
        if before:
            before(vm)
        result = vm.run()
        t = vm.threads[0]
        fast = getattr(t, "fast", None)
        return {"result": (result.status, result.reason), "lines": parse(bytes(vm.console.history).decode()),
                "stats": vm.stats(), "handled": fast.handled()[k.EXIT_IO] if fast else None,
                "pm_end": vm.acpi_pm.timer()}


def check_timer(lines: dict[str, list[int]]) -> None:
    """T t1 t2 t3: two 4-byte reads (C in the fast loop) around a 2-byte read (the device's Python): the
    Python value lies between them, so both sides count from the same t0 with the same formula."""
    t1, t2, t3, ok = lines["T"]
    assert ok == 1, lines["T"]
    assert t1 <= MASK24 and t3 <= MASK24 and t2 <= 0xFFFF
    span = (t3 - t1) & MASK24
    assert span < 0x8000, f"{span} ticks between two consecutive reads"
    assert (t2 - t1) & 0xFFFF <= span


@pytest.mark.parametrize("iterations", [1, 300])
def test_same_values_and_exit_counts_in_c_in_python_and_under_tcg(tmp_path, iterations):
    spec = spec_for(tmp_path, iterations)
    runs = {"c": run(spec, True), "python": run(spec, False), "tcg": run(spec_for(tmp_path, iterations, "tcg"), True)}
    for name, r in runs.items():
        assert r["result"] == (1, "debug-exit"), name
        lines = r["lines"]
        assert lines["S"] == [expected_checksum(iterations), 0], name
        # a word OUT keeps the low byte (the UART's Python), a word IN reads it back, so does a byte IN (C)
        assert lines["W"] == [0xCD, 0xCD], name
        check_timer(lines)
        st = r["stats"]
        exits = 2 * iterations + 3 + 3 + PRINTED + 1
        assert st.by_reason == {"IO": exits}, name
        # C-handled exits still count for the port and the device that publishes the register
        assert st.by_port[0x3FF] == 2 * iterations + 3 and st.by_port[0x608] == 3, name
        assert st.by_device == {"com1": 2 * iterations + 3 + PRINTED, "acpi-pm": 3, "debug-exit": 1}, name
    # the fast loop answered the one-byte SCR accesses and the 4-byte PM timer reads, nothing else
    if fastloop.AVAILABLE:
        assert runs["c"]["handled"] == 2 * iterations + 1 + 2
    assert runs["python"]["handled"] is None and runs["tcg"]["handled"] is None


@needs_c
def test_pm_timer_in_c_is_exact_past_64_bit_products(tmp_path):
    """Three hours in (the product (now - t0) * hz passes 2^64 after ~85 minutes): C's value is still
    Python's integer formula -- between the reads around it, and just before the device's own at the end."""
    def three_hours_in(vm):
        vm.acpi_pm.load({**vm.acpi_pm.save(), "timer_ns": 3 * 3600 * 10**9})

    r = run(spec_for(tmp_path, 10), True, three_hours_in)
    assert r["result"] == (1, "debug-exit")
    check_timer(r["lines"])
    t3 = r["lines"]["T"][2]
    assert (r["pm_end"] - t3) & MASK24 < 2 * PM_TIMER_HZ   # the device read it after the run: < 2 s later
    assert (3 * 3600 * PM_TIMER_HZ - r["lines"]["T"][0]) & MASK24 > MASK24 - 30 * PM_TIMER_HZ  # ~3 h in


@needs_c
def test_trace_of_c_answered_exits_has_the_values_the_guest_got(tmp_path):
    from hvm.trace import TraceConfig

    spec = spec_for(tmp_path, 5)
    traces = []
    for fast_loop in (True, False):
        path = tmp_path / f"trace-{fast_loop}.jsonl"
        with Machine(spec, console=Console("none", "none"), fast_loop=fast_loop, trace=TraceConfig(path=path)) as vm:
            vm.run()
        records = [json.loads(line) for line in path.read_text().splitlines()]
        for rec in records:
            rec.pop("t"), rec.pop("handle_ns")
            if rec.get("port") in (0x608, 0x3F8):
                rec.pop("data")     # the clock (and the timer values printed) differ from run to run
        traces.append(records)
    assert traces[0] == traces[1]
    scr = [r for r in traces[0] if r.get("port") == 0x3FF and r["size"] == 1]
    assert [(r["dir"], r["data"]) for r in scr[:4]] == [("out", "11"), ("in", "11"), ("out", "36"), ("in", "36")]
    assert all(r["device"] == "com1" for r in scr)


@needs_c
def test_last_exits_ring_holds_the_value_c_answered(tmp_path):
    spec = spec_for(tmp_path, 3)
    with Machine(spec, console=Console("none", "none")) as vm:
        seen = []
        # stop at the first console byte: the SCR pairs and nothing else are in the ring then
        vm.uart._output = lambda data: seen.append(data) or (len(seen) == 1 and vm.stop())
        vm.run()
        ring = vm.threads[0].describe_last_exits()
    assert ring[:6] == [f"IO {d} port=0x03ff size=1 count=1 value={v:#x}"
                        for v in (0x11, 0x36, 0x5B) for d in ("out", "in")]


@needs_c
def test_snapshot_restore_keeps_scr_and_the_pm_timer(tmp_path):
    """Snapshot in the middle of the SCR loop (often between an OUT and its IN), restore in a new machine:
    the guest's checksum is that of an uninterrupted run, with no mismatch."""
    iterations = 200_000
    spec = spec_for(tmp_path, iterations, timeout=60)
    path = tmp_path / "vm.snap"
    with Machine(spec, console=Console("none", "none")) as vm:
        vm.start()
        time.sleep(0.3)
        vm.pause()
        scr, timer_ns = vm.uart.scr, vm.acpi_pm.save()["timer_ns"]
        assert (vm.uart._scr.c.value, vm.uart.save()["scr"]) == (scr, scr)
        vm.snapshot(path)
        vm.stop()
    with Machine.restore(path, console=Console("none", "none"), timeout=60) as vm:
        assert vm.uart.scr == scr
        assert vm.acpi_pm.save()["timer_ns"] >= timer_ns
        assert vm.acpi_pm.save()["timer_ns"] - timer_ns < 5 * 10**9
        vm.start()
        result = vm.wait(60)
        assert (result.status, result.reason) == (1, "debug-exit")
        lines = parse(bytes(vm.console.history).decode())
        # the restored machine's fast loop answers them too (at least the byte IN and the two timer reads)
        assert vm.threads[0].fast.handled()[k.EXIT_IO] >= 3
    assert lines["S"] == [expected_checksum(iterations), 0]
    assert lines["W"] == [0xCD, 0xCD]
    check_timer(lines)


# --- the Python side ---------------------------------------------------------------------------------
def test_uart_scr_is_the_published_latch_for_every_access_size():
    uart = SerialUart()
    assert uart.published_registers == [(7, uart._scr)]
    uart.write(7, 1, 0x5A)
    assert (uart.read(7, 1), uart._scr.value) == (0x5A, 0x5A)
    uart.write(7, 2, 0xABCD)        # any other size: the UART's own behaviour (the low byte)
    assert (uart.read(7, 2), uart._scr.value) == (0xCD, 0xCD)
    state = uart.save()
    uart.reset()
    assert uart._scr.value == 0
    uart.load(state)
    assert uart.read(7, 1) == 0xCD


def test_pm_timer_published_only_with_the_real_clock():
    assert AcpiPm().published_registers[0][0] == 8
    fake = AcpiPm(clock_ns=lambda: 2**70)            # injected clocks stay in Python, with no C limits
    assert fake.published_registers == [] and not fake._tmr.in_c
    assert fake.timer() == 0


def test_clock_counter_formula_has_no_64_bit_overflow():
    c = ClockCounter(PM_TIMER_HZ, 24, 4, t0_ns=-(10**18))
    now = 5 * 3600 * 10**9
    assert c.count(now) == ((now + 10**18) * PM_TIMER_HZ // 10**9) & MASK24
    with pytest.raises(ValueError, match="outside the signed 64-bit range"):
        c.t0_ns = 1 << 63 if c.in_c else pytest.skip("no C module: no range limit")


def test_latch_masks_to_its_size_and_rejects_odd_sizes():
    latch = Latch(2)
    latch.value = 0x12345
    assert latch.value == 0x2345
    with pytest.raises(ValueError, match="1, 2 or 4 bytes, not 3"):
        Latch(3)


@needs_c
def test_bus_publishes_device_registers_and_withdraws_them_with_the_range():
    bus = PioBus()
    uart = SerialUart()
    bus.register(0x2F8, 8, uart)
    assert bus.published.published() == {0x2FF: uart._scr}
    c = bus.published.pointer
    assert c.n == 1 and c.ent[0].port == 0x2FF and c.ports[0x2FF >> 3] & (1 << 7)
    with pytest.raises(BusError, match="port 0x0100: no device there"):
        bus.publish(0x100, Latch(1))
    bus.unregister(0x2F8, uart)
    assert bus.published.published() == {} and not c.ports[0x2FF >> 3] & (1 << 7)


def test_table_full_leaves_registers_to_python():
    table = PublishedTable()
    regs = [Latch(1) for _ in range(table.capacity + 1)]
    assert [table.publish(0x100 + i, r) for i, r in enumerate(regs)] == [True] * table.capacity + [False]


@needs_c
def test_every_vcpu_reads_one_table(tmp_path):
    spec = VmSpec(name="smp", boot=FlatBoot(image(tmp_path, 1), 0x7C00, 0x7C00, "real"), memory=4 << 20,
                  timeout=10, machine="pc", vcpus=2)
    with Machine(spec, console=Console("none", "none")) as vm:
        pointers = {int(fastloop.ffi.cast("uintptr_t", t.fast.state.published)) for t in vm.threads}
        assert pointers == {int(fastloop.ffi.cast("uintptr_t", vm.pio.published.pointer))} and 0 not in pointers


def test_without_the_c_module_registers_are_python_fields(monkeypatch):
    import hvm.mmio.published as published

    monkeypatch.setattr(published, "_ffi", [None])
    bus = PioBus()
    uart = SerialUart()
    bus.register(0x3F8, 8, uart)
    assert not uart._scr.in_c and bus.published.pointer is None and bus.published.published() == {}
    bus.write(0x3FF, 1, 0x77)
    assert bus.read(0x3FF, 1) == 0x77 and uart.save()["scr"] == 0x77
    assert not bus.publish(0x3FF, Latch(1))
