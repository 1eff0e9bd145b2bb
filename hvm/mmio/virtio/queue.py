"""Split virtqueues (virtio 1.x, spec 2.7): the descriptor table, the available ring and the used ring.

Everything in guest memory is untrusted: the guest may rewrite any of it at any moment, on another vCPU,
with any values. So:
- a ring's own extent (table, avail ring, used ring) is checked against guest RAM once, when the driver
  makes the queue ready (Queue.check), and every later ring access falls inside it;
- every descriptor a chain names is checked as it is read: its buffer inside guest RAM
  (GuestMemory.contains: the PCI hole and anything past RAM are refused), its length neither 0 nor more
  than MAX_CHAIN_BYTES, its `next` inside its table, no descriptor visited twice (a loop), at most
  `size` descriptors from the main table and at most len/16 from an indirect table, no indirect table
  inside an indirect table, no INDIRECT together with NEXT, no device-readable buffer after a
  device-writable one (the spec's order), at most MAX_CHAIN_BYTES in all;
- an available index more than `size` ahead of the device's is refused.
Any of these raises VirtqueueError (one line). The transport then sets DEVICE_NEEDS_RESET and stops the
device (Queue.broken): a hostile guest breaks its own device, never the VMM, and nothing outside guest RAM
is ever read or written.

Memory ordering: hvm runs on x86 (TSO): stores are seen in program order and loads are not reordered with
older loads, so writing a used element before the used index, and reading the available index before the
ring entry it covers, need no fences. A store followed by a load of another location can be reordered,
though, and two places need that order (as QEMU's smp_mb() in the same places): publishing avail_event and
then looking at the available index again (pop), and publishing the used index and then reading
used_event or the avail flags (needs_interrupt); otherwise the device and the driver can each miss the
other's update and a notification or an interrupt is lost. _full_barrier() gives it: acquiring and
releasing a lock is a locked read-modify-write, a full barrier on x86.
"""
from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field

from hvm.memory import GuestMemory, GuestMemoryError
from hvm.mmio.virtio import constants as vc

_DESC = struct.Struct("<QIHH")       # addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")    # id, len


_BARRIER = threading.Lock()


def _full_barrier() -> None:
    """A full memory barrier (the lock's atomic read-modify-write): earlier stores are visible before later loads."""
    with _BARRIER:
        pass


class VirtqueueError(Exception):
    """A guest ring or descriptor chain that breaks the rules; str() is one line naming the queue and why."""


@dataclass
class DescriptorChain:
    """One available chain, checked: every buffer lies inside guest RAM, readable ones first.

    read()/write() move bytes between the host and the chain's buffers; they never fail on guest memory
    (the buffers were checked when the chain was popped and guest RAM does not move)."""

    memory: GuestMemory
    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)    # (gpa, length), in chain order
    writable: list[tuple[int, int]] = field(default_factory=list)
    readable_len: int = 0
    writable_len: int = 0

    def read(self, length: int | None = None, offset: int = 0) -> bytes:
        """Up to `length` bytes (all of them if None) of the readable buffers, from `offset` on. Fewer when
        the buffers end first."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"read of {length} bytes at {offset} from a descriptor chain")
        remaining = self.readable_len - offset if length is None else length
        out = bytearray()
        for gpa, n in self.readable:
            if remaining <= 0:
                break
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, remaining)
            out += self.memory.read(gpa + offset, take)
            remaining -= take
            offset = 0
        return bytes(out)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Copy `data` into the writable buffers from `offset` on; returns the bytes written (fewer than
        len(data) when the buffers end first)."""
        if offset < 0:
            raise ValueError(f"write at {offset} into a descriptor chain")
        view = memoryview(data).cast("B")
        done = 0
        for gpa, n in self.writable:
            if done >= len(view):
                break
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, len(view) - done)
            self.memory.write(gpa + offset, view[done:done + take])
            done += take
            offset = 0
        return done


