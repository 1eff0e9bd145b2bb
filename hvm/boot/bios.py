"""What a PC BIOS leaves behind that real-mode guests rely on, without running a BIOS:
a real-mode interrupt vector table whose every entry points at a stub in the BIOS area
(IRET; for hardware IRQ vectors, EOI to the 8259s first), and the state a BIOS programs
into the 8259 PICs (vector bases 0x08 / 0x70, timer and cascade unmasked) and the PIT
(channel 0 at 18.2 Hz). The interrupt-controller values are applied by the Machine."""
from __future__ import annotations

import struct

from hvm.memory import GuestMemory

BIOS_SEGMENT = 0xF000
STUB_BASE = 0xFF00            # offset in the BIOS segment: stubs at 0xFFF00..
IRET = b"\xcf"
# push ax; mov al, 0x20; out 0x20, al; pop ax; iret
MASTER_EOI_IRET = bytes([0x50, 0xB0, 0x20, 0xE6, 0x20, 0x58, 0xCF])
# push ax; mov al, 0x20; out 0xa0, al; out 0x20, al; pop ax; iret
SLAVE_EOI_IRET = bytes([0x50, 0xB0, 0x20, 0xE6, 0xA0, 0xE6, 0x20, 0x58, 0xCF])

PIC_MASTER_BASE = 0x08
PIC_SLAVE_BASE = 0x70
PIC_MASTER_IMR = 0xFF & ~((1 << 0) | (1 << 2))   # timer and cascade unmasked
PIC_SLAVE_IMR = 0xFF
PIT_HZ = 1193182
PIT_BIOS_COUNT = 0x10000                          # 18.2 Hz, as every PC BIOS programs it
PIT_MODE_RATE_GENERATOR = 2


def write_real_mode_ivt(mem: GuestMemory) -> None:
    stubs = IRET + MASTER_EOI_IRET + SLAVE_EOI_IRET
    iret_off = STUB_BASE
    master_off = STUB_BASE + len(IRET)
    slave_off = master_off + len(MASTER_EOI_IRET)
    mem.write(BIOS_SEGMENT * 16 + STUB_BASE, stubs)
    ivt = bytearray()
    for vector in range(256):
        if PIC_MASTER_BASE <= vector < PIC_MASTER_BASE + 8:
            off = master_off
        elif PIC_SLAVE_BASE <= vector < PIC_SLAVE_BASE + 8:
            off = slave_off
        else:
            off = iret_off
        ivt += struct.pack("<HH", off, BIOS_SEGMENT)
    mem.write(0, bytes(ivt))
