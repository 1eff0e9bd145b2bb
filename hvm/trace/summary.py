"""`hvm trace summary`: stream a JSON-lines trace once, in bounded memory, into counts, shares and
handling-time statistics by reason, port, MMIO region and device, plus exits per second over time.
Percentiles come from log-spaced histograms (about 3% wide buckets): memory does not grow with the
number of exits, only with the number of distinct keys (bounded by the input's size), and the exit rate
over time is kept in at most TIME_BINS bins however long the span (two records 1e17 s apart included)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from hvm.trace.record import BadRecord, Skipped, parse_line, read_lines

BUCKETS_PER_OCTAVE = 24
MMIO_REGION = 0x1000  # MMIO addresses are grouped by 4 KiB page unless a device claims them
TIME_BINS = 120       # at most this many rows of "exits per ..." over time: 1 s each, or wider for long spans
SECOND = 1_000_000_000


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
    # exits per time bin: bin i covers [i * bin_ns, (i + 1) * bin_ns); bin_ns starts at 1 s and doubles
    # whenever the bins in use would span more than TIME_BINS, so the table stays bounded.
    bin_ns: int = SECOND
    per_bin: dict[int, int] = field(default_factory=dict)
    bad_lines: int = 0

    def add(self, d: dict) -> None:
        t, ns = d["t"], d.get("handle_ns", 0)
        self.total += 1
        if self.first_ns is None or t < self.first_ns:
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
        self._count_time(t)

    def _count_time(self, t: int) -> None:
        b = t // self.bin_ns
        bins = self.per_bin
        if b not in bins and bins:
            lo, hi = min(b, min(bins)), max(b, max(bins))
            while hi - lo >= TIME_BINS:   # coarsen: merge pairs of bins until the span fits
                self.bin_ns *= 2
                merged: dict[int, int] = {}
                for k, n in bins.items():
                    merged[k // 2] = merged.get(k // 2, 0) + n
                bins = self.per_bin = merged
                lo, hi = lo // 2, hi // 2
            b = t // self.bin_ns
        bins[b] = bins.get(b, 0) + 1

    @property
    def per_second(self) -> dict[int, int]:
        """Exits per second since t = 0 (only while the span is within TIME_BINS seconds, else {})."""
        return dict(self.per_bin) if self.bin_ns == SECOND else {}


def iter_lines(path: Path) -> Iterator[bytes | None]:
    """A trace file's lines, in bounded memory (see record.read_lines)."""
    return read_lines(path)


def summarize(lines: Iterable[str | bytes | None], skipped: Skipped | None = None) -> Summary:
    """Lines of a trace (any iterable, e.g. an open file) -> Summary, in one streaming pass. Lines that
    are not records (e.g. the last one of a killed run, cut short) are counted in bad_lines and, when
    given, `skipped`."""
    s = Summary()
    for lineno, line in enumerate(lines, 1):
        if line is not None and not line.strip():
            continue
        try:
            d = parse_line(line)
        except BadRecord as e:
            s.bad_lines += 1
            if skipped is not None:
                skipped.add(lineno, str(e))
            continue
        s.add(d)
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
    if s.per_bin:
        first = min(s.per_bin)
        if s.bin_ns == SECOND:
            lines += ["", "exits per second:"]
            for b in range(first, max(s.per_bin) + 1):
                lines.append(f"  {b - first:>5} s {s.per_bin.get(b, 0):>10}")
        else:
            width = s.bin_ns / SECOND
            lines += ["", f"exits per {width:g} s:"]
            for b in range(first, max(s.per_bin) + 1):
                lines.append(f"  {(b - first) * width:>12g} s {s.per_bin.get(b, 0):>10}")
    return "\n".join(lines)
