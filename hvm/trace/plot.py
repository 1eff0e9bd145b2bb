"""`hvm trace plot`: exit rate over time, stacked by reason, and a histogram of handling time."""
from __future__ import annotations

import math
from pathlib import Path

from hvm.trace.record import iter_dicts


def plot(src: Path, dest: Path, bins: int = 100) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Stream once: per reason, counts per time bin (bin width fixed after a first pass for the span).
    first = last = None
    for d in iter_dicts(src):
        t = d["t"]
        first = t if first is None else min(first, t)
        last = t if last is None else max(last, t)
    if first is None:
        raise ValueError(f"{src}: no exit records")
    width = max((last - first) / bins, 1)
    rates: dict[str, list[int]] = {}
    hist_bins = [0] * 64
    for d in iter_dicts(src):
        i = min(int((d["t"] - first) / width), bins - 1)
        rates.setdefault(d["reason"], [0] * bins)[i] += 1
        hist_bins[min(int(math.log2(d.get("handle_ns", 0) + 1) * 2), 63)] += 1

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8))
    xs = [(first + (i + 0.5) * width - first) / 1e9 for i in range(bins)]
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
    fig.savefig(dest, dpi=100)
    plt.close(fig)
