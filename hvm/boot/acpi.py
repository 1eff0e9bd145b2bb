"""Minimal ACPI tables for a PC-like guest, written where a BIOS leaves them (0xE0000..0xFFFFF):
RSDP -> RSDT -> FADT (PM timer, PM1 blocks; FACS, DSDT with \\_S3 and \\_S5 so guests can suspend to
RAM and power off), MADT
(one LAPIC per vCPU, the IOAPIC, IRQ0 -> GSI 2 as on a PC). ACPI 1.0 layouts: what kvm-unit-tests
and Linux read. The DSDT also describes each virtio-mmio slot as a "LNRO0005" device (as Firecracker
and QEMU's microvm do), so a kernel finds them without `virtio_mmio.device=` on its command line; the
AML is hand-encoded below (ACPI 6.x section 20, "ACPI Machine Language Specification")."""
from __future__ import annotations

import struct
from collections.abc import Sequence

from hvm.memory import GuestMemory

ACPI_BASE = 0xE0000
OEM_ID = b"HVM   "
OEM_TABLE_ID = b"HVMTABLE"
LAPIC_ADDR = 0xFEE00000
IOAPIC_ADDR = 0xFEC00000
# AML: Name (_S5, Package (4) { 5, 5, 0, 0 }) -- the sleep type the PM1 control register expects for S5.
S5_AML = bytes([0x08, 0x5F, 0x53, 0x35, 0x5F, 0x12, 0x08, 0x04, 0x0A, 0x05, 0x0A, 0x05, 0x00, 0x00])
# AML: Name (_S3, Package (4) { One, One, Zero, Zero }) -- S3's sleep type, 1 as in QEMU's PIIX4 DSDT
# (hvm/mmio/acpi_pm.py S3_SLEEP_TYPE).
S3_AML = bytes([0x08, 0x5F, 0x53, 0x33, 0x5F, 0x12, 0x06, 0x04, 0x01, 0x01, 0x00, 0x00])
# The FACS's Firmware Waking Vector (ACPI 1.0 5.2.9, a 32-bit physical address): where the guest tells the
# firmware to resume from S3 (Machine.wakeup jumps there in real mode, as SeaBIOS's s3_resume).
FACS_WAKING_VECTOR = 12
FACS_ADDR = ACPI_BASE + 0x40    # the first table after the RSDP (write_acpi_tables), on every build
VIRTIO_MMIO_HID = "LNRO0005"   # Linux's virtio_mmio ACPI id (drivers/virtio/virtio_mmio.c)
MADT_LEVEL_HIGH = 0x000D       # MPS INTI flags: polarity 01 (active high), trigger 11 (level)

# AML opcodes (ACPI 6.x, 20.2)
ZERO_OP, ONE_OP, NAME_OP, BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX = 0x00, 0x01, 0x08, 0x0A, \
    0x0B, 0x0C, 0x0D
SCOPE_OP, BUFFER_OP, EXT_OP_PREFIX, DEVICE_OP, ROOT_CHAR = 0x10, 0x11, 0x5B, 0x82, 0x5C


def aml_pkg_length(body_len: int) -> bytes:
    """PkgLength (20.2.4) for a package whose contents after the PkgLength are `body_len` bytes: the
    encoded length counts its own bytes. One byte (6 bits) below 63, else a lead byte holding the byte
    count in bits 7:6 and the low nibble in bits 3:0, followed by the higher bits 8 at a time."""
    if body_len + 1 < 0x40:
        return bytes([body_len + 1])
    for extra in (1, 2, 3):
        total = body_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (total & 0xF)]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"AML package of {body_len} bytes is longer than PkgLength can say")


def aml_integer(value: int) -> bytes:
    """ComputationalData for an integer: ZeroOp, OneOp, or the smallest of Byte/Word/DWord prefix."""
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, size in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4)):
        if value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise ValueError(f"AML integer {value:#x} does not fit a DWord (a revision-1 DSDT's integers are 32-bit)")


def aml_nameseg(name: str) -> bytes:
    """A NameSeg: four characters, A-Z, 0-9 or '_' (the first not a digit), '_'-padded."""
    seg = name.ljust(4, "_")
    if len(seg) != 4 or not all(c.isupper() or c.isdigit() or c == "_" for c in seg) or seg[0].isdigit():
        raise ValueError(f"bad AML name segment {name!r}")
    return seg.encode("ascii")


def aml_string(text: str) -> bytes:
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\0"


def aml_name(name: str, data: bytes) -> bytes:
    """Name (NAME, data): DefName := NameOp NameString DataRefObject."""
    return bytes([NAME_OP]) + aml_nameseg(name) + data


def aml_scope(path: bytes, body: bytes) -> bytes:
    """Scope (path) { body }: ScopeOp PkgLength NameString TermList."""
    inner = path + body
    return bytes([SCOPE_OP]) + aml_pkg_length(len(inner)) + inner


def aml_device(name: str, body: bytes) -> bytes:
    """Device (NAME) { body }: ExtOpPrefix DeviceOp PkgLength NameString TermList."""
    inner = aml_nameseg(name) + body
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + aml_pkg_length(len(inner)) + inner


