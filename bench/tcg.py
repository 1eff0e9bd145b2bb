"""Binary translation vs hardware assist: the same guests under `accel: tcg` (Unicorn, QEMU's TCG as a library)
and `accel: kvm`, with the same devices, in one run side by side. docs/performance.md and docs/paravirt.md
("three techniques") read these rows.

Figure: time per iteration (per loop iteration, per OUT, per console line). Each sample is the difference of
two runs of the same image with a short and a long loop, divided by the difference in iterations, so start-up
(process, Machine build, Unicorn's first translations, the UART's init) cancels and the ratio compares like
with like. The clock is hvm's own: Machine.run()'s start() to the guest's debug-exit write
(RunResult.seconds). Every run's exit counts are checked. Ratio: tcg/kvm time per iteration (< 1: tcg is
faster).

Loop lengths differ per accelerator (KVM's CPL3 is ~10x faster than TCG, its CPL0 ~200x slower on kvm_pvm),
chosen so that the long run lasts ~0.3-0.5 s on this host; the image is the same."""
from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.common import FIRMWARE, ROOT, BenchError, Figure, Row, _fmt, json_result, run_measured
from bench.console import LINE_LEN, METHODS as CONSOLE_METHODS, UART, Method, pvcon_image
from bench.exits import patch_header

RUN_TIMEOUT = 60.0         # seconds, outer bound of one run (the guest's own watchdog is at 45 s)
GUEST_TIMEOUT = 45
ACCELS = ("tcg", "kvm")
PVCONSOLE = next(m for m in CONSOLE_METHODS if m.key == "console.pvconsole")


@dataclass(frozen=True)
class Case:
    key: str
    title: str
    kind: str                  # cpl | pio | console
    counts: dict               # accel -> (short, long) iterations in the full suite
    quick_counts: dict         # the same for --quick: a tenth (long runs of ~30-50 ms, ten times the short ones)
    per: str                   # what one iteration is: "iteration", "OUT", "line"
    dominates: str             # what the figures are made of, for the note
    ring: int = 0              # cpl: 0 or 3
    port: int = 0x80           # pio: the port
    claimed: bool = False      # pio: a device owns the port
    method: Method | None = None   # console: firmware/pvcon's method

    def iterations(self, accel: str, quick: bool) -> tuple[int, int]:
        return (self.quick_counts if quick else self.counts)[accel]


CASES = (
    Case("tcg.cpl0", "Compute loop at CPL0 (`dec %rcx; jnz`, 64-bit, firmware/bench_cpl), tcg vs kvm", "cpl",
         {"kvm": (40_000, 400_000), "tcg": (8_000_000, 80_000_000)},
         {"kvm": (4_000, 40_000), "tcg": (800_000, 8_000_000)}, "iteration",
         "kvm_pvm emulates guest CPL0 code in KVM instruction by instruction; tcg runs one translated block",
         ring=0),
    Case("tcg.cpl3", "Compute loop at CPL3 (the same image, entered by IRETQ with IOPL 3), tcg vs kvm", "cpl",
         {"kvm": (80_000_000, 800_000_000), "tcg": (8_000_000, 80_000_000)},
         {"kvm": (8_000_000, 80_000_000), "tcg": (800_000, 8_000_000)}, "iteration",
         "kvm: the guest's user code runs natively on the CPU; tcg: translated code", ring=3),
    Case("tcg.pio", "Port-I/O loop: real-mode `out %al,(%dx)` to port 0x80, no device (firmware/bench_pio), "
         "tcg vs kvm", "pio",
         {"kvm": (5_000, 50_000), "tcg": (30_000, 300_000)},
         {"kvm": (500, 5_000), "tcg": (3_000, 30_000)}, "OUT",
         "kvm: an exit to user space + hvm's C fast loop + 2 emulated instructions; "
         "tcg: Unicorn's IN/OUT hook, a ctypes callback into Python, PioBus and hvm's exit accounting",
         port=0x80),
    Case("tcg.pio_dev", "Port-I/O loop to a device: `out` to port 0x3ff, COM1's scratch register, tcg vs kvm",
         "pio", {"kvm": (5_000, 50_000), "tcg": (30_000, 300_000)},
         {"kvm": (500, 5_000), "tcg": (3_000, 30_000)}, "OUT",
         "kvm: an exit answered in hvm's C fast loop (SCR is a published latch, hvm/mmio/published.py); "
         "tcg: the ctypes callback -> PioBus -> SerialUart.write in Python",
         port=0x3FF, claimed=True),
    Case("tcg.console_uart", f"Console line through the 16550 UART ({2 * LINE_LEN} port exits per line, "
         "firmware/pvcon), tcg vs kvm", "console",
         {"kvm": (50, 500), "tcg": (300, 3_000)}, {"kvm": (5, 50), "tcg": (30, 300)}, "line",
         "58 port accesses per line, each an exit (kvm) or a Python callback (tcg), plus the guest's "
         "polling loop (emulated CPL0 real-mode code under kvm_pvm)", method=UART),
    Case("tcg.console_pv", "Console line through hvm's paravirtual console (1 port exit per line, "
         "firmware/pvcon), tcg vs kvm", "console",
         {"kvm": (2_000, 20_000), "tcg": (6_000, 60_000)}, {"kvm": (200, 2_000), "tcg": (600, 6_000)}, "line",
         "one OUT per line: the device reads the 29-byte line from guest memory; kvm: one exit through "
         "Python; tcg: one Python callback", method=PVCONSOLE),
)

