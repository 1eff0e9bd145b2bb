"""Several vCPUs: secondaries started by the guest (INIT/SIPI on the in-kernel LAPIC, announced by the ACPI
MADT and the MP table), exact --stats counts when vCPUs share devices, the halt rule with vCPUs that were
never started, and a teardown that never pulls memory from under a vCPU thread (docs/lifecycle.md,
"Several vCPUs")."""
from __future__ import annotations

import logging
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import hvm.machine as machine_mod
from conftest import FIRMWARE, ROOT, run_hvm, write_yaml
from hvm import Machine
from hvm.boot.mptable import MP_BASE, mp_config_table, write_mp_table
from hvm.config import FlatBoot, KernelBoot, VmSpec, parse_devices
from hvm.host import detect as detect_host
from hvm.console import Console
from hvm.kvm import Vcpu
from hvm.kvm import constants as kc
from hvm.memory import GuestMemory

KUT = Path("/work/shared/kvm-unit-tests")
SMP_ITERATIONS = 20000
SMP_HALT_STI_OFFSET = 8       # firmware/smp.S: the field after the iterations


def quiet() -> Console:
    return Console("none", "none")


def smp_image(tmp_path: Path, iterations: int, halt_sti: int = 0) -> Path:
    data = bytearray((FIRMWARE / "smp.bin").read_bytes())
    assert struct.unpack_from("<IIIII", data, 4) == (1000, 0, 0, 0, 0), "firmware/smp.S header layout changed"
    struct.pack_into("<II", data, 4, iterations, halt_sti)
    out = tmp_path / f"smp-{iterations}-{halt_sti}.bin"
    out.write_bytes(bytes(data))
    return out


def smp_spec(image: Path, *, vcpus: int = 2, debug_exit: bool = True, timeout: float = 30) -> VmSpec:
    spec = VmSpec(name="smp", boot=FlatBoot(image, 0x100000, 0x100000, "protected"), memory=8 << 20,
                  vcpus=vcpus, timeout=timeout, machine="pc")
    return spec if debug_exit else spec.with_overrides(debug_exit=None)


# --- the MP table ---------------------------------------------------------------------------------
def test_mp_table_lists_every_cpu_the_ioapic_and_the_isa_interrupts():
    with GuestMemory(2 << 20) as mem:
        table = write_mp_table(mem, 3)
        fp = mem.read(MP_BASE, 16)
        assert fp[:4] == b"_MP_" and sum(fp) & 0xFF == 0
        assert struct.unpack_from("<I", fp, 4)[0] == table and fp[8] == 1 and fp[9] == 4 and fp[11] == 0
        length = struct.unpack_from("<H", mem.read(table, 6), 4)[0]
        raw = mem.read(table, length)
    assert raw == mp_config_table(3)
    assert raw[:4] == b"PCMP" and sum(raw) & 0xFF == 0
    count, lapic = struct.unpack_from("<HI", raw, 34)
    assert lapic == 0xFEE00000
    entries, at = [], 44
    sizes = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}
    for _ in range(count):
        entries.append(raw[at:at + sizes[raw[at]]])
        at += sizes[raw[at]]
    assert at == length
    cpus = [(e[1], e[3]) for e in entries if e[0] == 0]
    assert cpus == [(0, 3), (1, 1), (2, 1)]                         # APIC ids; enabled, vCPU 0 the BSP
    assert [e for e in entries if e[0] == 2] == [struct.pack("<BBBBI", 2, 3, 0x11, 1, 0xFEC00000)]
    irqs = {e[5]: (e[7], struct.unpack_from("<H", e, 2)[0]) for e in entries if e[0] == 3}
    assert irqs[0] == (2, 0) and 2 not in irqs and irqs[9] == (9, 0x0D) and irqs[4] == (4, 0)
    assert [(e[1], e[7]) for e in entries if e[0] == 4] == [(3, 0), (1, 1)]   # LINT0 ExtINT, LINT1 NMI


