"""virtio-blk (hvm/mmio/virtio/blk.py): the backend behind the transport, driven by tests/virtio_driver.py as
Linux's virtio_blk drives it (a readable 16-byte header, data buffers, a writable status byte) and with chain
shapes Linux does not make; durability after SIGKILL; its config errors; --drive and hvm-qemu's -drive.
Linux's own driver and ext4 are in test_virtio_blk_linux.py (slow)."""
from __future__ import annotations

import hashlib
import os
import struct

import pytest

from conftest import ROOT, run_hvm
from hvm.cli import build_parser, spec_from_args
from hvm.config import ConfigError, parse_devices
from hvm.mmio.virtio import blk
from hvm.mmio.virtio import constants as vc
from hvm.qemu_shim import ShimError, translate
from virtio_driver import make_rig, memory  # noqa: F401 (memory: the fixture)

SECTORS = 64


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes((i * 7 + i // 512) & 0xFF for i in range(SECTORS * 512)))
    return path


def make(memory, path, readonly=False, serial="", discard=None, size=None):
    fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    backend = blk.VirtioBlk(memory, fd, os.path.getsize(path) if size is None else size, readonly, serial,
                            "virtio-blk0", discard=discard)
    return make_rig(memory, backend)


@pytest.fixture
def dev(memory, image):
    d = make(memory, image)
    yield d
    d.t.close()


def header(kind, sector=0):
    return struct.pack("<IIQ", kind, 0, sector)


def request(d, kind, sector=0, data=(), in_len=0):
    """One request: header (+ data out), then `in_len` writable bytes and the status byte. Returns
    (status, used length, the bytes the device wrote before the status)."""
    head = d.ring.add(out=[header(kind, sector), *data], in_lens=[in_len, 1] if in_len else [1])
    d.drv.kick(0)
    [(used_head, used_len)] = d.ring.take_used()
    assert used_head == head
    written = d.ring.written(head)
    return written[-1], used_len, written[:-1]


def test_identity_features_and_config(dev, image):
    assert dev.drv.r(vc.MMIO_DEVICE_ID) == vc.VIRTIO_ID_BLOCK == 2
    assert dev.drv.r(vc.MMIO_QUEUE_NUM_MAX) == 256
    features = dev.drv.device_features()
    for bit in (blk.F_SIZE_MAX, blk.F_SEG_MAX, blk.F_BLK_SIZE, blk.F_FLUSH):
        assert features >> bit & 1
    assert not features >> blk.F_RO & 1
    config = dev.backend.config()
    capacity, size_max, seg_max = struct.unpack_from("<QII", config)
    assert (capacity, size_max, seg_max) == (SECTORS, 64 << 10, 254)
    assert struct.unpack_from("<I", config, 20)[0] == 512                       # blk_size
    assert dev.drv.r(vc.MMIO_CONFIG) == SECTORS                                 # through the transport
    if dev.backend.discard:
        assert features >> blk.F_DISCARD & 1
        assert struct.unpack_from("<III", config, 36) == (32768, 1, 8)


def test_capacity_rounds_a_partial_sector_down(memory, tmp_path):
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(3 * 512 + 100))
    d = make(memory, path)
    assert struct.unpack_from("<Q", d.backend.config())[0] == 3
    status, _, _ = request(d, blk.T_IN, 2, in_len=1024)          # sectors 2..3: the partial one is not the disk's
    assert status == blk.S_IOERR
    d.t.close()


def test_read(dev, image):
    status, used, data = request(dev, blk.T_IN, 3, in_len=1024)
    assert status == blk.S_OK and used == 1025
    assert data == image.read_bytes()[3 * 512:5 * 512]
    assert dev.irq.level and dev.drv.ack_interrupt() == vc.INT_USED_BUFFER


def test_read_into_many_buffers_and_indirect(dev, image):
    # data scattered over three buffers of odd sizes (totalling whole sectors), through an indirect table
    head = dev.ring.add(out=[header(blk.T_IN, 1)], in_lens=[100, 700, 224, 1], indirect=False)
    dev.drv.kick(0)
    assert dev.ring.take_used() == [(head, 1025)]
    assert dev.ring.written(head) == image.read_bytes()[512:1536] + b"\0"


def test_write_then_read_back(dev, image):
    before = image.read_bytes()
    payload = bytes(range(256)) * 4
    status, used, _ = request(dev, blk.T_OUT, 10, data=[payload[:300], payload[300:]])
    assert (status, used) == (blk.S_OK, 1)
    after = image.read_bytes()
    assert after[10 * 512:12 * 512] == payload
    assert after[:10 * 512] == before[:10 * 512] and after[12 * 512:] == before[12 * 512:]
    assert request(dev, blk.T_IN, 10, in_len=1024)[2] == payload
    assert dev.backend.stats()["writes"] == 1 and dev.backend.stats()["bytes_written"] == 1024


def test_flush_fsyncs_the_image(dev, monkeypatch):
    synced = []
    monkeypatch.setattr(blk.os, "fsync", lambda fd: synced.append(fd))
    assert request(dev, blk.T_FLUSH)[:2] == (blk.S_OK, 1)
    assert synced == [dev.backend.fd]


def test_get_id(memory, image):
    d = make(memory, image, serial="disk-serial-1")
    status, used, data = request(d, blk.T_GET_ID, in_len=20)
    assert (status, used, data) == (blk.S_OK, 21, b"disk-serial-1".ljust(20, b"\0"))
    d.t.close()


def test_get_id_default_names_the_instance(dev):
    assert request(dev, blk.T_GET_ID, in_len=20)[2] == b"hvm-virtio-blk0".ljust(20, b"\0")


def test_unsupported_types(dev, image):
    before = image.read_bytes()
    for kind in (2, 3, 10, 13, 14, 99, 0xFFFFFFFF):     # SCSI, FLUSH_OUT, GET_LIFETIME, WRITE_ZEROES, ...
        assert request(dev, kind, 0, data=[bytes(512)])[:2] == (blk.S_UNSUPP, 1)
    assert image.read_bytes() == before


def test_discard_punches_a_hole(memory, image):
    d = make(memory, image)
    if not d.backend.discard:
        d.t.close()
        pytest.skip("the file system of the test's tmp dir cannot punch holes")
    before = image.read_bytes()
    segment = struct.pack("<QII", 8, 16, 0)
    assert request(d, blk.T_DISCARD, data=[segment])[:2] == (blk.S_OK, 1)
    after = image.read_bytes()
    assert after[8 * 512:24 * 512] == bytes(16 * 512)
    assert after[:8 * 512] == before[:8 * 512] and after[24 * 512:] == before[24 * 512:]
    assert len(after) == len(before)
    # past the end, two segments (max_discard_seg 1), unknown flags
    assert request(d, blk.T_DISCARD, data=[struct.pack("<QII", SECTORS - 8, 16, 0)])[0] == blk.S_IOERR
    assert request(d, blk.T_DISCARD, data=[segment * 2])[0] == blk.S_IOERR
    assert request(d, blk.T_DISCARD, data=[struct.pack("<QII", 8, 8, 2)])[0] == blk.S_UNSUPP
    assert request(d, blk.T_DISCARD, data=[struct.pack("<QII", 0, 8, 1)])[0] == blk.S_UNSUPP   # UNMAP
    assert image.read_bytes() == after
    d.t.close()


def test_discard_not_offered_is_unsupported(memory, image):
    d = make(memory, image, discard=False)
    assert not d.drv.device_features() >> blk.F_DISCARD & 1
    assert request(d, blk.T_DISCARD, data=[struct.pack("<QII", 0, 8, 0)])[0] == blk.S_UNSUPP
    d.t.close()


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_readonly_disk_refuses_writes_and_discards(memory, image, monkeypatch):
    digest = sha256(image)
    d = make(memory, image, readonly=True, discard=True)
    features = d.drv.device_features()
    assert features >> blk.F_RO & 1 and not features >> blk.F_DISCARD & 1
    assert request(d, blk.T_OUT, 0, data=[bytes(512)])[:2] == (blk.S_IOERR, 1)
    assert request(d, blk.T_DISCARD, data=[struct.pack("<QII", 0, 8, 0)])[:2] == (blk.S_IOERR, 1)
    assert request(d, blk.T_FLUSH)[0] == blk.S_OK
    status, _, data = request(d, blk.T_IN, 0, in_len=512)            # reads work
    assert status == blk.S_OK and data == image.read_bytes()[:512]
    assert sha256(image) == digest
    assert d.backend.stats()["ioerrs"] == 2
    d.t.close()


@pytest.mark.parametrize("sector, length", [(SECTORS, 512), (SECTORS - 1, 1024), (2 ** 64 - 1, 512),
                                            (2 ** 63, 512), (0, 100), (0, 513)])
def test_out_of_range_or_partial_sectors_are_ioerr(dev, image, sector, length):
    digest = sha256(image)
    assert request(dev, blk.T_OUT, sector, data=[bytes(length)])[:2] == (blk.S_IOERR, 1)
    status, used, data = request(dev, blk.T_IN, sector, in_len=length)
    assert (status, used) == (blk.S_IOERR, 1) and data == bytes(length)     # nothing read into the guest
    assert sha256(image) == digest and dev.backend.stats()["ioerrs"] == 2
    assert not dev.t.status & vc.STATUS_DEVICE_NEEDS_RESET


def test_last_sector_is_inside(dev, image):
    assert request(dev, blk.T_IN, SECTORS - 1, in_len=512)[2] == image.read_bytes()[-512:]


@pytest.mark.parametrize("shape", ["short header", "no status byte", "header split short"])
def test_bad_chain_shapes_need_a_reset(dev, image, shape):
    digest = sha256(image)
    if shape == "short header":
        dev.ring.add(out=[header(blk.T_IN)[:15]], in_lens=[513])
    elif shape == "no status byte":
        dev.ring.add(out=[header(blk.T_OUT), bytes(512)])
    else:
        dev.ring.add(out=[header(blk.T_IN)[:8], header(blk.T_IN)[8:12]], in_lens=[1])
    dev.drv.kick(0)
    assert dev.t.status & vc.STATUS_DEVICE_NEEDS_RESET
    assert dev.ring.take_used() == []
    assert sha256(image) == digest
    # the driver resets the device and it works again
    dev.drv.start(1)
    dev.ring = dev.drv.rings[0]
    assert request(dev, blk.T_IN, 0, in_len=512)[:2] == (blk.S_OK, 513)


def test_good_requests_before_a_bad_one_complete(dev):
    good = dev.ring.add(out=[header(blk.T_IN)], in_lens=[512, 1])
    dev.ring.add(out=[b"short"], in_lens=[1])
    dev.drv.kick(0)
    assert dev.ring.take_used() == [(good, 513)]
    assert dev.t.status & vc.STATUS_DEVICE_NEEDS_RESET


def test_close_closes_the_fd(memory, image):
    d = make(memory, image)
    fd = d.backend.fd
    d.t.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_guest_ram_views_are_released(dev, memory):
    request(dev, blk.T_IN, 0, in_len=4096)
    dev.t.close()
    memory.close()         # a memoryview still exported would make mmap.close() raise BufferError


# --- chain shapes Linux does not make: the device assumes no framing ------------------------------------
def chain(d, out=(), in_lens=()):
    """Make one chain available, notify, return (used len, writable bytes)."""
    head = d.ring.add(list(out), list(in_lens))
    d.drv.kick(0)
    [(got_head, length)] = d.ring.take_used()
    assert got_head == head
    return length, d.ring.written(head)


def test_read_scattered_buffers_and_status_in_the_data_buffer(dev, image):
    # data split over three buffers of odd sizes; the status shares the last one (no framing assumed)
    n, data = chain(dev, [header(blk.T_IN, 1)], [100, 412, 513])
    assert n == 1025 and data[-1] == blk.S_OK and data[:1024] == image.read_bytes()[512:1536]


def test_write_then_flush(dev, image):
    payload = os.urandom(2048)
    n, data = chain(dev, [header(blk.T_OUT, 10), payload[:1000], payload[1000:]], [1])
    assert (n, data) == (1, bytes([blk.S_OK]))
    assert image.read_bytes()[10 * 512:14 * 512] == payload
    n, data = chain(dev, [header(blk.T_FLUSH)], [1])
    assert data == bytes([blk.S_OK]) and dev.backend.stats()["flushes"] == 1


def test_header_and_data_in_one_buffer(dev, image):
    payload = b"\xAB" * 512
    n, data = chain(dev, [header(blk.T_OUT, SECTORS - 1) + payload], [1])
    assert data == bytes([blk.S_OK]) and image.read_bytes()[-512:] == payload


def test_get_id_short_buffer(dev):
    n, data = chain(dev, [header(blk.T_GET_ID)], [4, 1])
    assert n == 5 and data == b"hvm-" + bytes([blk.S_OK])


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


def test_flushed_write_survives_sigkill_of_a_machine(tmp_path):
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


# --- config errors -----------------------------------------------------------------------------------
def config_error(entry) -> str:
    with pytest.raises(ConfigError) as e:
        parse_devices({"virtio-blk": [entry]})
    return str(e.value)


def test_config_errors(tmp_path, image):
    small = tmp_path / "small.img"
    small.write_bytes(bytes(511))
    ro = tmp_path / "ro.img"
    ro.write_bytes(bytes(4096))
    ro.chmod(0o444)
    assert config_error({"file": str(tmp_path / "none.img")}) == \
        f"Python: devices.virtio-blk[0].file: file not found: {tmp_path}/none.img"
    assert config_error({"file": str(tmp_path)}) == \
        f"Python: devices.virtio-blk[0].file: not a regular file: {tmp_path} is a directory"
    assert config_error({"file": str(small)}) == \
        f"Python: devices.virtio-blk[0]: {small} is 511 bytes, smaller than one 512-byte sector"
    assert config_error({"file": str(ro)}) == \
        f"Python: devices.virtio-blk[0]: {ro} is read-only (mode 0444): give readonly=on"
    assert config_error({"file": str(image), "format": "qcow2"}) == \
        "Python: devices.virtio-blk[0].format: 'qcow2' is not one of: raw"
    assert config_error({"file": str(image), "serial": "x" * 21}) == \
        f"Python: devices.virtio-blk[0]: serial {'x' * 21!r}: at most 20 ASCII characters"
    assert config_error({}) == "Python: devices.virtio-blk[0].file: missing (required)"
    [d] = parse_devices({"virtio-blk": [{"file": str(ro), "readonly": True}]})
    assert d.values["readonly"] is True and d.name == "virtio-blk0"


def test_cannot_open_for_writing(tmp_path, monkeypatch):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    real_open = os.open

    def refuse(p, flags, *a):
        if p == path and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied")
        return real_open(p, flags, *a)
    monkeypatch.setattr(blk.os, "open", refuse)
    assert config_error({"file": str(path)}) == (f"Python: devices.virtio-blk[0]: cannot open {path} for writing "
                                                 "(readonly=on opens it read-only): Permission denied")
    parse_devices({"virtio-blk": [{"file": str(path), "readonly": "on"}]})


def test_the_cli_status_and_message(tmp_path):
    small = tmp_path / "small.img"
    small.write_bytes(bytes(100))
    r = run_hvm("run", "--kernel", "firmware/build/hello.elf", "--drive", f"file={small}", timeout=30)
    assert r.status == 2
    assert r.stderr.strip() == f"hvm: --drive: {small} is 100 bytes, smaller than one 512-byte sector"


# --- --drive and hvm-qemu -drive ---------------------------------------------------------------------
def drives(*argv: str):
    args = build_parser().parse_args(["run", "--kernel", str(ROOT / "firmware/build/hello.elf"), *argv])
    spec = spec_from_args(args)
    return [(d.name, d.values) for d in spec.devices if d.type == "virtio-blk"]


def test_drive_flags(tmp_path, image, monkeypatch):
    other = tmp_path / "other.img"
    other.write_bytes(bytes(1024))
    monkeypatch.chdir(tmp_path)
    got = drives("--drive", "file=disk.img,format=raw,if=virtio,id=d0", "--drive",
                 f"file={other},readonly=on,serial=S1")
    assert got == [("virtio-blk0", {"file": image, "readonly": False, "format": "raw", "serial": "", "ioeventfd": False}),
                   ("virtio-blk1", {"file": other, "readonly": True, "format": "raw", "serial": "S1", "ioeventfd": False})]
    # --device virtio-blk comes first, as vda
    got = drives("--drive", f"file={other}", "--device", f"virtio-blk-device,file={image},read-only=on")
    assert [(n, v["file"], v["readonly"]) for n, v in got] == [("virtio-blk0", image, True),
                                                                ("virtio-blk1", other, False)]


@pytest.mark.parametrize("value, message", [
    ("file=X,format=qcow2", "--drive: format: 'qcow2' is not one of: raw"),
    ("file=X,if=ide", "--drive: if=ide: hvm's disks are virtio-blk (if=virtio)"),
    ("format=raw", "--drive: needs file=PATH (a raw disk image)"),
    ("file=X,cache=none", "--drive: 'cache' is not an option of --drive (file, format, readonly, serial, if=virtio, id)"),
    ("file=X,readonly", "--drive: 'readonly' is not OPTION=VALUE"),
    ("file=X,readonly=maybe", "--drive: readonly: expected on or off, got a string ('maybe')"),
])
def test_drive_flag_errors(image, monkeypatch, value, message):
    monkeypatch.chdir(image.parent)
    with pytest.raises(ConfigError) as e:
        drives("--drive", value.replace("X", "disk.img"))
    assert str(e.value) == message


def test_qemu_drive_spellings():
    assert translate(["-drive", "file=/d.img,if=virtio,format=raw,readonly=on"])[-2:] == \
        ["--drive", "file=/d.img,format=raw,readonly=on"]
    assert translate(["-drive", "id=d0,file=/a.img,if=none", "-drive", "file=/b.img,if=virtio",
                      "-device", "virtio-blk-device,drive=d0,serial=X"])[-4:] == \
        ["--drive", "file=/b.img", "--drive", "file=/a.img,serial=X"]


@pytest.mark.parametrize("argv, message", [
    (["-drive", "file=/d.img"], "-drive if=ide (the default): hvm's disks are virtio-blk (if=virtio, or if=none "
                                "with -device virtio-blk-device,drive=ID)"),
    (["-drive", "file=/d.img,if=ide"], "-drive if=ide: hvm's disks are virtio-blk (if=virtio, or if=none with "
                                       "-device virtio-blk-device,drive=ID)"),
    (["-drive", "id=d0,file=/d.img,if=none"], "-drive id=d0: no -device virtio-blk-device,drive=d0 uses it"),
    (["-device", "virtio-blk-device,drive=d1"], "-device virtio-blk-device: drive=d1 names no -drive id"),
    (["-device", "virtio-blk-device"], "-device virtio-blk-device: needs drive=ID (of a -drive id=ID,file=PATH,if=none)"),
    (["-drive", "file=/d.img,if=virtio,cache=none"],
     "-drive: cache: not an option hvm has (file, format, readonly, read-only, serial, if, id)"),
])
def test_qemu_drive_errors(argv, message):
    with pytest.raises(ShimError) as e:
        translate(argv)
    assert str(e.value) == message


def test_qemu_qcow2_is_a_one_line_error(image):
    r = run_hvm_qemu("-kernel", "firmware/build/hello.elf", "-drive", f"file={image},if=virtio,format=qcow2")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["hvm: --drive: format: 'qcow2' is not one of: raw"]


def run_hvm_qemu(*argv: str):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", "import sys; from hvm.qemu_shim import main; sys.exit(main())", *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


CHILD = r'''
import os, sys, time
sys.path.insert(0, "tests")
from test_virtio_blk import make, request, blk
from hvm.memory import GuestMemory, MiB
mem = GuestMemory(16 * MiB)
d = make(mem, sys.argv[1])
status = request(d, blk.T_OUT, 5, data=[b"\xa5" * 512])[0]
status |= request(d, blk.T_FLUSH)[0]
print("done", status, flush=True)
time.sleep(60)
'''


def test_a_completed_flushed_write_survives_sigkill(image):
    # the device in a process of its own, killed with SIGKILL once the guest saw OUT and FLUSH complete
    import signal
    import subprocess
    import sys
    before = image.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(image)], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"done 0\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert child.returncode == -signal.SIGKILL
    after = image.read_bytes()
    assert after[5 * 512:6 * 512] == b"\xa5" * 512
    assert after[:5 * 512] == before[:5 * 512] and after[6 * 512:] == before[6 * 512:]
