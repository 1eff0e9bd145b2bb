"""Multiboot (v1) loader, as QEMU's `-kernel` boots a multiboot kernel.

Spec: https://www.gnu.org/software/grub/manual/multiboot/multiboot.html. The kernel's PT_LOAD segments
(or, with header flag 16, the a.out-kludge addresses) are loaded at their physical addresses, modules
(-initrd) follow page-aligned, and the CPU starts in flat 32-bit protected mode with
EAX = 0x2BADB002 and EBX = the multiboot information structure.
"""
from __future__ import annotations

import struct
from pathlib import Path

from hvm.boot.cpu_modes import protected_mode_state
from hvm.boot.elf import EM_386, is_elf, parse_elf
from hvm.boot.errors import BootError
from hvm.boot.layout import BIOS_AREA, GDT, IVT, KERNEL_FILE_MAX, Layout, load_piece, read_input
from hvm.boot.state import BootState
from hvm.memory import GuestMemory
from hvm.plain import Frozen

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
HEADER_SEARCH = 8192
HF_PAGE_ALIGN = 1 << 0
HF_MEMORY_INFO = 1 << 1
HF_VIDEO_MODE = 1 << 2
HF_AOUT_KLUDGE = 1 << 16

MBI_MEMORY = 1 << 0
MBI_CMDLINE = 1 << 2
MBI_MODS = 1 << 3
MBI_MMAP = 1 << 6
MBI_LOADER_NAME = 1 << 9

# The boot information goes after the kernel and its modules, as QEMU places it: kernels may load
# anywhere above the GDT hvm keeps at 0x500 and outside the BIOS area (kvm-unit-tests' realmode test
# loads at 0x8000); hvm.boot.layout checks every placement.
INFO_SIZE = 0x80
MAX_MMAP = 0x400
LOADER_NAME = b"hvm\0"


class MultibootHeader(Frozen):
    _fields = ("offset", "flags", "header_addr", "load_addr", "load_end_addr", "bss_end_addr", "entry_addr")

    def __init__(self, offset: int, flags: int, header_addr: int = 0, load_addr: int = 0, load_end_addr: int = 0,
                 bss_end_addr: int = 0, entry_addr: int = 0):
        self._set(offset=offset, flags=flags, header_addr=header_addr, load_addr=load_addr,
                  load_end_addr=load_end_addr, bss_end_addr=bss_end_addr, entry_addr=entry_addr)


