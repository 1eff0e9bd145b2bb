"""Paravirtualization, measured: firmware/pvcon prints the same line through the 16550 UART (two exits per
byte), QEMU's debugcon (one exit per byte) and hvm's paravirtual console (one exit per line), and
firmware/vcon the same line through virtio-console (a transmit buffer and one QueueNotify exit per line),
each under hvm's real run loop and devices. Figure: lines per second over the run (start() to the
debug-exit write), with KiB/s and exits per KiB in the note; the reference is the UART. docs/paravirt.md
explains the techniques and these rows."""
from __future__ import annotations

import statistics
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.common import FIRMWARE, ROOT, BenchError, Figure, Row, json_result, run_measured
from bench.exits import patch_header

LINE_LEN = 29              # firmware/pvcon.S: "one line, printed three ways\n"
UART_INIT_EXITS = 5
UART_INIT_EXITS_PVCON = UART_INIT_EXITS
VCON_INIT_EXITS = 35       # firmware/vcon.S: the virtio-mmio handshake (MMIO accesses)
VCON_MODE_OFFSET = 12      # firmware/vcon.S: u32 mode at +12 (0: print the line), base at +8
RUN_TIMEOUT = 60.0         # seconds, outer bound of one run (the guest's own watchdog is at 45 s)
GUEST_TIMEOUT = 45


@dataclass(frozen=True)
class Method:
    key: str
    number: int                # the firmware's method field
    name: str
    exits_per_line: int
    lines: int                 # lines per run in the full suite: each run lasts ~0.3 s or more here
    quick_lines: int
    image: str = "pvcon"       # firmware/build/<image>.bin
    init_exits: int = UART_INIT_EXITS_PVCON    # exits before the first line (pvcon: the UART's init)
    batch: int = 1             # lines per notify (vcon mode 2: 8 transmit buffers made available at once)

    @property
    def per_line(self) -> float:
        return self.exits_per_line / self.batch

    @property
    def per_line_text(self) -> str:
        return _exits(self.exits_per_line) + (" per line" if self.batch == 1 else f" per {self.batch} lines")


UART = Method("console.uart", 0, "16550 UART", 2 * LINE_LEN, 400, 20)
METHODS = (
    Method("console.debugcon", 1, "QEMU's debugcon at port 0xe9", LINE_LEN, 800, 40),
    Method("console.pvconsole", 2, "hvm's paravirtual console at port 0xe00", 1, 20000, 400),
    Method("console.virtio", 0, "virtio-console (virtio-mmio at 0xd0000000)", 1, 20000, 400,
           image="vcon", init_exits=VCON_INIT_EXITS),
    Method("console.virtio_batch", 2, "virtio-console, 8 buffers per notify", 1, 40000, 800,
           image="vcon", init_exits=VCON_INIT_EXITS, batch=8),
)


def _per_kib(exits_per_line: float) -> str:
    n = exits_per_line * 1024 / LINE_LEN
    return f"{n:,.0f}" if n >= 100 else f"{n:.1f}"


def _exits(n: int) -> str:
    return f"{n} exit" if n == 1 else f"{n} exits"


def pvcon_image(method: Method, lines: int, workdir: Path) -> Path:
    if method.image == "vcon":
        return vcon_image(lines, method.number, workdir)
    image = patch_header(FIRMWARE / "pvcon.bin", workdir / f"pvcon-{method.number}-{lines}.bin", lines, method.number,
                         arg_as_built=0)
    yaml_path = workdir / f"pvcon-{method.number}-{lines}.yaml"
    yaml_path.write_text(
        "name: pvcon\nmemory: 16M\n"
        f"timeout: {GUEST_TIMEOUT}\n"
        "machine: none\n"
        f"boot: {{image: '{image}', load: 0x7c00, mode: real}}\n"
        "devices: {serial: {output: none, input: none}, debugcon: true, pvconsole: true}\n")
    return yaml_path


