"""A guest-side virtio driver for unit tests: lays out split rings in a GuestMemory, makes chains available,
reads the used ring, and drives a VirtioMmio's registers the way Linux's virtio_mmio.c does.

No KVM: the "guest" is this Python code writing guest RAM and calling transport.read/write.
Other device tests (blk, net, console) may use it: `from virtio_driver import GuestDriver, RingWriter`.
The device unit tests share `memory` (a pytest fixture: 16 MiB of guest RAM; import it into the test module),
`make_rig` (a backend behind a VirtioMmio with a started driver) and `patch_firmware` (a firmware image with
its header fields set).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hvm.memory import MiB, GuestMemory
from hvm.mmio.device import IrqLine
from hvm.mmio.virtio import VirtioMmio
from hvm.mmio.virtio import constants as vc

DESC = struct.Struct("<QIHH")


class Arena:
    """A bump allocator over guest RAM, from `start`."""

    def __init__(self, start: int = 0x100000):
        self.next = start

    def alloc(self, size: int, align: int = 16) -> int:
        addr = -(-self.next // align) * align
        self.next = addr + size
        return addr


@dataclass
class RingWriter:
    """The driver's view of one split queue: raw access for crafting hostile rings, and helpers for good ones."""

    memory: GuestMemory
    size: int
    desc: int
    avail: int
    used: int
    arena: Arena
    avail_idx: int = 0
    last_used: int = 0
    next_free: int = 0
    buffers: dict[int, list[tuple[int, int, bool]]] = field(default_factory=dict)   # head -> (gpa, len, writable)

    @classmethod
    def create(cls, memory: GuestMemory, size: int, arena: Arena) -> "RingWriter":
        desc = arena.alloc(vc.desc_table_size(size), 16)
        avail = arena.alloc(vc.avail_ring_size(size), 2)
        used = arena.alloc(vc.used_ring_size(size), 4)
        memory.zero(desc, used + vc.used_ring_size(size) - desc)
        return cls(memory, size, desc, avail, used, arena)

    # raw ring access
    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0, table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.memory.write(base + 16 * index, DESC.pack(addr, length, flags, next))

    def publish(self, head: int) -> None:
        """Put a head in the available ring and advance the available index."""
        self.memory.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.memory.write(self.avail + 2, struct.pack("<H", value & 0xFFFF))

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write(self.avail, struct.pack("<H", flags))

    def set_used_event(self, value: int) -> None:
        self.memory.write(self.avail + 4 + 2 * self.size, struct.pack("<H", value & 0xFFFF))

    def avail_event(self) -> int:
        return struct.unpack("<H", self.memory.read(self.used + 4 + 8 * self.size, 2))[0]

    def used_idx(self) -> int:
        return struct.unpack("<H", self.memory.read(self.used + 2, 2))[0]

    def take_used(self) -> list[tuple[int, int]]:
        """The (id, len) elements the device added since the last call."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            out.append(struct.unpack("<II", self.memory.read(slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    # good chains
    def add(self, out: list[bytes] = (), in_lens: list[int] = (), indirect: bool = False) -> int:
        """A chain of device-readable buffers holding `out` then device-writable ones of `in_lens` bytes;
        published; returns its head."""
        bufs: list[tuple[int, int, bool]] = []
        for data in out:
            gpa = self.arena.alloc(len(data))
            self.memory.write(gpa, data)
            bufs.append((gpa, len(data), False))
        for n in in_lens:
            gpa = self.arena.alloc(n)
            self.memory.zero(gpa, n)
            bufs.append((gpa, n, True))
        if indirect:
            table = self.arena.alloc(16 * len(bufs))
            for i, (gpa, n, w) in enumerate(bufs):
                flags = (vc.VIRTQ_DESC_F_WRITE if w else 0) | (vc.VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0)
                self.write_desc(i, gpa, n, flags, i + 1, table=table)
            head = self._free(1)[0]
            self.write_desc(head, table, 16 * len(bufs), vc.VIRTQ_DESC_F_INDIRECT)
        else:
            ids = self._free(len(bufs))
            for k, (gpa, n, w) in enumerate(bufs):
                last = k + 1 == len(bufs)
                flags = (vc.VIRTQ_DESC_F_WRITE if w else 0) | (0 if last else vc.VIRTQ_DESC_F_NEXT)
                self.write_desc(ids[k], gpa, n, flags, 0 if last else ids[k + 1])
            head = ids[0]
        self.buffers[head] = bufs
        self.publish(head)
        return head

    def _free(self, n: int) -> list[int]:
        # Descriptors are handed out round robin: the tests never keep more than `size` in flight.
        ids = [(self.next_free + k) % self.size for k in range(n)]
        self.next_free = (self.next_free + n) % self.size
        return ids

    def written(self, head: int) -> bytes:
        """The contents of a chain's writable buffers, concatenated."""
        return b"".join(self.memory.read(gpa, n) for gpa, n, w in self.buffers[head] if w)


