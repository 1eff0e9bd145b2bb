"""Start-up (process start to exit, wall time and peak RSS from wait4) and memory overhead (process RSS
minus the guest RAM it has touched, read from /proc/PID/smaps of the running VMM), hvm beside QEMU."""
from __future__ import annotations

import compileall
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import CONFIGS, MBTEST, QEMU, ROOT, BenchError, Figure, Row, have_qemu, hvm_command, run_measured

STARTUP_TIMEOUT = 30.0
QEMU_MICROVM = [QEMU, "-M", "microvm", "-accel", "kvm", "-nodefaults", "-no-user-config", "-display", "none"]
DEBUG_EXIT_DEV = ["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]
MEM_GUEST = 128 << 20
MEM_MARKER = b"exiting through port 0xf4"   # mbtest's last line: after it the guest only halts
MEM_TIMEOUT = 20.0


def startup_commands() -> dict[str, list[str]]:
    hvm = hvm_command()
    return {
        "hvm_hello": hvm + ["run", str(CONFIGS / "hello.yaml"), "--serial", "none"],
        "hvm_mbtest": hvm + ["run", "--kernel", str(MBTEST), "--serial", "none", "--timeout", "20"],
        "qemu_mbtest": QEMU_MICROVM + ["-serial", "none"] + DEBUG_EXIT_DEV + ["-kernel", str(MBTEST)],
        # baselines for the analysis (not in the table): the interpreter alone, and importing hvm
        "python_bare": [sys.executable, "-c", "pass"],
        "python_import_hvm": [sys.executable, "-c", "import hvm.cli, hvm.machine"],
    }


EXPECTED_STATUS = {"hvm_hello": 0, "hvm_mbtest": 1, "qemu_mbtest": 1, "python_bare": 0, "python_import_hvm": 0}


def refresh_bytecode() -> None:
    """The rows measure hvm as `make install` leaves it: bytecode for every module. A source changed since
    (a merge, an edit) would be compiled again at every start, PYTHONDONTWRITEBYTECODE being set here (3
    stale modules: ~10 ms of CPU a run here): compile what is stale, as `make install` does."""
    compileall.compile_dir(str(ROOT / "hvm"), quiet=1)


def bench_startup(reps: int, warmup: bool, log) -> tuple[list[Row], dict]:
    refresh_bytecode()
    cmds = startup_commands()
    if not have_qemu():
        del cmds["qemu_mbtest"]
    wall = {name: Figure("s") for name in cmds}
    rss = {name: Figure("MiB") for name in cmds}
    cpu = {name: Figure("s") for name in cmds}     # user+sys from wait4: steadier than wall on a busy host
    errors = {}
    first = 0 if warmup else 1      # a warm-up round (page cache, pyc files) is run but not counted
    for i in range(first, reps + 1):
        names = list(cmds) if i % 2 == 0 else list(reversed(cmds))
        for name in names:
            if name in errors:
                continue
            res = run_measured(cmds[name], STARTUP_TIMEOUT, capture=True)
            if res.timed_out or res.status != EXPECTED_STATUS[name]:
                errors[name] = (f"{name}: status {res.status} (expected {EXPECTED_STATUS[name]})"
                                f"{' after a timeout' if res.timed_out else ''}; {res.stderr.strip()[-200:]}")
                continue
            if i > 0:
                wall[name].samples.append(res.seconds)
                rss[name].samples.append(res.maxrss_kib / 1024)
                cpu[name].samples.append(res.user + res.sys)
    for name in wall:
        if name not in errors:
            log(f"  start-up {name}: {wall[name].median * 1000:.0f} ms, peak RSS {rss[name].median:.1f} MiB")
    qemu_ref = "QEMU microvm, mbtest.elf (-kernel, multiboot)"
    rows = []
    specs = (
        ("startup.mbtest", "Start-up to exit, the same multiboot kernel (firmware/build/mbtest.elf, exits at once "
         "via 0xf4): `hvm run --kernel` (machine pc)", "hvm_mbtest", wall, "hvm/QEMU wall time"),
        ("startup.hello", "Start-up to exit, `hvm run configs/hello.yaml --serial none` (real-mode flat image, "
         "machine none)", "hvm_hello", wall, "hvm/QEMU wall time; different guests"),
        ("rss.mbtest", "Peak RSS (ru_maxrss from wait4) of the start-up run of mbtest.elf", "hvm_mbtest", rss,
         "hvm/QEMU peak RSS"),
        ("rss.hello", "Peak RSS (ru_maxrss from wait4) of the hello.yaml run", "hvm_hello", rss,
         "hvm/QEMU peak RSS; different guests"),
    )
    for key, title, name, fig, ratio_of in specs:
        if name in errors:
            rows.append(Row(key, title, qemu_ref, status="error", note=errors[name]))
        elif "qemu_mbtest" not in cmds:
            rows.append(Row(key, title, qemu_ref, fig[name], status="skipped", note=f"{QEMU} not found"))
        elif "qemu_mbtest" in errors:
            rows.append(Row(key, title, qemu_ref, fig[name], status="error", note=errors["qemu_mbtest"]))
        else:
            note = ""
            if key == "startup.mbtest":
                # The interpreter the baselines ran is the one `hvm` runs on (the venv's, when the bench
                # runs as .venv/bin/python -m bench): say which, so a row from another environment shows.
                note = (f"python -c pass: {wall['python_bare'].median * 1000:.0f} ms, "
                        f"python -c 'import hvm.cli, hvm.machine': {wall['python_import_hvm'].median * 1000:.0f} ms "
                        f"(hvm: {cmds['hvm_mbtest'][0]}; python: {sys.executable}; median CPU time user+sys: hvm "
                        f"{cpu['hvm_mbtest'].median * 1000:.0f} ms, QEMU {cpu['qemu_mbtest'].median * 1000:.0f} ms)")
            rows.append(Row(key, title, qemu_ref, fig[name], fig["qemu_mbtest"], ratio_of, note))
    raw = {"commands": cmds, "errors": errors, "reps": reps,
           "wall_seconds": {n: f.to_json() for n, f in wall.items() if f.samples},
           "peak_rss_mib": {n: f.to_json() for n, f in rss.items() if f.samples},
           "cpu_seconds": {n: f.to_json() for n, f in cpu.items() if f.samples}}
    return rows, raw


# --- memory overhead ----------------------------------------------------------------------------------
def smaps(pid: int) -> list[dict]:
    """Mappings of a live process: start, end, path, Size and Rss (KiB)."""
    maps, cur = [], None
    head = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$")
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = head.match(line)
            if m:
                cur = {"start": int(m[1], 16), "end": int(m[2], 16), "path": m[3].strip(), "Size": 0, "Rss": 0}
                maps.append(cur)
            elif cur is not None and (line.startswith("Size:") or line.startswith("Rss:")):
                key, value = line.split(":", 1)
                cur[key] = int(value.split()[0])
    return maps


def status_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0])
    return out


