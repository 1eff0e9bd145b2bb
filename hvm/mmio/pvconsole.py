"""A paravirtual console: the guest hands over a whole buffer in one exit.

A 16550 costs two exits per byte (poll LSR, write THR) and QEMU's debugcon one. Here the guest writes
the guest-physical address of a descriptor to a doorbell port, and the device reads the bytes out of
guest memory itself: one exit per buffer, whatever its length. That is paravirtualization in
miniature: the guest knows it runs under a hypervisor and uses an interface made for one, as virtio
(whose descriptor layout this borrows) and Xen's console ring do. docs/paravirt.md measures it.

Registers (4 bytes of port space at PVCONSOLE_PORT):
  write u32 at +0  the doorbell: the GPA of a 16-byte descriptor {le64 addr; le32 len; le32 used}.
                   The device sends the `len` bytes at `addr` to the console, then stores in `used`
                   how many it took: `len`, or 0 if the buffer was refused (outside guest RAM, or
                   longer than MAX_BUFFER).
  read  u32 at +0  PVCONSOLE_MAGIC ("hvPC"), so that a guest can probe for the device.
A descriptor that is itself outside guest RAM is dropped with a warning (there is nowhere to answer).
"""
from __future__ import annotations

import logging
import struct
from typing import Callable, Protocol

from hvm.memory import GuestMemoryError

log = logging.getLogger(__name__)

PVCONSOLE_PORT = 0x0E00
PVCONSOLE_LEN = 4
PVCONSOLE_MAGIC = int.from_bytes(b"hvPC", "little")
DESCRIPTOR = struct.Struct("<QII")     # addr, len, used
USED_OFFSET = 12
MAX_BUFFER = 1 << 20                   # a bound on what one doorbell makes the VMM copy


class GuestRam(Protocol):
    """What the device needs of guest memory (hvm.memory.GuestMemory is one); an access outside
    guest RAM raises GuestMemoryError."""

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...


class PvConsole:
    name = "pvconsole"

    def __init__(self, ram: GuestRam, output: Callable[[bytes], None]):
        self._ram = ram
        self._output = output
        self.buffers = 0          # doorbells answered with the buffer taken
        self.refused = 0          # descriptors refused or dropped

    def read(self, offset: int, size: int) -> int:
        return (PVCONSOLE_MAGIC >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0 or size != 4:
            log.warning("pvconsole: %d-byte write at +%d ignored (the doorbell is a u32 at +0)", size, offset)
            return
        try:
            addr, length, _ = DESCRIPTOR.unpack(self._ram.read(value, DESCRIPTOR.size))
        except GuestMemoryError as e:
            self.refused += 1
            log.warning("pvconsole: descriptor at %#x dropped: %s", value, e)
            return
        used = 0
        if length > MAX_BUFFER:
            log.warning("pvconsole: buffer of %d bytes at %#x refused (at most %d)", length, addr, MAX_BUFFER)
        else:
            try:
                data = self._ram.read(addr, length)
            except GuestMemoryError as e:
                log.warning("pvconsole: buffer refused: %s", e)
            else:
                self._output(data)
                used = length
        if used == length:
            self.buffers += 1
        else:
            self.refused += 1
        self._ram.write(value + USED_OFFSET, used.to_bytes(4, "little"))
