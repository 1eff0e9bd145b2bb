"""Exit records: the raw tuple the run loop produces (cheap), the ExitRecord scripts see, and the
JSON-lines encoding (hand-written f-strings: measurably cheaper than json.dumps per record)."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from hvm.files import check_regular_input, open_regular_input
from hvm.kvm import constants as kc

# Raw record, built on the vCPU thread right after the handler returns:
# (t_ns since VM start, vcpu, reason code, port|addr|None, size, direction (1 = out/write), count,
#  data bytes, handle_ns, extra) -- extra is the RIP when captured, else the suberror of an internal error.
T, VCPU, REASON, WHERE, SIZE, DIRECTION, COUNT, DATA, HANDLE, EXTRA = range(10)

REASON_NAMES = {code: name for code, name in kc.EXIT_REASON_NAMES.items()}


@dataclass(frozen=True)
class ExitRecord:
    t_ns: int
    vcpu: int
    reason: str
    handle_ns: int
    port: int | None = None
    addr: int | None = None
    size: int = 0
    direction: str | None = None   # "in"/"out" for I/O, "read"/"write" for MMIO
    count: int = 0
    data: bytes = b""
    device: str | None = None
    rip: int | None = None
    suberror: int | None = None

    @property
    def value(self) -> int:
        """The first element's value, little-endian (what a single in/out/read/write carried)."""
        return int.from_bytes(self.data[:self.size], "little") if self.size else 0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in json.loads(encode_record(self)).items()}


def from_raw(raw: tuple, device: str | None, rip_captured: bool) -> ExitRecord:
    reason = raw[REASON]
    name = REASON_NAMES.get(reason, str(reason))
    extra = raw[EXTRA]
    common = dict(t_ns=raw[T], vcpu=raw[VCPU], reason=name, handle_ns=raw[HANDLE],
                  rip=extra if rip_captured else None,
                  suberror=extra if (not rip_captured and reason == kc.EXIT_INTERNAL_ERROR) else None)
    if reason == kc.EXIT_IO:
        return ExitRecord(port=raw[WHERE], size=raw[SIZE], direction="out" if raw[DIRECTION] else "in",
                          count=raw[COUNT], data=raw[DATA], device=device, **common)
    if reason == kc.EXIT_MMIO:
        return ExitRecord(addr=raw[WHERE], size=raw[SIZE], direction="write" if raw[DIRECTION] else "read",
                          count=1, data=raw[DATA], device=device, **common)
    return ExitRecord(**common)


def encode_raw(raw: tuple, device: str | None, rip_captured: bool) -> str:
    """One JSON line for a raw record, without building an ExitRecord."""
    reason = raw[REASON]
    name = REASON_NAMES.get(reason, str(reason))
    dev = "null" if device is None else f'"{device}"'
    head = f'{{"t":{raw[T]},"vcpu":{raw[VCPU]},"reason":"{name}"'
    tail = f',"handle_ns":{raw[HANDLE]}'
    if rip_captured:
        tail += f',"rip":{raw[EXTRA]}'
    if reason == kc.EXIT_IO:
        d = "out" if raw[DIRECTION] else "in"
        return (f'{head},"port":{raw[WHERE]},"size":{raw[SIZE]},"dir":"{d}","count":{raw[COUNT]},'
                f'"data":"{raw[DATA].hex()}","device":{dev}{tail}}}\n')
    if reason == kc.EXIT_MMIO:
        d = "write" if raw[DIRECTION] else "read"
        return (f'{head},"addr":{raw[WHERE]},"size":{raw[SIZE]},"dir":"{d}","data":"{raw[DATA].hex()}",'
                f'"device":{dev}{tail}}}\n')
    if reason == kc.EXIT_INTERNAL_ERROR and not rip_captured and raw[EXTRA] is not None:
        tail += f',"suberror":{raw[EXTRA]}'
    return f"{head}{tail}}}\n"


