"""Loaders on their own: they write GuestMemory and return a BootState, no KVM involved."""
from __future__ import annotations

import struct

import pytest

from conftest import FIRMWARE
from hvm.boot import BootError, Module, load_flat, load_multiboot
from hvm.boot import cpu_modes, multiboot
from hvm.memory import GuestMemory, ram_layout


@pytest.fixture
def mem():
    with GuestMemory(64 << 20) as m:
        yield m


def cstring(mem: GuestMemory, addr: int) -> bytes:
    data = mem.read(addr, 256)
    return data[:data.index(0)]


def test_multiboot_info(mem, tmp_path):
    mod = tmp_path / "env"
    mod.write_bytes(b"KEY=value\n")
    state = load_multiboot(mem, FIRMWARE / "mbtest.elf", "exit=3 x", (Module(mod),))
    assert state.mode == "protected"
    assert state.regs["rax"] == 0x2BADB002
    mbi = state.regs["rbx"]
    flags, mem_lower, mem_upper, _bd, cmdline, mods_count, mods_addr = struct.unpack_from("<7I", mem.read(mbi, 28))
    assert flags & 0x24D == 0x24D                      # memory, cmdline, mods, mmap, loader name
    assert (mem_lower, mem_upper) == (639, (64 << 20) // 1024 - 1024)
    assert cstring(mem, cmdline) == f"{FIRMWARE / 'mbtest.elf'} exit=3 x".encode()
    assert mods_count == 1
    start, end, name, _ = struct.unpack("<4I", mem.read(mods_addr, 16))
    assert mem.read(start, end - start) == b"KEY=value\n"
    assert start % 4096 == 0
    assert cstring(mem, name) == str(mod).encode()
    mmap_len, mmap_addr = struct.unpack("<2I", mem.read(mbi + 44, 8))
    entries = [struct.unpack_from("<IQQI", mem.read(mmap_addr, mmap_len), off) for off in range(0, mmap_len, 24)]
    assert [(b, l, t) for _s, b, l, t in entries] == [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2),
                                                      (0x100000, (64 << 20) - 0x100000, 1)]
    assert cstring(mem, struct.unpack("<I", mem.read(mbi + 64, 4))[0]) == b"hvm"
    assert state.cs.selector == 0x10 and state.cs.db == 1 and state.cs.limit == 0xFFFFFFFF
    assert state.cr0 & 1


def test_multiboot_segments_are_loaded_at_their_physical_address(mem):
    data = (FIRMWARE / "mbtest.elf").read_bytes()
    state = load_multiboot(mem, FIRMWARE / "mbtest.elf")
    assert state.rip == struct.unpack_from("<I", data, 24)[0]     # e_entry
    assert mem.read(0x200000, 4) == struct.pack("<I", multiboot.HEADER_MAGIC)


def test_aout_kludge_kernel(mem, tmp_path):
    # A raw (non-ELF) multiboot image that gives its load addresses in the header (flags bit 16).
    load = 0x100000
    code = b"\xf4"                                                  # hlt
    flags = multiboot.HF_AOUT_KLUDGE
    header = struct.pack("<3I5I", multiboot.HEADER_MAGIC, flags, -(multiboot.HEADER_MAGIC + flags) & 0xFFFFFFFF,
                         load, load, 0, load + 0x1000, load + 32)
    image = header + code
    k = tmp_path / "aout.bin"
    k.write_bytes(image)
    state = load_multiboot(mem, k)
    assert state.rip == load + 32
    assert mem.read(load, len(image)) == image
    assert mem.read(load + len(image), 16) == bytes(16)             # bss zeroed


def test_multiboot_errors(mem, tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\0" * 100)
    with pytest.raises(BootError, match="no multiboot header in the first 8192 bytes"):
        load_multiboot(mem, bad)
    elf64 = FIRMWARE / "hello64.elf"
    hdr = struct.pack("<3I", multiboot.HEADER_MAGIC, 0, -multiboot.HEADER_MAGIC & 0xFFFFFFFF)
    data = bytearray(elf64.read_bytes())
    data[0x100:0x10C] = hdr
    k = tmp_path / "k64"
    k.write_bytes(bytes(data))
    with pytest.raises(BootError, match="a multiboot ELF must be 32-bit i386 \\(this one is 64-bit\\)"):
        load_multiboot(mem, k)


def test_kernel_too_big_for_memory(tmp_path):
    with GuestMemory(2 << 20) as small:
        with pytest.raises(BootError, match="does not fit in guest memory \\(2 MiB\\)"):
            load_multiboot(small, FIRMWARE / "mbtest.elf")   # linked at 2 MiB


def test_flat_long_mode_tables(mem):
    state = load_flat(mem, FIRMWARE / "hello64.bin", 0x100000, 0x100000, "long")
    assert (state.cr3, state.efer & 0x500, state.cr4 & 0x20) == (cpu_modes.PML4_ADDR, 0x500, 0x20)
    assert state.cr0 & 0x80000001 == 0x80000001
    assert state.cs.l == 1 and state.cs.db == 0
    pml4e = struct.unpack("<Q", mem.read(cpu_modes.PML4_ADDR, 8))[0]
    assert pml4e & ~0xFFF == cpu_modes.PDPT_ADDR
    # the PD entry for 3 GiB + 2 MiB maps exactly that address, as a 2 MiB page
    pde = struct.unpack("<Q", mem.read(cpu_modes.PD_ADDR + (3 * 512 + 1) * 8, 8))[0]
    assert pde == (3 << 30) + (2 << 20) | 0x83


def test_ram_layout_leaves_the_pci_hole():
    assert ram_layout(64 << 20) == [(0, 64 << 20)]
    assert ram_layout(4 << 30) == [(0, 3 << 30), (4 << 30, 1 << 30)]


def test_guest_memory_bounds(mem):
    mem.write(0x1000, b"abc")
    assert mem.read(0x1000, 3) == b"abc"
    with pytest.raises(Exception, match="outside guest RAM"):
        mem.read((64 << 20) - 2, 4)


def test_guest_ram_is_not_inherited_by_children():
    """Each region is MADV_DONTFORK, as QEMU's guest RAM: a forked child gets none of it, and the kernel
    never merges it with a neighbouring mapping that is not guest RAM (VmFlags `dc` in smaps)."""
    with GuestMemory((3 << 30) + (4 << 20)) as m:
        vmas, current = [], None
        with open("/proc/self/smaps") as f:
            for line in f:
                first = line.split()[0]
                if "-" in first and not first.endswith(":"):
                    current = [int(x, 16) for x in first.split("-")]
                elif first == "VmFlags:":
                    vmas.append((current[0], current[1], line.split()[1:]))
        assert len(m.regions) == 2
        for r in m.regions:
            holding = [flags for lo, hi, flags in vmas if lo <= r.host_addr and r.host_addr + r.size <= hi]
            assert len(holding) == 1 and "dc" in holding[0], (r, holding)
