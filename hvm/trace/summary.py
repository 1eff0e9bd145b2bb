"""`hvm trace summary`: stream a JSON-lines trace once, in bounded memory, into counts, shares and
handling-time statistics by reason, port, MMIO region and device, plus exits per second over time.
Percentiles come from log-spaced histograms (about 3% wide buckets): memory does not grow with the
number of exits, only with the number of distinct keys and seconds."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

BUCKETS_PER_OCTAVE = 24
MMIO_REGION = 0x1000  # MMIO addresses are grouped by 4 KiB page unless a device claims them


@dataclass
class Stat:
    count: int = 0
    min: int = 0
    max: int = 0
    total: int = 0
    hist: dict[int, int] = field(default_factory=dict)

    def add(self, ns: int) -> None:
        if self.count == 0 or ns < self.min:
            self.min = ns
        if ns > self.max:
            self.max = ns
        self.count += 1
        self.total += ns
        b = int(math.log2(ns + 1) * BUCKETS_PER_OCTAVE)
        self.hist[b] = self.hist.get(b, 0) + 1

    def percentile(self, p: float) -> float:
        if not self.count:
            return 0.0
        target = p / 100 * self.count
        seen = 0
        for b in sorted(self.hist):
            seen += self.hist[b]
            if seen >= target:
                # bucket midpoint, clamped to the exact extremes
                lo, hi = 2 ** (b / BUCKETS_PER_OCTAVE) - 1, 2 ** ((b + 1) / BUCKETS_PER_OCTAVE) - 1
                return min(max((lo + hi) / 2, self.min), self.max)
        return float(self.max)


@dataclass
class Summary:
    total: int = 0
    first_ns: int | None = None
    last_ns: int = 0
    by_reason: dict[str, Stat] = field(default_factory=dict)
    by_port: dict[int, Stat] = field(default_factory=dict)
    by_mmio: dict[int, Stat] = field(default_factory=dict)
    by_device: dict[str, Stat] = field(default_factory=dict)
    per_second: dict[int, int] = field(default_factory=dict)
    bad_lines: int = 0

    def add(self, d: dict) -> None:
        t, ns = d["t"], d.get("handle_ns", 0)
        self.total += 1
        if self.first_ns is None:
            self.first_ns = t
        self.last_ns = max(self.last_ns, t)
        self.by_reason.setdefault(d["reason"], Stat()).add(ns)
        if "port" in d:
            self.by_port.setdefault(d["port"], Stat()).add(ns)
        if "addr" in d:
            key = d["addr"] & ~(MMIO_REGION - 1)
            self.by_mmio.setdefault(key, Stat()).add(ns)
        dev = d.get("device")
        if dev:
            self.by_device.setdefault(dev, Stat()).add(ns)
        sec = t // 1_000_000_000
        self.per_second[sec] = self.per_second.get(sec, 0) + 1


def iter_lines(path: Path) -> Iterator[str]:
    with open(path) as f:
        yield from f


def summarize(lines: Iterable[str]) -> Summary:
    """Lines of a trace (any iterable, e.g. an open file) -> Summary, in one streaming pass."""
    s = Summary()
    for line in lines:
        if not line.strip():
            continue
        try:
            s.add(json.loads(line))
        except (ValueError, KeyError):
            s.bad_lines += 1  # e.g. a line cut short by a killed process: count it, keep going
    return s


def _table(title: str, rows: dict, total: int, key_fmt) -> list[str]:
    out = [f"{title:<18} {'exits':>10} {'share':>7} {'min ns':>9} {'median':>9} {'p99':>9} {'max ns':>10}"]
    for key, st in sorted(rows.items(), key=lambda kv: -kv[1].count):
        out.append(f"{key_fmt(key):<18} {st.count:>10} {100 * st.count / max(total, 1):>6.1f}% {st.min:>9} "
                   f"{st.percentile(50):>9.0f} {st.percentile(99):>9.0f} {st.max:>10}")
    return out


def format_summary(s: Summary) -> str:
    span = (s.last_ns - (s.first_ns or 0)) / 1e9
    lines = [f"{s.total} exits over {span:.3f} s" + (f" ({s.total / span:,.0f} exits/s)" if span > 0 else "")]
    if s.bad_lines:
        lines.append(f"({s.bad_lines} unreadable lines skipped)")
    lines.append("")
    lines += _table("by reason", s.by_reason, s.total, str)
    if s.by_port:
        lines += [""] + _table("by port", s.by_port, s.total, lambda p: f"{p:#06x}")
    if s.by_mmio:
        lines += [""] + _table("by MMIO region", s.by_mmio, s.total, lambda a: f"{a:#x}")
    if s.by_device:
        lines += [""] + _table("by device", s.by_device, s.total, str)
    if s.per_second:
        lines += ["", "exits per second:"]
        first = min(s.per_second)
        for sec in range(first, max(s.per_second) + 1):
            n = s.per_second.get(sec, 0)
            lines.append(f"  {sec - first:>5} s {n:>10}")
    return "\n".join(lines)
