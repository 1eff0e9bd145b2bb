"""`hvm compare`: one guest under both accelerators (KVM's hardware assist, then tcg's binary translation),
one after the other, and what differs between the two runs, side by side.

Each run gets its console captured (not the terminal) and its exits traced to a file (a temporary one,
or PREFIX.kvm.jsonl / PREFIX.tcg.jsonl with --trace PREFIX: the normal hvm trace format, so `hvm trace`
reads them). The traces are read back with hvm's own trace reader and folded into bounded summaries:
exits by reason and by port/address, and the exit sequence as *elements*. Under KVM a string I/O
instruction (rep ins/outs) is one exit with count > 1 carrying every element; under tcg Unicorn calls
the I/O hook once per element, so it is count exits of one element each. Comparing elements
(reason, port/address, direction, size, data) makes the two sequences comparable; the table counts
both exits and elements and says which accelerator splits string I/O.

Instructions per second: KVM gives hvm no instruction count (that would take a hardware performance
counter in guest mode; this host has no hardware PMU at all: /sys/bus/event_source/devices has no cpu). Unicorn
can count with a per-instruction hook, which costs ~0.6 µs an instruction, so it never runs in a timed run:
a third, untimed tcg run counts (up to MAX_COUNTED instructions) and the timed runs' times divide that count.
The KVM rate uses the tcg count only when both runs produced the same exit sequence and output (the same
program path); otherwise it is "n/a" with the reason.

Exit status: 0 when serial output and exit status are identical, 1 when they differ (as diff), 2 on bad
input (flags, config) or when a machine cannot be built.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvm.boot import BootError
from hvm.config import ConfigError, VmSpec
from hvm.files import HostFileError
from hvm.kvm import KvmError
from hvm.machine import EXIT_CONFIG, EXIT_HOST, Machine
from hvm.mmio import BusError

log = logging.getLogger("hvm.compare")

ACCELS = ("kvm", "tcg")
# A compared guest with no timeout of its own gets this one (each run): compare must end.
DEFAULT_TIMEOUT = 60.0
# Exit-sequence elements kept per run for locating the first difference; beyond it the sequences are still
# compared whole through a running hash (equal or not), but the place of a difference is not known.
MAX_KEPT = 100_000
# Distinct (port|address, direction) pairs counted per run; the rest are summed in one "other" bucket
# (a guest touching every MMIO page must not grow hvm's memory without bound).
MAX_PLACES = 4096
# Port/address rows in the table (the busiest; the JSON has up to MAX_PLACES).
TABLE_PLACES = 24
# The instruction-counting tcg run stops after this many instructions (~0.6 µs each with the hook).
MAX_COUNTED = 2_000_000
CONTEXT = 3              # exit-sequence records shown before and after the first difference
NL = b"\n"
SHOW = 60                # characters of a differing serial line shown around the difference


class CompareError(Exception):
    """Bad input or a machine that cannot be built: one line (str), and the exit status to give."""

    def __init__(self, message: str, status: int = EXIT_CONFIG):
        super().__init__(message)
        self.status = status


# --- exit sequences, flattened into elements -------------------------------------------------------------

@dataclass(frozen=True, slots=True)     # slots: up to MAX_KEPT of them per run
class Element:
    """One element of the exit sequence: a whole exit, or one element of a string I/O exit."""
    record: int              # the exit's index in its trace (0-based)
    part: int                # the element's index within a string I/O exit (0 otherwise)
    count: int               # that exit's element count (1 for all but string I/O under KVM)
    reason: str
    where: int | None        # port or guest-physical address
    direction: str | None
    size: int
    data: bytes

    @property
    def key(self) -> tuple:
        return (self.reason, self.where, self.direction, self.size, self.data)

    def describe(self) -> str:
        if self.reason == "IO":
            text = f"IO {self.direction} {self.where:#06x} {self.size}B {self.data.hex() or '-'}"
            if self.size == 1 and len(self.data) == 1 and 32 <= self.data[0] < 127:
                text += f" {chr(self.data[0])!r}"
        elif self.reason == "MMIO":
            text = f"MMIO {self.direction} {self.where:#x} {self.size}B {self.data.hex() or '-'}"
        else:
            text = self.reason
        if self.count > 1:
            text += f" [rep {self.part + 1}/{self.count}]"
        return text


@dataclass
class ExitSummary:
    """A run's exits, folded as they are read (bounded memory whatever the guest did)."""
    records: int = 0
    elements: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    string_exits: int = 0
    string_elements: int = 0
    # ("port"|"mmio", where, direction) -> [elements, exits]
    places: dict[tuple[str, int, str], list[int]] = field(default_factory=dict)
    other_places: list[int] = field(default_factory=lambda: [0, 0])
    kept: list[Element] = field(default_factory=list)
    skipped: int = 0
    _hash: Any = field(default_factory=lambda: hashlib.blake2b(digest_size=16), repr=False)

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()

    def add(self, d: dict) -> None:
        """One validated trace record (hvm.trace.record.validate)."""
        index = self.records
        self.records += 1
        reason = d["reason"]
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        where = d.get("port", d.get("addr"))
        direction = d.get("dir")
        size = d.get("size", 0)
        data = bytes.fromhex(d.get("data", ""))
        count = d.get("count", 1) if reason == "IO" else 1
        if reason == "IO" and count > 1 and size and len(data) == count * size:
            parts = [data[i * size:(i + 1) * size] for i in range(count)]
            self.string_exits += 1
            self.string_elements += count
        else:
            parts, count = [data], 1
        if where is not None:
            place = ("port" if reason == "IO" else "mmio", where, direction or "")
            slot = self.places.get(place)
            if slot is None:
                if len(self.places) < MAX_PLACES:
                    slot = self.places[place] = [0, 0]
                else:
                    slot = self.other_places
            slot[0] += len(parts)
            slot[1] += 1
        for part, chunk in enumerate(parts):
            e = Element(index, part, count, reason, where, direction, size, chunk)
            self._hash.update(repr(e.key).encode())
            if len(self.kept) < MAX_KEPT:
                self.kept.append(e)
            self.elements += 1

    @property
    def complete(self) -> bool:
        """Every element is kept (a difference can be located anywhere)."""
        return len(self.kept) == self.elements


