"""firmware/vblk, a virtio-blk driver of our own, under hvm's virtio-blk and under QEMU's `-M microvm`
virtio-mmio transport: it reads sectors and prints a checksum the test computes from the image on the host,
writes a pattern, flushes, reads it back; the pattern must then be in the image file, byte for byte, and
nothing else changed. The same image boots both ways (a flat image with a multiboot a.out-kludge header)."""
from __future__ import annotations

import random
import re
import shutil
import subprocess
import sys

import pytest

from bench.vblk import HVM_BASE, QEMU_ARGS, SCAN, checksum, hvm_yaml, pattern, qemu_argv, vblk_image
from conftest import ROOT, run_hvm
from hvm.mmio import registry

QEMU_BIN = "qemu-system-x86_64"
DISK = 1 << 20              # 2048 sectors
SECTORS, WSECTOR, WCOUNT = 128, 128, 16     # the image's built values: read [0, 128), write [128, 144)

needs_blk = pytest.mark.skipif(registry.lookup("virtio-blk") is None,
                               reason="this hvm has no virtio-blk device (hvm/mmio/virtio/blk.py)")
needs_qemu = pytest.mark.skipif(shutil.which(QEMU_BIN) is None,
                                reason=f"{QEMU_BIN} is not installed (make bench-qemu installs it)")


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(random.Random(13).randbytes(DISK))
    return path


def expected_output(original: bytes) -> bytes:
    return f"vblk: sum 0x{checksum(original[:SECTORS * 512]):08x}\nvblk: ok\n".encode()


def assert_pattern_written(disk, original: bytes) -> None:
    after = disk.read_bytes()
    lo, hi = WSECTOR * 512, (WSECTOR + WCOUNT) * 512
    assert len(after) == len(original)
    assert after[lo:hi] == pattern(WSECTOR, WCOUNT)
    assert after[:lo] == original[:lo] and after[hi:] == original[hi:]      # nothing else written


def stats_counters(stderr: str) -> dict[str, int]:
    m = re.search(r"^device virtio-blk0: (.*)$", stderr, re.M)
    assert m, stderr
    words = m.group(1).split()
    return {k: int(v) for k, v in zip(words[::2], words[1::2])}


def test_checksum_and_pattern_helpers():
    # the host side of the contract, against values worked out by hand
    assert checksum(b"\x01\x00\x00\x00\x02\x00\x00\x00") == (1 << 5) + 2
    assert checksum(b"\x00\x00\x00\x80\x00\x00\x00\x00") == 0x10        # rol carries the top bit round
    assert pattern(1, 1)[:8] == bytes.fromhex("80 00 0c b1 81 00 0c b1")
    assert len(pattern(128, 16)) == 16 * 512


# --- under hvm ---------------------------------------------------------------------------------------------
@needs_blk
@pytest.mark.parametrize("ioeventfd", [False, True])
def test_hvm_read_write_flush_checksum(tmp_path, disk, ioeventfd):
    original = disk.read_bytes()
    kernel = vblk_image(tmp_path / "vblk.bin")
    yaml = hvm_yaml(tmp_path / "vm.yaml", kernel, disk, ioeventfd=ioeventfd, timeout=20)
    run = run_hvm("run", str(yaml), "--stats")
    assert run.status == 1, run.stderr                  # debug-exit 0: every request OK, read-back equal
    assert run.stdout == expected_output(original)
    assert_pattern_written(disk, original)
    # one read of 64 KiB, the write, the flush, the read-back: one notify each
    assert stats_counters(run.stderr)["notifications"] == 4


@needs_blk
def test_hvm_from_the_drive_flag(tmp_path, disk):
    original = disk.read_bytes()
    kernel = vblk_image(tmp_path / "vblk.bin")
    run = run_hvm("run", "--kernel", str(kernel), "--drive", f"file={disk},format=raw", "--timeout", "20")
    assert run.status == 1, run.stderr
    assert run.stdout == expected_output(original)
    assert_pattern_written(disk, original)


@needs_blk
def test_hvm_readonly_disk_refuses_the_write(tmp_path, disk):
    original = disk.read_bytes()
    kernel = vblk_image(tmp_path / "vblk.bin")
    yaml = tmp_path / "vm.yaml"
    yaml.write_text(f"name: vblk\nmemory: 64M\ntimeout: 20\nboot: {{kernel: '{kernel}'}}\n"
                    f"devices: {{serial: {{output: stdio, input: none}}, "
                    f"virtio-blk: [{{file: '{disk}', readonly: true}}]}}\n")
    run = run_hvm("run", str(yaml))
    assert run.status == 9, run.stderr                  # debug-exit 4: the write's status was not OK
    assert run.stdout == expected_output(original)[:len("vblk: sum 0x00000000\n")]   # the reads worked
    assert disk.read_bytes() == original


