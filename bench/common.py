"""Shared pieces of the benchmark suite: paths, repeated measurements (min and median), bounded
subprocess runs with the child's resource usage, and the one markdown table `make bench` prints."""
from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware" / "build"
CONFIGS = ROOT / "configs"
BENCH_BUILD = ROOT / "bench" / "build"
RESULTS = ROOT / "bench" / "results"
CREF = BENCH_BUILD / "cref"
MBTEST = FIRMWARE / "mbtest.elf"
KUT_DIR = ROOT.parent / "shared" / "kvm-unit-tests"
QEMU = "qemu-system-x86_64"


class BenchError(RuntimeError):
    """A benchmark could not produce a figure (a run failed, timed out or printed nonsense)."""


# --- figures ---------------------------------------------------------------------------------------
@dataclass
class Figure:
    """One quantity measured several times: every sample is kept, min and median are reported."""

    unit: str                       # "exits/s", "s", "MiB", "cycles"
    samples: list[float] = field(default_factory=list)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def cell(self) -> str:
        return f"{_fmt(self.median, self.unit)} (min {_fmt(self.min, self.unit)})"

    def to_json(self) -> dict:
        return {"unit": self.unit, "median": self.median, "min": self.min, "max": max(self.samples),
                "n": len(self.samples), "samples": self.samples}


def _fmt(value: float, unit: str) -> str:
    if unit == "exits/s":
        return f"{value / 1000:.1f}k exits/s"
    if unit == "MiB/s":
        return f"{value:,.1f} MiB/s"
    if unit == "lines/s":
        return f"{value:,.0f} lines/s"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 10 else f"{value:.1f} s"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if unit == "cycles":
        return f"{value / 1000:.1f}k cycles"
    if unit.startswith("s/"):      # time per thing (bench/tcg.py): "s/line" -> "107.3 µs/line"
        per = unit[2:]
        if value < 1e-6:
            return f"{value * 1e9:.2f} ns/{per}"
        if value < 1e-3:
            return f"{value * 1e6:.2f} µs/{per}"
        return f"{value * 1e3:.2f} ms/{per}"
    return f"{value:g} {unit}"


@dataclass
class Row:
    """One line of the table: hvm's figure, the reference's figure and their ratio."""

    key: str                        # stable id, first column (tests look rows up by it)
    title: str
    reference: str                  # what hvm is compared with
    hvm: Figure | None = None
    ref: Figure | None = None
    ratio_of: str = "hvm/ref"       # how the ratio is formed, e.g. "hvm/C exits/s"
    note: str = ""
    status: str = "ok"              # ok | pending | error | skipped

    @property
    def ratio(self) -> float | None:
        if self.status != "ok" or self.hvm is None or self.ref is None or self.ref.median == 0:
            return None
        return self.hvm.median / self.ref.median

    def to_json(self) -> dict:
        return {"key": self.key, "title": self.title, "reference": self.reference, "status": self.status,
                "ratio": self.ratio, "ratio_of": self.ratio_of, "note": self.note,
                "hvm": self.hvm.to_json() if self.hvm else None, "ref": self.ref.to_json() if self.ref else None}


TABLE_HEADER = "| id | benchmark | hvm: median (min) | reference: median (min) | ratio | notes |"
TABLE_RULE = "|---|---|---|---|---|---|"


def format_table(rows: list[Row]) -> str:
    lines = [TABLE_HEADER, TABLE_RULE]
    for r in rows:
        hvm = r.hvm.cell() if r.hvm else "—"
        ref = f"{r.reference}: {r.ref.cell()}" if r.ref else r.reference
        if r.status == "ok":
            # e.g. the reference reached nothing: "—"; a ratio far below 1 (tcg's CPL0 loop) keeps 3 digits
            ratio = "—" if r.ratio is None else f"{r.ratio:.2f}" if r.ratio >= 0.1 else f"{r.ratio:.3g}"
            note = f"{r.ratio_of}; {r.note}" if r.note and r.ratio_of else r.note or r.ratio_of
        else:
            ratio = r.status
            note = r.note
        lines.append(f"| {r.key} | {r.title} | {hvm} | {ref} | {ratio} | {_cell(note)} |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --- running things --------------------------------------------------------------------------------
@dataclass
class ProcResult:
    argv: list[str]
    status: int                     # exit status, or -signal
    seconds: float                  # wall time from just before fork to wait4's return
    maxrss_kib: int                 # the child's peak RSS (ru_maxrss, KiB)
    user: float                     # the child's user and system CPU seconds
    sys: float
    stdout: str
    stderr: str
    timed_out: bool = False


def json_result(res: "ProcResult", who: str, timeout: float) -> dict:
    """The JSON object a worker (bench/hvm_worker.py, bench/cref.c) prints as its last line."""
    if res.timed_out:
        raise BenchError(f"{who}: no end after {timeout:g} s")
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError(f"{who}: status {res.status}, no result; stderr: {res.stderr.strip()[-300:]}") from None


def run_measured(argv: list[str], timeout: float, cwd: Path = ROOT, capture: bool = True,
                 env: dict | None = None) -> ProcResult:
    """Run argv to completion, bounded by `timeout` (then SIGKILL), and return its wall time and the
    resource usage wait4() reports for it. Output goes to temporary files, so that a chatty child
    never blocks on a full pipe and reading it costs nothing while the clock runs."""
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        target_out = out if capture else subprocess.DEVNULL
        target_err = err if capture else subprocess.DEVNULL
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=target_out, stderr=target_err,
                                env=env)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        try:
            while True:
                try:
                    _, wstatus, usage = os.wait4(proc.pid, 0)
                    break
                except InterruptedError:
                    continue
        finally:
            timer.cancel()
        t1 = time.perf_counter()
        proc.returncode = os.waitstatus_to_exitcode(wstatus)
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode("utf-8", "replace"))
    return ProcResult(argv, proc.returncode, t1 - t0, usage.ru_maxrss, usage.ru_utime, usage.ru_stime, texts[0],
                      texts[1], killed.is_set())


def hvm_command() -> list[str]:
    """The `hvm` command a user runs: the console script next to this Python, else `python -m hvm`."""
    script = Path(sys.executable).parent / "hvm"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("hvm")
    if found:
        return [found]
    return [sys.executable, "-m", "hvm"]


def have_qemu() -> bool:
    return shutil.which(QEMU) is not None
