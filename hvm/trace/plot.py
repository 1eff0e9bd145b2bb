"""`hvm trace plot`: exit rate over time, stacked by reason, and a histogram of handling time."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from hvm.files import open_output
from hvm.trace.record import NoRecords, Skipped, iter_records, read_lines


@dataclass
class PlotData:
    first: int                   # ns of the earliest record
    width: float                 # ns per time bin
    rates: dict[str, list[int]]  # reason -> exits per time bin
    hist: list[int]              # exits per half-octave of handling time (bin b: 2**(b/2) ns)


def plot_data(src: Path, bins: int = 100, skipped: Skipped | None = None) -> PlotData:
    """What the plot shows, from two streaming passes over `src` (memory: `bins` counters per reason).
    NoRecords when no line is a record."""
    skipped = Skipped() if skipped is None else skipped
    # A first pass for the span (fixes the bin width), then per reason, counts per time bin.
    first = last = None
    for d in iter_records(read_lines(src), skipped):
        t = d["t"]
        first = t if first is None else min(first, t)
        last = t if last is None else max(last, t)
    if first is None or last is None:
        raise NoRecords(src, skipped)
    width = max((last - first) / bins, 1)
    rates: dict[str, list[int]] = {}
    hist = [0] * 64
    for d in iter_records(read_lines(src), Skipped()):   # the lines skipped were counted in the first pass
        if not first <= d["t"] <= last:                      # the file changed since: ignore what is new
            continue
        i = min(int((d["t"] - first) / width), bins - 1)
        rates.setdefault(d["reason"], [0] * bins)[i] += 1
        hist[min(int(math.log2(d.get("handle_ns", 0) + 1) * 2), 63)] += 1
    if not rates:
        raise NoRecords(src, skipped)
    return PlotData(first, width, rates, hist)


def plot(src: Path, dest: Path, bins: int = 100, skipped: Skipped | None = None) -> None:
    """Write a PNG of `src` to exactly `dest` (no extension is added; opened without following a symlink,
    only after `src` proved to hold records)."""
    data = plot_data(src, bins, skipped)
    width, rates, hist_bins = data.width, data.rates, data.hist

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8))
    try:
        xs = [(i + 0.5) * width / 1e9 for i in range(bins)]
        seconds_per_bin = width / 1e9
        names = sorted(rates, key=lambda r: -sum(rates[r]))
        ax1.stackplot(xs, *[[c / seconds_per_bin for c in rates[r]] for r in names], labels=names)
        ax1.set_xlabel("time since the first exit (s)")
        ax1.set_ylabel("exits per second")
        ax1.set_title(f"VM exits by reason ({src.name})")
        ax1.legend(loc="upper right")
        used = [i for i, n in enumerate(hist_bins) if n]
        lo, hi = used[0], used[-1] + 1
        edges = [2 ** (b / 2) for b in range(lo, hi + 1)]
        ax2.stairs(hist_bins[lo:hi], edges, fill=True)
        ax2.set_xscale("log")
        ax2.set_xlabel("handling time in hvm (ns, log scale)")
        ax2.set_ylabel("exits")
        ax2.set_title("Exit handling time")
        fig.tight_layout()
        fd = open_output(dest, "plot output")
        with os.fdopen(fd, "wb") as out:
            fig.savefig(out, format="png", dpi=100)   # format given: the path is used as it is
    finally:
        plt.close(fig)
