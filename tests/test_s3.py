"""ACPI S3 (suspend to RAM) and the wake-up, with firmware/s3.S: the guest finds the FACS through the RSDP,
writes its resume code's address to the firmware waking vector, leaves a marker in RAM and writes
SLP_TYP=1 | SLP_EN; hvm stops the vCPUs ("suspended", SUSPEND) and a wake-up (QMP system_wakeup, the power
button) resets the CPUs with RAM kept and enters the vector in real mode (WAKEUP). Every VM is bounded by
its timeout and the tests' own waits."""
from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FIRMWARE, ROOT, write_yaml
from hvm.boot.acpi import FACS_ADDR, FACS_WAKING_VECTOR
from hvm.config import parse_spec
from hvm.console import Console
from hvm.machine import Machine
from hvm.mmio.acpi_pm import (PM1_CNT, PM1_EVT, PWRBTN_STS, RTC_EN, RTC_STS, SCI_EN, SLP_EN, WAK_STS,
                              AcpiPm)
from hvm.snapshot import SnapshotError

S3 = FIRMWARE / "s3.bin"
VM_TIMEOUT = 30
WAIT = 10.0
RESUMED_OK = 33          # firmware/s3.S: (0x10 << 1) | 1 through isa-debug-exit


def _resume_address() -> int:
    out = subprocess.run(["nm", str(FIRMWARE / "s3.elf")], capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[0], 16) for line in out.splitlines() if line.endswith(" resume"))


def _spec(mode: int = 0, timeout: float = VM_TIMEOUT, vcpus: int = 1):
    return parse_spec({"memory": "4M", "timeout": timeout, "machine": "pc", "vcpus": vcpus,
                       "boot": {"image": str(S3), "regs": {"rbx": mode}}})


