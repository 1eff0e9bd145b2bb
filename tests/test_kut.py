"""kvm-unit-tests guests (../shared/kvm-unit-tests, upstream 1da1819e49fc) under hvm, as upstream's
runner runs them under QEMU. Every entry QEMU passes on this host must pass under hvm.
Checked on the kvm_pvm host; realmode (~11 s here, emulated 16-bit code) is in the slow group."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest

from conftest import ROOT
from hvm.kut import format_table, hvm_args_for, parse_qemu_results, parse_unittests_cfg, run_all, run_entry
from hvm.qemu_shim import translate

KUT = ROOT.parent / "shared" / "kvm-unit-tests"
pytestmark = pytest.mark.skipif(not (KUT / "unittests.cfg").is_file(), reason=f"{KUT} is not there")

SLOW_ENTRIES = {"realmode"}


def entries():
    if not (KUT / "unittests.cfg").is_file():
        return []
    return parse_unittests_cfg(KUT / "unittests.cfg")


def test_cfg_and_reference_parse():
    by_name = {e.name: e for e in entries()}
    assert set(by_name) == {"realmode", "setjmp", "smptest", "idt_test", "vmexit_cpuid", "vmexit_mov_from_cr8",
                            "vmexit_inl_pmtimer", "vmexit_ipi"}
    ipi = by_name["vmexit_ipi"]
    assert (ipi.file, ipi.smp, ipi.args, ipi.qemu_params, ipi.groups) == ("vmexit.flat", 2, "ipi",
                                                                           "-machine pit=off", ("vmexit",))
    assert "--no-pit" in hvm_args_for(ipi, KUT)
    assert by_name["idt_test"].arch == "x86_64"
    refs = parse_qemu_results(KUT / "RESULTS-QEMU.md")
    assert refs["setjmp"].result == "PASS (10 tests)" and refs["setjmp"].seconds == 4.2
    assert len(refs) == 8


@pytest.mark.parametrize("entry", [pytest.param(e, id=e.name, marks=[pytest.mark.slow] if e.name in SLOW_ENTRIES
                                                else []) for e in entries()])
def test_entry_passes_like_qemu(entry):
    ref = parse_qemu_results(KUT / "RESULTS-QEMU.md")[entry.name]
    result = run_entry(entry, KUT, timeout=min(entry.timeout, 60))
    assert result.status == "PASS", result.output[-2000:]
    assert result.exit_status == 1
    assert result.line() == f"{ref.result.split(' ', 1)[0]} {entry.name}" + (
        f" {ref.result.split(' ', 1)[1]}" if " " in ref.result else "")


def test_runner_output_format(tmp_path):
    cfg = tmp_path / "unittests.cfg"
    cfg.write_text("[setjmp]\nfile = setjmp.flat\n\n[missing]\nfile = nope.flat\n\n[i386only]\nfile = setjmp.flat\n"
                   "arch = i386\n")
    (tmp_path / "setjmp.flat").symlink_to(KUT / "setjmp.flat")
    (tmp_path / "RESULTS-QEMU.md").write_text("| setjmp | `-kernel setjmp.flat` | PASS (10 tests) | 4.2 |\n")
    out = io.StringIO()
    results = run_all(tmp_path, timeout=60, out=out)
    text = out.getvalue()
    assert [r.status for r in results] == ["PASS", "SKIP", "SKIP"]
    assert text.splitlines()[:3] == ["PASS setjmp (10 tests)",
                                     f"SKIP missing (Test file '{tmp_path / 'nope.flat'}' not found)",
                                     "SKIP i386only (i386 only)"]
    assert "| setjmp | PASS (10 tests) |" in text
    assert "1 PASS, 0 FAIL, 2 SKIP of 3; every entry QEMU passes here, hvm passes: 1/1" in text


def test_a_failing_guest_is_a_fail(tmp_path):
    # The multiboot test firmware exits with code 5 -> status 11: upstream's FAIL.
    from conftest import FIRMWARE
    (tmp_path / "unittests.cfg").write_text("[fails]\nfile = mbtest.flat\ntest_args = 'exit=5'\n")
    (tmp_path / "mbtest.flat").symlink_to(FIRMWARE / "mbtest.elf")
    results = run_all(tmp_path, timeout=30, out=io.StringIO())
    assert (results[0].status, results[0].exit_status) == ("FAIL", 11)
    assert format_table(results, {}).endswith("0 PASS, 1 FAIL, 0 SKIP of 1")


def test_hvm_kut_cli_on_one_entry():
    proc = subprocess.run([sys.executable, "-m", "hvm", "kut", str(KUT), "smptest"], capture_output=True,
                          timeout=120, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("PASS smptest (1 tests)\n")
    assert "| smptest | PASS (1 tests) |" in proc.stdout


UPSTREAM_PREFIX = ["--no-reboot", "-nodefaults", "-global", "kvm-pit.lost_tick_policy=discard", "-device", "pc-testdev",
                   "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "-display", "none", "-serial", "stdio",
                   "-device", "pci-testdev", "-machine", "accel=kvm"]


def test_qemu_shim_translation():
    args = translate(UPSTREAM_PREFIX + ["-kernel", "x.flat", "-smp", "2", "-append", "ipi", "-machine", "pit=off"])
    assert args == ["run", "--quiet", "--machine", "pc", "--serial", "none", "--device", "pc-testdev",
                    "--device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "--serial", "stdio", "--kernel", "x.flat",
                    "--vcpus", "2", "--append", "ipi", "--no-pit"]


def test_qemu_shim_runs_upstreams_command_line(tmp_path):
    """The exact command upstream's x86/run builds, with its environment file as -initrd."""
    env = tmp_path / "env"
    env.write_text("QEMU_ACCEL=kvm\nQEMU_MAJOR=7\n")
    proc = subprocess.run([sys.executable, "-m", "hvm.qemu_shim", *UPSTREAM_PREFIX, "-kernel", str(KUT / "smptest.flat"),
                           "-smp", "2", "-initrd", str(env)], capture_output=True, timeout=120, text=True)
    assert proc.returncode == 1
    assert proc.stderr == ""          # upstream's runner takes any stderr as a QEMU failure
    assert "found 2 cpus" in proc.stdout and "SUMMARY: 1 tests" in proc.stdout


def test_qemu_shim_probes():
    run = lambda *a: subprocess.run([sys.executable, "-m", "hvm.qemu_shim", *a], capture_output=True, text=True,
                                    timeout=60)
    assert run("--help").stdout.startswith("QEMU emulator version 7.2.0")
    assert 'name "pc-testdev"' in run("-device", "?").stdout
    missing = run("-kernel", "_NO_FILE_4Uhere_")
    assert missing.returncode == 1
    assert "could not load kernel '_NO_FILE_4Uhere_'" in missing.stderr
    bad = run("-kernel", str(KUT / "setjmp.flat"), "-device", "virtio-net")
    assert (bad.returncode, bad.stderr.strip()) == (2, "hvm-qemu: -device virtio-net: not a device hvm has")
