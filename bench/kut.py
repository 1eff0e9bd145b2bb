"""kvm-unit-tests' vmexit.flat: guest-measured TSC cycles per exit under hvm and under QEMU.

All four tests run in one boot of each VMM (vmexit.flat runs every test named on its command line,
each timing itself with rdtsc), so one repetition is two boots."""
from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import KUT_DIR, QEMU, BenchError, Figure, Row, have_qemu, hvm_command, run_measured

TESTS = ("cpuid", "inl_from_pmtimer", "mov_from_cr8", "inl_from_qemu")
TITLES = {
    "cpuid": "vmexit.flat `cpuid`: CPUID exit, handled in the kernel",
    "inl_from_pmtimer": "vmexit.flat `inl_from_pmtimer`: port read of the ACPI PM timer (hvm: answered in the C "
                        "fast loop from the clock counter the device publishes, hvm/mmio/published.py; "
                        "QEMU: its device model)",
    "mov_from_cr8": "vmexit.flat `mov_from_cr8`: CR8 read (TPR), handled in the kernel",
    "inl_from_qemu": "vmexit.flat `inl_from_qemu`: port read of 0x1234, claimed by no device (exits to the VMM)",
}
REF_NAME = "QEMU pc (SeaBIOS), -accel kvm"
RUN_TIMEOUT = 90.0
GUEST_TIMEOUT = 60
LINE = re.compile(r"^(\w+) (\d+)\s*$", re.MULTILINE)


def commands(kut: Path) -> dict[str, list[str]]:
    flat = str(kut / "vmexit.flat")
    args = " ".join(TESTS)
    return {
        "hvm": hvm_command() + ["run", "--kernel", flat, "--append", args, "--device", "pc-testdev",
                                "--serial", "stdio", "--timeout", str(GUEST_TIMEOUT)],
        "qemu": [QEMU, "-nodefaults", "-accel", "kvm", "-device", "pc-testdev", "-device",
                 "isa-debug-exit,iobase=0xf4,iosize=0x4", "-display", "none", "-serial", "stdio",
                 "-kernel", flat, "-append", args],
    }


def run_once(name: str, argv: list[str]) -> dict:
    res = run_measured(argv, RUN_TIMEOUT)
    cycles = {m[1]: int(m[2]) for m in LINE.finditer(res.stdout) if m[1] in TESTS}
    if res.timed_out or res.status != 1 or set(cycles) != set(TESTS):
        raise BenchError(f"{name}: status {res.status}{' (timeout)' if res.timed_out else ''}, "
                         f"got {sorted(cycles)}; output tail: {res.stdout.strip()[-200:]!r}")
    return {"cycles": cycles, "seconds": res.seconds}


def bench_kut(reps: int, parallel: bool, log, kut: Path = KUT_DIR) -> tuple[list[Row], dict]:
    def rows_error(why: str, status: str = "error") -> tuple[list[Row], dict]:
        return [Row(f"kut.{t}", TITLES[t], REF_NAME, status=status, note=why) for t in TESTS], {"error": why}

    if not (kut / "vmexit.flat").is_file():
        return rows_error(f"{kut / 'vmexit.flat'} not found", "skipped")
    if not have_qemu():
        return rows_error(f"{QEMU} not found", "skipped")
    cmds = commands(kut)
    runs = {"hvm": [], "qemu": []}
    try:
        for _ in range(reps):
            if parallel:   # quick mode: both boots at once (the host has 2 CPUs); figures are rough
                with ThreadPoolExecutor(2) as pool:
                    futures = {n: pool.submit(run_once, n, argv) for n, argv in cmds.items()}
                    for n, fut in futures.items():
                        runs[n].append(fut.result())
            else:
                for n, argv in cmds.items():
                    runs[n].append(run_once(n, argv))
    except (BenchError, subprocess.SubprocessError) as e:
        log(f"  kvm-unit-tests: {e}")
        return rows_error(str(e))
    rows = []
    for t in TESTS:
        h = Figure("cycles", [r["cycles"][t] for r in runs["hvm"]])
        q = Figure("cycles", [r["cycles"][t] for r in runs["qemu"]])
        log(f"  kut {t}: hvm {h.median:,.0f} cycles, QEMU {q.median:,.0f} cycles")
        note = "both boots ran at once (quick mode)" if parallel else ""
        rows.append(Row(f"kut.{t}", TITLES[t], REF_NAME, h, q, "hvm/QEMU cycles per exit", note))
    return rows, {"commands": cmds, "runs": runs, "parallel": parallel}
