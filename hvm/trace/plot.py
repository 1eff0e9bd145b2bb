"""`hvm trace plot`: exit rate over time, stacked by reason, and a histogram of handling time."""
from __future__ import annotations

import math
import os
from pathlib import Path

from hvm.files import open_output
from hvm.trace.record import NoRecords, Skipped, iter_records, read_lines


def plot(src: Path, dest: Path, bins: int = 100, skipped: Skipped | None = None) -> None:
    """Write a PNG of `src` to exactly `dest` (no extension is added; opened without following a symlink,
    only after `src` proved to hold records)."""
    skipped = Skipped() if skipped is None else skipped
    # Stream twice: a first pass for the span (fixes the bin width), then per reason, counts per time bin.
    first = last = None
    for d in iter_records(read_lines(src), skipped):
        t = d["t"]
        first = t if first is None else min(first, t)
        last = t if last is None else max(last, t)
    if first is None or last is None:
        raise NoRecords(src, skipped)
    width = max((last - first) / bins, 1)
    rates: dict[str, list[int]] = {}
    hist_bins = [0] * 64
    for d in iter_records(read_lines(src), Skipped()):   # the lines skipped were counted in the first pass
        if not first <= d["t"] <= last:                      # the file changed since: ignore what is new
            continue
        i = min(int((d["t"] - first) / width), bins - 1)
        rates.setdefault(d["reason"], [0] * bins)[i] += 1
        hist_bins[min(int(math.log2(d.get("handle_ns", 0) + 1) * 2), 63)] += 1
    if not rates:
        raise NoRecords(src, skipped)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8))
    try:
        xs = [(i + 0.5) * width / 1e9 for i in range(bins)]
        seconds_per_bin = width / 1e9
        names = sorted(rates, key=lambda r: -sum(rates[r]))
        ax1.stackplot(xs, *[[c / seconds_per_bin for c in rates[r]] for r in names], labels=names)
        ax1.set_xlabel("time since VM start (s)")
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
