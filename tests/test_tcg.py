"""The binary-translation accelerator (hvm/vcpu/tcg.py, docs/tcg.md) against KVM, guest by guest.

Every firmware program and the multiboot test guest run under `--accel kvm` and `--accel tcg` with the
configuration its own test uses: the ones tcg can run give byte-identical serial output and the same exit
status (IDENTICAL), the others stop under tcg with the outcome LIMITED names and the reason it gives (the same
table is docs/tcg.md's "Firmware under tcg", checked below). Then exit sequences compared record by record,
the watchdog, pause/resume/stop through the Python API, `auto`'s fallback when /dev/kvm is unusable (in a
private mount namespace), configuration errors, snapshot/reset refusals and clean-up after a fault or crash.
Checked on the kvm_pvm host; nothing here depends on it except the KVM side of a few programs whose own tests
say so (the cmpxchg16b/xsave probes, vmcall).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import CONFIGS, FIRMWARE, ROOT, Latch, run_hvm, write_yaml

pytest.importorskip("unicorn", reason="accel tcg needs the unicorn package")

from hvm.config import parse_spec  # noqa: E402
from hvm.console import Console  # noqa: E402
from hvm.doctor import PROBES  # noqa: E402  (firmware/probe.S's probe numbers)
from hvm.machine import Machine  # noqa: E402
from hvm.trace.tracer import TraceConfig  # noqa: E402

KVM_OK = os.access("/dev/kvm", os.R_OK | os.W_OK)
needs_kvm = pytest.mark.skipif(not KVM_OK, reason="/dev/kvm is not usable here: nothing to compare tcg with")
TIMEOUT = 10            # hvm's watchdog for each run; the subprocess bound is run_hvm's (20 s)
FUZZ_DEVICES = ("--device", "pc-testdev", "--device", "isa-debugcon", "--device", "pvconsole")


# --- the programs, each with the configuration its own test uses -------------------------------------------
def _yaml(tmp: Path, name: str, config: dict) -> str:
    return str(write_yaml(tmp, json.dumps(config), f"{name}.yaml"))      # JSON is YAML


def _flat(image, mode: str = "real", load: int = 0x7C00, regs: dict | None = None, **top) -> dict:
    boot = {"image": str(image), "mode": mode, "load": load}
    if regs:
        boot["regs"] = regs
    return {"memory": top.pop("memory", "16M"), "boot": boot, **top}


def _patched(image: str, tmp: Path, iterations: int, arg: int | None = None, fmt: str = "<H", **kw) -> Path:
    from bench.exits import patch_header

    return patch_header(FIRMWARE / f"{image}.bin", tmp / f"{image}-{iterations}.bin", iterations, arg, fmt, **kw)


def _virtio(image: str, tmp: Path, iterations: int) -> Path:
    from virtio_driver import patch_firmware

    return patch_firmware(FIRMWARE / f"{image}.bin", tmp / f"{image}.bin", iterations, 0xD000_0000, 0)


def _vblk(tmp: Path) -> list[str]:
    from bench.vblk import vblk_image

    disk = tmp / "disk.raw"
    if not disk.exists():
        disk.write_bytes(random.Random(13).randbytes(1 << 20))
    return [_yaml(tmp, "vblk", {"memory": "64M", "boot": {"kernel": str(vblk_image(tmp / "vblk.bin"))},
                                "devices": {"virtio-blk": [{"file": str(disk)}]}})]


def _probe(name: str, iterations: int = 100) -> Callable[[Path], list[str]]:
    return lambda tmp: [_yaml(tmp, f"probe-{name}", _flat(FIRMWARE / "probe.bin", "long", 0x100000, machine="none",
                                                          regs={"rdi": PROBES[name], "rsi": iterations},
                                                          devices={"serial": "none"}))]


@dataclass(frozen=True)
class Program:
    args: Callable[[Path], list[str]]     # `hvm run` arguments (a YAML file written into the directory given)
    status: int                           # the exit status under KVM (IDENTICAL: under both)
    input: bytes = b""                    # the serial input (stdin)


PROGRAMS: dict[str, Program] = {
    "hello": Program(lambda tmp: [str(CONFIGS / "hello.yaml")], 0),
    "echo": Program(lambda tmp: [_yaml(tmp, "echo", _flat(FIRMWARE / "echo.bin", memory="4M"))], 0,
                    b"hello, world q"),
    **{f"pvcon-{how}": Program(lambda tmp, m=m: [_yaml(tmp, "pvcon", _flat(
        _patched("pvcon", tmp, 3, m, arg_as_built=0), machine="none",
        devices={"debugcon": True, "pvconsole": True}))], 1)
       for m, how in enumerate(("uart", "debugcon", "pvconsole"))},
    "count": Program(lambda tmp: [_yaml(tmp, "count", _flat(FIRMWARE / "count.bin", regs={"rdi": 30}))], 43),
    "rtc_irq": Program(lambda tmp: [_yaml(tmp, "rtc_irq", _flat(FIRMWARE / "rtc_irq.bin", memory="4M", machine="pc",
                                                                 devices={"debug_exit": True}))], 3),
    "s3": Program(lambda tmp: [_yaml(tmp, "s3", _flat(FIRMWARE / "s3.bin", memory="4M", machine="pc",
                                                       regs={"rbx": 1}))], 33),
    "modes": Program(lambda tmp: [str(CONFIGS / "modes.yaml")], 0),
    "hello32": Program(lambda tmp: [str(CONFIGS / "hello32.yaml")], 0),
    "triple": Program(lambda tmp: [_yaml(tmp, "triple", _flat(FIRMWARE / "triple.bin", "protected", 0x100000,
                                                               memory="4M"))], 4),
    "smp": Program(lambda tmp: [_yaml(tmp, "smp", _flat(FIRMWARE / "smp.bin", "protected", 0x100000, memory="8M",
                                                         vcpus=2, machine="pc"))], 1),
    "vcon": Program(lambda tmp: [_yaml(tmp, "vcon", _flat(_virtio("vcon", tmp, 3), "protected", 0x100000,
                                                           machine="none", devices={"virtio-console": True}))], 1),
    "vrng": Program(lambda tmp: [_yaml(tmp, "vrng", _flat(_virtio("vrng", tmp, 5), "protected", 0x100000,
                                                           machine="none",
                                                           devices={"serial": "none", "virtio-rng": True}))], 1),
    "vblk": Program(_vblk, 1),
    "pci": Program(lambda tmp: [_yaml(tmp, "pci", _flat(FIRMWARE / "pci.bin", "protected", 0x100000)),
                                "--device", "pci-testdev"], 1),
    "vmcall": Program(lambda tmp: [_yaml(tmp, "vmcall", _flat(FIRMWARE / "vmcall.bin", "protected", 0x100000))],
                      (0x11 << 1) | 1),
    "msrgp": Program(lambda tmp: [_yaml(tmp, "msrgp", _flat(FIRMWARE / "msrgp.bin", "protected", 0x100000))],
                     (0x11 << 1) | 1),
    "hello64": Program(lambda tmp: [str(CONFIGS / "hello64.yaml")], 0),
    **{f"probe-{name}": Program(_probe(name), 1) for name in PROBES},
    "testdev64": Program(lambda tmp: [_yaml(tmp, "testdev64", _flat(FIRMWARE / "testdev64.bin", "long", 0x100000,
                                                                     devices={"testdev": True}))], 1),
    "cpuid64": Program(lambda tmp: [_yaml(tmp, "cpuid64", _flat(FIRMWARE / "cpuid64.bin", "long", 0x100000))], 1),
    "bench_pio": Program(lambda tmp: [_yaml(tmp, "bench_pio", _flat(_patched("bench_pio", tmp, 200, 0x80),
                                                                     machine="none"))], 1),
    # an IN loop from COM1's LSR (0x3fd); the guest ends with the last byte read, 0x60: status 0xc1
    "bench_pin": Program(lambda tmp: [_yaml(tmp, "bench_pin", _flat(_patched("bench_pin", tmp, 200, 0x3FD),
                                                                     machine="none"))], 0xC1),
    "bench_mmio": Program(lambda tmp: [_yaml(tmp, "bench_mmio", _flat(
        _patched("bench_mmio", tmp, 200, 0xD000_0000, "<I"), "protected", 0x100000, machine="none"))], 1),
    "bench_hlt": Program(lambda tmp: [_yaml(tmp, "bench_hlt", _flat(_patched("bench_hlt", tmp, 200),
                                                                     machine="none"))], 0),
    # published registers (COM1's SCR, the PM timer): answered in C under KVM, by the devices under tcg
    "pubregs": Program(lambda tmp: [_yaml(tmp, "pubregs", _flat(_patched("pubregs", tmp, 100), machine="pc"))], 1),
    # bench/tcg.py's compute loop; at CPL3 it writes its CS to port 0x80: kvm_pvm's user selector is the host's
    # (0x33), Unicorn's the guest's GDT's (0x2b): same output and status, other exit data (tests/test_bench_tcg.py)
    **{f"bench_cpl-ring{ring}": Program(lambda tmp, r=ring: [_yaml(tmp, f"bench_cpl{r}", _flat(
        _patched("bench_cpl", tmp, 1000, r, "<I"), "long", 0x100000, machine="none"))], 1) for ring in (0, 3)},
    # fuzz: every device check but the PIC's (check 2 reads the in-kernel PIC's IRR; tcg has no PIC: LIMITED)
    **{f"fuzz-seed{seed}": Program(lambda tmp, s=seed: ["--kernel", str(FIRMWARE / "fuzz.elf"), "--append",
                                                         f"seed={s} iters=300 checks=0xfd", *FUZZ_DEVICES],
                                   (0x42 << 1) | 1) for seed in (1, 2, 3)},
    "fuzz": Program(lambda tmp: ["--kernel", str(FIRMWARE / "fuzz.elf"), "--append", "seed=1 iters=300",
                                 *FUZZ_DEVICES], (0x42 << 1) | 1),
    "mbtest": Program(lambda tmp: [str(CONFIGS / "multiboot.yaml")], 15),
    # a guest that never ends by itself: both runs end at the watchdog, with a timing-dependent number of lines
    "ticker": Program(lambda tmp: [_yaml(tmp, "ticker", _flat(FIRMWARE / "ticker.bin", memory="4M"))], 124),
}


@dataclass(frozen=True)
class Limit:
    """What a program does under tcg when it cannot give KVM's output and status."""
    status: int          # hvm's exit status under tcg
    says: str            # a fragment of hvm's stderr (or, with `out`, of the guest's output) under tcg
    reason: str          # why (docs/tcg.md's table)
    out: bool = False    # `says` is in the serial output
    other: tuple[int, str] | None = None    # another outcome the timing may give: (status, serial output)


