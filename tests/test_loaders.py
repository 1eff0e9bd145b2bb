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


# --- hardening (issue 11): one placement check for every loader, bss without host memory, real-mode limits ---

def elf32_multiboot(paddr=0x200000, entry=None, filesz=64, memsz=64 + 4096, extra_segments=()) -> bytes:
    """An i386 multiboot ELF: one PT_LOAD at `paddr` (its first bytes the multiboot header, then hlt) and
    any `extra_segments` (paddr, filesz, memsz) after it."""
    segs = [(paddr, filesz, memsz), *extra_segments]
    code_off = 0x1000
    eh = struct.pack("<4sBBBB8sHHIIIIIHHHHHH", b"\x7fELF", 1, 1, 1, 0, bytes(8), 2, 3, 1,
                     paddr + 12 if entry is None else entry, 52, 0, 0, 52, 32, len(segs), 40, 0, 0)
    phs = b"".join(struct.pack("<8I", 1, code_off, p, p, fs, ms, 5, 0x1000) for p, fs, ms in segs)
    mb = struct.pack("<3I", multiboot.HEADER_MAGIC, 0, -multiboot.HEADER_MAGIC & 0xFFFFFFFF)
    code = (mb + b"\xf4" * 64)[:max(fs for _p, fs, _m in segs)]
    return (eh + phs).ljust(code_off, b"\0") + code.ljust(max(fs for _p, fs, _m in segs), b"\xf4")


