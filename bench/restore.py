"""Restore to running: a booted Linux guest restored from a snapshot beside its cold boot, in one run.

One worker process (`python -m bench.restore save`) boots the minimal kernel cold through the Python API
(the same kernel, initramfs, command line and memory as bench/linux.py), snapshots it once the console
shows SNAP_LINE (late in the boot, just before init), lets it run on and records when NEXT_LINE appears:
the cold boot's time from process start (fork) to NEXT_LINE, less the time the save itself took.

Then REPS restores, each a new `hvm run --incoming file:SNAP` process, as a user runs it: the time from
fork to the first console byte the restored guest prints (the guest is running: "restore to running");
the first restore also runs on to NEXT_LINE (the same console line as the cold figure). A second
worker (`python -m bench.restore restore`) times the parts inside one process: Machine.restore()
(open and check the file, map memory, create the VM and set every state) and start() to the first byte.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT, Figure, Row

LINUX_BUILD = ROOT / "build" / "linux"
KERNEL = LINUX_BUILD / "vmlinux-minimal"
INITRD = LINUX_BUILD / "initramfs-ud2.cpio"
# bench/linux.py's command line plus clocksource=kvm-clock: see docs/performance.md "Restore to running" (on
# kvm_pvm a restored guest on the TSC clocksource first catches up every tick it missed since the save).
CMDLINE = "console=ttyS0 earlyprintk=serial panic=-1 clocksource=kvm-clock"
MEM = "256M"
SNAP_LINE = b"Freeing unused kernel"
NEXT_LINE = b"Run /init as init process"
REPS = 5
BOOT_WALL = 300.0
RESTORE_WALL = 60.0
TITLE = "Restore to running: a booted Linux guest (vmlinux-minimal, 256 MiB, clocksource=kvm-clock) from its snapshot"
REFERENCE = "hvm's cold boot of the same guest, same run"


def _spec():
    from hvm.config import parse_spec

    return parse_spec({"memory": MEM, "timeout": BOOT_WALL, "boot": {
        "kernel": str(KERNEL), "initrd": [str(INITRD)], "cmdline": CMDLINE}})


def worker_save(snap: Path) -> dict:
    from hvm.console import Console
    from hvm.machine import Machine

    out: dict = {}
    with Machine(_spec(), console=Console("none", "none", open_now=False)) as vm:
        vm.start()
        vm.wait_for_console(SNAP_LINE, timeout=BOOT_WALL)
        t = time.monotonic()
        vm.snapshot(snap, resume=True)
        out["save_s"] = time.monotonic() - t
        vm.wait_for_console(NEXT_LINE, timeout=BOOT_WALL)
        out["t_next"] = vm.console.time_of(NEXT_LINE)
        vm.stop()
    out["file_bytes"] = os.stat(snap).st_size
    out["file_used_bytes"] = os.stat(snap).st_blocks * 512
    return out


def worker_restore(snap: Path) -> dict:
    from hvm.console import Console
    from hvm.machine import Machine

    t0 = time.monotonic()
    vm = Machine.restore(snap, console=Console("none", "none", open_now=False), timeout=RESTORE_WALL)
    t1 = time.monotonic()
    with vm:
        vm.start()
        t2 = time.monotonic()
        vm.wait_for_console(re.compile(rb"[\s\S]"), timeout=RESTORE_WALL)     # any byte
        t3 = time.monotonic()
        vm.stop()
    return {"restore_s": t1 - t0, "start_s": t2 - t1, "first_byte_s": t3 - t1}


def _watch(argv: list[str], wall: float, to_next_line: bool) -> dict:
    """Run argv; seconds from fork to its first stdout byte (and to NEXT_LINE), then kill it."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    out, first, nxt = b"", None, None
    try:
        while time.monotonic() - t0 < wall:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, wall - (time.monotonic() - t0)))
            if not ready:
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            at = time.monotonic() - t0
            first = at if first is None else first
            out += chunk
            if NEXT_LINE in out:
                nxt = at
            if nxt is not None or not to_next_line:
                break
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    return {"first_byte": first, "next_line": nxt, "console_head": out[:200].decode("utf-8", "replace")}


