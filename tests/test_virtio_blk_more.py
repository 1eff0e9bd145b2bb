"""virtio-blk (hvm/mmio/virtio/blk.py): the backend behind the transport, driven as Linux's virtio_blk does
(header, data, status byte per request), on a real image file."""
from __future__ import annotations

import hashlib
import os
import struct
from types import SimpleNamespace

import pytest

from conftest import run_hvm, write_yaml
from hvm.memory import MiB, GuestMemory
from hvm.mmio.bus import MmioBus
from hvm.mmio.device import DeviceStateError, IrqLine
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
    fd, capacity = blk.open_image(path, readonly)
    if discard is None:
        discard = not readonly and blk.can_punch_holes(fd, capacity * 512)
    backend = blk.VirtioBlk("virtio-blk0", fd, capacity, readonly=readonly, serial=serial, discard=discard,
                            path=str(path))
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


def test_identity_and_config(dev, memory):
    assert dev.drv.r(vc.MMIO_DEVICE_ID) == vc.VIRTIO_ID_BLOCK == 2
    assert dev.drv.r(vc.MMIO_QUEUE_NUM_MAX) == 256
    feats = dev.drv.device_features()
    for bit in (blk.F_FLUSH, blk.F_SEG_MAX, blk.F_SIZE_MAX, blk.F_BLK_SIZE):
        assert feats >> bit & 1
    assert not feats >> blk.F_RO & 1
    cfg = dev.backend.config()
    assert len(cfg) == 60
    capacity, size_max, seg_max = struct.unpack_from("<QII", cfg)
    assert (capacity, size_max, seg_max) == (SECTORS, 64 << 10, 254)
    assert struct.unpack_from("<I", cfg, 20)[0] == 512
    # the transport reads the config space at 0x100: capacity as two 32-bit reads, as Linux does
    assert dev.drv.r(vc.MMIO_CONFIG) | dev.drv.r(vc.MMIO_CONFIG + 4) << 32 == SECTORS


def test_read(dev, image):
    n, data = request(dev, [header(blk.T_IN, 3)], [1024, 1])
    assert n == 1025 and data[-1] == blk.S_OK
    assert data[:1024] == image.read_bytes()[3 * 512:5 * 512]
    assert dev.backend.stats()["reads"] == 1 and dev.backend.stats()["bytes_read"] == 1024


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


def test_get_id(dev):
    n, data = request(dev, [header(blk.T_GET_ID)], [20, 1])
    assert n == 21 and data == b"hvm-vda" + bytes(13) + bytes([blk.S_OK])


def test_get_id_short_buffer(dev):
    n, data = request(dev, [header(blk.T_GET_ID)], [4, 1])
    assert n == 5 and data == b"hvm-" + bytes([blk.S_OK])


@pytest.mark.parametrize("rtype", [blk.T_WRITE_ZEROES, blk.T_GET_LIFETIME, blk.T_SECURE_ERASE, 2, 99])
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
    assert digest(image) == before and dev.backend.stats()["ioerr"] == 2


def test_wrong_direction_ioerr(dev, image):
    before = digest(image)
    # IN with device-readable data after the header; OUT with device-writable room besides the status
    assert request(dev, [header(blk.T_IN), bytes(512)], [512, 1])[1][-1] == blk.S_IOERR
    assert request(dev, [header(blk.T_OUT), bytes(512)], [512, 1])[1][-1] == blk.S_IOERR
    assert digest(image) == before


def test_readonly_refuses_writes(memory, image):
    before = digest(image)
    d = make(memory, image, readonly=True)
    try:
        assert d.drv.device_features() >> blk.F_RO & 1
        assert not d.drv.device_features() >> blk.F_DISCARD & 1
        assert request(d, [header(blk.T_OUT, 0), b"\xFF" * 512], [1])[1] == bytes([blk.S_IOERR])
        assert request(d, [header(blk.T_DISCARD), struct.pack("<QII", 0, 8, 0)], [1])[1] == bytes([blk.S_UNSUPP])
        assert request(d, [header(blk.T_FLUSH)], [1])[1] == bytes([blk.S_OK])
        n, data = request(d, [header(blk.T_IN, 0)], [512, 1])
        assert data[-1] == blk.S_OK and data[:512] == image.read_bytes()[:512]
    finally:
        d.backend.close()
    assert digest(image) == before
    with pytest.raises(OSError):         # opened O_RDONLY: the fd itself cannot write
        fd, _ = blk.open_image(image, True)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)


