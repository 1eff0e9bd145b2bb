"""virtio-blk throughput: firmware/vblk (a virtio-blk driver in firmware, mode 1) reads a disk image
sequentially in 4 KiB or 64 KiB requests, one request per QueueNotify, each polled to completion. The same
image file and the same guest (its one header field that differs: the device's address) run under hvm
(`hvm run`, multiboot --kernel, machine pc) and under QEMU `-M microvm` (-kernel, its virtio-mmio
transport in modern mode), side by side; and under hvm with the device's ioeventfd on and off.

Figure: MiB/s from two runs of each VMM, a short one (SHORT requests) and a long one (SHORT + n): the
extra bytes over the extra wall time, so start-up (Python's imports, QEMU's machine) and the guest's
handshake cancel out and what remains is the per-request path. Every run must end with the debug-exit
status 1 and "vblk: done" on the serial line."""
from __future__ import annotations

import os
import re
import struct
import sys
from pathlib import Path

from bench.common import FIRMWARE, QEMU, BenchError, Figure, Row, have_qemu, run_measured

IMAGE = FIRMWARE / "vblk.bin"
HVM_BASE = 0xD000_0000         # hvm's first virtio-mmio slot (the image's built value)
SCAN = 0                       # base 0: the firmware scans QEMU microvm's transports for a virtio-blk
OFF_ITERATIONS, OFF_BASE, OFF_MODE, OFF_SECTORS, OFF_KIB, OFF_WSECTOR, OFF_WCOUNT = 4, 8, 12, 16, 20, 24, 28
BUILT = (1000, HVM_BASE, 0, 128, 4, 128, 16)     # the header as built, checked before patching
DISK_BYTES = 16 << 20
SHORT = 100                    # requests of the short run
SETUP_MMIO = 29                # firmware/vblk mode 1: the handshake's and the capacity's MMIO accesses
FULL_EXTRA, QUICK_EXTRA = 10000, 1000     # extra requests of the long run
FULL_REPS, QUICK_REPS = 5, 1
RUN_TIMEOUT = 90.0
GUEST_TIMEOUT = 60
DONE = "vblk: done"
# `python -m hvm` from the checkout (run_measured's cwd): the hvm of this tree, wherever the venv's script points
HVM = [sys.executable, "-m", "hvm"]
QEMU_ARGS = [QEMU, "-M", "microvm", "-accel", "kvm", "-m", "64M", "-nodefaults", "-no-user-config",
             "-display", "none", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
             "-global", "virtio-mmio.force-legacy=false"]


def vblk_image(out: Path, *, mode: int = 0, base: int = HVM_BASE, iterations: int | None = None,
               sectors: int | None = None, kib: int | None = None, wsector: int | None = None,
               wcount: int | None = None) -> Path:
    """firmware/vblk.bin with its header fields set (None: as built); checks the layout first."""
    data = bytearray(IMAGE.read_bytes())
    if data[0] != 0xEB or struct.unpack_from("<7I", data, 4) != BUILT:
        raise BenchError(f"{IMAGE}: not the expected vblk header (jmp, then {BUILT} at +4)")
    for off, value in ((OFF_ITERATIONS, iterations), (OFF_BASE, base), (OFF_MODE, mode), (OFF_SECTORS, sectors),
                       (OFF_KIB, kib), (OFF_WSECTOR, wsector), (OFF_WCOUNT, wcount)):
        if value is not None:
            struct.pack_into("<I", data, off, value)
    out.write_bytes(bytes(data))
    return out


def checksum(data: bytes) -> int:
    """firmware/vblk's checksum: h = rol(h, 5) + d over the little-endian dwords."""
    h = 0
    for (d,) in struct.iter_unpack("<I", data):
        h = ((((h << 5) | (h >> 27)) & 0xFFFFFFFF) + d) & 0xFFFFFFFF
    return h


def pattern(first_sector: int, count: int) -> bytes:
    """What mode 0 writes to sectors [first_sector, first_sector + count): dword o/4 is 0xb10c0000 ^ (o/4)."""
    first = first_sector * 128
    return struct.pack(f"<{count * 128}I", *((0xB10C0000 ^ i) for i in range(first, first + count * 128)))


