"""virtio-blk (hvm/mmio/virtio/blk.py): cases beside tests/test_virtio_blk.py: chain shapes Linux does not
make (the status byte in the data buffer, header and data in one buffer), discard's edge cases (UNMAP flag,
two segments, past the end), the IOERR cases with a hash of the image before and after, and a completed,
flushed write that must be in the image after SIGKILL of the process."""
from __future__ import annotations

import hashlib
import os
import struct
from types import SimpleNamespace

import pytest

from hvm.memory import MiB, GuestMemory
from hvm.mmio.device import IrqLine
from hvm.mmio.virtio import VirtioMmio
from hvm.mmio.virtio import blk
from hvm.mmio.virtio import constants as vc
from virtio_driver import GuestDriver

SECTORS = 64


def header(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def memory():
    with GuestMemory(16 * MiB) as mem:
        yield mem


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes((i * 7 + i // 512) & 0xFF for i in range(SECTORS * 512)))
    return p


def make(memory, path, readonly=False, discard=None, serial="hvm-vda"):
    fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    backend = blk.VirtioBlk(memory, fd, os.path.getsize(path), readonly, serial, "virtio-blk0", discard=discard)
    irq = IrqLine(5)
    t = VirtioMmio(memory, irq, backend)
    drv = GuestDriver(t, memory)
    [ring] = drv.start(1)
    return SimpleNamespace(backend=backend, t=t, irq=irq, drv=drv, ring=ring)


@pytest.fixture
def dev(memory, image):
    d = make(memory, image)
    yield d
    d.backend.close()


def request(d, out=(), in_lens=()):
    """Make one chain available, notify, return (used len, writable bytes)."""
    head = d.ring.add(list(out), list(in_lens))
    d.drv.kick(0)
    [(got_head, length)] = d.ring.take_used()
    assert got_head == head
    return length, d.ring.written(head)


def test_read_scattered_buffers_and_status_in_the_data_buffer(dev, image):
    # data split over three buffers of odd sizes; the status shares the last one (no framing assumed)
    n, data = request(dev, [header(blk.T_IN, 1)], [100, 412, 513])
    assert n == 1025 and data[-1] == blk.S_OK and data[:1024] == image.read_bytes()[512:1536]


def test_write_then_flush(dev, image):
    payload = os.urandom(2048)
    n, data = request(dev, [header(blk.T_OUT, 10), payload[:1000], payload[1000:]], [1])
    assert (n, data) == (1, bytes([blk.S_OK]))
    assert image.read_bytes()[10 * 512:14 * 512] == payload
    n, data = request(dev, [header(blk.T_FLUSH)], [1])
    assert data == bytes([blk.S_OK]) and dev.backend.stats()["flushes"] == 1


def test_header_and_data_in_one_buffer(dev, image):
    payload = b"\xAB" * 512
    n, data = request(dev, [header(blk.T_OUT, SECTORS - 1) + payload], [1])
    assert data == bytes([blk.S_OK]) and image.read_bytes()[-512:] == payload


def test_get_id_short_buffer(dev):
    n, data = request(dev, [header(blk.T_GET_ID)], [4, 1])
    assert n == 5 and data == b"hvm-" + bytes([blk.S_OK])


@pytest.mark.parametrize("rtype", [13, 10, 14, 2, 99])    # WRITE_ZEROES, GET_LIFETIME, SECURE_ERASE, ...
def test_unsupported_types(dev, image, rtype):
    before = digest(image)
    n, data = request(dev, [header(rtype), bytes(16)], [1])
    assert data == bytes([blk.S_UNSUPP]) and digest(image) == before


@pytest.mark.parametrize("sector,length", [(SECTORS, 512), (SECTORS - 1, 1024), (2**64 - 1, 512), (0, 100),
                                           (0, 513)])
def test_out_of_range_or_partial_sectors_ioerr(dev, image, sector, length):
    before = digest(image)
    n, data = request(dev, [header(blk.T_OUT, sector), bytes(length)], [1])
    assert data == bytes([blk.S_IOERR])
    n, data = request(dev, [header(blk.T_IN, sector)], [length, 1])
    assert n == 1 and data[-1] == blk.S_IOERR and data[:-1] == bytes(length)   # nothing read into RAM
    assert digest(image) == before and dev.backend.stats()["ioerrs"] == 2


def test_readonly_refuses_writes(memory, image):
    before = digest(image)
    d = make(memory, image, readonly=True)
    try:
        assert d.drv.device_features() >> blk.F_RO & 1
        assert not d.drv.device_features() >> blk.F_DISCARD & 1
        assert request(d, [header(blk.T_OUT, 0), b"\xFF" * 512], [1])[1] == bytes([blk.S_IOERR])
        assert request(d, [header(blk.T_DISCARD), struct.pack("<QII", 0, 8, 0)], [1])[1] == bytes([blk.S_IOERR])
        assert request(d, [header(blk.T_FLUSH)], [1])[1] == bytes([blk.S_OK])
        n, data = request(d, [header(blk.T_IN, 0)], [512, 1])
        assert data[-1] == blk.S_OK and data[:512] == image.read_bytes()[:512]
    finally:
        d.backend.close()
    assert digest(image) == before


def test_discard_punches_a_hole(memory, image):
    fd = os.open(image, os.O_RDWR)
    supported = blk.can_punch_holes(fd, SECTORS * 512)
    os.close(fd)
    if not supported:
        pytest.skip(f"the file system of {image.parent} has no fallocate(PUNCH_HOLE)")
    d = make(memory, image)
    try:
        assert d.drv.device_features() >> blk.F_DISCARD & 1
        max_sectors, max_seg, align = struct.unpack_from("<III", d.backend.config(), 36)
        assert (max_seg, align) == (1, 8) and max_sectors > 0
        original = image.read_bytes()
        assert request(d, [header(blk.T_DISCARD), struct.pack("<QII", 8, 16, 0)], [1])[1] == bytes([blk.S_OK])
        now = image.read_bytes()
        assert now[8 * 512:24 * 512] == bytes(16 * 512)
        assert now[:8 * 512] == original[:8 * 512] and now[24 * 512:] == original[24 * 512:]
        assert len(now) == len(original)
        # past the end: IOERR, unchanged; the unmap flag: UNSUPP; two segments (max 1): IOERR
        assert request(d, [header(blk.T_DISCARD), struct.pack("<QII", 60, 8, 0)], [1])[1] == bytes([blk.S_IOERR])
        assert request(d, [header(blk.T_DISCARD), struct.pack("<QII", 0, 8, 1)], [1])[1] == bytes([blk.S_UNSUPP])
        two = struct.pack("<QII", 0, 8, 0) * 2
        assert request(d, [header(blk.T_DISCARD), two], [1])[1] == bytes([blk.S_IOERR])
        assert image.read_bytes() == now
    finally:
        d.backend.close()


def test_several_requests_one_interrupt(dev):
    heads = [dev.ring.add([header(blk.T_IN, s)], [512, 1]) for s in range(3)]
    dev.drv.kick(0)
    assert [h for h, _ in dev.ring.take_used()] == heads
    assert dev.t.interrupts == 1 and dev.irq.level


# --- durability: a completed, flushed write is in the file after SIGKILL of the hvm process ---------------
KILL_SCRIPT = r'''
import os, struct, sys, time
sys.path.insert(0, "tests")
from hvm import Machine
from hvm.config import parse_spec
from hvm.console import Console
from hvm.mmio.virtio import blk
from virtio_driver import GuestDriver

image, hlt = sys.argv[1], sys.argv[2]
spec = parse_spec({"memory": "16M", "timeout": 30, "machine": "none",
                   "boot": {"image": hlt, "load": 0x100000, "mode": "protected"},
                   "devices": {"serial": "none", "virtio-blk": [{"file": image}]}})
with Machine(spec, console=Console("none", "none")) as m:
    t = m.mmio.find(0xD000_0000).device
    drv = GuestDriver(t, m.memory)
    [ring] = drv.start(1)
    payload = bytes(range(256)) * 16
    ring.add([struct.pack("<IIQ", blk.T_OUT, 0, 8), payload], [1])
    ring.add([struct.pack("<IIQ", blk.T_FLUSH, 0, 0)], [1])
    drv.kick(0)
    used = ring.take_used()
    assert [ring.written(h) for h, _ in used] == [b"\0", b"\0"], used
    assert t.backend.stats()["flushes"] == 1
    print("flushed", flush=True)
    time.sleep(60)
'''


def test_flushed_write_survives_sigkill(tmp_path):
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * 512))
    (tmp_path / "hlt.bin").write_bytes(b"\xF4")
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(image), str(tmp_path / "hlt.bin")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        assert line == b"flushed\n", proc.stderr.read(4000) if proc.poll() is not None else line
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    data = image.read_bytes()
    assert data[8 * 512:16 * 512] == bytes(range(256)) * 16
    assert data[:8 * 512] == bytes(8 * 512) and data[16 * 512:] == bytes(48 * 512)