_BASE_YAML = ("memory: 16M\n"
              f"timeout: {GUEST_TIMEOUT}\n"
              "machine: none\n"
              "devices: {serial: {output: none, input: none}, debug_exit: {port: 0xf4, size: 4}}\n")


def write_config(case: Case, accel: str, iterations: int, workdir: Path) -> Path:
    """The image patched with `iterations` and the VM around it under `accel`."""
    stem = f"{case.key}-{iterations}"
    if case.kind == "console":
        base = pvcon_image(case.method, iterations, workdir)
        path = workdir / f"{stem}-{accel}.yaml"
        path.write_text(base.read_text() + f"accel: {accel}\n")
        return path
    if case.kind == "cpl":
        image = patch_header(FIRMWARE / "bench_cpl.bin", workdir / f"{stem}.bin", iterations, case.ring, "<I",
                             arg_as_built=0)
        boot = f"boot: {{image: '{image}', load: 0x100000, mode: long}}\n"
    else:
        image = patch_header(FIRMWARE / "bench_pio.bin", workdir / f"{stem}.bin", iterations, case.port, "<H",
                             arg_as_built=0x80)
        boot = f"boot: {{image: '{image}', load: 0x7c00, mode: real}}\n"
    path = workdir / f"{stem}-{accel}.yaml"
    path.write_text(f"name: {case.key.replace('.', '-')}\n{_BASE_YAML}{boot}accel: {accel}\n")
    return path


def expected_io(case: Case, iterations: int) -> int:
    """Port exits a complete run takes (each one is also checked to be an IO exit, no MMIO)."""
    if case.kind == "cpl":
        return 2                                   # CS to port 0x80, the debug-exit write
    if case.kind == "pio":
        return iterations + 1
    m = case.method
    return m.init_exits + iterations * m.exits_per_line + 1


def run_one(case: Case, accel: str, iterations: int, workdir: Path) -> dict:
    """One run in a process of its own (bench/hvm_worker.py); checks its end and every exit count."""
    yaml_path = write_config(case, accel, iterations, workdir)
    argv = [sys.executable, "-m", "bench.hvm_worker", "--yaml", str(yaml_path)]
    who = f"{case.key} {accel} ({iterations})"
    out = json_result(run_measured(argv, RUN_TIMEOUT, cwd=ROOT), who, RUN_TIMEOUT)
    if (out.get("end"), out.get("status")) != ("debug-exit", 1):
        raise BenchError(f"{who}: ended by {out.get('end')!r} with status {out.get('status')}, "
                         "not the debug-exit write of a complete run")
    exits = out["exits"]
    io = expected_io(case, iterations)
    # Under tcg the guest may still execute the HLT that follows its debug-exit OUT before the stop takes
    # effect (Unicorn stops at the end of a translated block): one HLT exit is allowed there, none under kvm.
    hlt_ok = exits["hlt"] == 0 or (accel == "tcg" and exits["hlt"] == 1 and case.kind != "cpl")
    if exits["io"] != io or exits["mmio"] != 0 or not hlt_ok or exits["total"] != io + exits["hlt"]:
        raise BenchError(f"{who}: {exits} exits, expected {io} port I/O")
    unclaimed = {"pio": 0 if case.claimed else iterations, "cpl": 1}.get(case.kind, 0)   # port 0x80: no device
    if out["unclaimed"] != unclaimed:
        raise BenchError(f"{who}: {out['unclaimed']} accesses no device claimed, expected {unclaimed}")
    return out


def unavailable() -> str | None:
    """Why the rows cannot be measured here (None: they can)."""
    from hvm.vcpu.tcg import unavailable as tcg_unavailable

    why = tcg_unavailable()
    if why:
        return why
    try:
        from hvm.kvm import Kvm

        with Kvm():
            pass
    except Exception as e:   # no /dev/kvm (a container, a CI runner): only half of each row
        return f"KVM is not usable here ({e})"
    return None