def hvm_yaml(path: Path, kernel: Path, disk: Path, ioeventfd: bool | None = None, timeout: int = GUEST_TIMEOUT) -> Path:
    """hvm: the image as a multiboot kernel (machine pc), the disk as virtio-blk, the UART on stdout."""
    props = f"{{file: '{disk}'" + ("" if ioeventfd is None else f", ioeventfd: {str(ioeventfd).lower()}") + "}"
    path.write_text(f"name: vblk\nmemory: 64M\ntimeout: {timeout}\nboot: {{kernel: '{kernel}'}}\n"
                    f"devices: {{serial: {{output: stdio, input: none}}, virtio-blk: [{props}]}}\n")
    return path


def qemu_argv(kernel: Path, disk: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return QEMU_ARGS + list(extra) + ["-drive", f"id=d0,file={disk},format=raw,if=none",
                                      "-device", "virtio-blk-device,drive=d0", "-kernel", str(kernel)]


def hvm_has_blk() -> bool:
    from hvm.mmio import registry
    return registry.lookup("virtio-blk") is not None


def ioeventfd_default() -> bool:
    """What a user gets: the virtio-blk declaration's default for its ioeventfd property."""
    from hvm.mmio import registry
    props = {p.name: p for p in registry.lookup("virtio-blk").props}
    return bool(props["ioeventfd"].default) if "ioeventfd" in props else False


def _run(who: str, argv: list[str], mmio_exits: int | None = None) -> float:
    """One run: its wall time. mmio_exits: the MMIO exits hvm's --stats must report (hvm runs only)."""
    res = run_measured(argv, RUN_TIMEOUT)
    if res.timed_out or res.status != 1 or DONE not in res.stdout:
        raise BenchError(f"{who}: status {res.status}{' (timed out)' if res.timed_out else ''}, "
                         f"output {res.stdout.strip()[-80:]!r}; {res.stderr.strip()[-200:]}")
    if mmio_exits is not None:
        m = re.search(r"^\s+MMIO\s+(\d+)$", res.stderr, re.M)
        if m is None or int(m.group(1)) != mmio_exits:
            raise BenchError(f"{who}: {m.group(1) if m else 'no'} MMIO exits, expected {mmio_exits}")
    return res.seconds


def bench_vblk(quick: bool, workdir: Path, log) -> tuple[list[Row], dict]:
    extra, reps = (QUICK_EXTRA, QUICK_REPS) if quick else (FULL_EXTRA, FULL_REPS)
    disk = workdir / "vblk-disk.raw"
    disk.write_bytes(os.urandom(DISK_BYTES))
    rows, raw = [], {"disk_bytes": DISK_BYTES, "short": SHORT, "extra": extra, "reps": reps}
    for kib in (4, 64):
        key = f"virtio_blk.seq{kib}k"
        title = (f"virtio-blk sequential reads, {kib} KiB per request (firmware/vblk: one request per "
                 "QueueNotify, polled; 16 MiB raw image)")
        ref_name = "QEMU microvm, same image and guest (virtio-mmio, force-legacy=false)"
        io_key, io_title = f"{key}_ioeventfd", f"virtio-blk {kib} KiB reads under hvm: device ioeventfd on vs off"
        if not hvm_has_blk():
            rows += [Row(key, title, ref_name, status="skipped", note="this hvm has no virtio-blk device"),
                     Row(io_key, io_title, "ioeventfd off", status="skipped", note="no virtio-blk device")]
            continue
        try:
            argvs: dict[str, tuple[list[str], list[str]]] = {}
            mmio: dict[tuple[str, bool], int] = {}      # hvm: (name, long run) -> MMIO exits expected
            for n, label in ((SHORT, "short"), (SHORT + extra, "long")):
                hk = vblk_image(workdir / f"vblk-{kib}-{label}-hvm.bin", mode=1, iterations=n, kib=kib)
                for ioe in (True, False):
                    y = hvm_yaml(workdir / f"vblk-{kib}-{label}-{ioe}.yaml", hk, disk, ioeventfd=ioe)
                    name = f"hvm_ioeventfd_{'on' if ioe else 'off'}"
                    argvs.setdefault(name, ([], []))[label == "long"].extend(HVM + ["run", str(y), "--stats"])
                    # a QueueNotify exit per request, none with the ioeventfd (the kernel signals it)
                    mmio[name, label == "long"] = SETUP_MMIO + (0 if ioe else n)
                if have_qemu():
                    qk = vblk_image(workdir / f"vblk-{kib}-{label}-qemu.bin", mode=1, base=SCAN, iterations=n, kib=kib)
                    argvs.setdefault("qemu", ([], []))[label == "long"].extend(qemu_argv(qk, disk))
                    # QEMU's transport with its ioeventfd off too (on is its default under KVM), for comparison
                    argvs.setdefault("qemu_ioeventfd_off", ([], []))[label == "long"].extend(
                        qemu_argv(qk, disk, ("-global", "virtio-mmio.ioeventfd=off")))
            figs = {name: Figure("MiB/s") for name in argvs}
            names = list(argvs)
            for i in range(reps):
                # alternate the order, so that a drift in the host's speed hits every side alike
                for name in (names if i % 2 == 0 else names[::-1]):
                    short_argv, long_argv = argvs[name]
                    t_short = _run(f"{key} {name} short", short_argv, mmio.get((name, False)))
                    t_long = _run(f"{key} {name} long", long_argv, mmio.get((name, True)))
                    if t_long <= t_short:
                        raise BenchError(f"{key} {name}: the long run ({t_long:.3f} s) was not longer than the "
                                         f"short one ({t_short:.3f} s)")
                    figs[name].samples.append(extra * kib / 1024 / (t_long - t_short))
            on, off = figs["hvm_ioeventfd_on"], figs["hvm_ioeventfd_off"]
            us = {name: 1e6 * kib / 1024 / f.median for name, f in figs.items()}   # µs per request
            per_req = ", ".join(f"{name} {v:.0f} µs" for name, v in us.items())
            default = ioeventfd_default()
            best = on if default else off
            which = "on" if default else "off"
            log(f"  {key}: " + ", ".join(f"{n} {f.median:.1f} MiB/s" for n, f in figs.items()))
            raw[key] = {name: f.to_json() for name, f in figs.items()} | {"us_per_request": us}
            if "qemu" in figs:
                rows.append(Row(key, title, ref_name, best, figs["qemu"], "hvm/QEMU MiB/s",
                                f"hvm with ioeventfd {which} (virtio-blk's default); per request: {per_req}; "
                                "exits per request (hvm's counted by --stats in every run): hvm "
                                + ("0 (the ioeventfd)" if default else "1 MMIO exit (QueueNotify, served in the exit)")
                                + "; QEMU's default, ioeventfd on: 0 to QEMU (the kernel signals an eventfd; its "
                                "main loop serves the queue, a worker thread reads)"))
            else:
                rows.append(Row(key, title, ref_name, best, status="skipped", note=f"{QEMU} not found"))
            qemu_io = ""
            if "qemu_ioeventfd_off" in figs:
                q_on, q_off = figs["qemu"].median, figs["qemu_ioeventfd_off"].median
                qemu_io = (f"; QEMU's transport, same runs: on {q_on:,.1f} MiB/s, off {q_off:,.1f} MiB/s "
                           f"(on/off {q_on / q_off:.2f})")
            rows.append(Row(io_key, io_title, "hvm, same run, ioeventfd off", on, off, "on/off MiB/s",
                            "on: the QueueNotify write signals an eventfd in the kernel (no exit to hvm), hvm's "
                            "ioevent thread serves the queue while the vCPU polls; off: served in the MMIO exit"
                            + qemu_io))
        except BenchError as e:
            log(f"  {key}: {e}")
            rows += [Row(key, title, ref_name, status="error", note=str(e)),
                     Row(io_key, io_title, "ioeventfd off", status="error", note=str(e))]
            raw[key] = {"error": str(e)}
    return rows, raw