INVALID = "tcg: invalid instruction (#UD)"
LIMITED: dict[str, Limit] = {
    "rtc_irq": Limit(4, "tcg: HLT with interrupts enabled", "waits with HLT for the RTC's IRQ 8 through the PIC: "
                     "tcg has no interrupt controller (prints `uip 1->0`, then the crash report; or, when its "
                     "200000 polls of UIP, much faster under tcg, end before the second's update cycle, status 5)",
                     other=(5, "fail: UIP never went 1 -> 0\n")),
    "s3": Limit(0, "guest asked for ACPI S3, which hvm does not do on accel tcg", "ACPI S3: waking needs a KVM "
                "vCPU reset, so under tcg the sleep is a power-off (status 0, one warning line)"),
    "smp": Limit(2, "vcpus: 2 vCPUs: accel tcg runs one vCPU", "two vCPUs (INIT/SIPI through the LAPIC): tcg "
                 "runs one; refused at configuration time"),
    "msrgp": Limit((0x11 << 1) | 1, "rdmsr 048: ok", "Unicorn's CPU accepts MSRs 0x48, 0x49, 0x10b where KVM "
                   "raises #GP: the guest prints `ok` instead of `#GP` (same status)", out=True),
    "cpuid64": Limit(1, "cpuid: vendor=GenuineIntel", "CPUID is Unicorn's qemu64 model, not KVM's (same "
                     "status, other values)", out=True),
    "fuzz": Limit((0x52 << 1) | 1, "fuzz: check failed: uart-lsr-irq", "device check 2 reads the PIC's IRR "
                  "(port 0x20): no PIC under tcg, the port reads 0xff; with checks=0xfd the run is identical",
                  out=True),
    "ticker": Limit(124, "timeout: the guest was still running after", "never ends: both runs end at the "
                    "watchdog (status 124), after a timing-dependent number of lines"),
    "probe-syscall": Limit(4, "tcg: SYSCALL (Unicorn steps over it)", "SYSCALL from CPL3: Unicorn does not "
                           "execute it (it would step over it, as if the call returned at once): hvm stops the guest"),
    "probe-sysenter": Limit(4, "tcg: SYSENTER (Unicorn steps over it)", "SYSENTER from CPL3: Unicorn does not "
                            "execute it: hvm stops the guest"),
    "probe-int80": Limit(4, "tcg: software interrupt 0x80", "INT 0x80 from CPL3 to a CPL0 handler: a delivery "
                         "with a stack switch, which hvm's tcg delivery does not do (crash report)"),
    "probe-npstack": Limit(4, "tcg: software interrupt 0x82", "INT through a not-present gate: the #NP "
                           "(then #PF) it raises is a fault, which hvm's tcg cannot deliver (crash report)"),
    "probe-xgetbv": Limit(4, "tcg: exception or interrupt vector 0xd (#GP or INT 0xd)", "XGETBV of XCR 5 "
                          "is #GP, which the guest handles under KVM; Unicorn delivers no exception"),
}
# Programs whose outcome differs because tcg does MORE than this host's KVM: kvm_pvm cannot emulate these
# CPL0 instructions (INTERNAL_ERROR, status 4), Unicorn executes them and the probe finishes (status 1).
BETTER: dict[str, str] = {
    "probe-cmpxchg16b": "LOCK CMPXCHG16B at CPL0: kvm_pvm cannot emulate it (status 4); tcg runs it (status 1)",
    "probe-xsave": "XSAVE/XRSTOR at CPL0: kvm_pvm cannot emulate them (status 4); tcg runs them (status 1)",
}
IDENTICAL = [name for name in PROGRAMS if name not in LIMITED and name not in BETTER]
# What an identical row of the docs table adds
NOTES = {"triple": "the crash reports differ: KVM's triple fault; under tcg the UD2's #UD cannot be delivered "
                   "(IDT limit 0)",
         "vmcall": "VMCALL is #UD under both: KVM (kvm_pvm) and, under tcg, hvm deliver it through the guest's IDT",
         **{f"probe-{n}": f"{what}: under tcg #UD, delivered by hvm through the guest's IDT (under KVM: completed "
                          "by hvm or raised by kvm_pvm)" for n, what in (("movbe", "MOVBE's 16-bit form"),
                                                                        ("clac", "CLAC/STAC"), ("clwb", "CLWB"),
                                                                        ("rdpru", "RDPRU"), ("avx", "VMOVDQA"))},
         "probe-int3": "INT3: delivered through the guest's IDT by hvm under both accelerators",
         "probe-intn": "INT 0x81: delivered through the guest's IDT by hvm under both accelerators",
         **{f"fuzz-seed{s}": "300 operations, every device check but the PIC's (checks=0xfd)" for s in (1, 2, 3)},
         "echo": "input `hello, world q` on stdin", "count": "`rdi: 30`: 30 lines, then debug-exit",
         "probe-cpuid": "the CPUID values it reports on port 0x80 are Unicorn's (see cpuid64)"}


