"""kvm-unit-tests guests (../shared/kvm-unit-tests, upstream 1da1819e49fc) under hvm, as upstream's
runner runs them under QEMU. Every entry QEMU passes on this host must pass under hvm.
Checked on the kvm_pvm host; realmode (~11 s here, emulated 16-bit code) is in the slow group."""
from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest

from conftest import ROOT, shared_tree
from hvm.kut import QEMU_PREFIX, format_table, hvm_args_for, parse_qemu_results, parse_unittests_cfg, run_all, run_entry
from hvm.qemu_shim import ShimError, drop_tcg_cpu, translate

KUT = shared_tree("kvm-unit-tests", lambda d: (d / "unittests.cfg").is_file())
needs_kut = pytest.mark.skipif(not (KUT / "unittests.cfg").is_file(), reason=f"{KUT} is not there")

SLOW_ENTRIES = {"realmode"}


def entries():
    if not (KUT / "unittests.cfg").is_file():
        return []
    return parse_unittests_cfg(KUT / "unittests.cfg")


@needs_kut
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


@needs_kut
@pytest.mark.parametrize("entry", [pytest.param(e, id=e.name, marks=[pytest.mark.slow] if e.name in SLOW_ENTRIES
                                                else []) for e in entries()])
def test_entry_passes_like_qemu(entry):
    ref = parse_qemu_results(KUT / "RESULTS-QEMU.md")[entry.name]
    result = run_entry(entry, KUT, timeout=min(entry.timeout, 60))
    assert result.status == "PASS", result.output[-2000:]
    assert result.exit_status == 1
    assert result.line() == f"{ref.result.split(' ', 1)[0]} {entry.name}" + (
        f" {ref.result.split(' ', 1)[1]}" if " " in ref.result else "")


@needs_kut
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


@needs_kut
def test_a_command_line_hvm_cannot_honour_is_a_skip(tmp_path):
    """As upstream's runner: hvm-qemu refuses the entry's flags before loading the kernel -> SKIP with its words."""
    (tmp_path / "setjmp.flat").symlink_to(KUT / "setjmp.flat")
    (tmp_path / "unittests.cfg").write_text("[vmx]\nfile = setjmp.flat\nqemu_params = -cpu qemu64,+vmx\n\n"
                                            "[q35]\nfile = setjmp.flat\nqemu_params = -M q35\n")
    results = run_all(tmp_path, timeout=60, out=io.StringIO())
    assert [r.status for r in results] == ["SKIP", "SKIP"]
    assert results[0].detail.startswith("(hvm-qemu: -cpu qemu64,+vmx: host doesn't support requested feature: "
                                        "CPUID.01H:ECX.vmx [bit 5]"), results[0].detail
    assert results[1].detail.startswith("(hvm-qemu: -machine q35"), results[1].detail


def test_a_failing_guest_is_a_fail(tmp_path):
    # The multiboot test firmware exits with code 5 -> status 11: upstream's FAIL.
    from conftest import FIRMWARE
    (tmp_path / "unittests.cfg").write_text("[fails]\nfile = mbtest.flat\ntest_args = 'exit=5'\n")
    (tmp_path / "mbtest.flat").symlink_to(FIRMWARE / "mbtest.elf")
    results = run_all(tmp_path, timeout=30, out=io.StringIO())
    assert (results[0].status, results[0].exit_status) == ("FAIL", 11)
    assert format_table(results, {}).endswith("0 PASS, 1 FAIL, 0 SKIP of 1")