class Queue:
    """One split virtqueue of a device. The transport owns it (its registers set size and addresses and
    make it ready); a backend pops available chains and pushes them back used.

    Not thread-safe by itself: callers hold the transport's lock (VirtioMmio.lock)."""

    def __init__(self, memory: GuestMemory, index: int, max_size: int, name: str = "virtio"):
        if not (1 <= max_size <= vc.QUEUE_SIZE_MAX and max_size & (max_size - 1) == 0):
            raise ValueError(f"{name}: queue {index} maximum size {max_size} is not a power of 2 <= 32768")
        self.memory = memory
        self.index = index
        self.max_size = max_size
        self.label = f"{name} queue {index}"
        self.reset()

    def reset(self) -> None:
        """Back to the state of a device reset: not ready, size max_size, no addresses, indices 0."""
        self.size = self.max_size      # QueueNum: the driver may lower it before making the queue ready
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.last_avail_idx = 0        # the next available-ring entry the device takes
        self.used_idx = 0              # the used index the device last published
        self.signalled_used = 0        # the used index at the last interrupt decision (EVENT_IDX)
        self.event_idx = False         # VIRTIO_F_EVENT_IDX negotiated
        self.indirect = False          # VIRTIO_F_INDIRECT_DESC negotiated
        self.broken = False            # the device needs a reset: pop() returns None, push_used() is dropped

    def set_features(self, features: int) -> None:
        self.event_idx = bool(features >> vc.F_RING_EVENT_IDX & 1)
        self.indirect = bool(features >> vc.F_RING_INDIRECT_DESC & 1)

    # --- checks ------------------------------------------------------------------------------------
    def check(self) -> None:
        """The queue as configured can be used: a power-of-2 size <= max_size and the three rings aligned
        and inside guest RAM. Raises VirtqueueError."""
        n = self.size
        if not (1 <= n <= self.max_size and n & (n - 1) == 0):
            raise VirtqueueError(f"{self.label}: size {n} is not a power of 2 in 1..{self.max_size}")
        for what, addr, length, align in (
                ("descriptor table", self.desc_addr, vc.desc_table_size(n), vc.DESC_ALIGN),
                ("available ring", self.avail_addr, vc.avail_ring_size(n), vc.AVAIL_ALIGN),
                ("used ring", self.used_addr, vc.used_ring_size(n), vc.USED_ALIGN)):
            if addr % align:
                raise VirtqueueError(f"{self.label}: {what} at {addr:#x} is not {align}-byte aligned")
            if not self.memory.contains(addr, length):
                raise VirtqueueError(f"{self.label}: {what} {addr:#x}..{addr + length:#x} is outside guest RAM")

    # --- ring fields (inside the rings checked by check()) ----------------------------------------
    def _u16(self, gpa: int) -> int:
        return _U16.unpack(self.memory.read(gpa, 2))[0]

    def avail_idx(self) -> int:
        return self._u16(self.avail_addr + 2)

    def avail_flags(self) -> int:
        return self._u16(self.avail_addr)

    def used_event(self) -> int:
        return self._u16(self.avail_addr + 4 + 2 * self.size)

    def _set_avail_event(self, value: int) -> None:
        self.memory.write(self.used_addr + 4 + vc.USED_ELEM_SIZE * self.size, _U16.pack(value))

    # --- the device side ---------------------------------------------------------------------------
    def pending(self) -> int:
        """How many chains the driver has made available and the device not yet taken."""
        if not self.ready or self.broken:
            return 0
        n = (self.avail_idx() - self.last_avail_idx) & 0xFFFF
        if n > self.size:
            raise VirtqueueError(f"{self.label}: available index {self.avail_idx()} is {n} entries ahead of "
                                 f"the device's {self.last_avail_idx}, more than the queue size {self.size}")
        return n

    def pop(self) -> DescriptorChain | None:
        """The next available chain, checked; None when there is none (or the queue is not usable).
        Raises VirtqueueError for a bad ring or chain (the entry is not consumed)."""
        if not self.ready or self.broken:
            return None
        try:
            if self.pending() == 0:
                if not self.event_idx:
                    return None
                # Ask for a notification at the next buffer, then look again: a buffer made available
                # between the first look and this store saw the old avail_event and may not notify.
                self._set_avail_event(self.last_avail_idx)
                _full_barrier()
                if self.pending() == 0:
                    return None
            head = self._u16(self.avail_addr + 4 + 2 * (self.last_avail_idx % self.size))
            chain = self._walk(head)
        except GuestMemoryError as e:   # cannot happen after check(); a VirtqueueError all the same
            raise VirtqueueError(f"{self.label}: {e}") from e
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx:
            self._set_avail_event(self.last_avail_idx)
        return chain

    def _walk(self, head: int) -> DescriptorChain:
        label = self.label
        if head >= self.size:
            raise VirtqueueError(f"{label}: chain head {head} is outside the descriptor table of {self.size}")
        chain = DescriptorChain(self.memory, head)
        table, count, where = self.desc_addr, self.size, "descriptor"
        in_indirect = False
        seen: set[int] = set()    # no index twice: so at most `count` descriptors per table
        total = 0
        index = head
        while True:
            if index in seen:
                raise VirtqueueError(f"{label}: chain {head}: {where} {index} is visited twice (a loop)")
            seen.add(index)
            addr, length, flags, nxt = _DESC.unpack(self.memory.read(table + vc.DESC_SIZE * index, vc.DESC_SIZE))
            if flags & vc.VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise VirtqueueError(f"{label}: chain {head}: {where} {index} is an indirect table "
                                         f"inside an indirect table")
                if not self.indirect:
                    raise VirtqueueError(f"{label}: chain {head}: {where} {index} is indirect but "
                                         f"VIRTIO_F_INDIRECT_DESC was not negotiated")
                if flags & vc.VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError(f"{label}: chain {head}: {where} {index} has both INDIRECT and NEXT")
                if length == 0 or length % vc.DESC_SIZE:
                    raise VirtqueueError(f"{label}: chain {head}: indirect table length {length} is not a "
                                         f"positive multiple of {vc.DESC_SIZE}")
                if length > vc.DESC_SIZE * vc.QUEUE_SIZE_MAX:
                    raise VirtqueueError(f"{label}: chain {head}: indirect table of {length // vc.DESC_SIZE} "
                                         f"descriptors (at most {vc.QUEUE_SIZE_MAX})")
                if not self.memory.contains(addr, length):
                    raise VirtqueueError(f"{label}: chain {head}: indirect table {addr:#x}..{addr + length:#x} "
                                         f"is outside guest RAM")
                # The device ignores WRITE on the descriptor naming the table (spec 2.7.5.3.2).
                table, count, where = addr, length // vc.DESC_SIZE, "indirect descriptor"
                in_indirect = True
                seen = set()
                index = 0
                continue
            if length == 0:
                raise VirtqueueError(f"{label}: chain {head}: {where} {index} has length 0")
            if length > vc.MAX_CHAIN_BYTES:
                raise VirtqueueError(f"{label}: chain {head}: {where} {index} has length {length} "
                                     f"(at most {vc.MAX_CHAIN_BYTES})")
            if not self.memory.contains(addr, length):
                raise VirtqueueError(f"{label}: chain {head}: {where} {index} buffer {addr:#x}..{addr + length:#x} "
                                     f"is outside guest RAM")
            total += length
            if total > vc.MAX_CHAIN_BYTES:
                raise VirtqueueError(f"{label}: chain {head}: more than {vc.MAX_CHAIN_BYTES} bytes in all")
            if flags & vc.VIRTQ_DESC_F_WRITE:
                chain.writable.append((addr, length))
                chain.writable_len += length
            elif chain.writable:
                raise VirtqueueError(f"{label}: chain {head}: {where} {index} is device-readable after a "
                                     f"device-writable one (readable buffers come first)")
            else:
                chain.readable.append((addr, length))
                chain.readable_len += length
            if not flags & vc.VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= count:
                raise VirtqueueError(f"{label}: chain {head}: {where} {index} names next {nxt}, outside its "
                                     f"table of {count}")
            index = nxt

    def push_used(self, chain: DescriptorChain, written: int) -> None:
        """Give a chain back to the driver, `written` bytes of its writable buffers filled."""
        if not 0 <= written <= chain.writable_len:
            raise ValueError(f"{self.label}: chain {chain.head}: {written} bytes written, its writable "
                             f"buffers hold {chain.writable_len}")
        if not self.ready or self.broken:
            return
        slot = self.used_addr + 4 + vc.USED_ELEM_SIZE * (self.used_idx % self.size)
        self.memory.write(slot, _USED_ELEM.pack(chain.head, written))
        # The element before the index (x86 keeps the stores in order): the driver reads it after the index.
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.memory.write(self.used_addr + 2, _U16.pack(self.used_idx))

    def needs_interrupt(self) -> bool:
        """After push_used: should the driver be interrupted? EVENT_IDX: only when the used index passed the
        driver's used_event since the last decision; otherwise unless the driver set NO_INTERRUPT."""
        if not self.ready or self.broken:
            return False
        _full_barrier()      # the used index published before the driver's used_event / flags are read
        if self.event_idx:
            old, new = self.signalled_used, self.used_idx
            self.signalled_used = new
            # vring_need_event(event, new, old): the event index lies in [old, new).
            return (new - self.used_event() - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not self.avail_flags() & vc.VIRTQ_AVAIL_F_NO_INTERRUPT

    # --- state ------------------------------------------------------------------------------------
    def save(self) -> dict:
        return {"num": self.size, "ready": self.ready, "desc": self.desc_addr, "driver": self.avail_addr,
                "device": self.used_addr, "last_avail_idx": self.last_avail_idx, "used_idx": self.used_idx,
                "signalled_used": self.signalled_used}

    QUEUE_FIELDS = ("num", "ready", "desc", "driver", "device", "last_avail_idx", "used_idx", "signalled_used")