def run_both(name: str, tmp_path: Path, *extra: str) -> dict[str, object]:
    program = PROGRAMS[name]
    runs = {}
    for accel in ("kvm", "tcg"):
        d = tmp_path / accel
        d.mkdir(exist_ok=True)
        runs[accel] = run_hvm("run", *program.args(d), "--accel", accel, "--timeout", str(TIMEOUT), *extra,
                              input=program.input)
    return runs


# Identical programs whose exit counts differ, and why (the others: the same --stats lines under both)
STATS_DIFFER = {
    **{name: "under KVM an exit (kvm_pvm's emulation failure, completed by hvm) or none (#UD raised inside KVM); "
             "under tcg no exit, hvm's delivery counted in --stats" for name in
       ("vmcall", "probe-int3", "probe-intn", "probe-movbe", "probe-clac", "probe-clwb", "probe-rdpru", "probe-avx")},
    "echo": "it polls LSR until the input arrives: as many polls as the timing gives",
    "triple": "KVM's SHUTDOWN exit; tcg stops at the UD2",
    "probe-fwait": "kvm_pvm's emulation failure, completed by hvm, is an exit",
    "probe-mmx": "kvm_pvm's emulation failures, completed by hvm, are exits",
    **{f"fuzz-seed{s}": "the in-kernel PIC and PIT take their ports without an exit; under tcg those are exits "
                        "(no device)" for s in (1, 2, 3)},
    "mbtest": "REP INSB: one KVM exit of count 4, four under tcg (the elements are the same)",
}


def exit_statistics(stderr: str) -> list[str]:
    """--stats' lines: exits by reason, port, device, each device's counters (not the run time)."""
    lines = stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"exits: \d+ total$", line)), None)
    assert start is not None, stderr
    return [line for line in lines[start:] if not line.startswith("run time:")]


@needs_kvm
@pytest.mark.parametrize("name", IDENTICAL)
def test_identical_output_and_status_under_both(name, tmp_path):
    runs = run_both(name, tmp_path, "--stats")
    kvm, tcg = runs["kvm"], runs["tcg"]
    assert kvm.status == PROGRAMS[name].status, kvm.stderr
    assert (tcg.status, tcg.stdout) == (kvm.status, kvm.stdout), tcg.stderr
    assert kvm.stdout or kvm.status != 0 or "HLT" in kvm.stderr     # something to compare
    if name not in STATS_DIFFER:     # the same exits, by reason, port and device, the same device counters
        assert exit_statistics(tcg.stderr) == exit_statistics(kvm.stderr)
    assert "Traceback" not in kvm.stderr + tcg.stderr
    if name == "vblk":      # the disk each run wrote: the same bytes (read, pattern written, flushed)
        assert (tmp_path / "kvm" / "disk.raw").read_bytes() == (tmp_path / "tcg" / "disk.raw").read_bytes()
    if name == "triple":    # the same status for another reason: UD2 is Unicorn's invalid instruction
        assert "guest crashed: SHUTDOWN (triple fault)" in kvm.stderr
        assert f"guest crashed: {INVALID} on vCPU 0" in tcg.stderr


@needs_kvm
def test_ioeventfd_notifications_are_exits_under_tcg(tmp_path):
    """virtio-blk with ioeventfd: KVM completes the guest's QueueNotify writes in the kernel (no exit), tcg has
    no ioeventfd, so they are MMIO exits: the same output and disk, 4 more MMIO exits (one per request)."""
    runs = {}
    for accel in ("kvm", "tcg"):
        d = tmp_path / accel
        d.mkdir()
        cfg = Path(_vblk(d)[0])
        config = json.loads(cfg.read_text())
        config["devices"]["virtio-blk"][0]["ioeventfd"] = True
        cfg.write_text(json.dumps(config))
        runs[accel] = run_hvm("run", str(cfg), "--accel", accel, "--timeout", str(TIMEOUT), "--stats")
    kvm, tcg = runs["kvm"], runs["tcg"]
    assert (tcg.status, tcg.stdout) == (kvm.status, kvm.stdout) == (1, kvm.stdout) and b"vblk: ok" in kvm.stdout
    mmio = {a: int(re.search(r"^  MMIO +(\d+)$", r.stderr, re.M).group(1)) for a, r in runs.items()}
    assert mmio["tcg"] == mmio["kvm"] + 4, (kvm.stderr, tcg.stderr)
    assert (tmp_path / "kvm" / "disk.raw").read_bytes() == (tmp_path / "tcg" / "disk.raw").read_bytes()


@pytest.mark.parametrize("name", sorted(LIMITED))
def test_limited_programs_stop_with_the_named_limitation(name, tmp_path):
    limit = LIMITED[name]
    run = run_hvm("run", *PROGRAMS[name].args(tmp_path), "--accel", "tcg",
                  "--timeout", "1" if name == "ticker" else str(TIMEOUT), input=PROGRAMS[name].input)
    if limit.other is not None and run.status == limit.other[0]:
        assert run.out == limit.other[1], run.out
        return
    assert run.status == limit.status, run.stderr
    assert limit.says in (run.out if limit.out else run.stderr), (run.out, run.stderr)
    assert "Traceback" not in run.stderr
    if run.status == 4:    # a crash report: what Unicorn could not do, the registers, the last exits
        assert "\nhvm: guest crashed: tcg: " in "\n" + run.stderr, run.stderr
        assert re.search(r"^\s+RIP=[0-9a-f]{16} RFLAGS=[0-9a-f]+$", run.stderr, re.M), run.stderr
        assert any(why in run.stderr for why in ("no interrupt controller", "does not deliver exceptions or "
                                                  "interrupts", "Unicorn does not execute",
                                                  "hvm could not deliver it as the CPU would")), run.stderr


@needs_kvm
@pytest.mark.parametrize("name", sorted(BETTER))
def test_tcg_runs_what_kvm_pvm_cannot_emulate(name, tmp_path):
    from hvm.host import detect

    runs = run_both(name, tmp_path)
    assert runs["tcg"].status == 1, runs["tcg"].stderr
    if detect().backend == "kvm_pvm":
        assert runs["kvm"].status == 4 and "emulation failure" in runs["kvm"].stderr, runs["kvm"].stderr


