"""Where the time of an exit that reaches a Python device goes (`make bench-hotpath`, `python -m bench.hotpath`).

Runs one guest loop -- by default firmware/bench_pin.S, `in` from port 0x3fd (COM1's line status register,
a read with side effects: hvm answers it in Python) -- under run loops that add one layer of hvm's device
path at a time, on identical VMs built by hvm.Machine, interleaved so that the host's drift hits all of them
alike. Prints, per loop, the median cost per exit: wall clock, the loop thread's CPU time (exact, and the
robust figure on a busy host), getrusage's user and system CPU, and the difference to the previous layer:

  cref       bench/cref.c, a minimal C VMM: the kernel's and the backend's share of an exit
  unclaimed  hvm's vCPU loop on the same guest loop to a port no device claims (0x80): hvm's C fast loop
             re-enters the guest itself; the C loop alone, inside hvm
  return     the C fast loop returns every exit to Python (the port is claimed), which calls it again:
             one cffi call per exit and the exit reason compared, nothing else
  dispatch   + hvm's loop shape: the stopping flag, the exit counted by reason
  decode     + the port-I/O exit decoded (direction, size, port, count, data offset), the IN's value packed
             into kvm_run (a constant)
  bus        + the PioBus route: the per-port hit count, the port's handler and offset, the fault guard,
             the size mask; the handler is a function that returns a constant
  hvm        + the device: hvm's vCPU loop as it is (VcpuThread._loop_fast, the UART's read)
  table      the same exits the way hvm took them before issue 16: dispatch table -> VcpuThread._exit_io ->
             PioView.read -> the device, and a last-exits tuple per exit (the device as it is now)
  hvm-py     Machine(..., fast_loop=False).run(): the all-Python loop (KVM_RUN from Python)

With --out, the loop is firmware/bench_pio.S instead (`out` to the port; default port then 0x3ff, the UART's
scratch register). This reads hvm's internals (threads, buses, the fast loop) but changes nothing in hvm/.
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import CREF, FIRMWARE, run_measured
from bench.exits import ARG_OFFSET, ITERATIONS_OFFSET

VARIANTS = ("cref", "unclaimed", "return", "dispatch", "decode", "bus", "hvm", "table", "hvm-py")
LAYERED = VARIANTS[:7]        # each adds one layer to the one before
UNCLAIMED_PORT = 0x80
DEBUG_EXIT_PORT = 0xF4


def make_image(iterations: int, port: int, out: bool, workdir: Path) -> Path:
    data = bytearray((FIRMWARE / ("bench_pio.bin" if out else "bench_pin.bin")).read_bytes())
    struct.pack_into("<I", data, ITERATIONS_OFFSET, iterations)
    struct.pack_into("<H", data, ARG_OFFSET, port)
    path = workdir / f"hotpath-{port:x}.bin"
    path.write_bytes(bytes(data))
    return path


def make_machine(image: Path, fast_loop: bool = True):
    from hvm import Machine
    from hvm.config import load_config
    from hvm.console import Console

    yaml_path = image.with_suffix(".yaml")
    yaml_path.write_text("name: hotpath\nmemory: 16M\ntimeout: 20\nmachine: none\n"
                         f"boot: {{image: '{image}', load: 0x7c00, mode: real}}\n"
                         "devices: {serial: {output: none, input: none}, debug_exit: {port: 0xf4, size: 4}}\n")
    return Machine(load_config(yaml_path), console=Console("none", "none"), fast_loop=fast_loop)


def on_thread(fn, timeout: float = 30.0) -> tuple:
    """Run a vCPU loop on a thread of its own, as hvm does; a daemon, so that a loop that never ends
    (a guest gone wrong) cannot keep the process alive after the timeout. Returns (fn's result, the
    thread's CPU seconds: CLOCK_THREAD_CPUTIME_ID, exact, unlike getrusage's tick-sampled user/system split)."""
    out = []

    def body() -> None:
        c0 = time.thread_time()
        r = fn()
        out.append((r, time.thread_time() - c0))

    t = threading.Thread(target=body, name="vcpu0", daemon=True)
    t.start()
    t.join(timeout)
    if not out:
        raise RuntimeError(f"the loop did not finish within {timeout:g} s")
    return out[0]


def layer_loop(vm, layer: str, port: int) -> int:
    """One of the stripped-down loops (return, dispatch, decode, bus) around hvm's C fast loop; returns
    the exits it saw. Each ends at the guest's debug-exit OUT (the port claimed by hvm's DebugExit)."""
    from hvm.kvm import constants as k
    from hvm.mmio.bus import MASK

    t = vm.threads[0]
    fast = t.fast
    run, fd, run_address, state = fast.run, fast.fd, fast.run_address, fast.state
    view = t._view
    u16 = struct.Struct("<H").unpack_from
    io_of = struct.Struct("<BBHIQ").unpack_from
    uint = [None, struct.Struct("<B"), struct.Struct("<H"), None, struct.Struct("<I")]
    EXIT_IO = k.EXIT_IO
    counts = [0] * 64
    n = 0
    if layer == "return":
        while True:
            reason = run(fd, run_address, state)
            n += 1
            if reason != EXIT_IO or u16(view, 34)[0] == DEBUG_EXIT_PORT:
                return n
    if layer == "dispatch":
        while not vm.stopping:
            reason = run(fd, run_address, state)
            if reason == EXIT_IO:
                counts[reason] += 1
                if u16(view, 34)[0] == DEBUG_EXIT_PORT:
                    break
                continue
            break
        return sum(counts)
    # decode, bus: the port's own handler is a constant (bus) or absent (decode)
    pio = t._pio
    hits, offsets, mask = pio._hits, pio._offsets, MASK
    handlers = list(pio._handlers)
    handlers[port] = (lambda offset, size: 0x60, lambda offset, size, value: None)
    use_bus = layer == "bus"
    while not vm.stopping:
        reason = run(fd, run_address, state)
        if reason == EXIT_IO:
            counts[reason] += 1
            direction, size, p, count, offset = io_of(view, 32)
            if p == DEBUG_EXIT_PORT:
                break
            if count == 1:
                if use_bus:
                    hits[p] += 1
                if direction:   # one byte straight from the byte view, as hvm's loop does
                    value = view[offset] if size == 1 else uint[size].unpack_from(view, offset)[0]
                    if use_bus:
                        try:
                            handlers[p][1](offsets[p], size, value)
                        except Exception:
                            raise
                else:
                    value = 0x60
                    if use_bus:
                        try:
                            value = handlers[p][0](offsets[p], size) & mask[size]
                        except Exception:
                            raise
                    if size == 1:
                        view[offset] = value
                    else:
                        uint[size].pack_into(view, offset, value)
                continue
        break
    return sum(counts)


def table_loop(vm) -> int:
    """hvm's loop as it was before issue 16: every exit through the dispatch table, port I/O through
    VcpuThread._exit_io (which still exists: string I/O and the all-Python loops use it)."""
    t = vm.threads[0]
    fast = t.fast
    run, fd, run_address, state = fast.run, fast.fd, fast.run_address, fast.state
    dispatch, counts = t.dispatch, t.exit_counts
    while not vm.stopping:
        reason = run(fd, run_address, state)
        if reason < 0:
            raise OSError(-reason, "KVM_RUN failed")
        counts[reason] += 1
        if dispatch[reason]():
            break
    return sum(counts)


def run_variant(name: str, image: Path, unclaimed_image: Path) -> tuple[float, float, float, float]:
    """(wall, CPU, user CPU, system CPU) seconds per exit for one run of `name`. CPU: the vCPU thread's
    (CLOCK_THREAD_CPUTIME_ID; hvm-py: the process's; cref: its loop's, CLOCK_PROCESS_CPUTIME_ID). User and
    system: the whole process's, from getrusage (for cref the child's, including its VM set-up), which the
    kernel splits by sampling at each tick: only the sum is exact."""
    if name == "cref":
        res = run_measured([str(CREF), "-t", "20", str(image)], 30)
        out = json.loads(res.stdout)
        n = out["exits"]["total"]
        return out["seconds"] / n, out["cpu_seconds"] / n, res.user / n, res.sys / n
    with make_machine(unclaimed_image if name == "unclaimed" else image, fast_loop=name != "hvm-py") as vm:
        if name not in ("unclaimed", "hvm", "hvm-py") and vm.threads[0].fast is None:
            raise RuntimeError("hvm's C fast loop is not compiled: `make install` builds it")
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        if name == "hvm-py":
            c0 = time.process_time()
            result = vm.run()
            dt = time.perf_counter() - t0
            cpu = time.process_time() - c0
            if result.reason != "debug-exit":
                raise RuntimeError(f"{name}: the guest ended by {result.reason}: {result.message}")
            n = vm.stats().total
        elif name in ("unclaimed", "hvm"):
            # The vCPU thread's own loop, as Machine.run() runs it, without the machine's start and stop
            # around it (the layered loops have none either)
            _, cpu = on_thread(vm.threads[0]._run_loop)
            dt = time.perf_counter() - t0
            if vm.result is None or vm.result.reason != "debug-exit":
                raise RuntimeError(f"{name}: the guest did not end at its debug-exit write: {vm.result}")
            n = vm.stats().total
        else:
            port = struct.unpack_from("<H", image.read_bytes(), ARG_OFFSET)[0]
            fn = table_loop if name == "table" else (lambda vm_: layer_loop(vm_, name, port))
            n, cpu = on_thread(lambda: fn(vm))
            dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        vm.stopping = True
    return dt / n, cpu / n, (r1.ru_utime - r0.ru_utime) / n, (r1.ru_stime - r0.ru_stime) / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=30000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", action="store_true", help="`out` to the port (bench_pio) instead of `in` (bench_pin)")
    ap.add_argument("--port", type=lambda s: int(s, 0), help="default 0x3fd (in) or 0x3ff (--out)")
    ap.add_argument("--only", help="comma-separated variants (default: all)")
    ap.add_argument("--json", type=Path, help="also write the samples here")
    args = ap.parse_args(argv)
    port = args.port if args.port is not None else (0x3FF if args.out else 0x3FD)
    variants = tuple(v for v in VARIANTS if not args.only or v in args.only.split(","))
    logging.basicConfig(level=logging.ERROR)
    samples: dict[str, list[tuple[float, float, float, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        image = make_image(args.iterations, port, args.out, Path(tmp))
        unclaimed = make_image(args.iterations, UNCLAIMED_PORT, args.out, Path(tmp))
        for rep in range(args.reps + 1):            # round 0 warms up and is dropped
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            for name in order:
                figures = run_variant(name, image, unclaimed)
                if rep:
                    samples[name].append(tuple(f * 1e6 for f in figures))
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"{'out to' if args.out else 'in from'} port {port:#x}, {args.iterations} iterations, {args.reps} "
          f"interleaved runs each; load average {' '.join(load)}")
    print(f"{'loop':<10} {'µs/exit':>8} {'min':>6} {'+layer':>7} {'CPU µs':>7} {'min':>6} {'+layer':>7} "
          f"{'user':>6} {'sys':>6}")
    prev = None
    for name in variants:
        wall, cpu, user, sys_ = (statistics.median(s[i] for s in samples[name]) for i in range(4))
        layered = name in LAYERED and prev is not None
        d_wall = f"{wall - prev[0]:+.2f}" if layered else ""
        d_cpu = f"{cpu - prev[1]:+.2f}" if layered else ""
        print(f"{name:<10} {wall:>8.2f} {min(s[0] for s in samples[name]):>6.2f} {d_wall:>7} {cpu:>7.2f} "
              f"{min(s[1] for s in samples[name]):>6.2f} {d_cpu:>7} {user:>6.2f} {sys_:>6.2f}")
        if name in LAYERED:
            prev = (wall, cpu)
    print("CPU: the loop thread's CPU time per exit (exact); user, sys: getrusage's tick-sampled split of the "
          "process's (noisy below ~1000 ticks)")
    if args.json:
        args.json.write_text(json.dumps({"samples_us": samples, "load": load, "args": vars(args)}, default=str,
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