# --- device state and counts with two vCPUs -------------------------------------------------------
@pytest.mark.parametrize("fast_loop", [True, False], ids=["fast-loop", "python-loop"])
def test_stats_stay_exact_when_two_vcpus_hammer_the_same_ports(tmp_path, fast_loop):
    """vCPU 0 starts vCPU 1 (INIT/SIPI); each makes N rounds of IN 0x64 (i8042), OUT 0x510 (fw_cfg), OUT 0x80
    and an MMIO write to 0xd0000000 (no device: in the fast loop, counted in C). Every count is exact.
    A tiny switch interval makes the threads change hands as often as CPython allows."""
    n = SMP_ITERATIONS
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with Machine(smp_spec(smp_image(tmp_path, n)), console=quiet(), fast_loop=fast_loop) as vm:
            vm.start()
            result = vm.wait(60)
            assert result is not None and (result.status, result.reason) == (1, "debug-exit")
            stats = vm.stats()
            per_vcpu = [t.total_exit_counts() for t in vm.threads]
            shared, kvm_features, leaf1_ebx = struct.unpack("<III", vm.memory.read(0x100000 + 12, 12))
    finally:
        sys.setswitchinterval(old)
    assert stats.by_port == {0x64: 2 * n, 0x510: 2 * n, 0xF4: 1}
    assert stats.unhandled_ports == {0x80: 2 * n}
    assert stats.unhandled_mmio == {0xD0000000: 2 * n} and stats.other_mmio == 0
    assert stats.by_device == {"i8042": 2 * n, "fw-cfg": 2 * n, "debug-exit": 1}
    assert stats.by_reason == {"IO": 6 * n + 1, "MMIO": 2 * n}
    # both vCPUs ran their loop: vCPU 0 also wrote to the debug-exit port
    assert [c[kc.EXIT_IO] for c in per_vcpu] == [3 * n + 1, 3 * n]
    assert [c[kc.EXIT_MMIO] for c in per_vcpu] == [n, n]
    assert shared == 2 * n                      # `lock incl` from both vCPUs: none lost
    assert leaf1_ebx >> 24 == 1                 # vCPU 1 sees its own APIC id in CPUID leaf 1
    if detect_host().backend == "kvm_pvm":      # the PV features that hang Linux there are hidden (host.py)
        assert kvm_features & PV_CROSS_VCPU == 0 and kvm_features & 1, hex(kvm_features)


PV_CROSS_VCPU = (1 << 7) | (1 << 9) | (1 << 11) | (1 << 13)   # PV_UNHALT, PV_TLB_FLUSH, PV_SEND_IPI, PV_SCHED_YIELD


def test_stats_on_the_command_line_with_two_vcpus(tmp_path):
    cfg = write_yaml(tmp_path, f"vcpus: 2\ntimeout: 20\nboot: {{image: {smp_image(tmp_path, 500)}, mode: protected}}\n")
    r = run_hvm("run", str(cfg), "--stats", "-q")
    assert r.status == 1, r.stderr
    assert "  0x0064                 1000\n" in r.stderr and "  0x0080                 1000  (no device)\n" in r.stderr
    assert "  fw-cfg                 1000\n" in r.stderr and "  0x00d0000000           1000\n" in r.stderr


@pytest.mark.skipif(not hasattr(Machine, "snapshot"), reason="needs Machine.snapshot")
def test_two_vcpus_snapshot_mid_run_and_restore_finish_the_count(tmp_path):
    """Both vCPUs are in their loop when the VM is saved; the restored VM runs both on from there: the word
    they `lock incl` ends at exactly 2 * iterations and vCPU 0 reaches its debug exit."""
    n = 200000
    snap = tmp_path / "smp.snap"
    with Machine(smp_spec(smp_image(tmp_path, n), timeout=60), console=quiet()) as vm:
        vm.start()
        deadline = time.monotonic() + 20
        while struct.unpack("<I", vm.memory.read(0x100000 + 12, 4))[0] < 1000 and time.monotonic() < deadline:
            time.sleep(0.01)
        vm.snapshot(snap)
        saved = struct.unpack("<I", vm.memory.read(0x100000 + 12, 4))[0]
        assert 1000 <= saved < 2 * n, saved
        vm.stop()
    with Machine.restore(snap, console=quiet(), timeout=60) as vm2:
        vm2.start()
        result = vm2.wait(60)
        assert result is not None and (result.status, result.reason) == (1, "debug-exit")
        assert struct.unpack("<I", vm2.memory.read(0x100000 + 12, 4))[0] == 2 * n


# --- the halt rule ------------------------------------------------------------------------------
def test_flat_guest_with_two_vcpus_ends_when_its_only_started_vcpu_halts(tmp_path):
    """hello32 never starts vCPU 1: it waits for INIT/SIPI and does not count as running, so vCPU 0's
    `cli; hlt` ends the VM with status 0, as with one vCPU (was: ran until the watchdog)."""
    cfg = write_yaml(tmp_path, f"vcpus: 2\ntimeout: 20\nboot: {{image: {FIRMWARE / 'hello32.bin'}, mode: protected}}\n")
    t0 = time.monotonic()
    r = run_hvm("run", str(cfg), "-v")
    assert r.status == 0, r.stderr
    assert r.out == "protected mode, set up by hvm: hello\n"
    assert "all started vCPUs halted (1 never started: waiting for INIT/SIPI) (exit status 0)" in r.stderr
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("fast_loop", [True, False], ids=["fast-loop", "python-loop"])
def test_two_started_vcpus_that_both_halt_end_the_vm(tmp_path, fast_loop):
    spec = smp_spec(smp_image(tmp_path, 100), debug_exit=False, timeout=20)
    with Machine(spec, console=quiet(), fast_loop=fast_loop) as vm:
        result = vm.run()
        assert (result.status, result.reason, result.message) == (0, "halt", "all started vCPUs halted")
        assert vm.stats().by_port[0x510] == 200


