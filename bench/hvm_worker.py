"""One exit-loop run under hvm, in a process of its own: `python -m bench.hvm_worker --yaml VM.yaml`.

Builds an hvm.Machine from the YAML (the user's path: load_config -> VmSpec -> Machine, quiet
console), times Machine.run() (start() to wait(): the vCPU thread's KVM_RUN loop, the dispatch table,
the PIO/MMIO buses and devices, ending at the debug-exit write), and prints one JSON object.

--hlt-continue: hvm ends the VM at the first HLT exit (without an irqchip nothing can wake the vCPU),
so the HLT benchmark asks the vCPU to resume after HLT exits instead (VcpuThread.resume_on: in the C
fast loop, or a no-op entry in the dispatch table of the Python loop). This measures the loop's floor.

--python-loop: run the all-Python loop (no C fast loop), as traced runs and uncompiled trees do.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hvm_worker")
    ap.add_argument("--yaml", required=True)
    ap.add_argument("--hlt-continue", action="store_true")
    ap.add_argument("--python-loop", action="store_true", help="no C fast loop")
    ap.add_argument("--trace", metavar="FILE", help="record every exit as JSON lines (hvm run --trace)")
    args = ap.parse_args(argv)

    t_import = time.perf_counter()
    from hvm import Machine, load_config
    from hvm.console import Console
    from hvm.kvm import constants as k

    logging.basicConfig(level=logging.ERROR)   # one "no device there" warning per address: not wanted here
    spec = load_config(args.yaml)
    t_build = time.perf_counter()
    from hvm.trace import TraceConfig

    trace = TraceConfig(path=args.trace) if args.trace else None
    with Machine(spec, console=Console("none", "none"), trace=trace, fast_loop=not args.python_loop) as vm:
        t_built = time.perf_counter()
        if args.hlt_continue:
            for t in vm.threads:
                t.resume_on(k.EXIT_HLT)
        c0, t0 = time.process_time(), time.perf_counter()
        result = vm.run()
        t1, c1 = time.perf_counter(), time.process_time()
        stats = vm.stats()
        out = {
            "vmm": "hvm",
            "end": result.reason,
            "status": result.status,
            "seconds": t1 - t0,                 # start() .. wait() returned
            "cpu_seconds": c1 - c0,             # CPU time of the whole process meanwhile (all threads)
            "run_result_seconds": result.seconds,  # start() .. the debug-exit write, as hvm measures it
            "build_seconds": t_built - t_build,
            "import_seconds": t_build - t_import,
            "exits": {"total": stats.total, "io": stats.by_reason.get("IO", 0),
                      "mmio": stats.by_reason.get("MMIO", 0), "hlt": stats.by_reason.get("HLT", 0)},
            "unclaimed": sum(stats.unhandled_ports.values()) + sum(stats.unhandled_mmio.values()) + stats.other_mmio,
        }
    print(json.dumps(out))
    return 0 if result.reason == "debug-exit" else 1


if __name__ == "__main__":
    sys.exit(main())
