"""Shared fixtures. Every guest a test runs is bounded twice: hvm's own watchdog (timeout in the
spec or --timeout) and a subprocess/wait timeout in the test."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import HealthCheck, settings

# Property-based tests: a fixed, modest run in the test suite (deterministic, so CI sees what a developer saw);
# `make fuzz` selects the long profile (HVM_FUZZ=long), with fresh random examples each time.
settings.register_profile("ci", max_examples=60, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("long" if os.environ.get("HVM_FUZZ") == "long" else "ci")

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware" / "build"
CONFIGS = ROOT / "configs"
GUEST_TIMEOUT = 20  # seconds: the outer bound on any single small guest run in the tests


def shared_tree(relative: str, is_tree: Callable[[Path], bool]) -> Path:
    """A tree under ../shared (kvm-unit-tests' guests, upstream's runner): beside the checkout (/work/main ->
    /work/shared) or beside the folder of worktrees (/work/wt/NAME); the first place if neither has it."""
    places = [ROOT.parent / "shared" / relative, ROOT.parent.parent / "shared" / relative]
    return next((d for d in places if is_tree(d)), places[0])


@pytest.fixture(scope="session", autouse=True)
def firmware() -> Path:
    """Build the firmware once (make is a no-op when it is up to date)."""
    subprocess.run(["make", "-s", "firmware"], cwd=ROOT, check=True, timeout=120)
    return FIRMWARE


@dataclass
class HvmRun:
    status: int
    stdout: bytes
    stderr: str

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")


def run_hvm(*args: str, timeout: float = GUEST_TIMEOUT, input: bytes | None = b"", cwd: Path = ROOT) -> HvmRun:
    """Run the hvm CLI as a user would (python -m hvm), bounded by `timeout`."""
    proc = subprocess.run([sys.executable, "-m", "hvm", *args], cwd=cwd, input=input, capture_output=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return HvmRun(proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"))


@pytest.fixture
def hvm():
    return run_hvm


def write_yaml(tmp_path: Path, text: str, name: str = "vm.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@dataclass
class MeasuredRun:
    status: int
    stderr: str
    maxrss_kib: int   # peak RSS of the hvm process itself
    seconds: float


# ru_maxrss of a process includes the memory of the process it was forked from until its exec (the kernel
# records the old mm's high-water mark at exec), so hvm forked from pytest would report pytest's RSS (which
# grows past 250 MB over the suite). A small launcher forks hvm instead and reports hvm's own figure
# (floor: the launcher's ~10 MiB), with the status and the run time, in a file.
_LAUNCHER = """
import os, sys, time
report, argv = sys.argv[1], sys.argv[2:]
t0 = time.monotonic()
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "hvm", *argv])
_, wstatus, usage = os.wait4(pid, 0)
with open(report, "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(wstatus)} {usage.ru_maxrss} {time.monotonic() - t0}")
"""


def run_measured(*args: str, tmp_path: Path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                 timeout: float = 30, cwd: Path = ROOT) -> MeasuredRun:
    """Run `python -m hvm ARGS` and measure it: status, stderr (through a file, so a flood of log lines cannot
    block the child), hvm's own peak RSS and the wall time. Bounded: the process group is killed `timeout`
    seconds after the start."""
    err_path, report = tmp_path / "measured-stderr.txt", tmp_path / "measured-report.txt"
    report.unlink(missing_ok=True)
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(report), *args], cwd=cwd, stdin=stdin,
                                stdout=stdout, stderr=err, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            pytest.fail(f"hvm {' '.join(args)} did not end within {timeout} s")
    status, maxrss, seconds = report.read_text().split()
    return MeasuredRun(int(status), err_path.read_text("utf-8", "replace"), int(maxrss), float(seconds))


# --- a booted Linux guest, once per session (snapshot/restore: tests/test_snapshot.py, test_linux.py) -----------
LINUX_BUILD = ROOT / "build" / "linux"
# clocksource=kvm-clock: on kvm_pvm a vCPU's TSC cannot be set, so a restored guest whose clocksource is the
# TSC (what tsc=reliable, which hvm adds there, selects) sees time jump by the wall time since the save and
# runs its tick once per missed tick first (seconds to minutes of emulated code); kvmclock is restored.
LINUX_CMDLINE = "console=ttyS0 earlyprintk=serial panic=-1 clocksource=kvm-clock"
LINUX_MID_LINE = b"clocksource: Switched to clocksource"           # about a third of the boot
LINUX_LATE_LINE = b"Write protecting the kernel read-only data"    # the last line before the init memory is freed
LINUX_BOOT_TIMEOUT = 300


@dataclass
class LinuxSnapshots:
    mid: Path               # saved when the console showed LINUX_MID_LINE
    late: Path              # saved at LINUX_LATE_LINE
    mid_console: str        # the console output at each save
    late_console: str
    console: str            # the whole output of the boot the snapshots were taken from
    status: int             # and its hvm status


@pytest.fixture(scope="session")
def built_linux() -> Path:
    """build/linux with the minimal kernel, its initramfs images and root disks: `make linux` once per session
    (nothing to do when they are built), so a clean clone's `make test` runs the Linux tests, not skips them."""
    subprocess.run(["make", "-s", "linux"], cwd=ROOT, check=True, timeout=3600)
    return ROOT / "build" / "linux"


