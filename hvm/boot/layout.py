"""Where the loaders put things in guest RAM, checked in one place.

Every loader (flat, multiboot, bzImage, vmlinux) describes what it will write as regions of a `Layout`:
first what hvm itself keeps in guest memory (the IVT, GDT, page tables, boot_params, the command line), then
the image's segments, modules and initrd. `Layout.take` refuses, with one line naming the image, a region
that is not inside guest RAM or that overlaps one already taken; nothing is written before the whole
image has been placed, so a refused image leaves guest memory as it was. Zero-filled memory (an ELF
segment's bss) is zeroed with `zero()`: whole pages are handed back to the kernel (MADV_DONTNEED reads
back as zeros on private anonymous memory), so a 1 GiB bss costs no host memory at all.
"""
from __future__ import annotations

import bisect
import mmap
from pathlib import Path

from hvm.boot.cpu_modes import GDT_ADDR, PML4_ADDR, RESERVED_END
from hvm.boot.errors import BootError
from hvm.files import HostFileError, check_regular_input, read_regular_file
from hvm.memory import GuestMemory
from hvm.plain import Frozen

PAGE = mmap.PAGESIZE
# A kernel file larger than this is not something hvm can boot; it also bounds what a loader reads into
# host memory (a vmlinux with full debug information is a few hundred MiB).
KERNEL_FILE_MAX = 1 << 30


class Region(Frozen):
    """[start, end) of guest-physical memory, and what is there (plain: hvm/plain.py)."""
    _fields = ("start", "end", "what")

    def __init__(self, start: int, end: int, what: str):   # end: exclusive
        self._set(start=start, end=end, what=what)

    def __str__(self) -> str:
        return f"{self.what} at {self.start:#x}..{self.end:#x}"


# What hvm (or the pc machine) writes into low guest memory. Each loader reserves the ones it writes or
# that are written around it; `what` completes "overlaps ...".
IVT = Region(0x0, 0x400, "the real-mode IVT (machine pc)")
GDT = Region(GDT_ADDR, GDT_ADDR + 0x100, "the GDT hvm keeps")
PAGE_TABLES = Region(PML4_ADDR, RESERVED_END, "the page tables hvm keeps")
LOW_TABLES = Region(0x0, RESERVED_END, "the area below 0x7000 hvm keeps (IVT, GDT, page tables)")
# Reserved in the e820 map hvm reports (hvm.memory.GuestMemory.e820); the pc machine's ACPI tables and
# IVT stubs live there.
BIOS_AREA = Region(0x9FC00, 0x100000, "the BIOS area (EBDA, VGA, ACPI tables), reserved in the memory map")
VGA_BIOS_AREA = Region(0xA0000, 0x100000, "the VGA and BIOS area (ACPI tables, IVT stubs)")


class Layout:
    """The regions of guest RAM one boot uses, kept sorted and disjoint (bisect: thousands of ELF
    segments cost O(n log n) to check, not O(n^2))."""

    def __init__(self, mem: GuestMemory, name: str):
        self.mem = mem
        self.name = name
        self._starts: list[int] = []
        self._regions: list[Region] = []
        self.loaded: list[Region] = []      # the image's own pieces, for `in_loaded`

    def overlapping(self, start: int, end: int) -> Region | None:
        """The first region taken that overlaps [start, end), if any."""
        i = bisect.bisect_right(self._starts, start)
        if i > 0 and self._regions[i - 1].end > start:
            return self._regions[i - 1]
        if i < len(self._regions) and self._regions[i].start < end:
            return self._regions[i]
        return None

    def take(self, start: int, size: int, what: str, source: str | Path | None = None, *,
             loaded: bool = False) -> Region:
        """Claim [start, start + size) for `what`, or raise BootError naming `source` (default: the image)."""
        prefix = source if source is not None else self.name
        end = start + size
        if start < 0 or size < 0 or not self.mem.contains(start, max(size, 1)):
            raise BootError(f"{prefix}: {what} {start:#x}..{end:#x} does not fit in guest memory "
                            f"({self.mem.size >> 20} MiB)")
        region = Region(start, end, what)
        if size == 0:
            return region
        other = self.overlapping(start, end)
        if other is not None:
            raise BootError(f"{prefix}: {what} {start:#x}..{end:#x} overlaps {other}")
        i = bisect.bisect_right(self._starts, start)
        self._starts.insert(i, start)
        self._regions.insert(i, region)
        if loaded:
            self.loaded.append(region)
        return region

    def reserve(self, *regions: Region) -> None:
        """hvm's own structures: they must lie in RAM like everything else (a 2 MiB guest has no BIOS area
        above its end; regions beyond RAM are not written, so they are left out)."""
        for r in regions:
            if self.mem.contains(r.start, r.end - r.start):
                self.take(r.start, r.end - r.start, r.what)

    def free_at_or_above(self, start: int, size: int, align: int = PAGE) -> int:
        """The lowest `align`-aligned address >= start where `size` bytes overlap nothing taken (it may lie
        beyond RAM: `take` says so)."""
        addr = -(-start // align) * align
        while (other := self.overlapping(addr, addr + max(size, 1))) is not None:
            addr = -(-other.end // align) * align
        return addr

    def in_loaded(self, addr: int) -> bool:
        return any(r.start <= addr < r.end for r in self.loaded)

    @property
    def top(self) -> int:
        """The end of the highest loaded piece of the image."""
        return max((r.end for r in self.loaded), default=0)


def load_piece(mem: GuestMemory, start: int, data: bytes | memoryview, memsz: int) -> None:
    """Write `data` at `start` and zero the rest of `memsz` (a segment's bss). The region was taken."""
    if data:
        mem.write(start, data)
    if memsz > len(data):
        mem.zero(start + len(data), memsz - len(data))


def read_input(path: Path, what: str, max_bytes: int, too_big: str | None = None) -> bytes:
    """A kernel, module or initrd file: a regular file (never a FIFO or /dev/zero read until memory runs
    out) of at most `max_bytes`; every problem is a one-line BootError naming the file. `too_big` is the
    message (a format string with {size}) for a file larger than `max_bytes`."""
    try:
        size = check_regular_input(path, what)
        if size > max_bytes:
            raise BootError(f"{path}: " + (too_big.format(size=size) if too_big else
                                           f"{what} of {size} bytes is larger than the {max_bytes} allowed"))
        return read_regular_file(path, what, max_bytes)
    except HostFileError as e:
        raise BootError(str(e)) from None