def summarize_trace(path: Path) -> ExitSummary:
    """Read a trace file with hvm's trace reader (every line validated; bad lines counted, not fatal)."""
    from hvm.trace.record import Skipped, iter_records, read_lines

    summary = ExitSummary()
    skipped = Skipped()
    for d in iter_records(read_lines(path), skipped):
        summary.add(d)
    summary.skipped = skipped.count
    return summary


@dataclass
class ExitDiff:
    identical: bool
    index: int | None = None            # the first differing element (None: identical, or beyond MAX_KEPT)
    note: str = ""
    context: list[tuple[int, Element | None, Element | None]] = field(default_factory=list)


def diff_exits(a: ExitSummary, b: ExitSummary) -> ExitDiff:
    """The first difference of two exit sequences in (reason, port/address, direction, size, data)."""
    if a.elements == b.elements and a.digest == b.digest:
        return ExitDiff(True, note=f"identical ({a.elements} elements)")
    n = min(len(a.kept), len(b.kept))
    index = next((i for i in range(n) if a.kept[i].key != b.kept[i].key), None)
    if index is None:
        if not (a.complete and b.complete) and n == MAX_KEPT:
            return ExitDiff(False, None, f"the first {MAX_KEPT} elements are equal; the sequences differ "
                                         "beyond them (not located)")
        index = n       # one sequence is a prefix of the other
    lo, hi = max(0, index - CONTEXT), index + CONTEXT + 1
    context = [(i, a.kept[i] if i < len(a.kept) else None, b.kept[i] if i < len(b.kept) else None)
               for i in range(lo, hi) if i < len(a.kept) or i < len(b.kept)]
    ea = a.kept[index] if index < len(a.kept) else None
    eb = b.kept[index] if index < len(b.kept) else None
    what = ("kvm's sequence ends there" if ea is None else "tcg's sequence ends there" if eb is None
            else "elements differ")
    return ExitDiff(False, index, f"first difference at element {index} ({what})", context)