@pytest.fixture(scope="session")
def linux_snapshots(tmp_path_factory) -> LinuxSnapshots:
    """Boot the minimal kernel (vmlinux-minimal, initramfs-ud2, 256 MiB: tests/test_linux.py's guest) once
    and snapshot it twice on the way; the boot then runs on to its end (on kvm_pvm: /init's UD2, the
    panic, status 4). Tests that need a kernel well into its boot restore a snapshot (seconds) instead of
    booting (about a minute here)."""
    from hvm.config import parse_spec
    from hvm.console import Console
    from hvm.machine import Machine

    subprocess.run(["make", "-s", "linux"], cwd=ROOT, check=True, timeout=3600)
    tmp = tmp_path_factory.mktemp("linux-snapshots")
    spec = parse_spec({"memory": "256M", "timeout": LINUX_BOOT_TIMEOUT, "boot": {
        "kernel": str(LINUX_BUILD / "vmlinux-minimal"), "initrd": [str(LINUX_BUILD / "initramfs-ud2.cpio")],
        "cmdline": LINUX_CMDLINE}})
    saved = []
    with Machine(spec, console=Console("none", "none", open_now=False)) as vm:
        vm.start()
        for line, path in ((LINUX_MID_LINE, tmp / "mid.snap"), (LINUX_LATE_LINE, tmp / "late.snap")):
            if vm.wait_for_console(line, timeout=LINUX_BOOT_TIMEOUT) is None:
                pytest.fail(f"the kernel never printed {line!r}: {vm.console.text()[-2000:]}")
            vm.snapshot(path)                 # stopped: the console is exactly what the file has seen
            saved.append((path, vm.console.text()))
            vm.resume()
        result = vm.wait(LINUX_BOOT_TIMEOUT + 30)
        assert result is not None
        console = vm.console.text()
    (mid, mid_console), (late, late_console) = saved
    return LinuxSnapshots(mid, late, mid_console, late_console, console, result.status)


class FakeRam:
    """Guest RAM at GPA 0 for device unit tests (read/write as GuestMemory's, the same bounds errors)."""

    def __init__(self, size: int = 64 << 10) -> None:
        self.data = bytearray(size)

    def read(self, gpa: int, length: int) -> bytes:
        from hvm.memory import GuestMemoryError

        if gpa + length > len(self.data):
            raise GuestMemoryError(f"{gpa:#x}+{length} is outside guest RAM")
        return bytes(self.data[gpa:gpa + length])

    def write(self, gpa: int, data: bytes) -> None:
        from hvm.memory import GuestMemoryError

        if gpa + len(data) > len(self.data):
            raise GuestMemoryError(f"{gpa:#x}+{len(data)} is outside guest RAM")
        self.data[gpa:gpa + len(data)] = data


class Latch:
    """A port device for bus tests: reads 0, keeps every value written (a subclass may fail in write)."""
    name = "latch"

    def __init__(self) -> None:
        self.writes: list[int] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append(value)