def encode_record(r: ExitRecord) -> str:
    d: dict[str, Any] = {"t": r.t_ns, "vcpu": r.vcpu, "reason": r.reason}
    if r.port is not None:
        d.update(port=r.port, size=r.size, dir=r.direction, count=r.count, data=r.data.hex(), device=r.device)
    elif r.addr is not None:
        d.update(addr=r.addr, size=r.size, dir=r.direction, data=r.data.hex(), device=r.device)
    d["handle_ns"] = r.handle_ns
    if r.rip is not None:
        d["rip"] = r.rip
    if r.suberror is not None:
        d["suberror"] = r.suberror
    return json.dumps(d, separators=(",", ":")) + "\n"


# --- reading traces back: every line is untrusted ---------------------------------------------------

# A record is a few hundred bytes; the largest is a string-I/O exit with a page of data (8 KiB of hex).
MAX_LINE = 64 * 1024
MAX_DATA_HEX = 2 * 64 * 1024
_U64 = 1 << 64
_I63 = 1 << 63
_NAME = re.compile(r"[A-Za-z0-9_]{1,32}")
_DEVICE = re.compile(r"[\x21-\x7e]{1,64}")   # printable ASCII, no spaces: what hvm's device names are
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")

# field -> (required, check): checks return None when the value is fine, else what is wrong with it.
# Integers are Python ints only: JSON floats (1.5, 1e400 = inf, NaN) and booleans are not record values.


def _int_in(lo: int, hi: int):
    def check(v: Any) -> str | None:
        if type(v) is not int:
            return f"{type(v).__name__} where an integer belongs"
        if not lo <= v < hi:
            return f"{v} is outside {lo}..{hi - 1}"
        return None
    return check


def _str_re(pattern: re.Pattern, what: str, nullable: bool = False):
    def check(v: Any) -> str | None:
        if v is None and nullable:
            return None
        if type(v) is not str or not pattern.fullmatch(v):
            return f"not {what}"
        return None
    return check


def _one_of(*values: str):
    def check(v: Any) -> str | None:
        return None if v in values and type(v) is str else f"not one of {', '.join(values)}"
    return check


def _hex(v: Any) -> str | None:
    if type(v) is not str or len(v) > MAX_DATA_HEX or not _HEX.fullmatch(v):
        return "not hex bytes"
    return None


FIELDS: dict[str, Callable[[Any], str | None]] = {
    "t": _int_in(0, _I63),
    "vcpu": _int_in(0, 1 << 16),
    "reason": _str_re(_NAME, "an exit reason name"),
    "handle_ns": _int_in(0, _I63),
    "port": _int_in(0, 1 << 16),
    "addr": _int_in(0, _U64),
    "size": _int_in(0, 9),
    "dir": _one_of("in", "out", "read", "write"),
    "count": _int_in(0, 1 << 32),
    "data": _hex,
    "device": _str_re(_DEVICE, "a device name", nullable=True),
    "rip": _int_in(0, _U64),
    "suberror": _int_in(0, 1 << 32),
}
REQUIRED = ("t", "vcpu", "reason")


class BadRecord(ValueError):
    """A line of a trace that is not an exit record; the message says why (one line)."""


# The integer fields' ranges, checked inline in validate() (the hot part of reading a trace).
_INT_RANGES = {k: (lo, hi) for k, (lo, hi) in {
    "t": (0, _I63), "vcpu": (0, 1 << 16), "handle_ns": (0, _I63), "port": (0, 1 << 16), "addr": (0, _U64),
    "size": (0, 9), "count": (0, 1 << 32), "rip": (0, _U64), "suberror": (0, 1 << 32)}.items()}


def validate(d: Any) -> dict:
    """The one place a decoded trace line is checked: a JSON object with the record's fields, each of its
    type and in its range (unknown fields are ignored: newer writers may add some). Returns `d`."""
    if type(d) is not dict:
        raise BadRecord(f"a JSON {type(d).__name__}, not an object")
    if "t" not in d or "vcpu" not in d or "reason" not in d:
        raise BadRecord(f"no {next(k for k in REQUIRED if k not in d)!r} field")
    ranges = _INT_RANGES
    for key, value in d.items():
        r = ranges.get(key)
        if r is not None:
            if type(value) is not int or not r[0] <= value < r[1]:
                raise BadRecord(f"{key!r}: {FIELDS[key](value)}")
            continue
        check = FIELDS.get(key)
        if check is not None:
            problem = check(value)
            if problem is not None:
                raise BadRecord(f"{key!r}: {problem}")
    if "port" in d:
        if "addr" in d:
            raise BadRecord("both 'port' and 'addr'")
        if d.get("dir") not in ("in", "out") or "size" not in d:
            raise BadRecord("an I/O record needs 'size' and 'dir' in/out")
    elif "addr" in d and (d.get("dir") not in ("read", "write") or "size" not in d):
        raise BadRecord("an MMIO record needs 'size' and 'dir' read/write")
    return d


