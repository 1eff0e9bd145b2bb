"""virtio-blk (virtio 1.x spec 5.2, device ID 2) on a raw image file.

One queue ("requestq", 256 entries). Each request is a chain: a 16-byte device-readable header
(le32 type, le32 reserved, le64 sector), then the data (device-readable for OUT and DISCARD, device-writable
for IN and GET_ID), then one device-writable status byte: the chain's last writable byte.

Requests run synchronously inside notify() (QueueNotify, transport.lock held), all the available chains
at once: a read is one os.preadv and a write one os.pwritev straight between the image file and guest RAM
(memoryviews of the guest RAM mapping, no copy through Python bytes); FLUSH is os.fsync, so a write the
driver saw completed and then flushed is in the host file even if hvm is killed with SIGKILL right after.
By default notify() runs on the vCPU thread, which waits for the disk meanwhile: simple, no I/O thread.
With the `ioeventfd` property on, the doorbell is a KVM ioeventfd and notify() runs on hvm's ioevent
thread while the vCPU runs on (hvm/ioevents.py); nothing is in flight across notify() either way.

Features: FLUSH, SEG_MAX, SIZE_MAX, BLK_SIZE (512), RO for a read-only drive, DISCARD where the host file
system can punch holes (fallocate(PUNCH_HOLE|KEEP_SIZE), probed when the drive is opened: a discarded range
reads back as zeros and frees host blocks). Not offered: GEOMETRY, TOPOLOGY, CONFIG_WCE, MQ, WRITE_ZEROES,
SECURE_ERASE: their requests (and GET_LIFETIME, unknown types) end with VIRTIO_BLK_S_UNSUPP.

Errors the guest sees (VIRTIO_BLK_S_IOERR, the image untouched): a sector range past the capacity, a data
length that is not a multiple of 512, a write or discard to a read-only drive, data in the wrong direction
(readable data in an IN request, writable data besides the status in an OUT), a host I/O error. A chain
with no room for the header or the status byte cannot be answered at all: that is a VirtqueueError (the
device needs a reset, as QEMU's virtio_error for the same chains).

The capacity is the image size rounded down to 512-byte sectors (as QEMU does for a raw image whose size is
not a multiple of 512): trailing bytes are never read or written.
"""
from __future__ import annotations

import ctypes
import logging
import os
import stat
import struct
from typing import Callable, Iterator

from hvm.memory import GuestMemory
from hvm.mmio.device import StateReader
from hvm.mmio.virtio import attach
from hvm.mmio.virtio import constants as vc
from hvm.mmio.virtio.backend import VirtioBackend
from hvm.mmio.virtio.queue import DescriptorChain, Queue, VirtqueueError

try:   # the registry (CONTRACT.md part A): on main since 18:05; guarded so the backend imports without it
    from hvm.boot.errors import BootError
    from hvm.mmio.registry import DeviceContext, DeviceType, Prop
except ImportError:   # pragma: no cover
    DeviceType = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

SECTOR = 512
QUEUE_SIZE = 256

# feature bits (spec 5.2.3)
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_GEOMETRY = 4
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_TOPOLOGY = 10
F_CONFIG_WCE = 11
F_MQ = 12
F_DISCARD = 13
F_WRITE_ZEROES = 14

# request types and statuses (spec 5.2.6)
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_GET_LIFETIME = 10
T_DISCARD = 11
T_WRITE_ZEROES = 13
T_SECURE_ERASE = 14
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

ID_BYTES = 20                    # VIRTIO_BLK_ID_BYTES
HEADER = struct.Struct("<IIQ")   # type, reserved, sector
DISCARD_SEG = struct.Struct("<QII")   # sector, num_sectors, flags

# Limits the config space announces. A request is one chain, and a chain holds at most vc.MAX_CHAIN_BYTES
# (16 MiB): SEG_MAX data segments of SIZE_MAX bytes stay below it, so Linux never builds a bigger one.
SEG_MAX = QUEUE_SIZE - 2         # the header and the status take a descriptor each (as QEMU)
SIZE_MAX = 64 << 10
MAX_DISCARD_SECTORS = 1 << 22    # 2 GiB per discard segment
MAX_DISCARD_SEG = 1
DISCARD_ALIGNMENT = 8            # sectors: a 4 KiB host block (Linux's discard_granularity)
IOV_MAX = 1024                   # iovecs per preadv/pwritev call (Linux's UIO_MAXIOV)
MAX_WARNINGS = 16
IOEVENTFD_DEFAULT = False

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