def bench_tcg(quick: bool, reps: int, workdir: Path, log) -> tuple[list[Row], dict]:
    rows, raw = [], {}
    why = unavailable()
    for case in CASES:
        unit = f"s/{case.per}"
        if why:
            rows.append(Row(case.key, case.title, "kvm", status="skipped", note=why))
            raw[case.key] = {"skipped": why}
            continue
        try:
            figs = {a: Figure(unit) for a in ACCELS}
            runs: dict[str, list] = {a: [] for a in ACCELS}
            for i in range(reps):
                # alternate the order, so that a drift in the host's speed hits both sides alike
                for accel in (ACCELS if i % 2 == 0 else ACCELS[::-1]):
                    short, long_ = case.iterations(accel, quick)
                    a = run_one(case, accel, short, workdir)
                    b = run_one(case, accel, long_, workdir)
                    per = (b["run_result_seconds"] - a["run_result_seconds"]) / (long_ - short)
                    if per <= 0:
                        raise BenchError(f"{case.key} {accel}: the long run ({b['run_result_seconds']:.4f} s) was "
                                         f"not slower than the short one ({a['run_result_seconds']:.4f} s)")
                    figs[accel].samples.append(per)
                    runs[accel].append({"short": short, "long": long_, "short_seconds": a["run_result_seconds"],
                                        "long_seconds": b["run_result_seconds"], "per_iteration": per,
                                        "exits_long": b["exits"]})
            tcg, kvm = figs["tcg"], figs["kvm"]
            paired = statistics.median(t / k for t, k in zip(tcg.samples, kvm.samples))
            ratio = tcg.median / kvm.median
            faster = f"tcg {1 / ratio:.1f}x faster" if ratio < 1 else f"kvm {ratio:.1f}x faster"
            log(f"  {case.key}: tcg {_fmt(tcg.median, unit)}, kvm {_fmt(kvm.median, unit)}, "
                f"tcg/kvm {ratio:.3g} ({faster})")
            rows.append(Row(case.key, case.title, "kvm (the same guest, hardware assist)", tcg, kvm,
                            f"tcg/kvm time per {case.per} (< 1: tcg faster)",
                            f"{faster}; median of paired reps {paired:.3g}; time per {case.per} from two loop "
                            f"lengths differenced (start-up excluded); {case.dominates}"))
            raw[case.key] = {"reps": reps, "unit": unit, "ratio_tcg_over_kvm": ratio, "paired_ratio_median": paired,
                             "tcg": tcg.to_json(), "kvm": kvm.to_json(), "runs": runs}
        except BenchError as e:
            log(f"  {case.key}: {e}")
            rows.append(Row(case.key, case.title, "kvm", status="error", note=str(e)))
            raw[case.key] = {"error": str(e)}
    return rows, raw


# --- Unicorn alone: the floor under hvm's tcg figures (docs/performance.md) ----------------------------
FLOOR_LOOP = bytes.fromhex("48ffc975fbf4")        # 1: dec %rcx; jnz 1b; hlt
FLOOR_OUT = bytes.fromhex("e68048ffc975f9f4")     # 1: out %al,$0x80; dec %rcx; jnz 1b; hlt


def _unicorn_run(code: bytes, n: int, hook) -> float:
    """Seconds for Unicorn alone (64-bit, one page, no hvm) to run `code` with RCX = n, driven as hvm's
    TcgCpu drives it: 50 ms slices, no end address."""
    import time

    from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, UC_QUERY_TIMEOUT, Uc
    from unicorn import x86_const as x

    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0x1000, 0x1000)
    uc.mem_write(0x1000, code)
    if hook is not None:
        uc.hook_add(UC_HOOK_INSN, hook, None, 1, 0, x.UC_X86_INS_OUT)
    uc.reg_write(x.UC_X86_REG_RCX, n)
    uc.reg_write(x.UC_X86_REG_RIP, 0x1000)
    t0 = time.perf_counter()
    while True:
        uc.emu_start(uc.reg_read(x.UC_X86_REG_RIP), 0xFFFF_FFFF_FFFF_FFFF, timeout=50_000)
        if not uc.query(UC_QUERY_TIMEOUT):       # HLT ended it
            return time.perf_counter() - t0


def unicorn_floor(reps: int = 3) -> dict:
    """Unicorn's own cost, without hvm: ns per `dec; jnz` iteration, and ns per OUT with a Python hook that
    does nothing (the ctypes callback alone), each from two loop lengths differenced."""
    def noop(_uc, _port, _size, _value, _data) -> None:
        pass

    loop, out = [], []
    for _ in range(reps):
        loop.append((_unicorn_run(FLOOR_LOOP, 80_000_000, None) - _unicorn_run(FLOOR_LOOP, 8_000_000, None))
                    / 72_000_000)
        out.append((_unicorn_run(FLOOR_OUT, 300_000, noop) - _unicorn_run(FLOOR_OUT, 30_000, noop)) / 270_000)
    return {"loop_ns": [v * 1e9 for v in loop], "out_noop_hook_ns": [v * 1e9 for v in out]}


if __name__ == "__main__":
    import json

    print(json.dumps(unicorn_floor()))