def measure_live(argv: list[str], cwd: Path = ROOT) -> dict:
    """Start a VMM whose guest prints MEM_MARKER and then halts for good; once the marker is on its
    serial output, read its RSS and the Rss of its guest-RAM mapping, then kill it."""
    proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        buf = b""
        deadline = time.monotonic() + MEM_TIMEOUT
        while MEM_MARKER not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{argv[0]}: no {MEM_MARKER.decode()!r} on the serial line after {MEM_TIMEOUT:g} s")
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    raise BenchError(f"{argv[0]}: exited (status {proc.wait()}) before the guest was done")
                buf += chunk
        time.sleep(0.2)     # the guest is in its final `cli; hlt` loop: let the VMM settle
        maps = smaps(proc.pid)
        status = status_kib(proc.pid)
    finally:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
        proc.stdout.close()
    guest_kib = MEM_GUEST >> 10
    ram = [m for m in maps if not m["path"] and m["Size"] == guest_kib]
    if len(ram) != 1:
        bigger = sorted(m["Size"] for m in maps if not m["path"] and m["Size"] > guest_kib)
        raise BenchError(f"{argv[0]}: found {len(ram)} anonymous {guest_kib} KiB mappings (guest RAM), expected 1; "
                         f"larger anonymous mappings (KiB): {bigger}")
    total = sum(m["Rss"] for m in maps)
    return {"rss_kib": total, "guest_rss_kib": ram[0]["Rss"], "overhead_kib": total - ram[0]["Rss"],
            "status_kib": status}


def mem_yaml(workdir: Path) -> Path:
    """mbtest at 128 MiB, machine pc, without the debug-exit device: its exit write is dropped and the
    guest halts for good (HLT waits in the kernel with the irqchip), so the process stays up to be read."""
    path = workdir / "mem.yaml"
    path.write_text("name: bench-mem\nmemory: 128M\nvcpus: 1\ntimeout: 30\n"
                    f"boot: {{kernel: '{MBTEST}'}}\n"
                    "devices: {serial: {output: stdio, input: none}, debug_exit: false}\n")
    return path


def bench_memory(reps: int, workdir: Path, log) -> tuple[list[Row], dict]:
    key = "mem.overhead"
    title = ("Memory overhead, 1 vCPU / 128 MiB guest: VMM RSS minus the guest RAM it has touched, after "
             "mbtest.elf has run (smaps of the live process)")
    ref_name = "QEMU microvm, same kernel, -m 128M"
    hvm_argv = hvm_command() + ["run", str(mem_yaml(workdir))]
    qemu_argv = QEMU_MICROVM + ["-m", "128M", "-serial", "stdio", "-kernel", str(MBTEST)]
    hvm_fig, ref_fig = Figure("MiB"), Figure("MiB")
    runs = {"hvm": [], "qemu": []}
    try:
        for _ in range(reps):
            out = measure_live(hvm_argv)
            runs["hvm"].append(out)
            hvm_fig.samples.append(out["overhead_kib"] / 1024)
            if have_qemu():
                out = measure_live(qemu_argv)
                runs["qemu"].append(out)
                ref_fig.samples.append(out["overhead_kib"] / 1024)
    except (BenchError, OSError, subprocess.TimeoutExpired) as e:
        log(f"  {key}: {e}")
        return [Row(key, title, ref_name, status="error", note=str(e))], {"error": str(e), "runs": runs}
    raw = {"commands": {"hvm": hvm_argv, "qemu": qemu_argv}, "runs": runs, "hvm": hvm_fig.to_json()}
    if not have_qemu():
        return [Row(key, title, ref_name, hvm_fig, status="skipped", note=f"{QEMU} not found")], raw
    raw["qemu"] = ref_fig.to_json()
    h, q = runs["hvm"][-1], runs["qemu"][-1]
    note = (f"whole RSS: hvm {h['rss_kib'] / 1024:.1f} MiB (guest {h['guest_rss_kib'] / 1024:.1f}), "
            f"QEMU {q['rss_kib'] / 1024:.1f} MiB (guest {q['guest_rss_kib'] / 1024:.1f}); "
            f"file-backed: hvm {h['status_kib'].get('RssFile', 0) / 1024:.1f}, "
            f"QEMU {q['status_kib'].get('RssFile', 0) / 1024:.1f} MiB")
    log(f"  {key}: hvm {hvm_fig.median:.1f} MiB, QEMU {ref_fig.median:.1f} MiB")
    return [Row(key, title, ref_name, hvm_fig, ref_fig, "hvm/QEMU", note)], raw