class ImageError(ValueError):
    """An image that cannot be used: one line (config time: status 2)."""


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE|KEEP_SIZE): the range reads back as zeros, its host blocks are freed."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def can_punch_holes(fd: int, size: int) -> bool:
    """Whether the file system takes PUNCH_HOLE: punched past the end of the file (KEEP_SIZE), which changes
    nothing where it works and fails with EOPNOTSUPP where it does not."""
    try:
        punch_hole(fd, size + (1 << 20), SECTOR)
    except OSError:
        return False
    return True


def open_image(path: str | os.PathLike, readonly: bool) -> tuple[int, int]:
    """Open the image (O_RDONLY for a read-only drive, else O_RDWR; close-on-exec) -> (fd, capacity in
    sectors). ImageError (one line) for anything that is not a usable raw image."""
    path = os.fspath(path)
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not a disk image") from None
    except OSError as e:
        how = "read-only" if readonly else "read-write (readonly=on for a read-only drive)"
        raise ImageError(f"{path}: cannot open {how}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(f"{path}: is a directory, not a disk image")
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{path}: not a regular file (a raw image file is needed)")
        if st.st_size < SECTOR:
            raise ImageError(f"{path}: {st.st_size} bytes, too small for a disk (at least {SECTOR} bytes)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size // SECTOR


def _views(memory: GuestMemory, buffers: list[tuple[int, int]], offset: int, length: int) -> Iterator[memoryview]:
    """memoryviews of guest RAM covering `length` bytes of `buffers` from `offset` (the chain's checked
    buffers: each lies in one RAM region). The views must be dropped before guest memory is closed."""
    for gpa, n in buffers:
        if length <= 0:
            return
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, length)
        region, off = memory._locate(gpa + offset, take)
        yield memoryview(region.mapping)[off:off + take]
        length -= take
        offset = 0


class VirtioBlk(VirtioBackend):
    device_id = vc.VIRTIO_ID_BLOCK
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, name: str, fd: int, capacity: int, *, readonly: bool = False, serial: str = "",
                 discard: bool = False, path: str = ""):
        self.name = name
        self.fd = fd
        self.capacity = capacity          # sectors
        self.readonly = readonly
        self.discard = discard and not readonly
        self.path = path
        ident = (serial or f"hvm-{name}").encode("ascii", "replace")[:ID_BYTES]
        self.ident = ident.ljust(ID_BYTES, b"\0")
        self._queues: list[Queue] = []
        self._signal: Callable[[int], None] | None = None
        self._warnings = 0
        # Host-side statistics (not device state): --stats and tests.
        self.counts = {"reads": 0, "writes": 0, "flushes": 0, "discards": 0, "get_id": 0, "bytes_read": 0,
                       "bytes_written": 0, "ioerr": 0, "unsupp": 0}

    # --- virtio backend ---------------------------------------------------------------------------
    def device_features(self) -> int:
        bits = 1 << F_SIZE_MAX | 1 << F_SEG_MAX | 1 << F_BLK_SIZE | 1 << F_FLUSH
        if self.readonly:
            bits |= 1 << F_RO
        if self.discard:
            bits |= 1 << F_DISCARD
        return bits

    def config(self) -> bytes:
        """struct virtio_blk_config up to write_zeroes_may_unmap (60 bytes)."""
        discard = (MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, DISCARD_ALIGNMENT) if self.discard else (0, 0, 0)
        return struct.pack("<QII HBB I BBHI BBH III IIB3x",
                           self.capacity, SIZE_MAX, SEG_MAX,
                           0, 0, 0,            # geometry (not offered)
                           SECTOR,             # blk_size
                           0, 0, 0, 0,         # topology (not offered)
                           0, 0, 1,            # writeback, unused, num_queues
                           *discard,
                           0, 0, 0)            # write zeroes (not offered)

    def activate(self, features: int, queues: list[Queue], signal: Callable[[int], None]) -> None:
        self._queues, self._signal = queues, signal

    def reset(self) -> None:
        self._queues, self._signal = [], None

    def notify(self, queue_index: int) -> None:
        if queue_index != 0 or not self._queues or self._signal is None:
            return
        q = self._queues[0]
        served = False
        while (chain := q.pop()) is not None:
            q.push_used(chain, self.handle(chain))
            served = True
        if served:
            self._signal(0)

    def save(self) -> dict:
        # Requests complete inside notify(): nothing is ever in flight. The capacity is saved so a restore
        # onto an image of another size (the guest's idea of the disk would be wrong) is refused.
        return {"capacity": self.capacity}

    def load(self, state: dict) -> None:
        r = StateReader(self.name, state, ("capacity",))
        if r.state["capacity"] != self.capacity:
            raise r.fail("capacity", f"{r.state['capacity']!r} sectors saved, the image {self.path} has "
                                     f"{self.capacity}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def stats(self) -> dict[str, int]:
        return dict(self.counts)

    # --- requests ---------------------------------------------------------------------------------
    def handle(self, chain: DescriptorChain) -> int:
        """Carry out one request; returns the bytes written into its writable buffers (status included)."""
        if chain.readable_len < HEADER.size:
            raise VirtqueueError(f"{self.name}: request {chain.head}: {chain.readable_len} device-readable "
                                 f"bytes, less than the {HEADER.size}-byte request header")
        if chain.writable_len < 1:
            raise VirtqueueError(f"{self.name}: request {chain.head}: no device-writable status byte")
        rtype, _reserved, sector = HEADER.unpack(chain.read(HEADER.size))
        status, written = self._dispatch(chain, rtype, sector)
        if status == S_IOERR:
            self.counts["ioerr"] += 1
        elif status == S_UNSUPP:
            self.counts["unsupp"] += 1
        chain.write(bytes((status,)), chain.writable_len - 1)
        return written + 1

    def _range_ok(self, sector: int, nbytes: int) -> bool:
        return nbytes % SECTOR == 0 and sector + nbytes // SECTOR <= self.capacity

    def _dispatch(self, chain: DescriptorChain, rtype: int, sector: int) -> tuple[int, int]:
        """(status, data bytes written into the chain)."""
        out_len = chain.readable_len - HEADER.size      # data the driver gave
        in_len = chain.writable_len - 1                 # room the driver gave, before the status byte
        if rtype == T_IN:
            if out_len or not self._range_ok(sector, in_len):
                return S_IOERR, 0
            if not self._io(chain.writable, 0, in_len, sector * SECTOR, write=False):
                return S_IOERR, 0
            self.counts["reads"] += 1
            self.counts["bytes_read"] += in_len
            return S_OK, in_len
        if rtype == T_OUT:
            if in_len or self.readonly or not self._range_ok(sector, out_len):
                return S_IOERR, 0
            if not self._io(chain.readable, HEADER.size, out_len, sector * SECTOR, write=True):
                return S_IOERR, 0
            self.counts["writes"] += 1
            self.counts["bytes_written"] += out_len
            return S_OK, 0
        if rtype == T_FLUSH:
            try:
                os.fsync(self.fd)
            except OSError as e:
                self._warn("fsync of %s failed: %s", self.path, e.strerror)
                return S_IOERR, 0
            self.counts["flushes"] += 1
            return S_OK, 0
        if rtype == T_GET_ID:
            self.counts["get_id"] += 1
            return S_OK, chain.write(self.ident[:in_len])
        if rtype == T_DISCARD and self.discard:
            return self._discard(chain, out_len), 0
        return S_UNSUPP, 0

    def _discard(self, chain: DescriptorChain, out_len: int) -> int:
        if out_len == 0 or out_len % DISCARD_SEG.size or out_len // DISCARD_SEG.size > MAX_DISCARD_SEG:
            return S_IOERR
        segments = [DISCARD_SEG.unpack_from(chain.read(out_len, HEADER.size), k)
                    for k in range(0, out_len, DISCARD_SEG.size)]
        for sector, count, flags in segments:
            if flags:      # the unmap flag (and anything else) belongs to WRITE_ZEROES: spec 5.2.6.1
                return S_UNSUPP
            if count > MAX_DISCARD_SECTORS or sector + count > self.capacity:
                return S_IOERR
        for sector, count, _ in segments:
            if count:
                try:
                    punch_hole(self.fd, sector * SECTOR, count * SECTOR)
                except OSError as e:
                    self._warn("discard on %s failed: %s", self.path, e.strerror)
                    return S_IOERR
        self.counts["discards"] += 1
        return S_OK

    def _io(self, buffers: list[tuple[int, int]], offset: int, length: int, pos: int, *, write: bool) -> bool:
        """Move `length` bytes between the file at `pos` and the chain's buffers from `offset`, in
        preadv/pwritev calls of at most IOV_MAX buffers, until done; False on an I/O error or end of file."""
        if length == 0:
            return True
        memory = self._queues[0].memory
        views = list(_views(memory, buffers, offset, length))
        try:
            while views:
                batch = views[:IOV_MAX]
                n = os.pwritev(self.fd, batch, pos) if write else os.preadv(self.fd, batch, pos)
                if n <= 0:
                    self._warn("%s: %s at byte %d of %s ended early (the file shrank?)", self.name,
                               "write" if write else "read", pos, self.path)
                    return False
                pos += n
                while n:         # drop what was done, keep the rest of a partly done buffer
                    if n >= len(views[0]):
                        n -= len(views[0])
                        views.pop(0)
                    else:
                        views[0] = views[0][n:]
                        n = 0
            return True
        except OSError as e:     # (EINTR is retried by Python itself: PEP 475)
            self._warn("%s: %s of %s failed: %s", self.name, "write" if write else "read", self.path, e.strerror)
            return False
        finally:
            views.clear()     # drop the exports of the guest RAM mapping

    def _warn(self, msg: str, *args) -> None:
        if self._warnings < MAX_WARNINGS:
            self._warnings += 1
            log.warning(msg, *args)


# --- the device type (CONTRACT.md part A) ------------------------------------------------------------
def check(props: dict) -> None:
    """Config time: the image opens as asked (read-write unless readonly) and holds at least one sector;
    the serial fits GET_ID's 20 bytes."""
    serial = props.get("serial") or ""
    if len(serial.encode("ascii", "replace")) > ID_BYTES or not serial.isascii():
        raise ValueError(f"serial {serial[:40]!r}: at most {ID_BYTES} ASCII characters")
    fd, _ = open_image(props["file"], bool(props.get("readonly")))
    os.close(fd)


def create(ctx: "DeviceContext", props: dict) -> object:
    readonly = bool(props.get("readonly"))
    try:
        fd, capacity = open_image(props["file"], readonly)
    except ImageError as e:           # checked at config time; it may have changed since
        raise BootError(f"{ctx.name}: {e}") from None
    try:
        discard = not readonly and can_punch_holes(fd, capacity * SECTOR)
        serial = props.get("serial") or f"hvm-vd{chr(ord('a') + ctx.index)}"   # as Linux names it: vda, vdb
        backend = VirtioBlk(ctx.name, fd, capacity, readonly=readonly, serial=serial,
                            discard=discard, path=os.fspath(props["file"]))
    except BaseException:
        os.close(fd)
        raise
    # attach() registers backend.close() with ctx.on_close (the transport's close calls it).
    return attach(ctx, backend, ioeventfd=bool(props.get("ioeventfd", IOEVENTFD_DEFAULT)))


if DeviceType is not None:
    DEVICE = DeviceType(
        name="virtio-blk", aliases=("virtio-blk-device",), multiple=True, virtio=True, create=create,
        check=check,
        props=(Prop("file", "path", help="a raw disk image (its size rounded down to 512-byte sectors)"),
               Prop("readonly", "bool", False, help="guest writes fail with VIRTIO_BLK_S_IOERR"),
               Prop("format", "choice", "raw", choices=("raw",), help="only raw images"),
               Prop("serial", "str", "", help="the GET_ID string (at most 20 characters; default hvm-vda, hvm-vdb, ...)"),
               Prop("ioeventfd", "bool", IOEVENTFD_DEFAULT,
                    help="QueueNotify through a KVM ioeventfd: requests run on hvm's ioevent thread, the vCPU runs on")),
        help="virtio block device on a raw image file (read, write, flush, discard, GET_ID)")