def _worker(mode: str, snap: Path, wall: float) -> dict:
    t_fork = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench.restore", mode, str(snap)], cwd=ROOT, capture_output=True,
                          text=True, timeout=wall)
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"bench.restore {mode}: status {proc.returncode}: {proc.stderr.strip()[-300:]}") from None
    data["t_fork"] = t_fork
    return data


def bench_restore(quick: bool, work: Path, log) -> tuple[list[Row], dict]:
    if quick:
        return [Row("restore.linux", TITLE, REFERENCE, status="skipped",
                    note="skipped in quick mode (it boots Linux once, about a minute here)")], {"status": "skipped"}
    missing = [p.name for p in (KERNEL, INITRD) if not p.is_file()]
    if missing:
        return [Row("restore.linux", TITLE, REFERENCE, status="skipped",
                    note=f"skipped: run make linux first ({', '.join(missing)} missing)")], {"status": "skipped"}
    snap = work / "linux.snap"
    log(f"  restore: cold boot to {SNAP_LINE.decode()!r}, snapshot, on to {NEXT_LINE.decode()!r} ...")
    try:
        cold = _worker("save", snap, BOOT_WALL + 60)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        return [Row("restore.linux", TITLE, REFERENCE, status="error", note=str(e)[:300])], {"status": "error"}
    cold_next = cold["t_next"] - cold["t_fork"] - cold["save_s"]
    log(f"  restore: cold {cold_next:.1f} s to {NEXT_LINE.decode()!r}; snapshot {cold['file_bytes'] >> 20} MiB "
        f"({cold['file_used_bytes'] >> 20} MiB written) in {cold['save_s'] * 1000:.0f} ms")
    # `python -m hvm` from the repository (as the workers): the hvm that wrote the snapshot restores it.
    argv = [sys.executable, "-m", "hvm", "run", "--incoming", f"file:{snap}", "--serial", "stdio", "--timeout", str(RESTORE_WALL)]
    first, nxt, inproc = [], [], []
    for rep in range(REPS):
        # Each restore starts with the file's pages in the page cache (as after the save): what a restore
        # costs when the snapshot is hot. Dropping the cache would measure the disk instead. Only the first
        # runs on to NEXT_LINE (seconds of emulated guest code).
        r = _watch(argv, RESTORE_WALL, to_next_line=rep == 0)
        if r["first_byte"] is None or (rep == 0 and r["next_line"] is None):
            return [Row("restore.linux", TITLE, REFERENCE, status="error",
                        note=f"the restored guest printed {r['console_head'][:100]!r}")], {"cold": cold, "cli": r}
        first.append(r["first_byte"])
        if r["next_line"] is not None:
            nxt.append(r["next_line"])
        inproc.append(_worker("restore", snap, RESTORE_WALL + 30))
    med = lambda xs: sorted(xs)[len(xs) // 2]      # noqa: E731
    restore_ms = med([x["restore_s"] for x in inproc]) * 1000
    first_ms = med([x["first_byte_s"] for x in inproc]) * 1000
    note = (f"restore: fork to the restored guest's first console byte, {REPS} runs of `hvm run --incoming`; "
            f"cold: fork to {NEXT_LINE.decode()!r} in the boot the snapshot was taken from (save time "
            f"excluded); to that same line the first restore took {nxt[0]:.2f} s from fork; in one process: "
            f"Machine.restore() {restore_ms:.1f} ms, then start() to the first byte {first_ms:.1f} ms "
            f"(medians); snapshot {cold['file_bytes'] >> 20} MiB sparse, {cold['file_used_bytes'] / (1 << 20):.1f} "
            f"MiB written, saved in {cold['save_s'] * 1000:.0f} ms; page cache hot")
    log(f"  restore: first byte {med(first) * 1000:.0f} ms from fork; Machine.restore() {restore_ms:.1f} ms")
    rows = [Row("restore.linux", TITLE, REFERENCE, Figure("s", first), Figure("s", [cold_next]),
                f"restore/cold boot, from fork (cold: to {NEXT_LINE.decode()!r})", note)]
    return rows, {"cold": cold, "cold_next_s": cold_next, "cli_first_byte_s": first, "cli_next_line_s": nxt,
                  "in_process": inproc}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.restore")
    ap.add_argument("mode", choices=("save", "restore"))
    ap.add_argument("snapshot", type=Path)
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.ERROR)
    data = worker_save(args.snapshot) if args.mode == "save" else worker_restore(args.snapshot)
    print(json.dumps(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