class Vm:
    """An in-process Machine running s3.bin, with its events recorded (event, data, run_state then)."""

    def __init__(self, mode: int = 0, vcpus: int = 1):
        self.m = Machine(_spec(mode, vcpus=vcpus), console=Console("none", "none", open_now=False))
        self.events: list[tuple[str, dict, str]] = []
        self.m.add_listener(lambda e, d: self.events.append((e, d, self.m.run_state)))

    def names(self) -> list[str]:
        return [e for e, _, _ in self.events]

    def wait_state(self, state: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while self.m.run_state != state:
            assert time.monotonic() < deadline, f"never {state}: {self.m.run_state}, {self.console()}"
            time.sleep(0.01)

    def console(self) -> str:
        return bytes(self.m.console.history).decode("utf-8", "replace")

    def sleep(self) -> None:
        self.m.start()
        self.m.wait_for_console(b"s3: sleeping\n", WAIT)
        self.wait_state("suspended")


@pytest.fixture
def vm():
    v = Vm()
    yield v
    v.m.close()


def _resumed_lines(pm1_sts: int) -> str:
    addr = _resume_address()
    return (f"s3: resumed at {addr >> 4:04x}:{addr & 0xF:04x}\ns3: marker kept\ns3: pm1_sts={pm1_sts:04x}\n"
            "s3: pm1_sts after clear=0000\n")


# --- the machine ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("vcpus", [1, 2])
def test_suspend_then_wakeup_resumes_at_the_waking_vector_with_ram_kept(vcpus):
    """With 2 vCPUs the AP (never started: waiting for INIT/SIPI) stops and is reset too."""
    vm = Vm(vcpus=vcpus)
    try:
        _suspend_then_wakeup(vm)
    finally:
        vm.m.close()


def _suspend_then_wakeup(vm: Vm) -> None:
    vm.sleep()
    assert vm.events == [("SUSPEND", {}, "suspended")]
    assert vm.m.state == "paused" and vm.m.running
    time.sleep(0.3)                      # asleep: nothing runs, nothing more is printed
    assert vm.console() == "s3: booted\ns3: sleeping\n"
    assert vm.m.wakeup("qmp", wait=True) is True
    result = vm.m.wait(WAIT)
    assert result is not None and result.status == RESUMED_OK, vm.console()
    # WAK_STS and PWRBTN_STS: QEMU reports a wake-up without a device of its own as the power button
    assert vm.console() == "s3: booted\ns3: sleeping\n" + _resumed_lines(WAK_STS | PWRBTN_STS)
    assert vm.names() == ["SUSPEND", "WAKEUP", "SHUTDOWN"]
    assert vm.events[1] == ("WAKEUP", {}, "running")


def test_the_vcpu_stops_right_at_the_slp_en_write(vm):
    """The code after the write (which prints "did not sleep" and exits 35) never runs while asleep."""
    vm.sleep()
    assert vm.m.wait(0.5) is None
    assert "did not sleep" not in vm.console()


def test_the_power_button_wakes_a_sleeping_machine(vm):
    vm.sleep()
    vm.m.system_powerdown()
    result = vm.m.wait(WAIT)
    assert result is not None and result.status == RESUMED_OK, vm.console()
    assert vm.console().endswith(_resumed_lines(WAK_STS | PWRBTN_STS))
    assert vm.names() == ["SUSPEND", "POWERDOWN", "WAKEUP", "SHUTDOWN"]


def test_the_rtc_alarm_wakes_a_sleeping_machine():
    """Mode 1: the guest sets the alarm to every second (don't-care bytes) with AIE and RTC_EN, then sleeps:
    the RTC's timer runs on while the machine sleeps, and its alarm (Rtc.on_alarm) wakes it, with RTC_STS.
    The RTC keeps its clock and CMOS bytes (the battery well) but, as QEMU's reset on wake-up, not its
    interrupt enables: AIE is off after the wake, the alarm bytes are kept."""
    v = Vm(1)
    try:
        v.sleep()
        result = v.m.wait(3.0)              # the alarm comes within a second
        assert result is not None and result.status == RESUMED_OK, v.console()
        assert v.console().endswith(_resumed_lines(WAK_STS | RTC_STS))
        assert v.names() == ["SUSPEND", "WAKEUP", "SHUTDOWN"]
        assert not v.m.rtc.cmos[0x0B] & 0x20 and v.m.rtc.cmos[0x01] == 0xFF     # AIE off, the alarm kept
    finally:
        v.m.close()


def test_wakeup_of_a_machine_not_asleep_does_nothing(vm):
    assert vm.m.wakeup("qmp") is False          # not started
    vm.sleep()
    with pytest.raises(ValueError, match="unknown wake-up reason 'alarm'"):
        vm.m.wakeup("alarm")
    assert vm.m.wakeup("rtc", wait=True) is True
    assert vm.m.wakeup("qmp") is False          # awake (or ended) now
    result = vm.m.wait(WAIT)
    assert result is not None and result.status == RESUMED_OK
    assert vm.console().endswith(_resumed_lines(WAK_STS | RTC_STS))


def test_pause_and_resume_leave_a_sleeping_machine_asleep(vm):
    vm.sleep()
    vm.m.pause()                                  # no-op, as QEMU's stop of a suspended VM
    assert vm.m.run_state == "suspended"
    with pytest.raises(RuntimeError, match=r"cannot resume a VM that is paused \(suspended\)"):
        vm.m.resume()
    assert vm.m.run_state == "suspended" and vm.names() == ["SUSPEND"]


def test_a_sleeping_machine_is_not_saved(vm, tmp_path):
    vm.sleep()
    path = tmp_path / "vm.snap"
    with pytest.raises(SnapshotError) as e:
        vm.m.snapshot(path)
    assert str(e.value) == (f"{path}: the guest is suspended (ACPI S3): hvm does not save a sleeping VM; "
                            "wake it first (system_wakeup)")
    assert not path.exists() and vm.m.run_state == "suspended"
    assert vm.m.wakeup("qmp", wait=True)          # and it still wakes up
    assert vm.m.wait(WAIT).status == RESUMED_OK


def test_system_reset_of_a_sleeping_machine_waits_for_cont(vm):
    vm.sleep()
    vm.m.system_reset()
    assert vm.m.run_state == "prelaunch"           # QEMU's state after a reset of a machine not running
    assert vm.events[-1] == ("RESET", {"guest": False, "reason": "host-qmp-system-reset"}, "prelaunch")
    time.sleep(0.2)
    assert vm.console() == "s3: booted\ns3: sleeping\n"
    vm.m.resume()
    vm.m.wait_for_console(b"s3: booted\ns3: sleeping\ns3: booted\ns3: sleeping\n", WAIT)
    vm.wait_state("suspended")                     # booted from scratch (RAM zeroed) and asleep again


@pytest.mark.parametrize("mode, problem", [
    (2, "the firmware waking vector 0x200000 is not in RAM below 1 MiB"),
    (3, "no firmware waking vector (0) in the FACS"),
])
def test_an_unusable_waking_vector_resets_the_machine(mode, problem, caplog):
    v = Vm(mode)
    try:
        v.sleep()
        with caplog.at_level(logging.WARNING, logger="hvm.machine"):
            assert v.m.wakeup("qmp", wait=True)
        assert [r.getMessage() for r in caplog.records if r.name == "hvm.machine"] == [
            f"ACPI S3 wake-up: {problem}: resetting the machine"]
        v.m.wait_for_console(b"s3: booted\ns3: sleeping\ns3: booted\ns3: sleeping\n", WAIT)
        v.wait_state("suspended")
        assert v.names() == ["SUSPEND", "WAKEUP", "RESET", "SUSPEND"]
        assert v.events[2] == ("RESET", {"guest": True, "reason": "guest-reset"}, "running")
    finally:
        v.m.close()


def test_repeated_unusable_wakeups_are_logged_a_bounded_number_of_times(caplog):
    """A guest that sleeps again and again with no waking vector (each wake-up resets it, it boots and sleeps
    again; the RTC alarm could wake it every second): the warning is logged BAD_WAKEUP_LOG_LIMIT times, the
    last saying so, then no more."""
    from hvm.machine import BAD_WAKEUP_LOG_LIMIT

    v = Vm(3)
    try:
        v.sleep()
        with caplog.at_level(logging.WARNING, logger="hvm.machine"):
            for i in range(BAD_WAKEUP_LOG_LIMIT + 3):
                assert v.m.wakeup("qmp", wait=True)
                deadline = time.monotonic() + WAIT
                while v.names().count("SUSPEND") < i + 2:      # booted again and asleep again
                    assert time.monotonic() < deadline, v.console()
                    time.sleep(0.01)
                v.wait_state("suspended")
        lines = [r.getMessage() for r in caplog.records if r.name == "hvm.machine"]
        problem = "ACPI S3 wake-up: no firmware waking vector (0) in the FACS: resetting the machine"
        assert lines == [problem] * (BAD_WAKEUP_LOG_LIMIT - 1) + [problem + "; further ones are not logged"]
        assert v.names().count("RESET") == BAD_WAKEUP_LOG_LIMIT + 3
    finally:
        v.m.close()


def test_a_clobbered_facs_is_caught(vm):
    vm.sleep()
    mem = vm.m.memory
    mem.write_u32(FACS_ADDR + FACS_WAKING_VECTOR, 0x7C00)
    assert vm.m.waking_vector() == (0x7C00, None)
    mem.write_u32(FACS_ADDR + FACS_WAKING_VECTOR, 0xFFFFFFFF)
    assert vm.m.waking_vector() == (0xFFFFFFFF, "the firmware waking vector 0xffffffff is not in RAM below 1 MiB")
    mem.write(FACS_ADDR, b"JUNK")
    assert vm.m.waking_vector() == (0, "the FACS is gone (its signature was overwritten)")


def test_qmp_system_wakeup_of_a_machine_awake_is_qemus_error(vm):
    from hvm.qmp.commands import Commands, QmpError

    commands = Commands(vm.m, lambda *a: None)
    with pytest.raises(QmpError) as e:
        commands.execute("system_wakeup", {})
    assert (e.value.cls, e.value.desc) == ("GenericError", "Unable to wake up: guest is not in suspended state")
    vm.sleep()
    assert commands.execute("cont", {}) == {} and vm.m.run_state == "suspended"
    assert commands.execute("system_wakeup", {}) == {}
    assert vm.m.wait(WAIT).status == RESUMED_OK          # (awake at once: it may have ended already)


# --- the PM1 registers -------------------------------------------------------------------------------
def test_pm1_control_s3_calls_on_suspend_and_wake_sets_status():
    calls = []
    pm = AcpiPm(on_poweroff=lambda: calls.append("off"), on_suspend=lambda: calls.append("s3"))
    pm.write(PM1_CNT, 2, (1 << 10))                       # SLP_TYP=1 without SLP_EN: nothing
    pm.write(PM1_CNT, 2, (2 << 10) | SLP_EN)              # another sleep type: ignored
    assert calls == []
    pm.write(PM1_CNT, 2, (1 << 10) | SLP_EN)              # \_S3
    assert calls == ["s3"]
    assert pm.read(PM1_CNT, 2) == (1 << 10) | SCI_EN      # SLP_EN reads back 0
    pm.write(PM1_CNT, 2, (5 << 10) | SLP_EN)
    assert calls == ["s3", "off"]
    lines = []
    pm.sci.set_level = lambda level: lines.append(level)
    pm.wake("rtc")
    assert pm.read(PM1_EVT, 2) == WAK_STS | RTC_STS and lines[-1] is False   # RTC_EN clear: no SCI
    pm.write(PM1_EVT + 2, 2, RTC_EN)
    assert lines[-1] is True                                                  # RTC_STS & RTC_EN: the SCI
    pm.write(PM1_EVT, 2, WAK_STS | RTC_STS)
    assert pm.read(PM1_EVT, 2) == 0 and lines[-1] is False
    pm.wake("powerbutton")
    assert pm.read(PM1_EVT, 2) == WAK_STS | PWRBTN_STS


# --- QMP, end to end ------------------------------------------------------------------------------------
qmp_lib = pytest.importorskip("qemu.qmp")
from qemu.qmp import QMPClient  # noqa: E402


async def _next_event(client: QMPClient, name: str) -> dict:
    async def find():
        async for event in client.events:
            if event["event"] == name:
                return event
    return await asyncio.wait_for(find(), WAIT)


def test_qmp_suspend_status_cont_migrate_and_system_wakeup(tmp_path):
    sock, console = tmp_path / "vm.sock", tmp_path / "console.txt"
    cfg = write_yaml(tmp_path, f"boot: {{image: {S3}, regs: {{rbx: 0}}}}\nmemory: 4M\nmachine: pc\n"
                     f"timeout: {VM_TIMEOUT}\ndevices: {{serial: {{output: 'file:{console}'}}}}\n")
    # -S: the guest starts at `cont`, once this client negotiated (events before that are not sent to it)
    proc = subprocess.Popen([sys.executable, "-m", "hvm", "run", str(cfg), "-S", "--qmp", f"unix:{sock},server=on"],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + WAIT
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no QMP socket"
            time.sleep(0.02)

        async def go():
            c = QMPClient("test")
            await asyncio.wait_for(c.connect(str(sock)), WAIT)
            assert await c.execute("cont") == {}
            out = {"suspend": await _next_event(c, "SUSPEND")}
            out["status"] = await c.execute("query-status")
            out["cont"] = await c.execute("cont")
            out["stop"] = await c.execute("stop")
            out["status2"] = await c.execute("query-status")
            out["ctl"] = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "hvm", "ctl", str(sock), "cont"], cwd=ROOT,
                capture_output=True, text=True, timeout=WAIT)
            out["status3"] = await c.execute("query-status")
            await c.execute("migrate", {"uri": f"file:{tmp_path / 'vm.snap'}"})
            await _next_event(c, "MIGRATION")
            while (mig := await c.execute("query-migrate"))["status"] not in ("completed", "failed"):
                await asyncio.sleep(0.02)
            out["migrate"] = mig
            out["wakeup"] = await c.execute("system_wakeup")
            out["woken"] = await _next_event(c, "WAKEUP")
            out["shutdown"] = await _next_event(c, "SHUTDOWN")
            try:
                await c.disconnect()
            except EOFError:
                pass
            return out

        out = asyncio.run(asyncio.wait_for(go(), 60))
        assert proc.wait(WAIT) == RESUMED_OK
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert out["suspend"]["data"] == {}
    assert out["status"] == {"running": False, "status": "suspended"}
    assert out["cont"] == {} and out["stop"] == {}               # QEMU: both leave a sleeping guest asleep
    assert out["status2"] == {"running": False, "status": "suspended"}
    assert (out["ctl"].returncode, out["ctl"].stdout, out["ctl"].stderr) == (0, "{}\n", "")      # hvm ctl cont
    assert out["status3"] == {"running": False, "status": "suspended"}
    assert out["migrate"]["status"] == "failed"
    assert out["migrate"]["error-desc"] == (f"{tmp_path / 'vm.snap'}: the guest is suspended (ACPI S3): hvm does "
                                            "not save a sleeping VM; wake it first (system_wakeup)")
    assert out["wakeup"] == {}
    assert out["shutdown"]["data"] == {"guest": True, "reason": "guest-shutdown"}
    assert console.read_text() == "s3: booted\ns3: sleeping\n" + _resumed_lines(WAK_STS | PWRBTN_STS)
