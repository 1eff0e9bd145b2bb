"""Minimal ACPI tables for a PC-like guest, written where a BIOS leaves them (0xE0000..0xFFFFF):
RSDP -> RSDT -> FADT (PM timer, PM1 blocks; FACS, DSDT with \\_S5 so guests can power off), MADT
(one LAPIC per vCPU, the IOAPIC, IRQ0 -> GSI 2 as on a PC). ACPI 1.0 layouts: what kvm-unit-tests
and Linux read."""
from __future__ import annotations

import struct

from hvm.memory import GuestMemory

ACPI_BASE = 0xE0000
OEM_ID = b"HVM   "
OEM_TABLE_ID = b"HVMTABLE"
LAPIC_ADDR = 0xFEE00000
IOAPIC_ADDR = 0xFEC00000
# AML: Name (_S5, Package (4) { 5, 5, 0, 0 }) -- the sleep type the PM1 control register expects for S5.
S5_AML = bytes([0x08, 0x5F, 0x53, 0x35, 0x5F, 0x12, 0x08, 0x04, 0x0A, 0x05, 0x0A, 0x05, 0x00, 0x00])


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    length = 36 + len(body)
    header = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, b"HVM ", 1)
    raw = header + body
    return raw[:9] + bytes([_checksum(raw)]) + raw[10:]


def fadt_body(facs: int, dsdt: int, pm_base: int, sci_irq: int = 9) -> bytes:
    return struct.pack(
        "<IIBBHIBBBBIIIIIIIIBBBBBBBBHHHHBBBBBHBI",
        facs, dsdt, 0, 0, sci_irq, 0, 0, 0, 0, 0,   # no SMI_CMD: always in ACPI mode
        pm_base, 0, pm_base + 4, 0, 0, pm_base + 8, 0, 0,
        4, 2, 0, 4, 0, 0, 0, 0,                      # pm1_evt_len, pm1_cnt_len, pm2, pm_tmr_len, gpe...
        0x65, 0x3E9, 0, 0, 0, 0, 0, 0, 0x32,         # C2/C3 not supported; century at CMOS 0x32
        0, 0,                                        # IA-PC boot arch flags, reserved
        # WBINVD; SLP_BUTTON set: no sleep button. PWR_BUTTON (bit 4) clear: the power button is the
        # fixed-feature one in PM1 (PWRBTN_STS/EN, hvm/mmio/acpi_pm.py), QMP system_powerdown's.
        (1 << 0) | (1 << 5),
    )


def madt_body(cpus: int) -> bytes:
    body = struct.pack("<II", LAPIC_ADDR, 1)                           # PCAT_COMPAT: there are 8259s too
    for i in range(cpus):
        body += struct.pack("<BBBBI", 0, 8, i, i, 1)                     # processor local APIC, enabled
    body += struct.pack("<BBBBII", 1, 12, cpus, 0, IOAPIC_ADDR, 0)      # IOAPIC, GSI base 0
    body += struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0)                    # ISA IRQ0 -> GSI 2
    body += struct.pack("<BBBBIH", 2, 10, 0, 9, 9, 0x000D)              # SCI: level, active high
    return body


def write_acpi_tables(mem: GuestMemory, cpus: int, pm_base: int) -> dict[str, int]:
    """Write the tables; return their addresses by signature."""
    addr = ACPI_BASE + 0x40                       # RSDP first, then the tables, 64-byte aligned
    placed: dict[str, int] = {}

    def put(name: str, blob: bytes) -> int:
        nonlocal addr
        at = addr
        mem.write(at, blob)
        placed[name] = at
        addr = (addr + len(blob) + 63) & ~63
        return at

    facs = put("FACS", struct.pack("<4sIIIII", b"FACS", 64, 0, 0, 0, 0).ljust(64, b"\0"))
    dsdt = put("DSDT", _table(b"DSDT", 1, S5_AML))
    fadt = put("FACP", _table(b"FACP", 1, fadt_body(facs, dsdt, pm_base)))
    madt = put("APIC", _table(b"APIC", 1, madt_body(cpus)))
    rsdt = put("RSDT", _table(b"RSDT", 1, struct.pack("<II", fadt, madt)))
    rsdp = struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 0, rsdt)
    rsdp = rsdp[:8] + bytes([_checksum(rsdp)]) + rsdp[9:]
    mem.write(ACPI_BASE, rsdp)
    placed["RSDP"] = ACPI_BASE
    return placed
