"""Guest RIP sampler: where a guest spends its time, by function (for the Linux boot on kvm_pvm, whose guest
kernel code is emulated instruction by instruction, time there is instructions executed).

    python -m bench.guestprof --kernel build/linux/vmlinux-minimal --initrd build/linux/initramfs-ud2.cpio \
        --append "console=ttyS0 earlyprintk=serial panic=-1" [-m 256M] [--vcpus N] [--interval 0.01] \
        [--until "Run /init"] [--top 40] [--phases] [--samples out.json]

Runs the VM through hvm's Python API (the same VmSpec `hvm run` builds from these flags; hvm adds the host's
kernel options as usual), and every `interval` seconds pauses it (each vCPU kicked out of KVM_RUN at an
instruction boundary), reads each running vCPU's RIP (KVM_GET_REGS), and resumes it. Samples are symbolized with
`nm` of the kernel ELF (the function containing the RIP). A sample costs a pause/resume (~1 ms), so the guest
runs a little slower than without the sampler; the shares are what matters. The console goes to a file
(--console, default /tmp/guestprof-console.log); the --until marker (seen on the console) ends sampling.
--phases prints, per console line that starts a phase, the top functions between it and the next line."""
from __future__ import annotations

import argparse
import bisect
import collections
import subprocess
import sys
import time
from pathlib import Path


def load_symbols(elf: Path) -> tuple[list[int], list[str]]:
    out = subprocess.run(["nm", "-n", "--defined-only", str(elf)], check=True, capture_output=True, text=True).stdout
    addrs, names = [], []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tTwW":
            addrs.append(int(parts[0], 16))
            names.append(parts[2])
    return addrs, names


def symbolize(addrs: list[int], names: list[str], rip: int) -> str:
    i = bisect.bisect_right(addrs, rip) - 1
    if i < 0:
        return f"?{rip:#x}"
    if rip >= 0xffffffff00000000 or rip >= 0xffff800000000000:
        return names[i]
    return "user" if rip < 0x800000000000 else f"?{rip:#x}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", action="append", default=[])
    ap.add_argument("--append", default="console=ttyS0 earlyprintk=serial panic=-1")
    ap.add_argument("-m", "--memory", default="256M")
    ap.add_argument("--vcpus", default=None)
    ap.add_argument("--interval", type=float, default=0.01)
    ap.add_argument("--until", default="Run /init")
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--console", default="/tmp/guestprof-console.log")
    ap.add_argument("--phases", action="store_true")
    ap.add_argument("--samples", help="also write the raw samples and console lines to this JSON file")
    a = ap.parse_args(argv)

    from hvm.cli import build_parser, spec_from_args
    from hvm.machine import Machine

    run_argv = ["run", "--kernel", a.kernel, "--append", a.append, "-m", a.memory, "--timeout", str(a.timeout),
                "--serial", f"file:{a.console}"]
    for i in a.initrd:
        run_argv += ["--initrd", i]
    if a.vcpus:
        run_argv += ["--vcpus", a.vcpus]
    args = build_parser().parse_args(run_argv)
    spec = spec_from_args(args)
    addrs, names = load_symbols(Path(a.kernel))
    samples: list[tuple[float, int, int]] = []      # (seconds since start, vcpu, rip)
    marks: list[tuple[float, str]] = []             # (seconds, console line) as the console grows
    seen = 0
    t0 = time.monotonic()
    with Machine(spec) as m:
        m.start()
        console = Path(a.console)
        done = False
        while not done and not m._done.is_set() and time.monotonic() - t0 < a.timeout:
            time.sleep(a.interval)
            try:
                m.pause(timeout=2.0)
            except (TimeoutError, RuntimeError):
                continue
            now = time.monotonic() - t0
            try:
                for t in m.threads:
                    if t.is_alive():
                        samples.append((now, t.index, t.vcpu.get_regs().rip))
            finally:
                m.resume()
            try:
                text = console.read_bytes()[seen:]
            except FileNotFoundError:
                text = b""
            if b"\n" in text:
                chunk = text[: text.rfind(b"\n") + 1]
                seen += len(chunk)
                for ln in chunk.decode("utf-8", "replace").splitlines():
                    marks.append((now, ln))
                    if a.until and a.until in ln:
                        done = True
        m.stop(0, "profiling done")
    total = len(samples)
    if a.samples:
        import json
        Path(a.samples).write_text(json.dumps({"samples": [[t, v, f"{r:#x}", symbolize(addrs, names, r)]
                                                           for t, v, r in samples], "console": marks}))
    print(f"{total} samples over {samples[-1][0] if samples else 0:.1f} s ({a.interval * 1000:g} ms interval)")
    count = collections.Counter(symbolize(addrs, names, rip) for _, _, rip in samples)
    for name, n in count.most_common(a.top):
        print(f"{n:6d} {100 * n / max(total, 1):5.1f}%  {name}")
    if a.phases:
        print("\n--- by console phase (samples before each line) ---")
        j = 0
        for at, line in marks:
            phase = collections.Counter()
            while j < total and samples[j][0] <= at:
                phase[symbolize(addrs, names, samples[j][2])] += 1
                j += 1
            n = sum(phase.values())
            if n >= 5:
                top = ", ".join(f"{k} {v}" for k, v in phase.most_common(6))
                print(f"[{at:6.2f} s] {n:5d} samples before: {line[:90]}\n           {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
