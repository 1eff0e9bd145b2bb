"""`hvm trace perfetto`: Chrome trace-event JSON (the format Perfetto and chrome://tracing open):
one track (thread) per vCPU, one complete ("X") slice per exit lasting its handling time in hvm.
Written as a stream: the input is never loaded whole."""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Iterable, TextIO

from hvm.files import open_output
from hvm.trace.record import NoRecords, Skipped, iter_records, read_lines

PID = 1


def _name(d: dict) -> str:
    if "port" in d:
        return f"{d['reason']} {d['dir']} {d['port']:#x}"
    if "addr" in d:
        return f"{d['reason']} {d['dir']} {d['addr']:#x}"
    return d["reason"]


def convert(records: Iterable[dict], out: TextIO) -> int:
    """Write the trace-event JSON for validated `records` (record.iter_records) to `out`; returns the
    number of exit slices."""
    out.write('{"displayTimeUnit":"ns","traceEvents":[\n')
    out.write(json.dumps({"name": "process_name", "ph": "M", "pid": PID, "tid": 0, "args": {"name": "hvm guest"}}))
    vcpus: set[int] = set()
    n = 0
    for d in records:
        v = d["vcpu"]
        if v not in vcpus:
            vcpus.add(v)
            out.write(",\n" + json.dumps({"name": "thread_name", "ph": "M", "pid": PID, "tid": v,
                                         "args": {"name": f"vCPU {v}"}}))
        args = {k: d[k] for k in ("port", "addr", "size", "count", "data", "device", "rip", "suberror") if k in d}
        ev = {"name": _name(d), "cat": d["reason"], "ph": "X", "ts": d["t"] / 1000,
              "dur": max(d.get("handle_ns", 0), 1) / 1000, "pid": PID, "tid": v, "args": args}
        out.write(",\n" + json.dumps(ev, separators=(",", ":")))
        n += 1
    out.write("\n]}\n")
    return n


def write_perfetto(src: Path, dest: Path, skipped: Skipped) -> int:
    """Convert the trace file `src` into `dest`. `dest` is opened (without following a symlink, see
    hvm/files.py) only once `src` has shown a record, so a file that is not a trace leaves it untouched."""
    records = iter_records(read_lines(src), skipped)
    first = next(records, None)
    if first is None:
        raise NoRecords(src, skipped)
    fd = open_output(dest, "perfetto output")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        return convert(itertools.chain((first,), records), out)