def test_every_program_is_classified_and_the_docs_table_says_why():
    built = {p.stem for p in FIRMWARE.glob("*.bin")} | {"mbtest"}
    named = {n.split("-")[0] for n in PROGRAMS}
    assert built <= named | {"probe"}, f"firmware without a tcg verdict: {built - named}"
    doc = (ROOT / "docs" / "tcg.md").read_text()
    section = doc[doc.index("## Firmware under tcg"):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w-]+)` \|[^|]*\| (.*) \|$", section, re.M)}
    for name, limit in {**LIMITED, **{n: Limit(0, "", why) for n, why in BETTER.items()}}.items():
        assert rows.get(name) == limit.reason.replace("|", "\\|"), name
    for name in IDENTICAL:
        assert rows.get(name) == "identical" + (f"; {NOTES[name]}" if name in NOTES else ""), name


# --- exit sequences --------------------------------------------------------------------------------------
def flat_exits(records) -> list[tuple]:
    """(reason, port or address, size, direction, data) per element: a KVM string I/O record (count > 1, data
    = every element) becomes `count` records, as tcg makes them."""
    out = []
    for r in records:
        where = r.port if r.reason == "IO" else r.addr
        if r.reason == "IO" and r.count > 1:
            out += [(r.reason, where, r.size, r.direction, r.data[i * r.size:(i + 1) * r.size])
                    for i in range(r.count)]
        else:
            out.append((r.reason, where, r.size, r.direction, r.data))
    return out


def machine_exits(config: dict, accel: str) -> tuple[list[tuple], object, bytes]:
    spec = parse_spec({**config, "accel": accel, "timeout": TIMEOUT})
    with Machine(spec, console=Console("none", "none", open_now=False), trace=TraceConfig(memory=True)) as m:
        result = m.run()
        return flat_exits(m.exits()), result, bytes(m.console.history)


SEQUENCES: dict[str, Callable[[Path], dict]] = {
    "hello": lambda tmp: _flat(FIRMWARE / "hello.bin"),
    "modes": lambda tmp: _flat(FIRMWARE / "modes.bin"),
    "hello32": lambda tmp: _flat(FIRMWARE / "hello32.bin", "protected", 0x100000),
    "hello64": lambda tmp: _flat(FIRMWARE / "hello64.bin", "long", 0x100000),
    "mbtest": lambda tmp: {"memory": "64M", "boot": {"kernel": str(FIRMWARE / "mbtest.elf"), "cmdline": "exit=7"}},
    "pvcon-uart": lambda tmp: _flat(_patched("pvcon", tmp, 2, 0, arg_as_built=0), machine="none"),
    "vcon": lambda tmp: _flat(_virtio("vcon", tmp, 2), "protected", 0x100000, machine="none",
                              devices={"virtio-console": True}),
    "testdev64": lambda tmp: _flat(FIRMWARE / "testdev64.bin", "long", 0x100000, devices={"testdev": True}),
    "pci": lambda tmp: _flat(FIRMWARE / "pci.bin", "protected", 0x100000, devices={"pci-testdev": True}),
    "probe-pio": lambda tmp: _flat(FIRMWARE / "probe.bin", "long", 0x100000, machine="none",
                                   regs={"rdi": 0, "rsi": 50}),
    "bench_mmio": lambda tmp: _flat(_patched("bench_mmio", tmp, 50, 0xD000_0000, "<I"), "protected", 0x100000,
                                    machine="none"),
    "bench_pio": lambda tmp: _flat(_patched("bench_pio", tmp, 50, 0x3FF), machine="none"),
    "count": lambda tmp: _flat(FIRMWARE / "count.bin", regs={"rdi": 12}),
    "pvcon-pvconsole": lambda tmp: _flat(_patched("pvcon", tmp, 6, 2, arg_as_built=0), machine="none",
                                         devices={"pvconsole": True}),
    "vrng": lambda tmp: _flat(_virtio("vrng", tmp, 3), "protected", 0x100000, machine="none",
                              devices={"virtio-rng": True}),
}
# A guest whose string I/O is one KVM exit with count > 1 (rep outsb of 10 bytes, rep insb of 7 to port 0x80),
# then a debug-exit write (status 7) and HLT: tests/test_hostile_guest.py's STRING_IO.
STRING_IO = bytes.fromhex("be007c b90a00 ba8000 fc f36e bf007c b90700 f36c baf400 b003 ee f4")


@needs_kvm
@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_exit_sequences_are_equal(name, tmp_path):
    config = SEQUENCES[name](tmp_path)
    kvm, kvm_result, kvm_out = machine_exits(config, "kvm")
    tcg, tcg_result, tcg_out = machine_exits(config, "tcg")
    assert len(kvm) > 10
    assert tcg == kvm
    assert (tcg_result.status, tcg_out) == (kvm_result.status, kvm_out)


@needs_kvm
def test_string_io_is_one_kvm_record_and_count_tcg_records_with_the_same_elements(tmp_path):
    image = tmp_path / "string.bin"
    image.write_bytes(STRING_IO)
    config = _flat(image, machine="none", memory="4M")
    seqs = {}
    for accel in ("kvm", "tcg"):
        spec = parse_spec({**config, "accel": accel, "timeout": TIMEOUT})
        with Machine(spec, console=Console("none", "none", open_now=False), trace=TraceConfig(memory=True)) as m:
            result = m.run()
            records = list(m.exits())
        assert (result.reason, result.status) == ("debug-exit", 7)
        seqs[accel] = (records, flat_exits(records))
    kvm_records, tcg_records = seqs["kvm"][0], seqs["tcg"][0]
    # KVM makes one exit per REP INS/OUTS (count > 1) on VT-x/AMD-V; kvm_pvm, which emulates CPL0 code, made
    # 10 exits of the REP OUTSB and one of count 7 for the REP INSB here. tcg: one record per element.
    kvm_io = [(r.direction, r.count) for r in kvm_records if r.port == 0x80]
    assert sum(n for d, n in kvm_io if d == "out") == 10 and sum(n for d, n in kvm_io if d == "in") == 7
    assert [(r.direction, r.count) for r in tcg_records if r.port == 0x80] == [("out", 1)] * 10 + [("in", 1)] * 7
    assert seqs["tcg"][1] == seqs["kvm"][1]
    assert [r.data for r in tcg_records if r.port == 0x80][:10] == [bytes([b]) for b in STRING_IO[:10]]


def test_mmio_read_pieces_come_from_the_hooked_read_and_other_reads_go_to_the_bus():
    """TcgCpu._read_piece, as Unicorn calls it: the aligned words around an unaligned 8-byte read at 0x205 are
    served from the value the memory hook read (bytes outside the access: 0); a read that belongs to no hooked
    access (Unicorn's own, e.g. a page walk) goes to the bus."""
    from types import SimpleNamespace

    from hvm.vcpu.tcg import TcgCpu, TcgIo

    reads = []
    io = TcgIo(lambda p, n: 0, lambda p, n, v: None, lambda a, n: reads.append((a, n)) or 0xAB, lambda a, n, v: None)
    with TcgCpu(SimpleNamespace(regions=[]), "long", io) as cpu:
        cpu._mmio_read(None, 0, 0xD000_0205, 8, 0, None)
        assert reads == [(0xD000_0205, 8)]
        cpu._read = (0xD000_0205, 8, 0x0102030405060708)
        assert [hex(cpu._read_piece(a, 4)) for a in (0xD000_0200, 0xD000_0204, 0xD000_0208, 0xD000_020C)] == \
            ["0x0", "0x6070800", "0x2030405", "0x1"]
        assert cpu._read_piece(0xD000_0300, 4) == 0xAB and reads[-1] == (0xD000_0300, 4)


def test_trace_rip_under_tcg_is_the_accessing_instruction():
    """With rip capture, a tcg record's RIP is the address of the IN/OUT that made it (KVM's, on this host, is
    the instruction after an OUT: the field's meaning differs by accelerator, docs/tcg.md)."""
    spec = parse_spec({**_flat(FIRMWARE / "hello32.bin", "protected", 0x100000), "accel": "tcg", "timeout": TIMEOUT})
    with Machine(spec, console=Console("none", "none", open_now=False), trace=TraceConfig(memory=True, rip=True)) as m:
        assert m.run().status == 0
        records = [r for r in m.exits() if r.reason == "IO"]
        opcodes = {m.memory.read(r.rip, 1)[0] for r in records}
    assert len(records) > 30 and opcodes <= {0xEC, 0xED, 0xEE, 0xEF, 0xE4, 0xE5, 0xE6, 0xE7}, opcodes


# --- the watchdog, pause/resume, stop ----------------------------------------------------------------------
@pytest.mark.parametrize("mode, load, code", [
    ("real", 0x7C00, "ebfe"),                  # jmp . : no exit ever, Unicorn never calls a hook
    ("protected", 0x100000, "ebfe"),
    ("long", 0x100000, "ebfe"),
])
def test_the_watchdog_ends_a_guest_that_never_exits(tmp_path, mode, load, code):
    image = tmp_path / "loop.bin"
    image.write_bytes(bytes.fromhex(code))
    cfg = _yaml(tmp_path, "loop", _flat(image, mode, load, memory="4M", machine="none"))
    t0 = time.monotonic()
    run = run_hvm("run", cfg, "--accel", "tcg", "--timeout", "1")
    assert (run.status, run.stderr) == (124, "hvm: timeout: the guest was still running after 1 s\n")
    assert time.monotonic() - t0 < 1 + 4          # hvm's start, the slice that was running, the exit


def test_the_watchdog_ends_the_ticker_under_tcg(tmp_path):
    run = run_hvm("run", _yaml(tmp_path, "ticker", _flat(FIRMWARE / "ticker.bin", memory="4M")), "--accel", "tcg",
                  "--timeout", "0.5")
    assert run.status == 124, run.stderr
    *lines, last = run.out.split("\n")              # (stopped anywhere: the last line may be cut)
    assert len(lines) >= 2 and set(lines) == {"tick"} and "tick".startswith(last), run.out[-100:]


def count_spec(n: int, timeout: float = 60):
    return parse_spec({**_flat(FIRMWARE / "count.bin", regs={"rdi": n}), "accel": "tcg", "timeout": timeout})


def counted(n: int) -> str:
    return "".join(f"{i}\n" for i in range(n)) + "done\n"


def vcpu_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vcpu")]


def test_pause_stops_the_guest_and_resume_runs_it_on_without_loss():
    n = 30000           # ~1 s under tcg here (40 times faster than kvm_pvm's emulation of this CPL0 loop)
    with Machine(count_spec(n), console=Console("none", "none", open_now=False)) as m:
        assert m.accel == "tcg"
        m.start()
        assert m.wait_for_console(b"\n100\n", 20) is not None
        for _ in range(10):
            m.pause()
            assert m.run_state == "paused"
            seen = bytes(m.console.history)
            time.sleep(0.05)
            assert bytes(m.console.history) == seen        # paused: not one more byte
            m.resume()
            time.sleep(0.01)
        result = m.wait(60)
        assert result is not None and (result.reason, result.status) == ("debug-exit", 43), result
        assert m.console.text() == counted(n)


@needs_kvm
def test_counts_equal_under_both_with_pauses():
    """Started paused, resumed, paused again while it prints (KVM: ~8 ms a line here; tcg finishes 100 lines in
    ~10 ms, so it may have ended by then: its mid-run pauses are the test above), resumed: the same lines."""
    outs, paused_mid_run = {}, {}
    for accel in ("kvm", "tcg"):
        spec = parse_spec({**_flat(FIRMWARE / "count.bin", regs={"rdi": 100}), "accel": accel, "timeout": 30})
        with Machine(spec, console=Console("none", "none", open_now=False)) as m:
            m.start(paused=True)
            time.sleep(0.05)
            assert m.console.text() == ""
            m.resume()
            assert m.wait_for_console(b"\n3\n", 20) is not None
            try:
                m.pause()
                paused_mid_run[accel] = True
                m.resume()
            except RuntimeError as e:           # it ended first
                assert "cannot pause a VM that is" in str(e)
            result = m.wait(30)
            outs[accel] = (result.status, m.console.text())
    assert paused_mid_run.get("kvm")
    assert outs["tcg"] == outs["kvm"] == (43, counted(100))


def test_stop_ends_a_running_tcg_guest_and_close_ends_its_thread():
    with Machine(count_spec(10 ** 7), console=Console("none", "none", open_now=False)) as m:
        m.start()
        assert m.wait_for_console(b"\n10\n", 20) is not None
        result = m.stop()
        assert (result.reason, result.status) == ("stopped", 0)
        thread = m.threads[0]
    thread.join(5)
    assert not thread.is_alive() and vcpu_threads() == []
    assert m.memory is None


def count_runs(monkeypatch) -> list[int]:
    """A one-element list counting TcgCpu.run calls (each one enters Unicorn again at the guest's CS:RIP)."""
    from hvm.vcpu import tcg

    runs, run = [0], tcg.TcgCpu.run

    def counted_run(self):
        runs[0] += 1
        return run(self)

    monkeypatch.setattr(tcg.TcgCpu, "run", counted_run)
    return runs


def run_across_slices_and_a_pause(monkeypatch, config: dict) -> tuple[object, str, int]:
    """Start the guest, pause and resume it after 50 ms, wait for its end: (result, console text, runs)."""
    runs = count_runs(monkeypatch)
    spec = parse_spec({**config, "accel": "tcg", "timeout": 20})
    with Machine(spec, console=Console("none", "none", open_now=False)) as m:
        m.start()
        time.sleep(0.05)
        m.pause()
        m.resume()
        result = m.wait(20)
        return result, m.console.text(), runs[0]


def test_resume_after_a_kick_in_real_protected_and_long_mode(monkeypatch):
    """Every port write kicks the vCPU (as a pause or a slice's end does), so Unicorn is entered again ~70
    times from the guest's current CS:RIP, in each of the modes firmware/modes walks through by itself."""
    from hvm.vcpu import tcg

    runs, write = count_runs(monkeypatch), tcg.TcgVcpuThread._write

    def kicking_write(self, bus_write, reason, direction, port, size, value):
        write(self, bus_write, reason, direction, port, size, value)
        if reason == tcg.k.EXIT_IO:
            self.cpu.kick()

    monkeypatch.setattr(tcg.TcgVcpuThread, "_write", kicking_write)
    spec = parse_spec({**_flat(FIRMWARE / "modes.bin"), "accel": "tcg", "timeout": TIMEOUT})
    with Machine(spec, console=Console("none", "none", open_now=False)) as m:
        result = m.run()
        assert (result.reason, result.status) == ("halt", 0)
        assert m.console.text() == "real mode: hello\nprotected mode: hello\nlong mode: hello (EFER.LMA=1)\n"
    assert runs[0] > 60


# Real mode at 0x7c00: CLI; LGDT; CR0.PE; far jump to 32-bit code, which copies the rest to 0x100000 and jumps
# there: `mov $50000000, %ecx; 1: dec %ecx; jnz 1b`, then 'P', '\n' on COM1 and 5 to debug-exit (status 11).
HIGH_LOOP = bytes.fromhex(
    "fa660f0116707c0f20c06683c8010f22c066ea197c0000080066b810008ed88ec08ed0be3b7c0000bf00001000b91a000000"
    "f3a4b800001000ffe0b980f0fa024975fd66baf803b050eeb00aee66baf400b005eef48d76000000000000000000ffff0000"
    "009acf00ffff00000092cf001700587c0000")


def test_a_real_mode_boot_runs_on_above_64k_across_slices_and_pauses(monkeypatch, tmp_path):
    """The loop above 1 MiB lasts several 50 ms slices, and is paused and resumed: each time Unicorn is entered
    again at CS:EIP with EIP > 0xffff (Unicorn's 16-bit mode, used for real-mode boots before, kept only IP)."""
    image = tmp_path / "high.bin"
    image.write_bytes(HIGH_LOOP)
    result, text, runs = run_across_slices_and_a_pause(monkeypatch, _flat(image, memory="4M", machine="none"))
    assert (result.reason, result.status, text) == ("debug-exit", 11, "P\n"), result
    assert runs >= 3


# Protected mode at 0x100000 (its own GDT): page tables mapping 0..1 GiB twice, at 0 and at 4 GiB; long mode;
# a jump to the 4 GiB alias of `mov $50000000, %ecx; 1: dec %ecx; jnz 1b`; then 'L', RIP bit 32 as a digit,
# '\n' on COM1 and 6 to debug-exit (status 13). A RIP cut to 32 bits runs on in the low alias and prints L0.
ABOVE_4G = bytes.fromhex(
    "fa0f0115d0001000bf0000200031c0b9000c0000f3abc7050000200003102000c7050010200003202000c705201020000320"
    "2000bf00202000b883000000b9000200008907050000200083c708e2f4b8000020000f22d80f20e083c8200f22e0b9800000"
    "c00f320d000100000f300f20c00d010000800f22c0ea80001000080048b88c00100001000000ffe0b980f0fa02ffc975fc48"
    "8d1d0000000048c1eb2066baf803b04cee88d80430eeb00aee66baf400b006eef4900000000000000000ffff0000009aaf00"
    "ffff00000092cf001700b8001000")


def test_a_protected_mode_boot_runs_on_above_4g_in_long_mode_across_slices(monkeypatch, tmp_path):
    image = tmp_path / "above4g.bin"
    image.write_bytes(ABOVE_4G)
    result, text, runs = run_across_slices_and_a_pause(monkeypatch, _flat(image, "protected", 0x100000, machine="none"))
    assert (result.reason, result.status, text) == ("debug-exit", 13, "L1\n"), result
    assert runs >= 3


def test_pause_before_the_first_instruction_then_resume():
    with Machine(count_spec(20), console=Console("none", "none", open_now=False)) as m:
        m.start(paused=True)
        time.sleep(0.1)
        assert m.console.text() == ""
        m.resume()
        result = m.wait(20)
        assert result.status == 43 and m.console.text() == counted(20)


def test_a_vm_stopped_by_its_own_write_makes_no_more_accesses(tmp_path):
    """debug-exit, then more OUTs in the same translation block: under KVM the first ends the VM; Unicorn runs
    the rest of the block, so tcg must drop them (the serial bytes would otherwise reach the console)."""
    image = tmp_path / "g.bin"
    # mov dx,0xf4; mov al,3; out dx,al; mov dx,0x3f8; mov al,'X'; out dx,al; out dx,al; hlt
    image.write_bytes(bytes.fromhex("baf400 b003 ee baf803 b058 ee ee f4"))
    spec = parse_spec({**_flat(image, machine="none", memory="4M"), "accel": "tcg", "timeout": TIMEOUT})
    with Machine(spec, console=Console("none", "none", open_now=False), trace=TraceConfig(memory=True)) as m:
        result = m.run()
        exits = [(r.reason, r.port) for r in m.exits()]
        stats = m.stats()
    assert (result.reason, result.status) == ("debug-exit", 7)
    assert m.console.text() == "" and exits == [("IO", 0xF4)] and stats.by_reason == {"IO": 1}


@needs_kvm
@pytest.mark.parametrize("machine", ["none", "pc"])
def test_hlt_with_interrupts_enabled(tmp_path, machine):
    """STI; HLT. Without an irqchip (machine none) KVM ends the vCPU at HLT, and so does tcg (status 0). With
    one (pc), KVM waits for an interrupt (here: until the watchdog); tcg has no interrupt controller, so nothing
    could ever wake it: a crash report saying so, not a clean halt."""
    image = tmp_path / "stihlt.bin"
    image.write_bytes(bytes.fromhex("fbf4"))
    cfg = _yaml(tmp_path, "stihlt", _flat(image, memory="4M", machine=machine))
    kvm = run_hvm("run", cfg, "--accel", "kvm", "--timeout", "1")
    tcg = run_hvm("run", cfg, "--accel", "tcg", "--timeout", "1")
    if machine == "none":
        assert (kvm.status, kvm.stderr, tcg.status, tcg.stderr) == (0, "", 0, "")
    else:
        assert kvm.status == 124, kvm.stderr
        assert tcg.status == 4 and tcg.stderr.startswith(
            "hvm: guest crashed: tcg: HLT with interrupts enabled (the guest waits for an interrupt) on vCPU 0\n"
            "  hvm's tcg accelerator has no interrupt controller: no device interrupt can wake a halted vCPU"), \
            tcg.stderr
        assert re.search(r"RFLAGS=0+246\b|RFLAGS=0+202\b", tcg.stderr), tcg.stderr       # IF set


# --- auto falls back when /dev/kvm is unusable ---------------------------------------------------------------
def in_namespace_without_kvm(how: str, *args: str, input: bytes = b"") -> subprocess.CompletedProcess:
    """`hvm ARGS` in a private mount namespace where /dev/kvm is /dev/null ("null": an ioctl fails) or absent
    ("absent": an empty /dev). The host's mounts are untouched (unshare -m)."""
    setup = {"null": "mount --bind /dev/null /dev/kvm", "absent": "mount -t tmpfs none /dev"}[how]
    cmd = " ".join(["exec", sys.executable, "-m", "hvm", *args])
    return subprocess.run(["unshare", "-m", "sh", "-c", f"{setup} && {cmd}"], cwd=ROOT, input=input,
                          capture_output=True, timeout=30, env=dict(os.environ, PYTHONUNBUFFERED="1"))


needs_unshare = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                   reason="needs root and unshare(1) for a private mount namespace")


@needs_kvm
@needs_unshare
@pytest.mark.parametrize("how, why", [
    ("null", "KVM_GET_API_VERSION: Inappropriate ioctl for device"),
    ("absent", "open /dev/kvm: No such file or directory"),
])
def test_auto_falls_back_to_tcg_with_one_line_and_the_same_output(how, why):
    args = ("run", str(CONFIGS / "modes.yaml"), "--timeout", str(TIMEOUT))
    here = run_hvm(*args, "--accel", "auto")
    there = in_namespace_without_kvm(how, *args, "--accel", "auto")
    err = there.stderr.decode()
    assert (there.returncode, there.stdout) == (here.status, here.stdout) == (0, here.stdout), err
    assert here.stdout.startswith(b"real mode: hello\n") and here.stderr == ""
    assert err.count("\n") == 1 and err.startswith("hvm: KVM is not usable here (") and why in err, err
    assert err.rstrip().endswith("running on tcg (binary translation, docs/tcg.md)"), err


@needs_unshare
@pytest.mark.parametrize("how", ["null", "absent"])
def test_accel_kvm_without_kvm_is_one_line_and_no_traceback(how):
    there = in_namespace_without_kvm(how, "run", str(CONFIGS / "hello.yaml"), "--accel", "kvm", "--timeout", "5")
    err = there.stderr.decode()
    assert there.returncode not in (0, 124) and there.stdout == b""
    assert err.count("\n") == 1 and err.startswith("hvm: ") and "Traceback" not in err, err


# --- configuration errors, refusals ------------------------------------------------------------------------
@pytest.mark.parametrize("config, flags, message", [
    ({"vcpus": 2, "accel": "tcg"}, (), "vcpus: 2 vCPUs: accel tcg runs one vCPU"),
    ({"vcpus": 2}, ("--accel", "tcg"), "vcpus: 2 vCPUs: accel tcg runs one vCPU"),
    ({"accel": "tcg"}, ("--vcpus", "2"), "vcpus: 2 vCPUs: accel tcg runs one vCPU"),
    ({"cpu": "qemu64", "accel": "tcg"}, (), "cpu: applies to accel kvm"),
    ({}, ("--accel", "tcg", "--cpu", "qemu64"), "cpu: applies to accel kvm"),
    ({"accel": "hvf"}, (), "accel"),
    ({"accel": ["tcg"]}, (), "accel"),
])
def test_config_errors_are_one_line_status_2(tmp_path, config, flags, message):
    from test_config import assert_config_error

    cfg = _yaml(tmp_path, "vm", {**_flat(FIRMWARE / "hello.bin"), **config})
    line = assert_config_error(run_hvm("run", cfg, *flags, "--timeout", "5"), message)
    assert "vm.yaml" in line or "--" in line


def test_a_bad_accel_flag_is_one_line_status_2():
    from test_config import assert_config_error

    line = assert_config_error(run_hvm("run", str(CONFIGS / "hello.yaml"), "--accel", "hax"))
    assert "--accel" in line and "hax" in line


def test_snapshot_and_system_reset_are_refused_under_tcg(tmp_path):
    from hvm.snapshot import SnapshotError

    with Machine(count_spec(10 ** 7), console=Console("none", "none", open_now=False)) as m:
        m.start()
        assert m.wait_for_console(b"\n5\n", 20) is not None
        with pytest.raises(SnapshotError) as e:
            m.snapshot(tmp_path / "vm.snap")
        assert str(e.value) == (f"{tmp_path / 'vm.snap'}: the VM runs on accel tcg: hvm saves the state of KVM "
                                "vCPUs only")
        assert not (tmp_path / "vm.snap").exists()
        with pytest.raises(RuntimeError) as e:
            m.system_reset()
        assert str(e.value) == "cannot reset a VM on accel tcg: hvm resets KVM vCPUs only"
        assert m.run_state == "running"                  # both refusals left it running
        before = len(m.console.history)
        assert m.wait_for_console(re.compile(rb"\n\d+\n"), 5, start=before) is not None
        m.stop()


@needs_kvm
def test_incoming_with_accel_tcg_is_one_line_status_2(tmp_path):
    snap = tmp_path / "vm.snap"
    spec = parse_spec({**_flat(FIRMWARE / "count.bin", regs={"rdi": 10 ** 6}), "accel": "kvm", "timeout": 30})
    with Machine(spec, console=Console("none", "none", open_now=False)) as m:
        m.start()
        assert m.wait_for_console(b"\n1\n", 20) is not None
        m.snapshot(snap)
    run = run_hvm("run", "--incoming", f"file:{snap}", "--accel", "tcg", "--timeout", "5")
    assert (run.status, run.stdout, run.stderr) == (
        2, b"", "hvm: --incoming: --accel cannot be given: the snapshot carries the VM description\n")


# --- faults, crashes, clean-up -----------------------------------------------------------------------------
def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class Faulty(Latch):
    name = "faulty"

    def write(self, offset: int, size: int, value: int) -> None:
        super().write(offset, size, value)
        raise ZeroDivisionError("division by zero")


def test_a_device_fault_under_tcg_is_status_70_and_stops_at_the_faulting_access(tmp_path):
    image = tmp_path / "g.bin"
    image.write_bytes(bytes.fromhex("ba8000 b042 ee b043 ee f4"))   # two OUTs to port 0x80 in one block, HLT
    spec = parse_spec({**_flat(image, machine="none", memory="4M"), "accel": "tcg", "timeout": TIMEOUT})
    fds = open_fds()
    device = Faulty()
    with Machine(spec, console=Console("none", "none", open_now=False)) as m:
        m.pio.register(0x80, 1, device)
        result = m.run()
    assert (result.status, result.reason, result.message) == (
        70, "device-fault", "device fault on vCPU 0: device faulty (port 0x0080, 1-byte write of 0x42) raised "
                            "ZeroDivisionError: division by zero (a bug in hvm)")
    assert device.writes == [0x42]            # the second OUT never reached the device
    assert vcpu_threads() == [] and m.memory is None and open_fds() <= fds


def test_a_guest_crash_under_tcg_is_a_report_and_leaves_nothing_behind(tmp_path):
    spec = parse_spec({**_flat(FIRMWARE / "triple.bin", "protected", 0x100000), "accel": "tcg", "timeout": TIMEOUT})
    fds = open_fds()
    with Machine(spec, console=Console("none", "none", open_now=False)) as m:
        result = m.run()
        thread = m.threads[0]
    assert (result.status, result.reason) == (4, "crash")
    assert result.crash.reason == INVALID and result.crash.detail == ("hvm could not deliver it as the CPU would: "
                                                                      "vector 0x6 is beyond the IDT limit 0x0 (#GP)")
    assert result.crash.regs["rip"] > 0x100000 and result.crash.sregs["cr0"] & 1
    assert result.crash.last_exits[-1].startswith("IO out port=0x03f")
    thread.join(5)
    assert not thread.is_alive() and vcpu_threads() == [] and open_fds() <= fds


def test_many_tcg_machines_leak_neither_fds_nor_threads():
    fds, threads = open_fds(), threading.active_count()
    for _ in range(5):
        spec = parse_spec({**_flat(FIRMWARE / "hello.bin"), "accel": "tcg", "timeout": TIMEOUT})
        with Machine(spec, console=Console("none", "none", open_now=False)) as m:
            assert m.run().status == 0 and m.console.text() == "Hello from real mode!\n"
    time.sleep(0.1)
    assert open_fds() <= fds and threading.active_count() <= threads and vcpu_threads() == []


# --- QMP under tcg ------------------------------------------------------------------------------------------
def test_qmp_stop_cont_and_the_refusals_under_tcg(tmp_path):
    """A ticker on tcg driven as QEMU is: stop (no more ticks), cont (ticks again), migrate and system_reset
    answered with an error naming tcg (the VM runs on), quit (status 0)."""
    pytest.importorskip("qemu.qmp")
    from qemu.qmp import ExecuteError
    from test_qmp import Vm, connect, next_event, run, status_once_started

    v = Vm(tmp_path, extra=("--accel", "tcg", "--machine", "pc")).wait_socket()
    try:
        v.wait_ticks(2)

        async def go():
            c = await connect(v.sock)
            assert await status_once_started(c) == "running"
            assert await c.execute("stop") == {}
            stopped = v.ticks()
            await asyncio.sleep(0.3)
            still = v.ticks()
            assert await c.execute("cont") == {}
            assert await c.execute("migrate", {"uri": f"file:{tmp_path / 'vm.snap'}"}) == {}     # (asynchronous)
            statuses = []
            while not statuses or statuses[-1] not in ("completed", "failed"):
                statuses.append((await next_event(c, "MIGRATION"))["data"]["status"])
            migration = await c.execute("query-migrate")
            with pytest.raises(ExecuteError) as e:
                await c.execute("system_reset")
            status = await c.execute("query-status")
            await c.disconnect()
            return stopped, still, (statuses, migration, str(e.value)), status

        stopped, still, (statuses, migration, reset), status = run(go())
        assert still == stopped                      # not one tick while stopped
        v.wait_ticks(2)                              # and on after cont
        assert statuses[-1] == "failed" and migration["status"] == "failed", (statuses, migration)
        assert "the VM runs on accel tcg" in migration.get("error-desc", ""), migration
        assert reset == "system_reset failed: cannot reset a VM on accel tcg: hvm resets KVM vCPUs only"
        assert status == {"running": True, "status": "running"}
        assert not (tmp_path / "vm.snap").exists()
        assert run_hvm("ctl", str(v.sock), "quit").status == 0
        assert v.wait() == 0
        assert "Traceback" not in v.stderr()
    finally:
        v.kill()


# --- a #UD handler that raises #UD again ---------------------------------------------------------------------
def gate_image(tmp: Path, vector: int, code: bytes, handler: bytes) -> Path:
    """Long mode at 0x100000: LIDT, then `code` (at 0x100008); the gate of `vector` (selector 0x10, the
    loader's code segment) points at `handler` (at 0x100020), every other gate is empty."""
    base, at, idtr, idt = 0x100000, 0x20, 0x40, 0x50
    image = bytearray(idt + 16 * (vector + 1))
    image[:8] = bytes.fromhex("0f011c25") + (base + idtr).to_bytes(4, "little")   # lidt [abs]
    image[8:8 + len(code)] = code
    image[at:at + len(handler)] = handler
    image[idtr:idtr + 10] = (16 * (vector + 1) - 1).to_bytes(2, "little") + (base + idt).to_bytes(8, "little")
    target = base + at
    gate = (target & 0xFFFF) | 0x10 << 16 | 0x8E << 40 | (target >> 16 & 0xFFFF) << 48
    image[idt + 16 * vector:] = gate.to_bytes(8, "little") + (target >> 32).to_bytes(8, "little")
    path = tmp / f"gate{vector}.bin"
    path.write_bytes(bytes(image))
    return path


def ud_loop_image(tmp: Path, reset_rsp: bool) -> Path:
    """UD2, whose #UD handler is UD2 again (after resetting RSP: then it never runs out of stack)."""
    return gate_image(tmp, 6, bytes.fromhex("0f0b"),
                      (bytes.fromhex("48c7c400700000") if reset_rsp else b"") + bytes.fromhex("0f0b"))


def test_a_ud_handler_that_raises_ud_again_is_delivered_each_time_not_a_halt(tmp_path):
    """Unicorn returns without an error at an invalid instruction it met before: that was taken for a HLT (the
    VM ended "halted", status 0, after two deliveries). Each #UD is delivered: the frames use up the stack
    until one cannot be pushed, a crash report naming it."""
    spec = parse_spec({**_flat(ud_loop_image(tmp_path, False), "long", 0x100000, machine="none"), "accel": "tcg",
                       "timeout": TIMEOUT})
    with Machine(spec, console=Console("none", "none", open_now=False)) as m:
        result = m.run()
        delivered = m.threads[0].completed["#UD delivered"]
    assert (result.status, result.reason, result.crash.reason) == (4, "crash", INVALID)
    assert result.crash.detail.startswith("hvm could not deliver it as the CPU would: page of ")
    assert delivered > 100 and result.crash.regs["rip"] == 0x100020


def test_the_watchdog_pause_and_stop_end_a_guest_looping_on_ud_deliveries(tmp_path):
    image = ud_loop_image(tmp_path, True)
    run = run_hvm("run", _yaml(tmp_path, "udloop", _flat(image, "long", 0x100000, machine="none")), "--accel", "tcg",
                  "--timeout", "1")
    assert (run.status, run.stderr) == (124, "hvm: timeout: the guest was still running after 1 s\n")
    spec = parse_spec({**_flat(image, "long", 0x100000, machine="none"), "accel": "tcg", "timeout": TIMEOUT})
    with Machine(spec, console=Console("none", "none", open_now=False)) as m:
        m.start()
        time.sleep(0.2)
        m.pause()
        before = m.threads[0].completed["#UD delivered"]
        time.sleep(0.2)
        assert m.threads[0].completed["#UD delivered"] == before > 10      # paused: no delivery
        m.resume()
        time.sleep(0.2)
        assert m.threads[0].completed["#UD delivered"] > before
        m.stop()
        assert m.wait(5).reason != "halt"
    assert vcpu_threads() == []


def test_int1_is_delivered_through_vector_1_with_the_next_instruction_as_return_address(tmp_path):
    """INT1 (ICEBP, F1): Unicorn stops at it as at an invalid instruction; a CPU raises #DB (vector 1, no DPL
    check) with the address after it pushed, as docs/tcg.md says hvm delivers it. The handler pops that."""
    image = gate_image(tmp_path, 1, bytes.fromhex("f1 0f0b"), bytes.fromhex("58 f4"))    # int1; ud2 | pop rax; hlt
    spec = parse_spec({**_flat(image, "long", 0x100000, machine="none"), "accel": "tcg", "timeout": TIMEOUT})
    with Machine(spec, console=Console("none", "none", open_now=False)) as m:
        result = m.run()
        thread = m.threads[0]
        regs, _ = thread.cpu.registers()
        assert (result.status, result.reason) == (0, "halt"), result.crash
        assert regs["rax"] == 0x100009 and thread.completed == {"INT 0x1 delivered": 1}


@pytest.mark.parametrize("where", ["set_boot_state", "_map_mmio"])
def test_a_tcg_vcpu_that_fails_half_way_through_construction_closes_its_unicorn(monkeypatch, where):
    """A TcgCpu's Unicorn exists before its MMIO regions are mapped and before the boot state is written: if
    either fails, the Machine never holds the thread, so the vCPU itself must close its Unicorn (uc_close now, not
    whenever the hooks' reference cycle is collected, after guest memory is unmapped)."""
    from hvm.vcpu import tcg

    closed, close = [], tcg.TcgCpu.close

    def recording_close(self):
        closed.append(self.uc is not None)
        close(self)

    def failing(self, *args):
        raise RuntimeError("no boot state")

    monkeypatch.setattr(tcg.TcgCpu, "close", recording_close)
    monkeypatch.setattr(tcg.TcgCpu, where, failing)
    spec = parse_spec({**_flat(FIRMWARE / "hello.bin"), "accel": "tcg", "timeout": TIMEOUT})
    with pytest.raises(RuntimeError, match="no boot state"):
        Machine(spec, console=Console("none", "none", open_now=False))
    assert closed == [True]