def aml_buffer(data: bytes) -> bytes:
    """Buffer () { data }: BufferOp PkgLength BufferSize ByteList."""
    inner = aml_integer(len(data)) + data
    return bytes([BUFFER_OP]) + aml_pkg_length(len(inner)) + inner


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate () { ... }: the descriptors, then the End Tag (small item 0x79) whose checksum
    byte makes the whole template sum to zero (6.4.2.9)."""
    body = b"".join(descriptors) + bytes([0x79])
    return body + bytes([_checksum(body)])


def memory32_fixed(base: int, size: int, writable: bool = True) -> bytes:
    """Memory32Fixed (ReadWrite, base, size): large item 0x86, length 9 (6.4.3.4)."""
    return struct.pack("<BHBII", 0x86, 9, 1 if writable else 0, base, size)


def extended_interrupt(irq: int, *, level: bool = True, active_high: bool = True, shared: bool = False) -> bytes:
    """Interrupt (ResourceConsumer, Level|Edge, ActiveHigh|ActiveLow, Exclusive|Shared) { irq }: large item
    0x89 (6.4.3.6). Flags: bit 0 consumer, bit 1 edge (0 = level), bit 2 active low, bit 3 shared."""
    flags = 0x01 | (0 if level else 0x02) | (0 if active_high else 0x04) | (0x08 if shared else 0)
    return struct.pack("<BHBBI", 0x89, 6, flags, 1, irq)


def virtio_mmio_aml(slots: Sequence[tuple[int, int, int]]) -> bytes:
    """Scope (\\_SB) { Device (VR00) { _HID "LNRO0005", _UID 0, _CCA One, _CRS { Memory32Fixed, Interrupt } }
    ... } for each (base, size, irq): what Linux's ACPI scan turns into a platform device virtio_mmio binds."""
    if not slots:
        return b""
    devices = b""
    for n, (base, size, irq) in enumerate(slots):
        crs = resource_template(memory32_fixed(base, size), extended_interrupt(irq))
        devices += aml_device(f"VR{n:02X}", aml_name("_HID", aml_string(VIRTIO_MMIO_HID))
                              + aml_name("_UID", aml_integer(n))
                              + aml_name("_CCA", bytes([ONE_OP]))       # DMA is cache-coherent
                              + aml_name("_CRS", aml_buffer(crs)))
    return aml_scope(bytes([ROOT_CHAR]) + aml_nameseg("_SB_"), devices)


def eisa_id(text: str) -> int:
    """EisaId ("PNP0A03"): three letters packed 5 bits each (big-endian) and four hex digits, as a DWord."""
    c = [ord(ch) - 0x40 for ch in text[:3]]
    packed = ((c[0] << 10) | (c[1] << 5) | c[2]).to_bytes(2, "big") + bytes.fromhex(text[3:])
    return int.from_bytes(packed, "little")


def word_address(kind: int, lo: int, hi: int, type_flags: int = 0) -> bytes:
    """WordBusNumber/WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, lo, hi): large item 0x88,
    length 13 (6.4.3.5.3). kind: 1 I/O, 2 bus numbers; general flags 0x0C: MinFixed | MaxFixed, producer."""
    return struct.pack("<BHBBBHHHHH", 0x88, 13, kind, 0x0C, type_flags, 0, lo, hi, 0, hi - lo + 1)


def dword_memory(lo: int, hi: int, cacheable: bool) -> bytes:
    """DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable|NonCacheable, ReadWrite):
    large item 0x87, length 23 (6.4.3.5.2); type-specific flags: bit 0 read-write, bits 2:1 caching."""
    return struct.pack("<BHBBBIIIII", 0x87, 23, 0, 0x0C, 0x01 | (0x02 if cacheable else 0), 0, lo, hi, 0,
                       hi - lo + 1)


def io_port(base: int, length: int) -> bytes:
    """IO (Decode16, base, base, 1, length): small item 0x47 (6.4.2.5)."""
    return struct.pack("<BBHHBB", 0x47, 0x01, base, base, 1, length)


# The windows PCI0's _CRS gives the bus: as QEMU's pc DSDT, but the 32-bit memory window is only the one
# hvm assigns BARs from (hvm/mmio/pci.py MEM_WINDOW): the virtio-mmio slots at 0xd0000000 stay outside it.
PCI_MEM_WINDOW = (0xC000_0000, 0xCFFF_FFFF)