def test_discard_punches_a_hole(memory, image):
    fd, _ = blk.open_image(image, False)
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


def test_no_status_byte_needs_reset(dev, image, caplog):
    before = digest(image)
    dev.ring.add([header(blk.T_OUT), bytes(512)], [])
    dev.drv.kick(0)
    assert dev.t.broken and dev.ring.take_used() == []
    assert "virtio-blk0: request 0: no device-writable status byte" in caplog.text
    assert digest(image) == before


def test_short_header_needs_reset(dev, caplog):
    dev.ring.add([b"\x00" * 8], [1])
    dev.drv.kick(0)
    assert dev.t.broken and dev.ring.take_used() == []
    assert "8 device-readable bytes, less than the 16-byte request header" in caplog.text


def test_many_small_buffers_and_indirect(dev, image):
    """A 64 KiB read in 128 buffers of 512 bytes through an indirect table (more iovecs than one descriptor
    table's worth would allow directly)."""
    head = dev.ring.add([header(blk.T_IN, 0)], [512] * 64 + [1], indirect=True)
    dev.drv.kick(0)
    [(h, n)] = dev.ring.take_used()
    data = dev.ring.written(head)
    assert h == head and n == 64 * 512 + 1 and data[-1] == blk.S_OK
    assert data[:-1] == image.read_bytes()


def test_several_requests_one_interrupt(dev):
    heads = [dev.ring.add([header(blk.T_IN, s)], [512, 1]) for s in range(3)]
    dev.drv.kick(0)
    assert [h for h, _ in dev.ring.take_used()] == heads
    assert dev.t.interrupts == 1 and dev.irq.level


def test_capacity_rounds_down(tmp_path):
    p = tmp_path / "odd.img"
    p.write_bytes(bytes(512 * 3 + 100))
    fd, capacity = blk.open_image(p, True)
    os.close(fd)
    assert capacity == 3


@pytest.mark.parametrize("setup,message", [
    (lambda p: p.write_bytes(bytes(511)), "511 bytes, too small for a disk (at least 512 bytes)"),
    (lambda p: p.mkdir(), "is a directory, not a disk image"),
    (lambda p: None, "cannot open read-write (readonly=on for a read-only drive): No such file or directory"),
])
def test_open_errors(tmp_path, setup, message):
    p = tmp_path / "bad.img"
    setup(p)
    with pytest.raises(blk.ImageError) as e:
        blk.open_image(p, False)
    assert str(e.value) == f"{p}: {message}"


def test_save_load(dev):
    assert dev.backend.save() == {"capacity": SECTORS}
    dev.backend.load({"capacity": SECTORS})
    with pytest.raises(DeviceStateError, match="capacity"):
        dev.backend.load({"capacity": SECTORS + 1})
    with pytest.raises(DeviceStateError):
        dev.backend.load({})


def test_close_closes_the_fd(memory, image):
    d = make(memory, image)
    fd = d.backend.fd
    d.t.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_create_attaches_to_the_slot(memory, image):
    bus, closers = MmioBus(), []
    ctx = SimpleNamespace(name="virtio-blk1", index=1, memory=memory, mmio=bus, on_close=closers.append,
                          slot=SimpleNamespace(base=0xD000_1000, size=0x1000, irq=6), irq_line=IrqLine,
                          ioevent=None)
    t = blk.create(ctx, {"file": image, "readonly": False, "format": "raw", "serial": ""})
    try:
        assert bus.read(0xD000_1000 + vc.MMIO_DEVICE_ID, 4) == 2
        assert t.backend.ident == b"hvm-vdb".ljust(20, b"\0")
        assert closers == [t.close]
    finally:
        t.close()


def test_device_declaration():
    dt = blk.DEVICE
    assert dt.name == "virtio-blk" and dt.aliases == ("virtio-blk-device",) and dt.multiple and dt.virtio
    assert [p.name for p in dt.props] == ["file", "readonly", "format", "serial", "ioeventfd"]


# --- configuration: one-line status-2 errors -----------------------------------------------------------
def blk_yaml(tmp_path, devices: str) -> str:
    return str(write_yaml(tmp_path, "name: blk\nmemory: 16M\ntimeout: 10\nmachine: none\n"
                          "boot: {image: hlt.bin, load: 0x100000, mode: protected}\n"
                          f"devices: {{serial: none, {devices}}}\n", "blk.yaml"))


@pytest.fixture
def hlt(tmp_path):
    (tmp_path / "hlt.bin").write_bytes(b"\xF4")