class GuestDriver:
    """Drives a VirtioMmio's registers as Linux's virtio_mmio.c does (read/write at register offsets)."""

    def __init__(self, transport, memory: GuestMemory, arena: Arena | None = None):
        self.t = transport
        self.memory = memory
        self.arena = arena or Arena()
        self.rings: list[RingWriter] = []

    def r(self, offset: int, size: int = 4) -> int:
        return self.t.read(offset, size)

    def w(self, offset: int, value: int, size: int = 4) -> None:
        self.t.write(offset, size, value)

    def device_features(self) -> int:
        self.w(vc.MMIO_DEVICE_FEATURES_SEL, 1)
        hi = self.r(vc.MMIO_DEVICE_FEATURES)
        self.w(vc.MMIO_DEVICE_FEATURES_SEL, 0)
        return hi << 32 | self.r(vc.MMIO_DEVICE_FEATURES)

    def add_status(self, bits: int) -> None:
        self.w(vc.MMIO_STATUS, self.r(vc.MMIO_STATUS) | bits)

    def negotiate(self, features: int | None = None) -> bool:
        """Probe, reset, ACKNOWLEDGE|DRIVER, features, FEATURES_OK; True when the device kept FEATURES_OK."""
        assert self.r(vc.MMIO_MAGIC_VALUE) == vc.MMIO_MAGIC
        assert self.r(vc.MMIO_VERSION) == 2
        self.w(vc.MMIO_STATUS, 0)
        self.add_status(vc.STATUS_ACKNOWLEDGE)
        self.add_status(vc.STATUS_DRIVER)
        offered = self.device_features()
        if features is None:
            features = offered
        self.w(vc.MMIO_DRIVER_FEATURES_SEL, 1)
        self.w(vc.MMIO_DRIVER_FEATURES, features >> 32)
        self.w(vc.MMIO_DRIVER_FEATURES_SEL, 0)
        self.w(vc.MMIO_DRIVER_FEATURES, features & 0xFFFFFFFF)
        self.add_status(vc.STATUS_FEATURES_OK)
        return bool(self.r(vc.MMIO_STATUS) & vc.STATUS_FEATURES_OK)

    def setup_queue(self, index: int, size: int | None = None) -> RingWriter:
        self.w(vc.MMIO_QUEUE_SEL, index)
        assert self.r(vc.MMIO_QUEUE_READY) == 0
        num_max = self.r(vc.MMIO_QUEUE_NUM_MAX)
        assert num_max
        size = size or num_max
        ring = RingWriter.create(self.memory, size, self.arena)
        self.w(vc.MMIO_QUEUE_NUM, size)
        for low, addr in ((vc.MMIO_QUEUE_DESC_LOW, ring.desc), (vc.MMIO_QUEUE_DRIVER_LOW, ring.avail),
                          (vc.MMIO_QUEUE_DEVICE_LOW, ring.used)):
            self.w(low, addr & 0xFFFFFFFF)
            self.w(low + 4, addr >> 32)
        self.w(vc.MMIO_QUEUE_READY, 1)
        return ring

    def start(self, queues: int, size: int | None = None, features: int | None = None) -> list[RingWriter]:
        """The whole Linux probe: negotiate, set up `queues` queues, DRIVER_OK."""
        assert self.negotiate(features)
        self.rings = [self.setup_queue(i, size) for i in range(queues)]
        self.add_status(vc.STATUS_DRIVER_OK)
        return self.rings

    def kick(self, index: int) -> None:
        self.w(vc.MMIO_QUEUE_NOTIFY, index)

    def ack_interrupt(self) -> int:
        """What the interrupt handler does: read InterruptStatus, write it back to InterruptACK."""
        status = self.r(vc.MMIO_INTERRUPT_STATUS)
        self.w(vc.MMIO_INTERRUPT_ACK, status)
        return status


@pytest.fixture
def memory():
    """16 MiB of guest RAM, closed after the test."""
    with GuestMemory(16 * MiB) as mem:
        yield mem


@dataclass
class Rig:
    """A device backend behind its transport on guest RAM, a guest driver, and (once started) its rings."""

    memory: GuestMemory
    backend: Any
    irq: IrqLine
    t: VirtioMmio
    drv: GuestDriver
    rings: list[RingWriter]
    ring: RingWriter | None         # rings[0]: the one queue of blk and rng


def make_rig(memory: GuestMemory, backend, queues: int | None = 1, size: int | None = None,
             irq: IrqLine | None = None) -> Rig:
    """`backend` behind a VirtioMmio on IRQ 5 (or `irq`); the driver started with `queues` queues of `size`
    (None: not started, the test drives the handshake)."""
    irq = IrqLine(5) if irq is None else irq
    t = VirtioMmio(memory, irq, backend)
    drv = GuestDriver(t, memory)
    rings = [] if queues is None else drv.start(queues, size)
    return Rig(memory, backend, irq, t, drv, rings, rings[0] if rings else None)


def patch_firmware(firmware: Path, out: Path, iterations: int, base: int, mode: int) -> Path:
    """A copy of a virtio firmware image (vcon, vrng: the header of firmware/header.inc, then the MMIO base
    at +8 and the mode at +12) at `out`, with those fields set."""
    from bench.exits import patch_header

    image = patch_header(firmware, out, iterations, base, "<I", arg_as_built=0xD000_0000)
    data = bytearray(image.read_bytes())
    assert struct.unpack_from("<I", data, 12)[0] == 0
    struct.pack_into("<I", data, 12, mode)
    image.write_bytes(bytes(data))
    return image
