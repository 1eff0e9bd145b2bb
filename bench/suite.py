"""`python -m bench [--quick]`: run every benchmark, print one markdown table on stdout (progress goes to
stderr), write the raw figures to bench/results/*.json."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import KUT_DIR, QEMU, RESULTS, ROOT, Row, format_table, have_qemu
from bench.console import bench_console
from bench.exits import bench_exits
from bench.kut import bench_kut
from bench.linux import bench_linux
from bench.restore import bench_restore
from bench.startup import bench_memory, bench_startup
from bench.tcg import bench_tcg
from bench.vblk import bench_vblk

GROUPS = ("exits", "console", "tcg", "virtio_blk", "startup", "memory", "kut", "linux", "restore")

# (exit-loop iterations, exit reps, console reps, tcg-vs-kvm reps, warm-up, start-up reps, memory reps,
#  kvm-unit-tests reps, kut in parallel)
FULL = dict(iterations=30000, exit_reps=9, console_reps=5, tcg_reps=5, warmup=True, startup_reps=10, memory_reps=3,
            kut_reps=3, kut_parallel=False)
QUICK = dict(iterations=2000, exit_reps=2, console_reps=1, tcg_reps=1, warmup=False, startup_reps=2, memory_reps=1,
             kut_reps=1, kut_parallel=False)

BUSY_CPUS = 0.3      # CPUs' worth of work by other processes above which the figures are flagged as noisy


def other_load(seconds: float = 0.5) -> float:
    """How many CPUs' worth of work the rest of the host does, sampled from /proc/stat while this
    process idles (a compiler running next to the benchmarks shows up as ~1-2)."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]           # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])
    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return (os.cpu_count() or 1) * (busy1 - busy0) / max(1, total1 - total0)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def host_info() -> dict:
    info = {"kernel": platform.release(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
            # start-up: without cached bytecode every `hvm` start compiles hvm's sources
            "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
            "hvm_pycache": (ROOT / "hvm" / "__pycache__").is_dir()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    try:   # kvm_intel, kvm_amd or (on the development host) kvm_pvm
        info["kvm_modules"] = sorted(m.name for m in Path("/sys/module").iterdir() if m.name.startswith("kvm"))
    except OSError:
        pass
    try:   # which hvm was measured: the commit, and whether hvm/ differs from it
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip()
        info["hvm_modified"] = bool(subprocess.run(["git", "status", "--porcelain", "--", "hvm"], cwd=ROOT,
                                                   capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    if have_qemu():
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=10).stdout
        info["qemu"] = out.splitlines()[0] if out else ""
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny iteration counts: a well-formed table in seconds")
    ap.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}")
    ap.add_argument("--iterations", type=int, help="exit-loop iterations per run")
    ap.add_argument("--reps", type=int, help="repetitions of every exit loop")
    ap.add_argument("--kut", type=Path, default=KUT_DIR, help="kvm-unit-tests directory holding vmexit.flat")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the JSON files go")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before each group, wait up to SECONDS for other processes to leave the CPUs idle")
    args = ap.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    if args.iterations:
        p["iterations"] = args.iterations
    if args.reps:
        p["exit_reps"] = args.reps
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = set(groups) - set(GROUPS)
    if unknown:
        ap.error(f"unknown group(s): {', '.join(sorted(unknown))}")

    started = time.monotonic()
    host = host_info()      # before the run: which hvm and QEMU are measured
    rows: list[Row] = []
    raw: dict[str, object] = {}
    loads: dict[str, float] = {}
    args.results.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hvm-bench-") as tmp:
        work = Path(tmp)
        for group in groups:
            t0 = time.monotonic()
            load = other_load()
            deadline = time.monotonic() + args.wait_quiet
            while load > BUSY_CPUS and time.monotonic() < deadline:
                time.sleep(2)
                load = other_load()
            loads[group] = round(load, 2)
            log(f"bench: {group} ... (other processes use {load:.2f} of {os.cpu_count()} CPUs)")
            if load > BUSY_CPUS:
                log("bench: warning: the host is busy: expect noisy figures")
            if group == "exits":
                r, data = bench_exits(p["iterations"], p["exit_reps"], p["warmup"], work, log)
            elif group == "console":
                r, data = bench_console(args.quick, p["console_reps"], work, log)
            elif group == "tcg":
                r, data = bench_tcg(args.quick, p["tcg_reps"], work, log)
            elif group == "virtio_blk":
                r, data = bench_vblk(args.quick, work, log)
            elif group == "startup":
                r, data = bench_startup(p["startup_reps"], p["warmup"], log)
            elif group == "memory":
                r, data = bench_memory(p["memory_reps"], work, log)
            elif group == "kut":
                r, data = bench_kut(p["kut_reps"], p["kut_parallel"], log, args.kut)
            elif group == "linux":
                r, data = bench_linux(args.quick, log)
            else:
                r, data = bench_restore(args.quick, work, log)
            rows += r
            raw[group] = data
            log(f"bench: {group} took {time.monotonic() - t0:.1f} s")
            (args.results / f"{group}.json").write_text(
                json.dumps({"rows": [x.to_json() for x in r], "data": data}, indent=1, default=str) + "\n")
    table = format_table(rows)
    summary = {"quick": args.quick, "params": p, "groups": groups, "seconds": time.monotonic() - started,
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": host, "other_cpu_load_before": loads,
               "rows": [x.to_json() for x in rows], "table": table}
    (args.results / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (args.results / "table.md").write_text(table + "\n")
    print(table, flush=True)
    log(f"bench: done in {summary['seconds']:.0f} s; raw figures in {args.results}/")
    return 0 if all(r.status in ("ok", "pending", "skipped") for r in rows) else 1
