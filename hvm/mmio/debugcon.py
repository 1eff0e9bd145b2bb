"""QEMU's isa-debugcon (Bochs' "port 0xe9 hack"): each byte the guest writes to the port goes to the
console; a read returns 0xe9, which is how a guest finds out the port is there.

There is no status register to poll, so a byte costs one exit where the 16550 costs two (LSR, THR):
the first step from emulating hardware towards an interface made for a hypervisor (docs/paravirt.md).
"""
from __future__ import annotations

from typing import Callable

from hvm.mmio.device import Stateless
from hvm.mmio.registry import DeviceType, Prop

DEBUGCON_PORT = 0xE9
DEBUGCON_READBACK = 0xE9


class DebugCon(Stateless):
    name = "debugcon"

    def __init__(self, output: Callable[[bytes], None]):
        self._output = output

    # No device state (Stateless): every byte goes out at once
    def read(self, offset: int, size: int) -> int:
        return DEBUGCON_READBACK

    def write(self, offset: int, size: int, value: int) -> None:
        # As QEMU: one character per write, whatever the access size.
        self._output(bytes((value & 0xFF,)))


def _create(ctx, props: dict) -> DebugCon:
    device = DebugCon(ctx.console.write)
    ctx.pio.register(props["port"], 1, device)
    return device


DEVICE = DeviceType(
    name="debugcon", aliases=("isa-debugcon",), create=_create, uses_console=True,
    help="QEMU's isa-debugcon: each byte written to the port goes to the console (one exit per byte)",
    props=(Prop("port", "port", DEBUGCON_PORT, alias="iobase", help="the I/O port"),),
    ports=lambda p: [(p["port"], 1)])