@pytest.mark.parametrize("make_file,expect", [
    (lambda p: p.write_bytes(bytes(100)), "100 bytes, too small for a disk (at least 512 bytes)"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: None, "not found"),
])
def test_config_errors(tmp_path, hlt, make_file, expect):
    make_file(tmp_path / "d.img")
    run = run_hvm("run", blk_yaml(tmp_path, "virtio-blk: [{file: d.img}]"))
    assert run.status == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "virtio-blk" in lines[0] and expect in lines[0], run.stderr


def test_config_serial_too_long(tmp_path, hlt):
    (tmp_path / "d.img").write_bytes(bytes(4096))
    run = run_hvm("run", blk_yaml(tmp_path, "virtio-blk: [{file: d.img, serial: '123456789012345678901'}]"))
    assert run.status == 2 and "at most 20 ASCII characters" in run.stderr, run.stderr


# --- --drive and hvm-qemu's -drive ------------------------------------------------------------------------
@pytest.mark.parametrize("drive,message", [
    ("format=raw", "--drive: a drive needs file=PATH (a raw disk image)"),
    ("file=d.img,format=qcow2", "--drive: format: 'qcow2' is not one of: raw"),
    ("file=d.img,readonly=maybe", "--drive: readonly: expected on or off, got a string ('maybe')"),
    ("file=d.img,if=ide", "--drive: if=ide: hvm's disks are virtio-blk (if=virtio/none)"),
    ("file=d.img,cache=none", "--drive: 'cache' is not an option of a drive (file, format=raw, readonly, serial, "
                              "if=virtio, id)"),
    ("file=small.img", "--drive: {dir}/small.img: 100 bytes, too small for a disk (at least 512 bytes)"),
])
def test_drive_flag_errors(tmp_path, drive, message):
    (tmp_path / "d.img").write_bytes(bytes(4096))
    (tmp_path / "small.img").write_bytes(bytes(100))
    (tmp_path / "hlt.bin").write_bytes(b"\xF4")
    # absolute paths: run_hvm runs this worktree's hvm from its root
    drive = drive.replace("=d.img", f"={tmp_path}/d.img").replace("=small.img", f"={tmp_path}/small.img")
    run = run_hvm("run", blk_yaml(tmp_path, "debug_exit: true"), "--drive", drive)
    assert run.status == 2, run.stderr
    assert run.stderr == f"hvm: {message.format(dir=tmp_path)}\n"


def test_drive_flags_become_device_entries(tmp_path):
    """--drive flags -> devices.virtio-blk entries, in flag order, QEMU's if= and id= dropped."""
    import argparse

    from hvm import cli

    over = cli.overrides_from_args(argparse.Namespace(
        memory=None, vcpus=None, timeout=None, machine=None, no_pit=False, qmp=None, device=[], netdev=[],
        serial=None, drive=[f"file={tmp_path}/b.img,if=virtio,id=x", f"file={tmp_path}/c.img,readonly=on"]))
    assert over == {"devices": {"virtio-blk": [{"file": f"{tmp_path}/b.img"},
                                               {"file": f"{tmp_path}/c.img", "readonly": "on"}]}}


def test_qemu_shim_drive_spellings():
    from hvm.qemu_shim import ShimError, translate

    argv = translate(["-kernel", "k", "-drive", "file=d.img,if=virtio,format=raw,readonly=on"])
    assert argv[-2:] == ["--drive", "file=d.img,format=raw,readonly=on"]
    argv = translate(["-drive", "id=d0,file=d.img,if=none", "-device", "virtio-blk-device,drive=d0,serial=abc"])
    assert argv[-2:] == ["--drive", "file=d.img,serial=abc"]
    for bad, message in [
            (["-drive", "file=x"], "-drive if=ide: hvm's disks are virtio-blk (if=virtio, or if=none with "
                                   "-device virtio-blk-device,drive=ID)"),
            (["-device", "virtio-blk-device,drive=zz"], "-device virtio-blk-device: drive=zz names no -drive "
                                                        "if=none,id=..."),
            (["-drive", "file=x,if=none"], "-drive if=none needs id=NAME (for -device virtio-blk-device,drive=NAME)"),
            (["-drive", "id=a,file=x,if=none", "-device", "virtio-blk-device,drive=a,scsi=on"],
             "-device virtio-blk-device: scsi: not an option hvm has (drive, serial)")]:
        with pytest.raises(ShimError) as e:
            translate(bad)
        assert str(e.value) == message


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
