"""A paravirtual console: the guest hands over a whole buffer in one exit.

A 16550 costs two exits per byte (poll LSR, write THR) and QEMU's debugcon one. Here the guest writes
the guest-physical address of a descriptor to a doorbell port, and the device reads the bytes out of
guest memory itself: one exit per buffer, whatever its length. That is paravirtualization in
miniature: the guest knows it runs under a hypervisor and uses an interface made for one, as virtio
(whose descriptors also start with a le64 address and a le32 length) and Xen's console ring do.
docs/paravirt.md measures it.

Registers (4 bytes of port space at PVCONSOLE_PORT):
  write u32 at +0  the doorbell: the GPA (below 4 GiB) of a 16-byte descriptor {le64 addr; le32 len;
                   le32 used}.
                   The device sends the `len` bytes at `addr` to the console, then stores in `used`
                   how many it took: `len`, or 0 if the buffer was refused (outside guest RAM, or
                   longer than MAX_BUFFER).
  read  u32 at +0  PVCONSOLE_MAGIC ("hvPC"), so that a guest can probe for the device.
A descriptor that is itself outside guest RAM is dropped (there is nowhere to answer). Refusals are
counted; the first is logged as a warning.
"""
from __future__ import annotations

import logging
import struct
import threading
from typing import Callable, Protocol

from hvm.memory import GuestMemoryError
from hvm.mmio.device import Stateless
from hvm.mmio.registry import DeviceType, Prop

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


class PvConsole(Stateless):
    name = "pvconsole"

    def __init__(self, ram: GuestRam, output: Callable[[bytes], None]):
        self._ram = ram
        self._output = output
        self.buffers = 0          # doorbells answered with the buffer taken
        self.refused = 0          # doorbells refused or dropped
        self._count_lock = threading.Lock()   # several vCPUs may ring at once: the counts stay exact

    # No device state (Stateless): a doorbell is handled whole in one
    # exit (the counters are this process's statistics)
    def read(self, offset: int, size: int) -> int:
        return (PVCONSOLE_MAGIC >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0 or size != 4:
            self._refuse(f"{size}-byte write at +{offset} ignored (the doorbell is a u32 at +0)")
            return
        try:
            addr, length, _ = DESCRIPTOR.unpack(self._ram.read(value, DESCRIPTOR.size))
        except GuestMemoryError as e:
            self._refuse(f"descriptor at {value:#x} dropped: {e}")
            return
        if length > MAX_BUFFER:
            self._refuse(f"buffer of {length} bytes at {addr:#x} refused (at most {MAX_BUFFER})")
            used = 0
        else:
            try:
                data = self._ram.read(addr, length)
            except GuestMemoryError as e:
                self._refuse(f"buffer refused: {e}")
                used = 0
            else:
                self._output(data)
                with self._count_lock:
                    self.buffers += 1
                used = length
        # cannot fail: the descriptor was just read from the same RAM
        self._ram.write(value + USED_OFFSET, used.to_bytes(4, "little"))

    def _refuse(self, why: str) -> None:
        # A guest can ring the doorbell in a loop: the first refusal is a warning, the rest debug lines
        # (as the bus warns once per unclaimed address).
        with self._count_lock:
            self.refused += 1
            first = self.refused == 1
        log.log(logging.WARNING if first else logging.DEBUG, "pvconsole: %s", why)


def _create(ctx, props: dict) -> PvConsole:
    device = PvConsole(ctx.memory, ctx.console.write)
    ctx.pio.register(props["port"], PVCONSOLE_LEN, device)
    return device


DEVICE = DeviceType(
    name="pvconsole", create=_create, uses_console=True,
    help="hvm's paravirtual console: one exit per buffer (docs/paravirt.md)",
    props=(Prop("port", "int", PVCONSOLE_PORT, lo=0, hi=0x10000 - PVCONSOLE_LEN, alias="iobase",
                help="the I/O port of the doorbell"),),
    ports=lambda p: [(p["port"], PVCONSOLE_LEN)])