@needs_blk
def test_hvm_disk_smaller_than_the_header_says(tmp_path):
    small = tmp_path / "small.raw"
    small.write_bytes(bytes(64 << 10))                  # 128 sectors: the write range [128, 144) is past the end
    kernel = vblk_image(tmp_path / "vblk.bin")
    run = run_hvm("run", str(hvm_yaml(tmp_path / "vm.yaml", kernel, small, timeout=20)))
    assert run.status == 13, run.stderr                 # debug-exit 6, before any request
    assert run.stdout == b""
    assert small.read_bytes() == bytes(64 << 10)


@needs_blk
def test_hvm_throughput_mode_wraps_round_the_disk(tmp_path, disk):
    # 40 reads of 64 KiB over a 1 MiB disk: sector 0 again after every 16 requests
    kernel = vblk_image(tmp_path / "vblk.bin", mode=1, iterations=40, kib=64)
    run = run_hvm("run", str(hvm_yaml(tmp_path / "vm.yaml", kernel, disk, ioeventfd=False, timeout=20)), "--stats")
    assert run.status == 1, run.stderr
    assert run.stdout == b"vblk: done\n"
    assert stats_counters(run.stderr)["notifications"] == 40


@needs_blk
def test_hvm_scan_finds_the_device(tmp_path, disk):
    # base 0: microvm's transport addresses first (nothing there under hvm: all-ones reads), then hvm's slots
    original = disk.read_bytes()
    kernel = vblk_image(tmp_path / "vblk.bin", base=SCAN)
    run = run_hvm("run", str(hvm_yaml(tmp_path / "vm.yaml", kernel, disk, timeout=20)))
    assert run.status == 1, run.stderr
    assert run.stdout == expected_output(original)


@needs_blk
def test_hvm_qemu_runs_the_qemu_command_line(tmp_path, disk):
    """hvm-qemu (hvm/qemu_shim.py) with QEMU's own spelling of the disk and the debug-exit device; the shim
    has no `-M microvm` and no `-no-user-config`, so those two are left out of QEMU's command line."""
    original = disk.read_bytes()
    kernel = vblk_image(tmp_path / "vblk.bin", base=SCAN)
    argv = [a for a in qemu_argv(kernel, disk)[1:] if a not in ("-M", "microvm", "-no-user-config")]
    proc = subprocess.run([sys.executable, "-m", "hvm.qemu_shim", *argv], cwd=ROOT, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=30)
    assert proc.returncode == 1, proc.stderr.decode(errors="replace")
    assert proc.stdout == expected_output(original)
    assert_pattern_written(disk, original)


def test_hvm_without_the_device(tmp_path):
    kernel = vblk_image(tmp_path / "vblk.bin")
    run = run_hvm("run", "--kernel", str(kernel), "--timeout", "20")
    assert run.status == 3, run.stderr                  # debug-exit 1: all-ones reads, no virtio-blk at the base
    assert run.stdout == b""


# --- under QEMU microvm --------------------------------------------------------------------------------------
def run_qemu(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=30)


# microvm (with its second I/O APIC, as under KVM) has 24 virtio-mmio transports, 0x200 apart from
# 0xfeb00000, and plugs the first virtio device into the last one
MICROVM_FIRST_DEVICE = 0xFEB0_0000 + 23 * 0x200


@needs_qemu
@pytest.mark.parametrize("base", [SCAN, MICROVM_FIRST_DEVICE], ids=["scan", "fixed"])
def test_qemu_microvm_same_checksum(tmp_path, disk, base):
    """The same image and guest as under hvm, only its base field differs: 0 (the firmware scans microvm's
    transports) or the transport's address."""
    original = disk.read_bytes()
    kernel = vblk_image(tmp_path / "vblk.bin", base=base)
    proc = run_qemu(qemu_argv(kernel, disk))
    assert proc.returncode == 1, proc.stderr.decode(errors="replace")
    assert proc.stdout == expected_output(original)
    assert_pattern_written(disk, original)


@needs_qemu
def test_qemu_microvm_throughput_mode(tmp_path, disk):
    kernel = vblk_image(tmp_path / "vblk.bin", mode=1, base=SCAN, iterations=40, kib=64)
    proc = run_qemu(qemu_argv(kernel, disk))
    assert proc.returncode == 1, proc.stderr.decode(errors="replace")
    assert proc.stdout == b"vblk: done\n"


@needs_qemu
def test_qemu_microvm_without_the_device(tmp_path):
    kernel = vblk_image(tmp_path / "vblk.bin", base=SCAN)
    proc = run_qemu(QEMU_ARGS + ["-kernel", str(kernel)])
    assert proc.returncode == 3, proc.stderr.decode(errors="replace")     # the scan found nothing


def test_image_header_as_built():
    # the harness patches fixed offsets; the built values are the ones this file's constants assume
    import struct

    from bench.vblk import BUILT, IMAGE
    data = IMAGE.read_bytes()
    assert struct.unpack_from("<7I", data, 4) == BUILT
    assert BUILT[1] == HVM_BASE and BUILT[3:] == (SECTORS, 4, WSECTOR, WCOUNT)
    assert struct.unpack_from("<3I", data, 32)[:2] == (0x1BADB002, 0x00010000)    # the multiboot header