RSS_CHILD = """
import sys
from pathlib import Path
from hvm.boot import BootError, load_multiboot
from hvm.boot.linux import load_linux
from hvm.memory import GuestMemory
loader = load_multiboot if sys.argv[1] == "multiboot" else load_linux
with GuestMemory(int(sys.argv[3])) as mem:
    try:
        state = loader(mem, Path(sys.argv[2]))
        print("loaded", mem.read(int(sys.argv[4]), 8).hex())
    except BootError as e:
        print("refused", e)
# VmHWM: the peak RSS of this process's memory since exec (ru_maxrss would also count the parent's, which
# Linux carries across fork and exec).
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def _load_in_child(kind: str, path, ram: int, probe: int) -> tuple[str, int]:
    """Load in a fresh interpreter and return (its verdict line, its peak RSS in bytes): the peak counts
    every transient allocation, which RSS measured before and after the call would not."""
    import subprocess
    import sys
    from conftest import ROOT
    proc = subprocess.run([sys.executable, "-c", RSS_CHILD, kind, str(path), str(ram), str(probe)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    verdict, peak = proc.stdout.splitlines()
    return verdict, int(peak)


@pytest.mark.parametrize("kind", ["multiboot", "vmlinux"])
def test_a_1gib_bss_costs_no_host_memory(tmp_path, kind):
    """A 4 KiB kernel whose segment has a 1 GiB p_memsz: the bss is zeroed without building 1 GiB of zeros on
    the host (it was: 2.1 GB peak). Fits in 1.1 GiB of RAM: loads, the bss reads as zeros, the peak RSS of
    the whole process stays under 100 MB (~20 MB is the interpreter)."""
    from test_linux_loader import elf64
    paddr = 0x200000 if kind == "multiboot" else 0x1000000
    if kind == "multiboot":
        data = elf32_multiboot(paddr, memsz=1 << 30)
    else:
        data = bytearray(elf64(paddr=paddr))
        struct.pack_into("<Q", data, 64 + 40, 1 << 30)           # p_memsz of the one PT_LOAD
    k = tmp_path / "kernel"
    k.write_bytes(bytes(data))
    assert k.stat().st_size < 8192
    verdict, peak = _load_in_child(kind, k, (1 << 30) + (64 << 20), paddr + (512 << 20))
    assert verdict == "loaded " + "00" * 8
    assert peak < 100 << 20, f"peak RSS {peak >> 20} MiB"
    # The same kernel in 64 MiB: refused in one line before anything is allocated.
    verdict, peak = _load_in_child(kind, k, 64 << 20, 0)
    assert verdict == f"refused {k}: segment {paddr:#x}..{paddr + (1 << 30):#x} does not fit in guest memory (64 MiB)"
    assert peak < 100 << 20


def test_bss_is_zeroed_even_over_old_contents(mem):
    """GuestMemory.zero drops whole pages and writes the partial ones: exact boundaries, over memory that
    was not fresh."""
    mem.write(0x300000, b"\xaa" * 0x5000)
    mem.zero(0x300123, 0x3000)
    got = mem.read(0x300000, 0x5000)
    assert got[:0x123] == b"\xaa" * 0x123
    assert got[0x123:0x3123] == bytes(0x3000)
    assert got[0x3123:] == b"\xaa" * (0x5000 - 0x3123)


@pytest.mark.parametrize("paddr,what", [
    (0x0, "the real-mode IVT (machine pc) at 0x0..0x400"),
    (0x480, "the GDT hvm keeps at 0x500..0x600"),
    (0x9F000, "the BIOS area (EBDA, VGA, ACPI tables), reserved in the memory map at 0x9fc00..0x100000"),
])
def test_multiboot_segment_overlapping_what_hvm_writes(mem, tmp_path, paddr, what):
    k = tmp_path / "k"
    k.write_bytes(elf32_multiboot(paddr))
    with pytest.raises(BootError) as e:
        load_multiboot(mem, k)
    assert str(e.value) == f"{k}: segment {paddr:#x}..{paddr + 64 + 4096:#x} overlaps {what}"


def test_multiboot_segments_overlapping_each_other(mem, tmp_path):
    k = tmp_path / "k"
    k.write_bytes(elf32_multiboot(0x200000, extra_segments=[(0x200800, 64, 64)]))
    with pytest.raises(BootError) as e:
        load_multiboot(mem, k)
    assert str(e.value) == f"{k}: segment 0x200800..0x200840 overlaps segment at 0x200000..0x201040"
    assert mem.read(0x200000, 16) == bytes(16)        # refused before anything was written


def test_multiboot_entry_outside_the_kernel(mem, tmp_path):
    k = tmp_path / "k"
    k.write_bytes(elf32_multiboot(0x200000, entry=0x400000))
    with pytest.raises(BootError) as e:
        load_multiboot(mem, k)
    assert str(e.value) == f"{k}: entry 0x400000 is not in any loaded segment"


def test_multiboot_modules_and_info_skip_the_bios_area(mem, tmp_path):
    """A kernel ending just below the BIOS area: modules and the info block go above it, not into it."""
    mod = tmp_path / "m"
    mod.write_bytes(b"M" * 5000)
    k = tmp_path / "k"
    k.write_bytes(elf32_multiboot(0x9E000, memsz=64))
    state = load_multiboot(mem, k, "", (Module(mod),))
    mods_addr = struct.unpack("<I", mem.read(state.regs["rbx"] + 24, 4))[0]
    start, end = struct.unpack("<2I", mem.read(mods_addr, 8))
    assert (start, end) == (0x100000, 0x100000 + 5000)
    assert state.regs["rbx"] == 0x102000


def test_kernel_that_is_not_a_regular_file(mem, tmp_path):
    """A FIFO is refused, not read (reading it would hang: the alarm turns that into a failure)."""
    import os
    import signal
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def hung(signo, frame):
        raise AssertionError("the loader blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    try:
        with pytest.raises(BootError) as e:
            load_multiboot(mem, fifo)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert str(e.value) == f"kernel {fifo}: is a FIFO, not a regular file"
    with pytest.raises(BootError) as e:
        load_multiboot(mem, FIRMWARE / "mbtest.elf", "", (Module(tmp_path),))
    assert str(e.value) == f"module {tmp_path}: is a directory, not a regular file"


@pytest.mark.parametrize("entry", [0x100000, 0x10FFEF, 0xFFFFFFFF])
def test_real_mode_entry_beyond_1mib(mem, entry):
    with pytest.raises(BootError) as e:
        load_flat(mem, FIRMWARE / "hello.bin", 0x7C00, entry, "real")
    assert str(e.value) == (f"{FIRMWARE / 'hello.bin'}: real-mode entry {entry:#x} is beyond the first 1 MiB, "
                            "all that real mode can address")


def test_real_mode_entry_just_below_1mib_is_reachable(mem):
    state = load_flat(mem, FIRMWARE / "hello.bin", 0x7C00, 0xFFFFF, "real")
    assert state.cs.base + state.rip == 0xFFFFF and state.rip <= 0xFFFF


def test_real_mode_image_beyond_1mib(mem):
    with pytest.raises(BootError) as e:
        load_flat(mem, FIRMWARE / "hello.bin", 0xFFFC0, 0x7C00, "real")
    assert str(e.value) == (f"{FIRMWARE / 'hello.bin'}: 99 bytes at 0xfffc0 reach beyond the first 1 MiB, "
                            "all that real mode can address")
    with pytest.raises(BootError) as e:
        load_flat(mem, FIRMWARE / "hello.bin", 0x9FFD0, 0x9FFD0, "real")
    assert str(e.value) == (f"{FIRMWARE / 'hello.bin'}: image 0x9ffd0..0xa0033 overlaps the VGA and BIOS area "
                            "(ACPI tables, IVT stubs) at 0xa0000..0x100000")


def test_flat_image_below_0x7000(mem):
    with pytest.raises(BootError) as e:
        load_flat(mem, FIRMWARE / "hello64.bin", 0x6000, 0x6000, "long")
    assert str(e.value) == (f"{FIRMWARE / 'hello64.bin'}: load address 0x6000 is below 0x7000, where hvm keeps "
                            "the GDT and page tables")


def test_real_mode_entry_beyond_1mib_from_the_cli(tmp_path):
    from conftest import run_hvm, write_yaml
    cfg = write_yaml(tmp_path, f"boot:\n  image: {FIRMWARE / 'hello.bin'}\n  entry: 0x100000\n")
    r = run_hvm("run", str(cfg), "--timeout", "5")
    assert r.status == 2
    assert r.stderr == (f"hvm: {FIRMWARE / 'hello.bin'}: real-mode entry 0x100000 is beyond the first 1 MiB, "
                        "all that real mode can address\n")
