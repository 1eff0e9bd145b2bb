"""Minimal ELF reader: the header and PT_LOAD segments, for ELF32 and ELF64 little-endian x86."""
from __future__ import annotations

import struct

from hvm.boot.errors import BootError
from hvm.plain import Frozen

PT_LOAD = 1
EM_386 = 3
EM_X86_64 = 62


class ElfSegment(Frozen):
    _fields = ("offset", "vaddr", "paddr", "filesz", "memsz")

    def __init__(self, offset: int, vaddr: int, paddr: int, filesz: int, memsz: int):
        self._set(offset=offset, vaddr=vaddr, paddr=paddr, filesz=filesz, memsz=memsz)


class ElfImage(Frozen):
    """bits: 32 or 64. (Plain classes: hvm/plain.py says why.)"""
    _fields = ("bits", "machine", "entry", "segments")

    def __init__(self, bits: int, machine: int, entry: int, segments: tuple[ElfSegment, ...]):
        self._set(bits=bits, machine=machine, entry=entry, segments=segments)


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def parse_elf(data: bytes, name: str) -> ElfImage:
    if not is_elf(data):
        raise BootError(f"{name}: not an ELF file")
    if len(data) < 52:
        raise BootError(f"{name}: ELF header is truncated")
    ei_class, ei_data = data[4], data[5]
    if ei_data != 1:
        raise BootError(f"{name}: big-endian ELF cannot run on x86")
    if ei_class == 1:
        (e_type, e_machine, _v, e_entry, e_phoff, _sh, _fl, _eh, e_phentsize, e_phnum) = struct.unpack_from(
            "<HHIIIIIHHH", data, 16)
        ph_fmt, bits = "<IIIIIIII", 32
    elif ei_class == 2:
        if len(data) < 64:
            raise BootError(f"{name}: ELF header is truncated")
        (e_type, e_machine, _v, e_entry, e_phoff, _sh, _fl, _eh, e_phentsize, e_phnum) = struct.unpack_from(
            "<HHIQQQIHHH", data, 16)
        ph_fmt, bits = "<IIQQQQQQ", 64
    else:
        raise BootError(f"{name}: unknown ELF class {ei_class}")
    if e_phnum and e_phentsize < struct.calcsize(ph_fmt):
        raise BootError(f"{name}: program header size {e_phentsize} is smaller than an ELF{bits} program header")
    segments = []
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        if off + struct.calcsize(ph_fmt) > len(data):
            raise BootError(f"{name}: program header {i} lies beyond the end of the file")
        if bits == 32:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _f, _a = struct.unpack_from(ph_fmt, data, off)
        else:
            p_type, _f, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _a = struct.unpack_from(ph_fmt, data, off)
        if p_type != PT_LOAD:
            continue
        if p_offset + p_filesz > len(data):
            raise BootError(f"{name}: segment {i} ({p_filesz} bytes at file offset {p_offset:#x}) lies beyond "
                            f"the end of the file ({len(data)} bytes)")
        if p_filesz > p_memsz:
            raise BootError(f"{name}: segment {i} has a file size larger than its memory size")
        segments.append(ElfSegment(p_offset, p_vaddr, p_paddr, p_filesz, p_memsz))
    if not segments:
        raise BootError(f"{name}: ELF file has no loadable segments")
    return ElfImage(bits, e_machine, e_entry, tuple(segments))