def test_a_vcpu_halted_with_interrupts_on_counts_as_running(tmp_path):
    """`sti; hlt` may be woken by any interrupt (hvm cannot know none will come): the VM runs on."""
    spec = smp_spec(smp_image(tmp_path, 100, halt_sti=1), debug_exit=False, timeout=1.5)
    with Machine(spec, console=quiet()) as vm:
        result = vm.run()
        assert (result.status, result.reason) == (124, "timeout")


def test_paused_vm_is_not_ended_by_the_halt_rule(tmp_path):
    """A VM paused before its vCPUs halt stays paused (the rule only asks running VMs), then ends on resume."""
    spec = smp_spec(FIRMWARE / "hello32.bin", debug_exit=False, timeout=20)
    with Machine(spec, console=quiet()) as vm:
        vm.start()
        vm.pause()
        time.sleep(4 * machine_mod.HALT_POLL)
        assert vm.wait(0) is None
        vm.resume()
        result = vm.wait(10)
        assert result is not None and (result.status, result.reason) == (0, "halt")


# --- multiboot guests: kvm-unit-tests' smptest ---------------------------------------------------
@pytest.mark.skipif(not (KUT / "smptest.flat").is_file(), reason=f"{KUT}/smptest.flat is not there")
@pytest.mark.parametrize("fast_loop", [True, False], ids=["fast-loop", "python-loop"])
def test_kvm_unit_tests_smptest_runs_on_both_cpus(fast_loop):
    spec = VmSpec(name="smptest", boot=KernelBoot(KUT / "smptest.flat", (), ""), memory=128 << 20, vcpus=2,
                  timeout=30, machine="pc", devices=parse_devices({"testdev": True}))
    with Machine(spec, console=quiet(), fast_loop=fast_loop) as vm:
        result = vm.run()
        out = vm.console.text()
    assert (result.status, result.reason) == (1, "debug-exit"), out
    for line in ("smp: waiting for 1 APs", "setup: CPU 1 online", "found 2 cpus", "ipi called, cpu 0",
                 "ipi called, cpu 1", "PASS: IPI to each CPU", "SUMMARY: 1 tests"):
        assert line in out, out


# --- teardown -------------------------------------------------------------------------------------
def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def ticker_spec() -> VmSpec:
    return VmSpec(name="ticker", boot=FlatBoot(FIRMWARE / "ticker.bin", 0x7C00, 0x7C00, "real"),
                  memory=4 << 20, timeout=20, irqchip=False)


def test_close_leaves_the_mappings_to_a_vcpu_thread_that_does_not_stop(monkeypatch, caplog):
    """A vCPU thread stuck past the join deadline (here: in an I/O handler) may still use kvm_run and guest
    memory: close() leaves them (and the fds) open, says so, and the thread closes them as it ends."""
    Machine(ticker_spec(), console=quiet()).close()      # warm-up: imports, signal handler
    before = fd_count()
    monkeypatch.setattr(machine_mod, "JOIN_TIMEOUT", 0.2)
    entered, release = threading.Event(), threading.Event()

    def stuck_io() -> bool:
        entered.set()
        release.wait(30)
        return False

    vm = Machine(ticker_spec(), console=quiet())
    thread = vm.threads[0]
    thread.dispatch[kc.EXIT_IO] = stuck_io
    vcpu, memory = vm.vcpus[0], vm.memory
    vm.start()
    assert entered.wait(10)
    with caplog.at_level(logging.INFO, logger="hvm.machine"):
        vm.close()
        assert thread.is_alive()
        assert vcpu.fd >= 0 and os.fstat(vcpu.fd) and vcpu.run_struct is not None
        assert vcpu.run_struct.exit_reason == kc.EXIT_IO            # the mapping is still there
        assert memory.regions and vm.memory is memory and vm.vm is not None
        assert vm.kvm is None                                       # what no vCPU uses is closed
        messages = [r.getMessage() for r in caplog.records]
        assert "close: vCPU thread vcpu0 still running: leaving its kvm_run mapping, vCPU fds, guest memory " \
               "and the VM fd open until it ends" in messages
        release.set()
        thread.join(10)
        assert not thread.is_alive()
        assert vcpu.fd == -1 and vcpu.run_struct is None and vm.vm is None and vm.memory is None
        assert "vCPU 0 ended: closed the vCPUs, VM fd and guest memory close() had left open" in \
               [r.getMessage() for r in caplog.records]
    assert fd_count() == before


