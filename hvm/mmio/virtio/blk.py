"""virtio-blk (virtio 1.x spec 5.2, device ID 2) on a raw image file.

One request queue (size 256). Configuration space (spec 5.2.4): capacity in 512-byte sectors (an image whose
size is not a multiple of 512 is rounded down: the tail is never read or written, and create() logs a
warning saying so), size_max, seg_max, blk_size 512 and, with discard, max_discard_sectors,
max_discard_seg = 1 and discard_sector_alignment. Features: SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH; RO for a
readonly disk; DISCARD when the host file system punches holes (probed once at create, past the end of the
image with KEEP_SIZE, so no byte of the image changes).

Requests (struct virtio_blk_req: a 16-byte header of type, reserved, sector; the data; one status byte):
IN, OUT, FLUSH (os.fsync: a flushed write is on the host's disk), GET_ID (20 bytes: the `serial` prop or
"hvm-<instance name>"), DISCARD (fallocate PUNCH_HOLE|KEEP_SIZE). Any other type answers
VIRTIO_BLK_S_UNSUPP. A request past the capacity, data not a multiple of 512 bytes, or a readonly disk's
OUT or DISCARD answers VIRTIO_BLK_S_IOERR and the image is not touched. A header shorter than 16 readable
bytes, or no writable byte for the status, is a malformed chain: VirtqueueError, and the device needs a
reset (the transport's rule); the VMM carries on.

Requests run synchronously in notify(): on the vCPU thread at the QueueNotify exit, or on hvm's ioevent
thread with ioeventfd=on, with the transport's lock held. Data moves between the image and guest RAM with
os.preadv/os.pwritev straight on memoryviews of the guest RAM mappings (no copy through Python bytes);
one request moves at most the queue's chain limit (16 MiB) and seg_max/size_max keep Linux's requests well
under it. The image's fd is opened at create (O_RDONLY for readonly, else O_RDWR; O_CLOEXEC) and closed
when the Machine closes. A VM with a virtio-blk disk cannot be snapshotted (the image is host state).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import struct
from contextlib import contextmanager
from typing import Callable, Iterator

from hvm.memory import GuestMemory
from hvm.mmio.virtio import attach
from hvm.mmio.virtio import constants as vc
from hvm.mmio.virtio.backend import VirtioBackend
from hvm.mmio.virtio.queue import DescriptorChain, Queue, VirtqueueError

from hvm.mmio.registry import DeviceContext, DeviceType, Prop

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
SECTOR = 512
SIZE_MAX = 64 << 10            # bytes of one segment at most
SEG_MAX = QUEUE_SIZE - 2       # data segments of one request (the header and the status take two)
MAX_DISCARD_SECTORS = 32768    # 16 MiB per discard segment
DISCARD_ALIGNMENT = 8          # sectors (4 KiB: what a host file system punches)
ID_BYTES = 20                  # VIRTIO_BLK_ID_BYTES
IOV_MAX = 1024                 # buffers per preadv/pwritev call

# feature bits (spec 5.2.3)
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_DISCARD = 13

# request types and statuses (spec 5.2.6)
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

HEADER = struct.Struct("<IIQ")          # type, reserved, sector
DISCARD_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
DISCARD_F_UNMAP = 1
# struct virtio_blk_config up to and including discard_sector_alignment (spec 5.2.4):
# capacity, size_max, seg_max, geometry (c, h, s), blk_size, topology (4 fields), writeback, unused,
# num_queues, max_discard_sectors, max_discard_seg, discard_sector_alignment
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIII")

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE): the range reads as zeros and frees its blocks; OSError if not."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def can_punch_holes(fd: int, size: int) -> bool:
    """Whether the file system of `fd` punches holes: tried past the end of the file (KEEP_SIZE: the size
    stays, and there is no data there to lose)."""
    try:
        punch_hole(fd, -(-size // 4096) * 4096 + (1 << 20), 4096)
        return True
    except OSError:
        return False


class VirtioBlk(VirtioBackend):
    device_id = vc.VIRTIO_ID_BLOCK
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, memory: GuestMemory, fd: int, size: int, readonly: bool = False, serial: str = "",
                 name: str = "virtio-blk0", discard: bool | None = None):
        self.name = name
        self.memory = memory
        self.fd = fd
        self.readonly = readonly
        self.capacity = size // SECTOR           # sectors; a partial last sector is not part of the disk
        self.serial = (serial or f"hvm-{name}").encode()[:ID_BYTES]
        self.discard = (not readonly) and (can_punch_holes(fd, size) if discard is None else discard)
        self._queues: list[Queue] = []
        self._signal: Callable[[int], None] | None = None
        self.closed = False
        # host-side statistics (not device state)
        self.reads = self.writes = self.flushes = self.discards = 0
        self.bytes_read = self.bytes_written = 0
        self.ioerrs = self.unsupported = 0

    # --- VirtioBackend --------------------------------------------------------------------------------
    def device_features(self) -> int:
        bits = [F_SIZE_MAX, F_SEG_MAX, F_BLK_SIZE, F_FLUSH]
        if self.readonly:
            bits.append(F_RO)
        if self.discard:
            bits.append(F_DISCARD)
        return sum(1 << b for b in bits)

    def config(self) -> bytes:
        discard = (MAX_DISCARD_SECTORS, 1, DISCARD_ALIGNMENT) if self.discard else (0, 0, 0)
        return CONFIG.pack(self.capacity, SIZE_MAX, SEG_MAX, 0, 0, 0, SECTOR, 0, 0, 0, 0, 0, 0, 0, *discard)

    def activate(self, features: int, queues: list[Queue], signal: Callable[[int], None]) -> None:
        self._queues, self._signal = queues, signal

    def reset(self) -> None:
        self._queues, self._signal = [], None

    def notify(self, queue_index: int) -> None:
        # vCPU (or ioevent) thread, transport.lock held: every available request runs to completion here.
        if queue_index != 0 or not self._queues or self._signal is None:
            return
        queue, signal = self._queues[0], self._signal
        done = 0
        try:
            while (chain := queue.pop()) is not None:
                queue.push_used(chain, self._request(chain))
                done += 1
        finally:
            if done:
                signal(0)      # the requests completed before a bad chain stand

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def stats(self) -> dict[str, int]:
        return {"reads": self.reads, "writes": self.writes, "flushes": self.flushes, "discards": self.discards,
                "bytes_read": self.bytes_read, "bytes_written": self.bytes_written, "ioerrs": self.ioerrs,
                "unsupported": self.unsupported}

    # --- requests ---------------------------------------------------------------------------------------
    def _request(self, chain: DescriptorChain) -> int:
        """Carry out one request; returns the bytes written into the chain (data + the status byte)."""
        if chain.readable_len < HEADER.size:
            raise VirtqueueError(f"{self.name}: request {chain.head}: a header of {chain.readable_len} readable "
                                 f"bytes (16 needed)")
        if chain.writable_len < 1:
            raise VirtqueueError(f"{self.name}: request {chain.head}: no writable byte for the status")
        kind, _, sector = HEADER.unpack(chain.read(HEADER.size))
        status_at = chain.writable_len - 1
        written = 0
        if kind == T_IN:
            status, written = self._read(chain, sector, status_at)
        elif kind == T_OUT:
            status = self._write(chain, sector)
        elif kind == T_FLUSH:
            status = self._flush()
        elif kind == T_GET_ID:
            written = chain.write(self.serial.ljust(ID_BYTES, b"\0")[:status_at])
            status = S_OK
        elif kind == T_DISCARD and self.readonly:
            status = S_IOERR          # as a readonly disk's OUT (DISCARD is not offered to it)
        elif kind == T_DISCARD and self.discard:
            status = self._discard(chain)
        else:
            status = S_UNSUPP
            self.unsupported += 1
        if status == S_IOERR:
            self.ioerrs += 1
        chain.write(bytes([status]), status_at)
        return written + 1 if kind == T_IN or kind == T_GET_ID else 1

    def _extent(self, sector: int, length: int) -> int | None:
        """The byte offset of `length` bytes at `sector`, or None when they are not whole sectors inside
        the disk."""
        if length % SECTOR or sector > self.capacity or length // SECTOR > self.capacity - sector:
            return None
        return sector * SECTOR

    def _read(self, chain: DescriptorChain, sector: int, length: int) -> tuple[int, int]:
        offset = self._extent(sector, length)
        if offset is None:
            return S_IOERR, 0
        with guest_views(self.memory, chain.writable, 0, length) as views:
            if not _transfer(os.preadv, self.fd, views, offset):
                return S_IOERR, 0
        self.reads += 1
        self.bytes_read += length
        return S_OK, length

    def _write(self, chain: DescriptorChain, sector: int) -> int:
        length = chain.readable_len - HEADER.size
        offset = self._extent(sector, length)
        if offset is None or self.readonly:
            return S_IOERR
        with guest_views(self.memory, chain.readable, HEADER.size, length) as views:
            if not _transfer(os.pwritev, self.fd, views, offset):
                return S_IOERR
        self.writes += 1
        self.bytes_written += length
        return S_OK

    def _flush(self) -> int:
        self.flushes += 1
        if self.readonly:
            return S_OK       # nothing was written through this fd
        try:
            os.fsync(self.fd)
        except OSError as e:
            log.warning("%s: fsync failed: %s", self.name, e.strerror)
            return S_IOERR
        return S_OK

    def _discard(self, chain: DescriptorChain) -> int:
        data = chain.read(None, HEADER.size)
        if not data or len(data) % DISCARD_SEGMENT.size or len(data) // DISCARD_SEGMENT.size > 1:
            return S_IOERR      # max_discard_seg is 1
        sector, count, flags = DISCARD_SEGMENT.unpack(data)
        if flags:    # unknown flags, and UNMAP too: the spec (5.2.6.2) makes UNMAP on a DISCARD UNSUPP, as QEMU
            return S_UNSUPP
        if count > MAX_DISCARD_SECTORS:
            return S_IOERR
        offset = self._extent(sector, count * SECTOR)
        if offset is None:
            return S_IOERR
        if count:
            try:
                punch_hole(self.fd, offset, count * SECTOR)
            except OSError as e:
                log.warning("%s: discard: %s", self.name, e.strerror)
                return S_UNSUPP if e.errno == errno.EOPNOTSUPP else S_IOERR
        self.discards += 1
        return S_OK


@contextmanager
def guest_views(memory: GuestMemory, buffers: list[tuple[int, int]], skip: int, length: int
                ) -> Iterator[list[memoryview]]:
    """Writable memoryviews of `length` bytes of the chain's `buffers` (checked to lie in guest RAM when
    the chain was popped), after the first `skip` bytes; released on exit (a mapping with exported views
    could not be closed)."""
    views: list[memoryview] = []
    try:
        for gpa, n in buffers:
            if length <= 0:
                break
            if skip >= n:
                skip -= n
                continue
            take = min(n - skip, length)
            mapping, off = memory.mapping_at(gpa + skip, take)
            whole = memoryview(mapping)
            views.append(whole)
            views.append(whole[off:off + take])
            length -= take
            skip = 0
        yield views[1::2]
    finally:
        for v in reversed(views):
            v.release()


def _transfer(op: Callable, fd: int, views: list[memoryview], offset: int) -> bool:
    """preadv/pwritev all of `views` at `offset`, IOV_MAX buffers a call, going on after short transfers.
    False on an error or end of file (the image shrank under us)."""
    pending = list(views)
    try:
        while pending:
            done = op(fd, pending[:IOV_MAX], offset)
            if done <= 0:
                log.warning("transfer at %d: end of the image file", offset)
                return False
            offset += done
            while pending and done >= len(pending[0]):
                done -= len(pending[0])
                pending.pop(0)
            if done:
                pending[0] = pending[0][done:]
    except OSError as e:
        log.warning("transfer at %d: %s", offset, e.strerror)
        return False
    return True


# --- the device type ----------------------------------------------------------------------------------------
def _open(props: dict) -> int:
    """The image's fd (O_RDONLY for a readonly disk, else O_RDWR), or ValueError with a one-line reason."""
    path, readonly = props["file"], props["readonly"]
    try:
        fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        how = "" if readonly else " for writing (readonly=on opens it read-only)"
        raise ValueError(f"cannot open {path}{how}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ValueError(f"{path} is a directory, not a disk image")
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if not readonly and not st.st_mode & 0o222:
            # root opens it for writing all the same: a file nobody may write is taken as meant read-only
            raise ValueError(f"{path} is read-only (mode {stat.S_IMODE(st.st_mode):04o}): give readonly=on")
        if st.st_size < SECTOR:
            raise ValueError(f"{path} is {st.st_size} bytes, smaller than one 512-byte sector")
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def check(props: dict) -> None:
    serial = props["serial"]
    if len(serial.encode()) > ID_BYTES or not serial.isascii():
        raise ValueError(f"serial {serial[:40]!r}: at most {ID_BYTES} ASCII characters")
    os.close(_open(props))


def create(ctx: DeviceContext, props: dict) -> object:
    fd = _open(props)
    try:
        size = os.fstat(fd).st_size
        if size % SECTOR:
            log.warning("%s: %s is %d bytes, not a multiple of 512: the disk is its first %d sectors, the last %d "
                        "bytes are not used", ctx.name, props["file"], size, size // SECTOR, size % SECTOR)
        backend = VirtioBlk(ctx.memory, fd, size, props["readonly"], props["serial"], ctx.name)
    except BaseException:
        os.close(fd)
        raise
    return attach(ctx, backend, ioeventfd=props["ioeventfd"])   # the backend's close() runs at Machine close


DEVICE = DeviceType(
    name="virtio-blk", aliases=("virtio-blk-device",), multiple=True, virtio=True, snapshot=False,
    create=create, check=check,
    props=(Prop("file", "path", help="the raw disk image"),
           Prop("readonly", "bool", False, alias="read-only", help="guest writes fail (VIRTIO_BLK_S_IOERR)"),
           Prop("format", "choice", "raw", choices=("raw",), help="raw images only"),
           Prop("serial", "str", "", help="GET_ID's answer, at most 20 characters (default hvm-<name>)"),
           Prop("ioeventfd", "bool", False, help="QueueNotify through KVM_IOEVENTFD (hvm's ioevent thread)")),
    help="virtio block device on a raw image file (vda, vdb, ... in order)")