def pci_host_aml() -> bytes:
    """Scope (\\_SB) { Device (PCI0) { _HID EisaId ("PNP0A03"), _ADR 0, _UID 0, _CRS { bus 0-0xff,
    the config ports 0xCF8-0xCFF, I/O 0-0xcf7 and 0xd00-0xffff, VGA memory 0xa0000-0xbffff, the 32-bit
    window } }: the root bridge Linux's ACPI PCI driver scans (with ACPI IRQ routing, x86 Linux scans only
    the root bridges ACPI describes). No _PRT: no device on the bus has an interrupt pin yet."""
    crs = resource_template(word_address(2, 0, 0xFF), io_port(0xCF8, 8),
                            word_address(1, 0, 0xCF7, 0x03), word_address(1, 0xD00, 0xFFFF, 0x03),
                            dword_memory(0xA0000, 0xBFFFF, True), dword_memory(*PCI_MEM_WINDOW, False))
    device = aml_device("PCI0", aml_name("_HID", aml_integer(eisa_id("PNP0A03")))
                        + aml_name("_ADR", aml_integer(0)) + aml_name("_UID", aml_integer(0))
                        + aml_name("_CRS", aml_buffer(crs)))
    return aml_scope(bytes([ROOT_CHAR]) + aml_nameseg("_SB_"), device)


# The ECAM window of bus 0 (hvm/mmio/pci.py ECAM_BASE/ECAM_SIZE): the MCFG table points at it and a
# motherboard-resources device (PNP0C02) reserves it, which Linux requires before it uses MMCONFIG.
ECAM_BASE, ECAM_SIZE = 0xE000_0000, 1 << 20


def ecam_reserve_aml() -> bytes:
    """Scope (\\_SB) { Device (PCIR) { _HID EisaId ("PNP0C02"), _UID 1, _CRS { Memory32Fixed (ReadOnly,
    ECAM_BASE, ECAM_SIZE) } } }."""
    crs = resource_template(memory32_fixed(ECAM_BASE, ECAM_SIZE, writable=False))
    device = aml_device("PCIR", aml_name("_HID", aml_integer(eisa_id("PNP0C02")))
                        + aml_name("_UID", aml_integer(1)) + aml_name("_CRS", aml_buffer(crs)))
    return aml_scope(bytes([ROOT_CHAR]) + aml_nameseg("_SB_"), device)


def mcfg_body() -> bytes:
    """MCFG (PCI Firmware spec 3.x 4.1.2): 8 reserved bytes, then one allocation: base, segment 0,
    buses 0-0 (the window is ECAM_SIZE: bus 0 only)."""
    return bytes(8) + struct.pack("<QHBBI", ECAM_BASE, 0, 0, (ECAM_SIZE >> 20) - 1, 0)


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


def madt_body(cpus: int, level_irqs: Sequence[int] = ()) -> bytes:
    body = struct.pack("<II", LAPIC_ADDR, 1)                           # PCAT_COMPAT: there are 8259s too
    for i in range(cpus):
        body += struct.pack("<BBBBI", 0, 8, i, i, 1)                     # processor local APIC, enabled
    body += struct.pack("<BBBBII", 1, 12, cpus, 0, IOAPIC_ADDR, 0)      # IOAPIC, GSI base 0
    body += struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0)                    # ISA IRQ0 -> GSI 2
    body += struct.pack("<BBBBIH", 2, 10, 0, 9, 9, MADT_LEVEL_HIGH)     # SCI: level, active high
    # virtio-mmio IRQs: level, active high, so Linux programs their IOAPIC pins level-triggered (the
    # transport holds its line high while InterruptStatus != 0); an ISA IRQ is edge without an override.
    for irq in level_irqs:
        if irq != 9:
            body += struct.pack("<BBBBIH", 2, 10, 0, irq, irq, MADT_LEVEL_HIGH)
    return body


def write_acpi_tables(mem: GuestMemory, cpus: int, pm_base: int,
                      virtio_slots: Sequence[tuple[int, int, int]] = (),
                      level_irqs: Sequence[int] | None = None, pci_host: bool = False) -> dict[str, int]:
    """Write the tables; return their addresses by signature. `virtio_slots`: (base, size, irq) of each
    virtio-mmio device the DSDT describes; `level_irqs` (default: those slots' IRQs) get level-triggered,
    active-high interrupt source overrides in the MADT; `pci_host`: the DSDT has the PCI0 root bridge."""
    if level_irqs is None:
        level_irqs = [irq for _, _, irq in virtio_slots]
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
    assert facs == FACS_ADDR
    pci_aml = pci_host_aml() + ecam_reserve_aml() if pci_host else b""
    dsdt = put("DSDT", _table(b"DSDT", 1, S3_AML + S5_AML + pci_aml + virtio_mmio_aml(virtio_slots)))
    fadt = put("FACP", _table(b"FACP", 1, fadt_body(facs, dsdt, pm_base)))
    madt = put("APIC", _table(b"APIC", 1, madt_body(cpus, level_irqs)))
    tables = [fadt, madt]
    if pci_host:
        tables.append(put("MCFG", _table(b"MCFG", 1, mcfg_body())))
    rsdt = put("RSDT", _table(b"RSDT", 1, struct.pack(f"<{len(tables)}I", *tables)))
    rsdp = struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 0, rsdt)
    rsdp = rsdp[:8] + bytes([_checksum(rsdp)]) + rsdp[9:]
    mem.write(ACPI_BASE, rsdp)
    placed["RSDP"] = ACPI_BASE
    return placed