def vcon_image(lines: int, mode: int, workdir: Path) -> Path:
    """firmware/vcon in mode 0 (a notify per line) or 2 (per 8 lines), its device at the first virtio slot."""
    image = patch_header(FIRMWARE / "vcon.bin", workdir / f"vcon-{mode}-{lines}.bin", lines, 0xD000_0000, "<I",
                         arg_as_built=0xD000_0000)
    data = bytearray(image.read_bytes())
    if struct.unpack_from("<I", data, VCON_MODE_OFFSET)[0] != 0:
        raise BenchError(f"{image}: the mode field at +{VCON_MODE_OFFSET} is not 0 as built")
    struct.pack_into("<I", data, VCON_MODE_OFFSET, mode)
    image.write_bytes(bytes(data))
    yaml_path = workdir / f"vcon-{mode}-{lines}.yaml"
    yaml_path.write_text(
        "name: vcon\nmemory: 16M\n"
        f"timeout: {GUEST_TIMEOUT}\n"
        "machine: none\n"
        f"boot: {{image: '{image}', load: 0x100000, mode: protected}}\n"
        "devices: {serial: {output: none, input: none}, virtio-console: true}\n")
    return yaml_path


def run_lines(method: Method, lines: int, workdir: Path) -> dict:
    """One hvm run (bench/hvm_worker.py: a process of its own, quiet console); checks the exit count."""
    argv = [sys.executable, "-m", "bench.hvm_worker", "--yaml", str(pvcon_image(method, lines, workdir))]
    out = json_result(run_measured(argv, RUN_TIMEOUT, cwd=ROOT), method.key, RUN_TIMEOUT)
    if (out.get("end"), out.get("status")) != ("debug-exit", 1):
        raise BenchError(f"{method.key}: ended by {out.get('end')!r} with status {out.get('status')}, "
                         "not the debug-exit write of a complete run")
    want = method.init_exits + -(-lines // method.batch) * method.exits_per_line + 1
    # pvcon: port I/O only; vcon: MMIO (handshake, notifies) and the one debug-exit OUT
    want_io = want if method.image == "pvcon" else 1
    if out["exits"]["total"] != want or out["exits"]["io"] != want_io:
        raise BenchError(f"{method.key}: {out['exits']} exits, expected {want} ({want_io} port I/O)")
    return out


def bench_console(quick: bool, reps: int, workdir: Path, log) -> tuple[list[Row], dict]:
    rows, raw = [], {}
    uart = Figure("lines/s")
    uart_runs: list[dict] = []
    for method in METHODS:
        title = f"Console line through {method.name} ({method.per_line_text})"
        reference = f"the same line through the {UART.name} ({UART.per_line_text})"
        try:
            fig = Figure("lines/s")
            lines, uart_lines = (method.quick_lines, UART.quick_lines) if quick else (method.lines, UART.lines)
            ref = Figure("lines/s")
            for i in range(reps):
                # alternate the order, so that a drift in the host's speed hits both sides alike
                for who in (("uart", "pv") if i % 2 == 0 else ("pv", "uart")):
                    if who == "uart":
                        out = run_lines(UART, uart_lines, workdir)
                        ref.samples.append(uart_lines / out["run_result_seconds"])
                        uart_runs.append(out)
                    else:
                        out = run_lines(method, lines, workdir)
                        fig.samples.append(lines / out["run_result_seconds"])
            uart.samples += ref.samples
            per_exit_us = 1e6 / (fig.median * method.per_line)
            log(f"  {method.key}: {fig.median:,.0f} lines/s, UART {ref.median:,.0f} lines/s, "
                f"{fig.median / ref.median:.1f}x")
            kib = LINE_LEN / 1024
            rows.append(Row(method.key, title, reference, fig, ref, "lines/s over the UART's",
                            f"{fig.median * kib:,.1f} KiB/s vs {ref.median * kib:,.1f} KiB/s; exits per KiB "
                            f"{_per_kib(method.per_line)} vs {_per_kib(UART.per_line)}; "
                            f"exits per line {method.per_line:g} vs {UART.per_line:g}; "
                            f"{per_exit_us:.1f} µs per exit (guest instructions included), UART "
                            f"{1e6 / (ref.median * UART.exits_per_line):.1f} µs; every run's exit count checked"))
            raw[method.key] = {"lines": lines, "uart_lines": uart_lines, "reps": reps,
                               "kib_per_s": fig.median * LINE_LEN / 1024,
                               "uart_kib_per_s": ref.median * LINE_LEN / 1024,
                               "exits_per_kib": method.per_line * 1024 / LINE_LEN,
                               "hvm": fig.to_json(), "uart": ref.to_json()}
        except BenchError as e:
            log(f"  {method.key}: {e}")
            rows.append(Row(method.key, title, reference, status="error", note=str(e)))
            raw[method.key] = {"error": str(e)}
    if uart.samples:
        raw["uart_all"] = {"median": statistics.median(uart.samples), "runs": len(uart_runs)}
    return rows, raw