def format_exit_diff(d: ExitDiff) -> list[str]:
    if d.identical or not d.context:
        return [f"exit sequences: {d.note}"]
    lines = [f"exit sequences: {d.note} (element: exit#.element, as (reason, port/address, direction, "
             f"size, data))"]
    lines.append(f"  {'':1} {'element':>8}  {'kvm':<44} tcg")
    for i, ea, eb in d.context:
        mark = ">" if i == d.index else " "
        sa = f"#{ea.record}: {ea.describe()}" if ea is not None else "(end of sequence)"
        sb = f"#{eb.record}: {eb.describe()}" if eb is not None else "(end of sequence)"
        lines.append(f"  {mark} {i:>8}  {_short(sa, 44):<44} {_short(sb, 44)}")
    return lines


# --- serial output ---------------------------------------------------------------------------------------

@dataclass
class SerialDiff:
    offset: int
    line: int           # 1-based line of the first differing byte
    column: int         # 0-based
    kvm: str            # the differing line (shortened around the difference), escaped
    tcg: str


def _show_bytes(b: bytes) -> str:
    return "".join(chr(c) if 32 <= c < 127 and c != 0x5C else f"\\x{c:02x}" if c != 0x5C else "\\\\" for c in b)


def _window(buf: bytes, offset: int) -> str:
    start = buf.rfind(b"\n", 0, offset) + 1
    end = buf.find(b"\n", offset)
    end = len(buf) if end < 0 else end
    lo, hi = max(start, offset - SHOW // 2), min(end, max(offset, start) + SHOW // 2)
    text = _show_bytes(buf[lo:hi])
    if offset >= len(buf):
        text += "<end of output>"
    elif offset == end:
        text += "\\n"
    return ("..." if lo > start else "") + text + ("..." if hi < end else "")


def serial_difference(a: bytes, b: bytes) -> SerialDiff | None:
    if a == b:
        return None
    n = min(len(a), len(b))
    # Up to 16 MiB of console each: compare in chunks (C speed), bytes only inside the first unequal chunk.
    chunk = 4096
    start = next((i for i in range(0, n, chunk) if a[i:i + chunk] != b[i:i + chunk]), n)
    offset = next((i for i in range(start, min(start + chunk, n)) if a[i] != b[i]), min(start + chunk, n))
    line = a.count(b"\n", 0, offset) + 1
    column = offset - (a.rfind(b"\n", 0, offset) + 1)
    return SerialDiff(offset, line, column, _window(a, offset), _window(b, offset))


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


# --- the runs ----------------------------------------------------------------------------------------------

@dataclass
class Side:
    accel: str
    status: int
    reason: str
    message: str
    output: bytes
    run_seconds: float            # start to end of the guest (RunResult.seconds)
    total_seconds: float          # build + run + close
    exits: ExitSummary
    crash: str | None = None
    trace_path: Path | None = None


def _console(spec: VmSpec):
    """Captured: nothing to the terminal. The config's input file is still the guest's input."""
    from hvm.console import Console

    inp = spec.serial.input if spec.serial is not None and spec.serial.input.startswith("file:") else "none"
    return Console("none", inp, open_now=False)


def _build(spec: VmSpec, trace) -> Machine:
    def said(e: Exception) -> str:     # "accel tcg: ...", once (the builder's messages may name it already)
        text = str(e)
        return text if text.startswith(f"accel {spec.accel}") else f"accel {spec.accel}: {text}"

    try:
        return Machine(spec, console=_console(spec), trace=trace)
    except (ConfigError, BootError, BusError, HostFileError) as e:
        raise CompareError(said(e)) from None
    except KvmError as e:
        raise CompareError(said(e), EXIT_HOST) from None
    except OSError as e:
        if e.errno == errno.ENOMEM:
            raise CompareError(f"accel {spec.accel}: this host cannot provide {spec.memory >> 20} MiB of guest "
                               f"RAM ({e.strerror})") from None
        raise CompareError(f"accel {spec.accel}: {e}") from None


def _run(machine: Machine, spec: VmSpec):
    from hvm.machine import RunResult

    try:
        if spec.script:
            from hvm.script import run_script

            result, failure = run_script(machine, spec.script)
            if failure is not None:
                from hvm.script import EXIT_SCRIPT

                return RunResult(EXIT_SCRIPT, "script", str(failure), seconds=result.seconds)
            return result
        return machine.run()
    except KeyboardInterrupt:
        machine.stop(130, "interrupted (Ctrl-C)", cause="host-signal")
        raise


def run_side(spec: VmSpec, trace_path: Path) -> Side:
    from hvm.trace.tracer import TraceConfig

    t0 = time.perf_counter()
    machine = _build(spec, TraceConfig(path=trace_path))
    with machine:
        result = _run(machine, spec)
        output = bytes(machine.console.history)
        if machine.tracer is not None and machine.tracer.write_error is not None:
            raise CompareError(f"accel {spec.accel}: {trace_path}: writing the trace failed "
                               f"({machine.tracer.write_error})")
    total = time.perf_counter() - t0
    crash = result.crash.reason if result.crash is not None else None
    return Side(spec.accel, result.status, result.reason, result.message, output, result.seconds, total,
                summarize_trace(trace_path), crash, trace_path)


def count_instructions(spec: VmSpec) -> tuple[int | None, bytes, int, str]:
    """An untimed tcg run with a per-instruction hook: (instructions or None, output, status, why None)."""
    from unicorn import UC_HOOK_CODE

    machine = _build(spec, None)
    with machine:
        thread = machine.threads[0]
        counted = [0]
        capped = [False]

        def hook(uc, _address, _size, _data) -> None:
            counted[0] += 1
            if counted[0] >= MAX_COUNTED and not capped[0]:
                capped[0] = True
                uc.emu_stop()
                machine.request_stop(0, "instruction count cap reached")

        thread.cpu.uc.hook_add(UC_HOOK_CODE, hook)
        # The timed tcg run logged what this one would (unclaimed accesses): said once is enough.
        quiet = logging.getLogger("hvm")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            result = _run(machine, spec)
        finally:
            quiet.setLevel(level)
        output = bytes(machine.console.history)
    if capped[0]:
        return None, output, result.status, f"over {MAX_COUNTED:,} instructions: not counted"
    return counted[0], output, result.status, ""


@dataclass
class Comparison:
    source: str
    kvm: Side
    tcg: Side
    serial: SerialDiff | None
    exits: ExitDiff
    instructions: int | None
    instructions_note: str
    kvm_rate_note: str

    @property
    def identical(self) -> bool:
        return self.serial is None and self.kvm.status == self.tcg.status

    def rate(self, side: Side) -> float | None:
        if self.instructions is None or side.run_seconds <= 0:
            return None
        if side.accel == "kvm" and self.kvm_rate_note:
            return None
        return self.instructions / side.run_seconds


def compare(spec: VmSpec, trace_prefix: Path | None = None, count: bool = True) -> Comparison:
    """Run `spec` under kvm, then under tcg (never at once), then (count=True) once more under tcg to count
    instructions. The traces go to PREFIX.{kvm,tcg}.jsonl, or to a temporary directory removed after."""
    if spec.vcpus > 1:
        raise CompareError(f"{spec.source}: vcpus: {spec.vcpus} vCPUs: accel tcg runs one vCPU, so this guest "
                           "cannot run both ways")
    if spec.cpu is not None:
        raise CompareError(f"{spec.source}: cpu: applies to accel kvm only (tcg runs Unicorn's qemu64 CPU)")
    if spec.timeout is None:
        spec = spec.replace(timeout=DEFAULT_TIMEOUT)
    with tempfile.TemporaryDirectory(prefix="hvm-compare-") as tmp:
        sides = {}
        for accel in ACCELS:
            path = (Path(f"{trace_prefix}.{accel}.jsonl") if trace_prefix is not None
                    else Path(tmp) / f"{accel}.jsonl")
            sides[accel] = run_side(spec.replace(accel=accel), path)
            if trace_prefix is None:
                sides[accel].trace_path = None
        kvm, tcg = sides["kvm"], sides["tcg"]
        exits = diff_exits(kvm.exits, tcg.exits)
        serial = serial_difference(kvm.output, tcg.output)
        instructions, note = None, "not counted (--no-count)"
        if count:
            if spec.script:
                note = "not counted: a script drives the guest (its timing is the host's)"
            elif tcg.reason in ("timeout", "stopped"):
                note = f"not counted: the tcg run ended by {tcg.reason} (what it ran depends on time)"
            else:
                n, out, status, why = count_instructions(spec.replace(accel="tcg"))
                if n is None:
                    note = why
                elif out != tcg.output or status != tcg.status:
                    note = "the counting run did not repeat the timed tcg run (output or status differ)"
                else:
                    instructions, note = n, ""
        if instructions is None:
            kvm_note = "n/a"
        elif not exits.identical or serial is not None:
            kvm_note = "hvm counts no instructions under KVM, and the runs took different paths"
        else:
            kvm_note = ""
    image = getattr(spec.boot, "kernel", None) or getattr(spec.boot, "image", None)
    source = spec.source if image is None else f"{spec.source} ({image})"
    return Comparison(source, kvm, tcg, serial, exits, instructions, note, kvm_note)


# --- output ------------------------------------------------------------------------------------------------

def _ms(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 10 else f"{s:.2f} s"


def _rate(r: float | None) -> str:
    if r is None:
        return "n/a"
    if r >= 1e6:
        return f"{r / 1e6:.2f} M/s"
    return f"{r / 1e3:.1f} k/s"


def _place_name(place: tuple[str, int, str]) -> str:
    kind, where, direction = place
    return f"port {where:#06x} {direction}" if kind == "port" else f"mmio {where:#x} {direction}"


def _count(slot: list[int] | None) -> str:
    if slot is None:
        return "0"
    elements, exits = slot
    return str(elements) if elements == exits else f"{elements} ({exits} exits)"


def table(c: Comparison) -> list[str]:
    """The side-by-side table: label | kvm | tcg | verdict."""
    rows: list[tuple[str, str, str, str]] = []
    k, t = c.kvm, c.tcg

    def row(label: str, a: str, b: str, verdict: str | None = None) -> None:
        if verdict is None:
            verdict = "same" if a == b else "differ"
        rows.append((label, a, b, verdict))

    def lines_of(out: bytes) -> str:
        return f"{len(out)} bytes, {out.count(NL)} lines"

    row("serial output", lines_of(k.output), lines_of(t.output),
        "identical" if c.serial is None else "DIFFERENT")
    row("exit status", f"{k.status} ({k.reason})", f"{t.status} ({t.reason})",
        "same" if k.status == t.status and k.reason == t.reason else "DIFFERENT")
    if k.crash or t.crash:
        row("crash", k.crash or "-", t.crash or "-")
    row("exits", str(k.exits.records), str(t.exits.records))
    for reason in sorted(set(k.exits.by_reason) | set(t.exits.by_reason)):
        row(f"  {reason}", str(k.exits.by_reason.get(reason, 0)), str(t.exits.by_reason.get(reason, 0)))

    def string_io(s: ExitSummary, default: str) -> str:
        return f"{s.string_exits} exits, {s.string_elements} el." if s.string_exits else default

    row("string I/O (rep ins/outs)", string_io(k.exits, "none"), string_io(t.exits, "1 exit per element"), "")
    places = set(k.exits.places) | set(t.exits.places)
    busiest = sorted(places, key=lambda p: -max(k.exits.places.get(p, [0])[0], t.exits.places.get(p, [0])[0]))
    for place in sorted(busiest[:TABLE_PLACES], key=lambda p: (p[0] != "port", p[1], p[2])):
        a, b = k.exits.places.get(place), t.exits.places.get(place)
        row(f"  {_place_name(place)}", _count(a), _count(b),
            "same" if (a or [0])[0] == (b or [0])[0] else "differ")
    if len(busiest) > TABLE_PLACES:
        row(f"  ({len(busiest) - TABLE_PLACES} more places)", "", "", "see --json")
    if k.exits.other_places[1] or t.exits.other_places[1]:
        row("  other places", _count(k.exits.other_places), _count(t.exits.other_places))
    row("exit sequence", f"{k.exits.elements} elements", f"{t.exits.elements} elements",
        "identical" if c.exits.identical else "DIFFERENT (--diff-exits)")
    row("wall time (run)", _ms(k.run_seconds), _ms(t.run_seconds),
        f"tcg/kvm {t.run_seconds / k.run_seconds:.2f}x" if k.run_seconds > 0 else "")
    row("wall time (all)", _ms(k.total_seconds), _ms(t.total_seconds), "")
    n = c.instructions
    row("instructions", "n/a" if c.kvm_rate_note or n is None else f"{n} (tcg's count)",
        "n/a" if n is None else f"{n} (counted)", "")
    ka, ta = c.rate(k), c.rate(t)
    row("instructions/s", _rate(ka), _rate(ta), f"tcg/kvm {ta / ka:.2f}x" if ka and ta else "")
    w0 = max(len(r[0]) for r in rows) + 2
    w1 = max(max(len(r[1]) for r in rows), 3) + 2
    w2 = max(max(len(r[2]) for r in rows), 3) + 2
    out = [f"hvm compare: {c.source}", f"{'':<{w0}}{'kvm':<{w1}}tcg"]
    out += [f"{label:<{w0}}{a:<{w1}}{b:<{w2}}{verdict}".rstrip() for label, a, b, verdict in rows]
    if c.serial is not None:
        s = c.serial
        out.append(f"serial output differs at byte {s.offset} (line {s.line}, column {s.column}):")
        out.append(f"  kvm: {s.kvm}")
        out.append(f"  tcg: {s.tcg}")
    notes = []
    if n is None:
        notes.append(f"instructions: {c.instructions_note}")
    elif c.kvm_rate_note:
        notes.append(f"kvm instructions: n/a: {c.kvm_rate_note}")
    else:
        notes.append("instructions: counted in a third, untimed tcg run (a per-instruction hook); the kvm "
                     "rate divides that count by kvm's run time (same exits, same output: same path)")
    if k.exits.string_exits:
        notes.append("string I/O: KVM exits once per rep ins/outs (count > 1), tcg once per element; "
                     "places count elements, exits in parentheses where they differ")
    for side in (k, t):
        if side.crash:
            said = "; ".join(x.strip() for x in side.message.splitlines()[:2])   # a crash report: its head
            notes.append(f"{side.accel}: {_short(said, 200)}")
        if side.exits.skipped:
            notes.append(f"{side.accel}: {side.exits.skipped} trace lines were not exit records (skipped)")
        if side.trace_path is not None:
            notes.append(f"{side.accel} trace: {side.trace_path}")
    out += [f"note: {x}" for x in notes]
    also = "; the crashes differ (the crash row)" if k.crash != t.crash else ""
    out.append("result: " + (f"identical (serial output and exit status{also})" if c.identical
                             else "DIFFERENT (" + ", ".join(w for w, bad in (
                                 ("serial output", c.serial is not None),
                                 ("exit status", k.status != t.status)) if bad) + ")"))
    return out


def _element_json(e: Element | None) -> dict | None:
    if e is None:
        return None
    return {"record": e.record, "part": e.part, "count": e.count, "reason": e.reason, "where": e.where,
            "dir": e.direction, "size": e.size, "data": e.data.hex(), "text": e.describe()}


def to_json(c: Comparison) -> dict:
    def side(s: Side) -> dict:
        return {"status": s.status, "reason": s.reason, "message": s.message, "crash": s.crash,
                "output_bytes": len(s.output), "output_lines": s.output.count(b"\n"),
                "run_seconds": s.run_seconds, "total_seconds": s.total_seconds,
                "exits": s.exits.records, "exit_elements": s.exits.elements, "by_reason": s.exits.by_reason,
                "string_io": {"exits": s.exits.string_exits, "elements": s.exits.string_elements},
                "places": [{"kind": p[0], "where": p[1], "dir": p[2], "elements": v[0], "exits": v[1]}
                           for p, v in sorted(s.exits.places.items())],
                "other_places": {"elements": s.exits.other_places[0], "exits": s.exits.other_places[1]},
                "instructions_per_second": c.rate(s),
                "trace": str(s.trace_path) if s.trace_path is not None else None}

    serial = None if c.serial is None else {"offset": c.serial.offset, "line": c.serial.line,
                                            "column": c.serial.column, "kvm": c.serial.kvm, "tcg": c.serial.tcg}
    return {"source": c.source, "identical": c.identical, "serial_identical": c.serial is None,
            "serial_difference": serial, "status_identical": c.kvm.status == c.tcg.status,
            "exits_identical": c.exits.identical,
            "exit_difference": None if c.exits.identical else {
                "index": c.exits.index, "note": c.exits.note,
                "context": [{"index": i, "kvm": _element_json(a), "tcg": _element_json(b)}
                            for i, a, b in c.exits.context]},
            "instructions": c.instructions, "instructions_note": c.instructions_note or c.kvm_rate_note or None,
            "kvm": side(c.kvm), "tcg": side(c.tcg)}


# --- the command -----------------------------------------------------------------------------------------

def cmd_compare(args: argparse.Namespace) -> int:
    """`hvm compare`: the spec from the config and flags as `hvm run` builds it, both runs, the table."""
    from hvm.cli import _Terminated, spec_from_args   # (hvm run's: SIGTERM/SIGHUP during a run)

    if "help" in args.device or "?" in args.device:
        print("hvm: compare: --device help: see `hvm run --device help`", file=sys.stderr)
        return EXIT_CONFIG
    try:
        spec = spec_from_args(args)
    except ConfigError as e:
        print(f"hvm: {e}", file=sys.stderr)
        return EXIT_CONFIG
    # The accelerator limits compare meets, named by the flag when a flag asked for them.
    if args.vcpus is not None and args.vcpus > 1:
        print(f"hvm: compare: --vcpus: {args.vcpus} vCPUs: accel tcg runs one vCPU, so this guest cannot run "
              "both ways", file=sys.stderr)
        return EXIT_CONFIG
    if args.cpu is not None:
        print("hvm: compare: --cpu: applies to accel kvm only (tcg runs Unicorn's qemu64 CPU)", file=sys.stderr)
        return EXIT_CONFIG
    prefix = args.trace
    if prefix is not None and (str(prefix).endswith(os.sep) or not str(prefix).strip()):
        print(f"hvm: compare: --trace: {str(prefix)[:200]!r} is not a file name prefix", file=sys.stderr)
        return EXIT_CONFIG

    def terminate(signo, frame):
        raise _Terminated(signo)

    previous = {s: signal.signal(s, terminate) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        c = compare(spec, prefix, count=not args.no_count)
    except CompareError as e:
        print(f"hvm: compare: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("hvm: compare: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except _Terminated as t:
        print(f"hvm: compare: terminated by signal {t.signo}", file=sys.stderr)
        return 128 + t.signo
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if args.json:
        print(json.dumps(to_json(c), indent=2))
    else:
        print("\n".join(table(c)))
        if args.diff_exits:
            print("\n".join(format_exit_diff(c.exits)))
    return 0 if c.identical else 1
