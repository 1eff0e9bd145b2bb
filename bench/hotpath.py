"""Where an exit's time goes in hvm (`make bench-hotpath`, or `python -m bench.hotpath`).

Runs the bench_pio guest loop (firmware/bench_pio.S) under several run loops, on identical VMs built by
hvm.Machine, interleaved so that the host's drift hits all of them alike, and prints the median cost
per exit of each and the differences between neighbours:

  cref          bench/cref.c: KVM_RUN in C (the kernel's and the backend's share of an exit)
  hvm           Machine.run() as it is: the C fast loop re-enters the guest itself after port I/O that
                no device claims (hvm/vcpu/fastloop.py); Python sees the first such exit and the rest
  py-min        the least a Python loop can do: KVM_RUN through hvm's cffi binding, read the exit reason
                and the port, stop at the debug-exit port; on a thread, as hvm runs vCPUs
  hvm-empty     hvm's own VcpuThread._loop, with the IO entry of its dispatch table replaced by a handler
                that only reads the port: the loop's shape (stopping flag, counters, table, one call)
  py-inline     the hvm loop with the port-I/O path written inline (decode, one dict lookup, count a
                miss or call the device), no per-exit method calls, no tuple per exit: what a
                restructured Python loop costs
  hvm-py        Machine.run() with the all-Python loop (fast_loop=False): _exit_io, PioBus.write, the
                miss path, last_exits, on every exit

Then times hvm's handler pieces in a warm loop (timeit, no KVM) for comparison with their cost in situ.
This reads hvm's internals (threads, dispatch table, buses) but changes nothing in hvm/.
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
import timeit
from pathlib import Path

from bench.common import CREF, FIRMWARE, run_measured
from bench.exits import ITERATIONS_OFFSET, ARG_OFFSET

VARIANTS = ("cref", "hvm", "py-min", "hvm-empty", "py-inline", "hvm-py")


def make_image(iterations: int, port: int, workdir: Path) -> Path:
    data = bytearray((FIRMWARE / "bench_pio.bin").read_bytes())
    struct.pack_into("<I", data, ITERATIONS_OFFSET, iterations)
    struct.pack_into("<H", data, ARG_OFFSET, port)
    path = workdir / "hotpath.bin"
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


def on_thread(fn, timeout: float = 30.0):
    """Run a vCPU loop on a thread of its own, as hvm does; a daemon, so that a loop that never ends
    (a guest gone wrong) cannot keep the process alive after the timeout."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()), name="vcpu0", daemon=True)
    t.start()
    t.join(timeout)
    if not out:
        raise RuntimeError(f"the loop did not finish within {timeout:g} s")
    return out[0]


def loop_py_min(vm) -> int:
    from hvm.kvm._ffi import lib
    from hvm.kvm.ioctls import KVM_RUN

    fd, view = vm.vcpus[0].fd, vm.vcpus[0].run_view
    ioctl = lib.hvm_ioctl_int
    u32 = struct.Struct("<I").unpack_from
    u16 = struct.Struct("<H").unpack_from
    n = 0
    while True:
        if ioctl(fd, KVM_RUN, 0) < 0:
            raise OSError("KVM_RUN failed")
        n += 1
        if u32(view, 8)[0] == 2 and u16(view, 34)[0] == 0xF4:
            return n


def port_table(vm) -> dict[int, tuple]:
    """port -> (device, base) from the devices registered on hvm's PioBus (its public `ranges`)."""
    return {port: (r.device, r.base) for r in vm.pio.ranges for port in range(r.base, r.base + r.length)}


def loop_py_inline(vm) -> int:
    """hvm's loop with the OUT path inline; every other exit goes through hvm's dispatch table."""
    from hvm.kvm import constants as k
    from hvm.kvm._ffi import lib
    from hvm.kvm.ioctls import KVM_RUN

    t = vm.threads[0]
    fd, view = vm.vcpus[0].fd, vm.vcpus[0].run_view
    ioctl = lib.hvm_ioctl_int
    reason_of = struct.Struct("<I").unpack_from
    io_of = struct.Struct("<BBHIQ").unpack_from
    uint = {1: struct.Struct("<B").unpack_from, 2: struct.Struct("<H").unpack_from, 4: struct.Struct("<I").unpack_from}
    ports = port_table(vm)            # port -> (device, base)
    counts_by_port: dict[int, int] = {}
    unhandled: dict[int, int] = {}
    counts, dispatch, machine = t.exit_counts, t.dispatch, vm
    EXIT_IO, OUT = k.EXIT_IO, k.EXIT_IO_OUT
    n = 0
    while not machine.stopping:
        if ioctl(fd, KVM_RUN, 0) < 0:
            raise OSError("KVM_RUN failed")
        n += 1
        reason = reason_of(view, 8)[0]
        counts[reason] += 1
        if reason == EXIT_IO:
            direction, size, port, count, offset = io_of(view, 32)
            if direction == OUT and count == 1:
                entry = ports.get(port)
                if entry is None:
                    unhandled[port] = unhandled.get(port, 0) + 1
                else:
                    counts_by_port[port] = counts_by_port.get(port, 0) + 1
                    device, base = entry
                    device.write(port - base, size, uint[size](view, offset)[0])
                continue
        if dispatch[reason]():
            break
    return n


