"""What a VMM must put in guest memory and registers to start a CPU in real, protected or long mode:
a GDT with flat segments, and for long mode identity-mapped page tables.

Layout (all below 0x7000, the area a PC BIOS leaves free; images must not load there):
  0x0500  GDT        0x1000  PML4     0x2000  PDPT     0x3000-0x6fff  four page directories (2 MiB pages)
"""
from __future__ import annotations

import struct

from hvm.boot.state import BootState, Segment
from hvm.memory import GuestMemory

GDT_ADDR = 0x500
PML4_ADDR = 0x1000
PDPT_ADDR = 0x2000
PD_ADDR = 0x3000
RESERVED_END = 0x7000  # first byte a loaded image may use

# Selectors, as the Linux boot protocol and QEMU's multiboot loader use them.
BOOT_CS = 0x10
BOOT_DS = 0x18

# Architectural control-register and flag bits (hvm/vcpu/complete.py takes its own from here too).
CR0_PE = 1 << 0
CR0_TS = 1 << 3
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
CR4_OSXSAVE = 1 << 18
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18

PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_PS = 1 << 7  # 2 MiB page in a page directory entry


def gdt_entry(base: int, limit: int, flags: int) -> int:
    """An 8-byte segment descriptor; `flags` holds access byte (bits 0-7) and G/DB/L (bits 12-15)."""
    return ((base & 0xFF000000) << 32 | (flags & 0xF0FF) << 40 | (limit & 0xF0000) << 32
            | (base & 0x00FFFFFF) << 16 | (limit & 0x0000FFFF))


CODE32 = gdt_entry(0, 0xFFFFF, 0xC09B)  # present, ring 0, code RX accessed, 4K granular, 32-bit
CODE64 = gdt_entry(0, 0xFFFFF, 0xA09B)  # present, ring 0, code RX accessed, 4K granular, long mode
DATA = gdt_entry(0, 0xFFFFF, 0xC093)    # present, ring 0, data RW accessed, 4K granular, 32-bit


def write_gdt(mem: GuestMemory, code: int) -> tuple[int, int]:
    entries = [0, 0, code, DATA]
    mem.write(GDT_ADDR, struct.pack(f"<{len(entries)}Q", *entries))
    return GDT_ADDR, len(entries) * 8 - 1


def write_identity_page_tables(mem: GuestMemory) -> int:
    """Identity-map the first 4 GiB with 2 MiB pages; returns CR3."""
    mem.write(PML4_ADDR, struct.pack("<Q", PDPT_ADDR | PTE_PRESENT | PTE_WRITE) + bytes(4088))
    mem.write(PDPT_ADDR, struct.pack("<4Q", *[(PD_ADDR + i * 0x1000) | PTE_PRESENT | PTE_WRITE for i in range(4)])
              + bytes(4096 - 32))
    pds = struct.pack("<2048Q", *[(i << 21) | PTE_PRESENT | PTE_WRITE | PTE_PS for i in range(2048)])
    mem.write(PD_ADDR, pds)
    return PML4_ADDR


def flat_segments(long_mode: bool) -> tuple[Segment, Segment]:
    code = Segment(BOOT_CS, limit=0xFFFFFFFF, type=0xB, g=1, db=0 if long_mode else 1, l=1 if long_mode else 0)
    data = Segment(BOOT_DS, limit=0xFFFFFFFF, type=0x3, g=1, db=1)
    return code, data


def real_mode_state(entry: int) -> BootState:
    """Real mode, CS:IP addressing `entry` (CS=0 when it fits in 64 KiB, as a BIOS jumps to 0:7c00)."""
    cs_sel = 0 if entry < 0x10000 else (entry >> 4) & 0xF000
    return BootState(
        mode="real", rip=entry - cs_sel * 16,
        cs=Segment(cs_sel, base=cs_sel * 16, type=0xB), data=Segment(0),
        regs={"rsp": RESERVED_END},
    )


def protected_mode_state(mem: GuestMemory, entry: int) -> BootState:
    """32-bit protected mode, flat 4 GiB segments, paging off."""
    gdt = write_gdt(mem, CODE32)
    cs, data = flat_segments(long_mode=False)
    return BootState(mode="protected", rip=entry, cs=cs, data=data, gdt=gdt, idt=(0, 0),
                     cr0=CR0_PE | CR0_ET, regs={"rsp": RESERVED_END})


def long_mode_state(mem: GuestMemory, entry: int) -> BootState:
    """64-bit long mode, first 4 GiB identity-mapped with 2 MiB pages."""
    gdt = write_gdt(mem, CODE64)
    cr3 = write_identity_page_tables(mem)
    cs, data = flat_segments(long_mode=True)
    return BootState(mode="long", rip=entry, cs=cs, data=data, gdt=gdt, idt=(0, 0),
                     cr0=CR0_PE | CR0_ET | CR0_PG, cr3=cr3, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA,
                     regs={"rsp": RESERVED_END})


def state_for_mode(mode: str, mem: GuestMemory, entry: int) -> BootState:
    if mode == "real":
        return real_mode_state(entry)
    if mode == "protected":
        return protected_mode_state(mem, entry)
    if mode == "long":
        return long_mode_state(mem, entry)
    raise ValueError(f"unknown CPU mode {mode!r}")