def find_header(data: bytes) -> MultibootHeader | None:
    for off in range(0, min(len(data), HEADER_SEARCH) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            if flags & HF_AOUT_KLUDGE:
                if off + 32 > len(data):
                    return None
                return MultibootHeader(off, flags, *struct.unpack_from("<5I", data, off + 12))
            return MultibootHeader(off, flags)
    return None


def is_multiboot(data: bytes) -> bool:
    return find_header(data) is not None


class Module(Frozen):
    _fields = ("path", "args")

    def __init__(self, path: Path, args: str = ""):
        self._set(path=path, args=args)


def load_multiboot(mem: GuestMemory, kernel: Path, cmdline: str = "", modules: tuple[Module, ...] = ()) -> BootState:
    data = read_input(kernel, "kernel", KERNEL_FILE_MAX)
    name = str(kernel)
    header = find_header(data)
    if header is None:
        raise BootError(f"{name}: no multiboot header in the first {HEADER_SEARCH} bytes")
    if header.flags & 0xFFFC & ~HF_VIDEO_MODE & 0xFFFF:
        raise BootError(f"{name}: multiboot header asks for unsupported features (flags {header.flags:#x})")

    pieces: list[tuple[int, bytes | memoryview, int]] = []  # (paddr, bytes, memsz)
    view = memoryview(data)
    if header.flags & HF_AOUT_KLUDGE:
        h = header
        file_start = h.offset - (h.header_addr - h.load_addr)
        load_end = h.load_end_addr or (h.load_addr + len(data) - file_start)
        if file_start < 0 or file_start > len(data) or load_end < h.load_addr:
            raise BootError(f"{name}: inconsistent multiboot a.out addresses")
        image = view[file_start:file_start + (load_end - h.load_addr)]
        memsz = max(h.bss_end_addr, load_end) - h.load_addr
        pieces.append((h.load_addr, image, memsz))
        entry = h.entry_addr
    else:
        if not is_elf(data):
            raise BootError(f"{name}: multiboot kernel is neither ELF nor marked with a.out load addresses")
        elf = parse_elf(data, name)
        if elf.bits != 32 or elf.machine != EM_386:
            raise BootError(f"{name}: a multiboot ELF must be 32-bit i386 (this one is {elf.bits}-bit); "
                            "a 64-bit kernel needs a 32-bit multiboot entry, as with QEMU")
        for seg in elf.segments:
            pieces.append((seg.paddr, view[seg.offset:seg.offset + seg.filesz], seg.memsz))
        entry = elf.entry

    # Place everything before writing anything: the kernel must not overlap what hvm and the pc machine
    # write (IVT, GDT, BIOS area) or itself.
    layout = Layout(mem, name)
    layout.reserve(IVT, GDT, BIOS_AREA)
    for paddr, image, memsz in pieces:
        layout.take(paddr, memsz, "segment", loaded=True)
    if not layout.in_loaded(entry):
        raise BootError(f"{name}: entry {entry:#x} is not in any loaded segment")
    for paddr, image, memsz in pieces:
        load_piece(mem, paddr, image, memsz)
    top = layout.top

    # Modules go after the kernel, each page-aligned; then the info block, memory map, module list, strings.
    addr = top
    placed: list[tuple[int, int, str]] = []
    for mod in modules:
        blob = read_input(mod.path, "module", mem.size, f"module of {{size}} bytes does not fit in guest memory ({mem.size >> 20} MiB)")
        addr = layout.free_at_or_above(addr, len(blob))
        layout.take(addr, len(blob), "module", mod.path)
        mem.write(addr, blob)
        placed.append((addr, addr + len(blob), str(mod.path) + (" " + mod.args if mod.args else "")))
        addr += len(blob)

    # The strings first (offsets relative to their block), so the whole information block is placed at once.
    strings = bytearray()

    def add_string(text: str | bytes) -> int:
        raw = (text.encode() if isinstance(text, str) else text).rstrip(b"\0") + b"\0"
        at = len(strings)
        strings.extend(raw)
        return at

    labels = [add_string(label) for _start, _end, label in placed]
    # As GRUB and QEMU do, the command line starts with the kernel's file name (guests such as
    # kvm-unit-tests take it as argv[0]).
    cmd_off = add_string(f"{kernel} {cmdline}" if cmdline else str(kernel))
    loader_off = add_string(LOADER_NAME)
    info_size = INFO_SIZE + MAX_MMAP + 16 * len(modules) + len(strings)
    mbi_addr = layout.free_at_or_above(addr, info_size)
    layout.take(mbi_addr, info_size, "multiboot information")
    mmap_addr = mbi_addr + INFO_SIZE
    mods_addr = mmap_addr + MAX_MMAP
    strings_addr = mods_addr + 16 * len(modules)
    mod_entries = b"".join(struct.pack("<4I", start, end, strings_addr + label, 0)
                           for (start, end, _label), label in zip(placed, labels))
    cmd_addr, loader_addr = strings_addr + cmd_off, strings_addr + loader_off

    mmap = b"".join(struct.pack("<IQQI", 20, base, length, kind) for base, length, kind in mem.e820())
    low_end = mem.regions[0].end
    mem_lower = min(0x9FC00, low_end) // 1024
    mem_upper = max(low_end - 0x100000, 0) // 1024
    flags = MBI_MEMORY | MBI_CMDLINE | MBI_MODS | MBI_MMAP | MBI_LOADER_NAME
    mbi = struct.pack("<12I", flags, mem_lower, mem_upper, 0, cmd_addr, len(modules), mods_addr,
                      0, 0, 0, 0, len(mmap)) + struct.pack("<5I", mmap_addr, 0, 0, 0, loader_addr)
    mem.write(mbi_addr, mbi.ljust(INFO_SIZE, b"\0"))
    mem.write(mmap_addr, mmap.ljust(MAX_MMAP, b"\0"))
    mem.write(mods_addr, mod_entries)
    mem.write(strings_addr, bytes(strings))

    state = protected_mode_state(mem, entry)
    state.regs.update({"rax": BOOTLOADER_MAGIC, "rbx": mbi_addr})
    state.description = (f"multiboot kernel {kernel.name}: entry {entry:#x}, {len(pieces)} segment(s) up to "
                         f"{top:#x}, {len(modules)} module(s), cmdline {cmdline!r}")
    return state
