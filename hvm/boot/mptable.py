"""The Intel MultiProcessor Specification (v1.4) tables a PC BIOS leaves for the operating system: a
floating pointer structure ("_MP_") in the BIOS area pointing at a configuration table ("PCMP") that
lists the processors (one local APIC each, vCPU 0 the bootstrap processor), the ISA bus, the IOAPIC and
how the ISA interrupts reach it -- the same facts as the ACPI MADT (hvm/boot/acpi.py), for guests that
read this table instead (Linux with `acpi=off`, older kernels, small multiboot kernels). Written by the
pc machine at MP_BASE, inside the BIOS area the memory map reserves."""
from __future__ import annotations

import struct
from collections.abc import Sequence

from hvm.boot.acpi import IOAPIC_ADDR, LAPIC_ADDR
from hvm.memory import GuestMemory

MP_BASE = 0xF0000              # floating pointer; the configuration table follows it (16-byte aligned)
SPEC_REV = 4                   # MP spec 1.4
LAPIC_VERSION = 0x14           # as KVM's in-kernel LAPIC reports
IOAPIC_VERSION = 0x11
CPU_SIGNATURE = 0x600          # family 6; the OS reads CPUID itself
CPU_FEATURES = (1 << 0) | (1 << 9)   # FPU, APIC
INT, NMI, EXTINT = 0, 1, 3     # interrupt types
ISA_BUS = 0
SCI_IRQ = 9
LEVEL_HIGH = 0x1 | (0x3 << 2)  # polarity active high, trigger level (the SCI, as in the MADT)


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def mp_config_table(cpus: int, level_irqs: Sequence[int] = ()) -> bytes:
    """The configuration table: header and base entries. `level_irqs` (the virtio-mmio IRQs) are
    level-triggered, active high, like the SCI (and as the MADT says)."""
    entries = []
    for i in range(cpus):       # processors, in APIC id order; vCPU 0 is the BSP
        flags = 1 | (2 if i == 0 else 0)
        entries.append(struct.pack("<BBBBII8x", 0, i, LAPIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES))
    entries.append(struct.pack("<BB6s", 1, ISA_BUS, b"ISA   "))
    ioapic_id = cpus            # after the local APICs, as in the MADT
    entries.append(struct.pack("<BBBBI", 2, ioapic_id, IOAPIC_VERSION, 1, IOAPIC_ADDR))
    for irq in range(16):       # ISA IRQs to IOAPIC pins: identity, IRQ0 (PIT) on pin 2, no IRQ2 (cascade)
        if irq == 2:
            continue
        pin = 2 if irq == 0 else irq
        flags = LEVEL_HIGH if irq == SCI_IRQ or irq in level_irqs else 0
        entries.append(struct.pack("<BBHBBBB", 3, INT, flags, ISA_BUS, irq, ioapic_id, pin))
    # Local interrupts of every LAPIC (id 0xff): LINT0 is the 8259's ExtINT (virtual wire), LINT1 NMI.
    entries.append(struct.pack("<BBHBBBB", 4, EXTINT, 0, ISA_BUS, 0, 0xFF, 0))
    entries.append(struct.pack("<BBHBBBB", 4, NMI, 0, ISA_BUS, 0, 0xFF, 1))
    body = b"".join(entries)
    length = 44 + len(body)
    header = struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", length, SPEC_REV, 0, b"HVM     ", b"HVM PC      ",
                         0, 0, len(entries), LAPIC_ADDR, 0, 0, 0)
    raw = header + body
    return raw[:7] + bytes([_checksum(raw)]) + raw[8:]


def mp_floating_pointer(table_addr: int) -> bytes:
    raw = struct.pack("<4sIBBB5s", b"_MP_", table_addr, 1, SPEC_REV, 0, bytes(5))  # feature 1 = 0: table given
    return raw[:10] + bytes([_checksum(raw)]) + raw[11:]


def write_mp_table(mem: GuestMemory, cpus: int, level_irqs: Sequence[int] = ()) -> int:
    """Write the floating pointer at MP_BASE and the table after it; return the table's address."""
    table_addr = MP_BASE + 16
    mem.write(table_addr, mp_config_table(cpus, level_irqs))
    mem.write(MP_BASE, mp_floating_pointer(table_addr))
    return table_addr