@needs_kut
def test_hvm_kut_cli_on_one_entry():
    proc = subprocess.run([sys.executable, "-m", "hvm", "kut", str(KUT), "smptest"], capture_output=True,
                          timeout=120, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("PASS smptest (1 tests)\n")
    assert "| smptest | PASS (1 tests) |" in proc.stdout


UPSTREAM_PREFIX = QEMU_PREFIX


def test_qemu_shim_translation():
    args = translate(UPSTREAM_PREFIX + ["-kernel", "x.flat", "-smp", "2", "-append", "ipi", "-machine", "pit=off"])
    assert args == ["run", "--quiet", "--machine", "pc", "--serial", "none", "--device", "pc-testdev",
                    "--device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "--serial", "stdio",
                    "--device", "pci-testdev", "--accel", "kvm", "--kernel", "x.flat",
                    "--vcpus", "2", "--append", "ipi", "--no-pit"]


def test_qemu_shim_accelerators():
    """QEMU's accelerator spellings: -accel NAME[,props], -machine accel=, -enable-kvm, kvm:tcg (= auto)."""
    def accel(*argv):
        args = translate(list(argv) + ["-kernel", "x.flat"])
        return [args[i + 1] for i, a in enumerate(args) if a == "--accel"]
    assert accel("-accel", "tcg") == ["tcg"]
    assert accel("-accel", "tcg,thread=single,tb-size=64") == ["tcg"]
    assert accel("-machine", "pc,accel=kvm:tcg") == ["auto"]
    assert accel("-enable-kvm") == ["kvm"]
    assert accel() == []                        # hvm's own default: auto
    with pytest.raises(ShimError, match=r"^-accel hvf: invalid accelerator hvf \(hvm has kvm and tcg\)$"):
        translate(["-accel", "hvf", "-kernel", "x.flat"])
    with pytest.raises(ShimError, match=r"^-machine accel=xen: invalid accelerator xen"):
        translate(["-machine", "accel=xen", "-kernel", "x.flat"])


def test_qemu_shim_cpu_under_tcg():
    """Unicorn's CPU is qemu64: `-cpu qemu64` is dropped under tcg, any other model refused (a SKIP upstream)."""
    args = translate(["-accel", "tcg", "-cpu", "qemu64", "-kernel", "x.flat"])
    drop_tcg_cpu(args)
    assert "--cpu" not in args
    args = translate(["-accel", "tcg", "-cpu", "max", "-kernel", "x.flat"])
    with pytest.raises(ShimError, match=r"^-cpu max: accel tcg runs Unicorn's qemu64 CPU only$"):
        drop_tcg_cpu(args)
    args = translate(["-accel", "kvm", "-cpu", "max", "-kernel", "x.flat"])
    drop_tcg_cpu(args)
    assert args[args.index("--cpu") + 1] == "max"


@needs_kut
def test_qemu_shim_runs_upstreams_command_line(tmp_path):
    """The exact command upstream's x86/run builds, with its environment file as -initrd."""
    env = tmp_path / "env"
    env.write_text("QEMU_ACCEL=kvm\nQEMU_MAJOR=7\n")
    proc = subprocess.run([sys.executable, "-m", "hvm.qemu_shim", *UPSTREAM_PREFIX, "-kernel", str(KUT / "smptest.flat"),
                           "-smp", "2", "-initrd", str(env)], capture_output=True, timeout=120, text=True)
    assert proc.returncode == 1
    assert proc.stderr == ""          # upstream's runner takes any stderr as a QEMU failure
    assert "found 2 cpus" in proc.stdout and "SUMMARY: 1 tests" in proc.stdout


@needs_kut
def test_qemu_shim_probes():
    run = lambda *a: subprocess.run([sys.executable, "-m", "hvm.qemu_shim", *a], capture_output=True, text=True,
                                    timeout=60)
    assert run("--help").stdout.startswith("QEMU emulator version 7.2.0")
    assert 'name "pc-testdev"' in run("-device", "?").stdout
    missing = run("-kernel", "_NO_FILE_4Uhere_")
    assert missing.returncode == 1
    assert "could not load kernel '_NO_FILE_4Uhere_'" in missing.stderr
    bad = run("-kernel", str(KUT / "setjmp.flat"), "-device", "e1000")
    assert (bad.returncode, bad.stderr.strip()) == (2, "hvm-qemu: -device e1000: not a device hvm has")


# --- hardening (issue 11): bad cfg files, bad entries, signals, messages. None needs kvm-unit-tests. ---

def idle_kernel(path) -> None:
    """A multiboot kernel (a.out addresses, no ELF) that idles forever: cli; hlt; jmp back."""
    import struct
    magic, flags, load = 0x1BADB002, 1 << 16, 0x100000
    header = struct.pack("<3I5I", magic, flags, -(magic + flags) & 0xFFFFFFFF, load, load, 0, load + 0x1000, load + 32)
    path.write_bytes(header + b"\xfa\xf4\xeb\xfd")


def hvm_kut(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "hvm", "kut", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_cfg_without_a_section_header(tmp_path):
    (tmp_path / "unittests.cfg").write_text("# a comment\nfile = x.flat\n")
    r = hvm_kut(tmp_path)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (f"hvm: {tmp_path / 'unittests.cfg'}:2: not a unittests.cfg: 'file = x.flat' comes before "
                        "any [entry] header\n")


@pytest.mark.parametrize("text,message", [
    ("[a]\nfile = x\n= y\n", ":3: cannot parse '= y'"),
    ("[a]\nfile = x\n[b\n", ":3: cannot parse '[b'"),
    ("[a]\nfile = \xff\n", ": not UTF-8 text (byte 11)"),
])
def test_cfg_that_cannot_be_parsed(tmp_path, text, message):
    (tmp_path / "unittests.cfg").write_bytes(text.encode("latin-1"))
    r = hvm_kut(tmp_path)
    assert (r.returncode, r.stderr) == (2, f"hvm: {tmp_path / 'unittests.cfg'}{message}\n")


def test_cfg_that_is_not_a_regular_file(tmp_path):
    import os
    os.mkfifo(tmp_path / "unittests.cfg")
    r = hvm_kut(tmp_path, timeout=20)                     # a FIFO with no writer: refused, not read
    assert (r.returncode, r.stderr) == (2, f"hvm: unittests.cfg {tmp_path / 'unittests.cfg'}: is a FIFO, "
                                           "not a regular file\n")


def test_a_bad_entry_fails_alone(tmp_path):
    """A bad quote in one entry (shlex) aborted every remaining entry and the table; now that entry is a
    FAIL naming the file and line, and the others run."""
    from conftest import FIRMWARE
    (tmp_path / "mbtest.flat").symlink_to(FIRMWARE / "mbtest.elf")
    cfg = tmp_path / "unittests.cfg"
    cfg.write_text("[quote]\nfile = mbtest.flat\nqemu_params = -append 'x\n\n"
                   "[smp]\nfile = mbtest.flat\nsmp = two\n\n"
                   "[timeout]\nfile = mbtest.flat\ntimeout = inf\n\n"
                   "[nofile]\nsmp = 1\n\n"
                   "[good]\nfile = mbtest.flat\n")
    out = io.StringIO()
    results = run_all(tmp_path, timeout=30, out=out)
    assert [(r.entry.name, r.status) for r in results] == [("quote", "FAIL"), ("smp", "FAIL"), ("timeout", "FAIL"),
                                                           ("nofile", "FAIL"), ("good", "PASS")]
    lines = out.getvalue().splitlines()
    assert lines[:5] == [f"FAIL quote ({cfg}:1: qemu_params: No closing quotation)",
                         f"FAIL smp ({cfg}:5: smp: 'two' is not a number)",
                         f"FAIL timeout ({cfg}:9: timeout: 'inf' is not in (0, 86400] seconds)",
                         f"FAIL nofile ({cfg}:13: file: missing: which binary to run)",
                         "PASS good"]
    assert lines[-1] == "1 PASS, 4 FAIL, 0 SKIP of 5"


def test_usage_and_folder_messages(tmp_path):
    r = hvm_kut()
    assert r.returncode == 2
    # one line (hvm's argparse errors), and only the folder is required: the names are optional
    assert r.stderr == "hvm kut: the following arguments are required: directory (see `hvm kut --help`)\n"
    usage = subprocess.run([sys.executable, "-m", "hvm", "kut", "--help"], capture_output=True, text=True,
                           cwd=ROOT, timeout=20).stdout
    assert " ".join(usage.split()).startswith("usage: hvm kut [-h] [-g GROUP] [--timeout SECONDS] [-v] [--logs DIR] "
                                               "[--accel {kvm,tcg}] "
                                               "directory [names ...]")
    assert hvm_kut(tmp_path / "nope").stderr == f"hvm: {tmp_path / 'nope'}: no such directory\n"
    assert hvm_kut(tmp_path).stderr == (f"hvm: {tmp_path}: no unittests.cfg there (nor run_tests.sh and "
                                        "x86/unittests.cfg: an upstream tree)\n")
    (tmp_path / "f").write_text("")
    assert hvm_kut(tmp_path / "f").stderr == f"hvm: {tmp_path / 'f'}: not a directory\n"
    (tmp_path / "unittests.cfg").write_text("[a]\nfile = a.flat\n")
    assert hvm_kut(tmp_path, "--logs", tmp_path / "l").stderr == ("hvm: kut: --logs: only for an upstream tree "
                                                             "(run_tests.sh writes the logs)\n")
    r = hvm_kut(tmp_path, "b", "c")
    assert (r.returncode, r.stderr) == (2, f"hvm: {tmp_path / 'unittests.cfg'}: no such entries: b, c\n")
    for bad in ("nan", "inf", "0", "-1", "1e300", "x"):
        r = hvm_kut(tmp_path, "--timeout", bad)
        assert r.returncode == 2 and r.stderr.startswith("hvm kut: argument --timeout: "), (bad, r.stderr)
        assert r.stderr.count("\n") == 1, r.stderr


def _children(pid: int) -> list[int]:
    import os
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _alive(pid: int) -> bool:
    """Running, or a zombie nobody reaped (an orphan's zombie is reaped by init at once)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signo,status,message", [(2, 130, "interrupted (Ctrl-C)"),
                                                  (15, 143, "terminated by signal 15")])
def test_a_signal_ends_the_runner_and_its_child(tmp_path, signo, status, message):
    """SIGINT gave a traceback; SIGTERM left the running `hvm run` child behind (it ran on until its own
    watchdog). Now the child's process group is killed and the runner ends quietly, 128 + signal."""
    import os
    import signal
    import time
    idle_kernel(tmp_path / "idle.flat")
    (tmp_path / "unittests.cfg").write_text("[idle]\nfile = idle.flat\ntimeout = 60\n\n[after]\nfile = idle.flat\n")
    proc = subprocess.Popen([sys.executable, "-m", "hvm", "kut", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    child = None
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and child is None:
            kids = _children(proc.pid)
            child = kids[0] if kids else None
            time.sleep(0.05)
        assert child is not None, "hvm kut started no child"
        time.sleep(1.0)                                  # let the child get into its run
        assert _alive(child)
        proc.send_signal(signo)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == status
        assert err == f"hvm: kut: {message}\n"
        assert out == ""                                 # the second entry was never started
        time.sleep(0.2)
        assert not _alive(child), "the hvm run child outlived the runner"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


@needs_kut
def test_entries_under_tcg():
    """The same guests on the binary-translation accelerator (docs/tcg.md): the entries whose only exception is
    setup_idt's UD2 (delivered by hvm through the guest's IDT) and that need the APIC's registers, not its
    interrupts, pass; the others stop with the limitation named (a fault hvm cannot deliver; a HLT waiting for
    an interrupt tcg cannot raise)."""
    proc = subprocess.run([sys.executable, "-m", "hvm", "kut", str(KUT), "setjmp", "vmexit_cpuid", "idt_test",
                           "realmode", "--accel", "tcg", "--timeout", "30"], capture_output=True, timeout=300,
                          text=True, cwd=ROOT)
    lines = proc.stdout.splitlines()
    assert "PASS setjmp (10 tests)" in lines and "PASS vmexit_cpuid" in lines, proc.stdout
    assert "FAIL idt_test (hvm: guest crashed: tcg: exception or interrupt vector 0x8 (#DF or INT 0x8) on vCPU 0)" \
        in lines, proc.stdout
    assert "FAIL realmode (hvm: guest crashed: tcg: HLT with interrupts enabled (the guest waits for an interrupt) " \
           "on vCPU 0)" in lines, proc.stdout


@needs_kut
def test_realmode_software_interrupt_delivered_under_tcg():
    """realmode.flat's `int` subtest under tcg: INT 0x11 goes through the real-mode IVT, delivered by hvm."""
    proc = subprocess.run([sys.executable, "-m", "hvm", "run", "--accel", "tcg", "--kernel", str(KUT / "realmode.flat"),
                           "--machine", "pc", "--device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "--timeout", "20",
                           "--stats"], capture_output=True, timeout=60, text=True, cwd=ROOT)
    assert "PASS: int 1\n" in proc.stdout and "FAIL: int" not in proc.stdout, proc.stdout
    assert re.search(r"^  INT 0x11 delivered +1$", proc.stderr, re.M), proc.stderr