def run_variant(name: str, image: Path) -> tuple[float, float, float]:
    """(wall, user CPU, system CPU) seconds per exit for one run of `name`. CPU times are the whole
    process's (getrusage; for cref the child's, including its few milliseconds of VM set-up)."""
    if name == "cref":
        res = run_measured([str(CREF), "-t", "20", str(image)], 30)
        out = json.loads(res.stdout)
        n = out["exits"]["total"]
        return out["seconds"] / n, res.user / n, res.sys / n
    from hvm.kvm import constants as k

    with make_machine(image, fast_loop=name != "hvm-py") as vm:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        if name in ("hvm", "hvm-py"):
            t0 = time.perf_counter()
            vm.run()
            dt = time.perf_counter() - t0
            n = vm.stats().total
        elif name == "hvm-empty":
            t = vm.threads[0]
            view = t._view
            u16 = struct.Struct("<H").unpack_from

            def only_port() -> bool:
                if u16(view, 34)[0] == 0xF4:
                    vm.stopping = True
                    return True
                return False

            t.dispatch[k.EXIT_IO] = only_port
            t0 = time.perf_counter()
            on_thread(t._loop)
            dt = time.perf_counter() - t0
            n = sum(t.exit_counts)
        else:
            fn = {"py-min": loop_py_min, "py-inline": loop_py_inline}[name]
            t0 = time.perf_counter()
            n = on_thread(lambda: fn(vm))
            dt = time.perf_counter() - t0
        vm.stopping = True
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    return dt / n, (r1.ru_utime - r0.ru_utime) / n, (r1.ru_stime - r0.ru_stime) / n


def warm_costs(port: int) -> dict[str, float]:
    """hvm's per-exit Python pieces timed in a warm loop (no KVM_RUN in between): µs per call."""
    from hvm.kvm._ffi import lib
    from hvm.kvm.ioctls import KVM_RUN

    with tempfile.TemporaryDirectory() as tmp:
        with make_machine(make_image(10, port, Path(tmp)), fast_loop=False) as vm:
            t = vm.threads[0]
            view = t._view
            struct.pack_into("<I", view, 8, 2)                       # a KVM_EXIT_IO ...
            struct.pack_into("<BBHIQ", view, 32, 1, 1, port, 1, 64)  # ... OUT, 1 byte, `port`, data at 64
            n = 100_000
            u32 = struct.Struct("<I").unpack_from
            counts, dispatch = t.exit_counts, t.dispatch

            def loop_body():
                reason = u32(view, 8)[0]
                counts[reason] += 1
                return dispatch[reason]()

            vm.vcpus[0].run_struct.immediate_exit = 1   # KVM_RUN returns at once with EINTR: the call's cost
            fd = vm.vcpus[0].fd
            out = {
                "loop body + _exit_io (reason, count, table, handler)": timeit.timeit(loop_body, number=n) / n,
                "_exit_io": timeit.timeit(t._exit_io, number=n) / n,
                "PioBus.write": timeit.timeit(lambda: vm.pio.write(port, 1, 0), number=n) / n,
                "last_exits.append(tuple)": timeit.timeit(lambda: t.last_exits.append((2, port, 1, 1, 1, 0)),
                                                          number=n) / n,
                "empty lambda call (timeit's own overhead)": timeit.timeit(lambda: None, number=n) / n,
                "KVM_RUN with immediate_exit (returns EINTR at once)":
                    timeit.timeit(lambda: lib.hvm_ioctl_int(fd, KVM_RUN, 0), number=20_000) / 20_000,
            }
            vm.vcpus[0].run_struct.immediate_exit = 0
    return {k_: v * 1e6 for k_, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--port", type=lambda s: int(s, 0), default=0x80)
    ap.add_argument("--json", type=Path, help="also write the samples here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        image = make_image(args.iterations, args.port, Path(tmp))
        for rep in range(args.reps + 1):            # round 0 warms up and is dropped
            order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]
            for name in order:
                wall, user, sys_ = run_variant(name, image)
                if rep:
                    samples[name].append(wall * 1e6)
                    cpu[name].append((user * 1e6, sys_ * 1e6))
    print(f"bench_pio to port {args.port:#x}, {args.iterations} iterations, {args.reps} interleaved runs each")
    print(f"{'loop':<10} {'µs/exit: median':>15} {'min':>6} {'+ over previous':>16} {'user CPU':>9} {'system CPU':>11}")
    prev = None
    for name in VARIANTS:
        med = statistics.median(samples[name])
        delta = f"{med - prev:+.2f}" if prev is not None else ""
        user = statistics.median(u for u, _ in cpu[name])
        sys_ = statistics.median(s_ for _, s_ in cpu[name])
        print(f"{name:<10} {med:>15.2f} {min(samples[name]):>6.2f} {delta:>16} {user:>9.2f} {sys_:>11.2f}")
        prev = med
    warm = warm_costs(args.port)
    print("\nhvm's pieces in a warm loop (timeit, no exits in between), µs per call:")
    for what, us in warm.items():
        print(f"  {us:6.2f}  {what}")
    if args.json:
        args.json.write_text(json.dumps({"samples_us": samples, "cpu_us": cpu, "warm_us": warm, "args": vars(args)}, default=str,
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