def test_close_runs_every_step_when_one_raises(monkeypatch, caplog, tmp_path):
    Machine(ticker_spec(), console=quiet()).close()
    before = fd_count()
    original = Vcpu.close

    def failing_close(self):
        original(self)
        raise RuntimeError("boom")

    monkeypatch.setattr(Vcpu, "close", failing_close)
    log_file = tmp_path / "serial.log"
    console = Console(f"file:{log_file}", "none", open_now=False)
    vm = Machine(VmSpec(name="two", boot=FlatBoot(FIRMWARE / "hello32.bin", 0x100000, 0x100000, "protected"),
                        memory=8 << 20, vcpus=2, timeout=20, machine="pc"), console=console)
    assert vm.run().status == 0
    with caplog.at_level(logging.ERROR, logger="hvm.machine"):
        with pytest.raises(RuntimeError, match="^boom$"):
            vm.close()
    # both vCPUs' failures logged; the VM fd, guest memory, /dev/kvm and the console file closed all the same
    assert [r.getMessage() for r in caplog.records] == ["close: vCPU 0 failed: RuntimeError: boom",
                                                        "close: vCPU 1 failed: RuntimeError: boom"]
    assert vm.vm is None and vm.memory is None and vm.kvm is None
    assert fd_count() == before
    assert log_file.read_text() == "protected mode, set up by hvm: hello\n"


def test_sigterm_storm_during_stop_and_close_ends_cleanly(tmp_path):
    """SIGTERMs keep coming while hvm stops and tears down: its handler only raises (no lock taken in a
    handler), and during the teardown they are ignored. It ends, with no traceback and no hang."""
    cfg = write_yaml(tmp_path, f"boot: {{image: {FIRMWARE / 'ticker.bin'}}}\nmemory: 4M\ntimeout: 20\n")
    proc = subprocess.Popen([sys.executable, "-m", "hvm", "run", str(cfg)], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.read(5) == b"tick\n"
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.0005)
        status = proc.wait(timeout=10)          # no deadlock: it ends
        err = proc.stderr.read().decode()
        assert "Traceback" not in err, err
        # 143: hvm handled the first signal and exited itself. -15: a later signal arrived after the
        # teardown, once main() had put back the handler it found (SIG_DFL) for its caller: killed then.
        assert status in (143, -signal.SIGTERM), (status, err)
        if status == 143:
            assert "terminated by signal 15" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()


# --- Linux ------------------------------------------------------------------------------------------
LINUX = ROOT / "build" / "linux"


@pytest.fixture(scope="module")
def linux_assets():
    subprocess.run(["make", "-s", "linux"], cwd=ROOT, check=True, timeout=3600)
    return LINUX


def boot_linux_smp(extra_cmdline: str = "", timeout: int = 300):
    return run_hvm("run", "--kernel", str(LINUX / "vmlinux-minimal"), "--initrd", str(LINUX / "initramfs-ud2.cpio"),
                   "--append", ("console=ttyS0 earlyprintk=serial panic=-1 " + extra_cmdline).strip(),
                   "--memory", "256M", "--vcpus", "2", "--timeout", str(timeout), input=b"", timeout=timeout + 60)


def assert_two_cpus_and_init(r):
    out = r.out
    assert "smp: Brought up 1 node, 2 CPUs" in out, out[-3000:]
    assert "Run /init as init process" in out, out[-3000:]
    # /init's first instruction is UD2 (initramfs-ud2): the kernel kills it and panics, hvm reports status 4
    assert "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000004" in out
    assert r.status == 4, r.stderr[-2000:]


@pytest.mark.slow
def test_linux_brings_up_two_cpus_from_the_madt(linux_assets):
    """About a minute on kvm_pvm. There hvm hides the KVM paravirtual features by which one vCPU acts on
    another (hvm/host.py, docs/lifecycle.md): with them the boot stops for good at the first cross-CPU wait."""
    r = boot_linux_smp()
    assert_two_cpus_and_init(r)
    # the MADT is where the CPUs came from: hvm's ACPI area at 0xE0000 (its offset moves as tables are added)
    assert re.search(r"ACPI: APIC 0x00000000000E[0-9A-F]{4} [0-9A-F]{6} \(v01 HVM", r.out), r.out[-3000:]


@pytest.mark.slow
def test_linux_brings_up_two_cpus_from_the_mp_table(linux_assets):
    """acpi=off: Linux finds the CPUs in the MP table alone."""
    r = boot_linux_smp("acpi=off")
    assert "found SMP MP-table at [mem 0x000f0000-0x000f000f]" in r.out, r.out[-3000:]
    assert "ACPI: APIC" not in r.out
    assert_two_cpus_and_init(r)