def parse_line(line: str | bytes | None) -> dict:
    """One line of a trace -> a validated record dict, or BadRecord. None stands for a line that was too
    long to read (see read_lines)."""
    if line is None:
        raise BadRecord(f"longer than {MAX_LINE} bytes")
    if len(line) > MAX_LINE:
        raise BadRecord(f"longer than {MAX_LINE} bytes")
    try:
        d = json.loads(line)
    except RecursionError:  # deeply nested arrays: json's C scanner recurses
        raise BadRecord("nested too deeply") from None
    except UnicodeDecodeError:
        raise BadRecord("not UTF-8") from None
    except ValueError as e:  # JSONDecodeError, and ints longer than Python's digit limit
        raise BadRecord(f"not JSON ({str(e).split(':')[0]})") from None
    return validate(d)


def read_lines(path) -> Iterator[bytes | None]:
    """The lines of a trace file as bytes, read in bounded memory: a line longer than MAX_LINE (random
    bytes with no newline) is consumed in pieces and yielded as None. The file must be a regular file
    (a FIFO would hang, /dev/zero would never end): HostFileError otherwise."""
    check_regular_input(path, "trace file")   # the message for a FIFO or a device names what it is
    with os.fdopen(open_regular_input(path, "trace file"), "rb") as f:
        while True:
            line = f.readline(MAX_LINE + 1)
            if not line:
                return
            if len(line) > MAX_LINE and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):   # skip the rest of the overlong line
                    line = f.readline(MAX_LINE)
                yield None
                continue
            yield line


@dataclass
class Skipped:
    """Lines that were not exit records: how many, and the first one's number and problem."""
    count: int = 0
    first_line: int = 0
    first_problem: str = ""

    def add(self, lineno: int, problem: str) -> None:
        if not self.count:
            self.first_line, self.first_problem = lineno, problem
        self.count += 1

    def text(self) -> str:
        lines = "1 line that is not an exit record" if self.count == 1 else \
            f"{self.count} lines that are not exit records"
        return (f"skipped {lines} "
                f"(the first, line {self.first_line}: {self.first_problem})")

    def message(self, src) -> str:
        return f"{src}: {self.text()}"


class NoRecords(ValueError):
    """A file in which no line was an exit record: one line naming it."""

    def __init__(self, src, skipped: Skipped):
        why = f" ({skipped.text()})" if skipped.count else " (it is empty)"
        super().__init__(f"{src}: not a trace: no exit records{why}")


def iter_records(lines: Iterable[str | bytes | None], skipped: Skipped) -> Iterator[dict]:
    """Validated record dicts from trace lines; blank lines are ignored, every other line that is not a
    record is counted in `skipped` (e.g. the last line of a killed run, cut short)."""
    for lineno, line in enumerate(lines, 1):
        if line is not None and not line.strip():
            continue
        try:
            yield parse_line(line)
        except BadRecord as e:
            skipped.add(lineno, str(e))


def iter_dicts(path) -> Iterator[dict]:
    """Stream a trace file's records as dicts, skipping lines that are not records."""
    return iter_records(read_lines(path), Skipped())


def decode_line(line: str) -> ExitRecord:
    d = parse_line(line)
    return ExitRecord(t_ns=d["t"], vcpu=d["vcpu"], reason=d["reason"], handle_ns=d.get("handle_ns", 0),
                      port=d.get("port"), addr=d.get("addr"), size=d.get("size", 0), direction=d.get("dir"),
                      count=d.get("count", 1 if "addr" in d else 0), data=bytes.fromhex(d.get("data", "")),
                      device=d.get("device"), rip=d.get("rip"), suberror=d.get("suberror"))
