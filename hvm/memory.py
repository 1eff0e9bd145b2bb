"""Guest physical memory: anonymous host mappings, addressed by guest-physical address.

Knows nothing of KVM: the Machine registers each region's host address with the VM.
"""
from __future__ import annotations

import mmap

# cffi's C module (hvm's compiled modules load it anyway): a bare FFI gives a mapping's address without
# importing ctypes at start-up (~1.5 ms here); ctypes is imported only to remap a snapshot's RAM (below).
import _cffi_backend

from hvm.plain import Record

MiB = 1 << 20
PAGE_SIZE = mmap.PAGESIZE
GiB = 1 << 30
# RAM above this is moved to 4 GiB, leaving the 32-bit PCI/MMIO hole (LAPIC, IOAPIC, devices) empty,
# as on a PC (QEMU's pc machine uses the same 3 GiB split point for large guests).
PCI_HOLE_START = 3 * GiB
PCI_HOLE_END = 4 * GiB


_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0)
_MAP_FIXED = 0x10
_ffi = _cffi_backend.FFI()


def _libc_mmap(addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    result = libc.mmap(addr, length, prot, flags, fd, offset)
    return -1 if result in (None, ctypes.c_void_p(-1).value) else result


class GuestMemoryError(Exception):
    """An access fell outside guest RAM."""


class MemoryRegion(Record):
    """One guest RAM region (plain: hvm/plain.py). file_extents: mapped from a file (a snapshot), the
    (offset, length) runs of the region the file holds data for; the rest of the file is holes. A page
    neither touched since nor in a run reads as zero."""
    _fields = ("gpa", "size", "mapping", "host_addr", "file_extents")

    def __init__(self, gpa: int, size: int, mapping: mmap.mmap, host_addr: int,
                 file_extents: list[tuple[int, int]] | None = None):
        self._set(gpa=gpa, size=size, mapping=mapping, host_addr=host_addr, file_extents=file_extents)

    @property
    def end(self) -> int:
        return self.gpa + self.size


def ram_layout(size: int) -> list[tuple[int, int]]:
    """(gpa, size) pairs for `size` bytes of RAM with the PCI hole left free."""
    low = min(size, PCI_HOLE_START)
    layout = [(0, low)]
    if size > low:
        layout.append((PCI_HOLE_END, size - low))
    return layout


class GuestMemory:
    """RAM of one guest. Use as a context manager; close() unmaps every region."""

    def __init__(self, size: int, _file: tuple[int, list[tuple[int, int, int]], list | None] | None = None):
        if size <= 0 or size % 4096:
            raise ValueError(f"guest memory size must be a positive multiple of 4 KiB, not {size}")
        self.size = size
        self.regions: list[MemoryRegion] = []
        # Regions mapped copy-on-write from a snapshot file (from_file): MADV_DONTNEED would bring back the
        # file's contents, not zeros, so zero() and reset_to_zero() treat them differently.
        self.file_backed = _file is not None
        try:
            if _file is None:
                for gpa, length in ram_layout(size):
                    mapping = mmap.mmap(-1, length, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE)
                    self._add(gpa, length, mapping)
            else:
                fd, layout, extents = _file
                for i, (gpa, length, offset) in enumerate(layout):
                    # MAP_PRIVATE: the guest's writes go to private copies of the pages, never to the file; a
                    # page nobody writes stays the page cache's (shared by every VM restored from this file).
                    mapping = mmap.mmap(fd, length, mmap.MAP_PRIVATE | _NORESERVE,
                                        mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
                    self._add(gpa, length, mapping, extents[i] if extents is not None else None)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_file(cls, fd: int, layout: list[tuple[int, int, int]],
                  extents: list[list[tuple[int, int]]] | None = None) -> "GuestMemory":
        """Guest RAM mapped copy-on-write from a file: (gpa, size, file offset) per region, each offset page
        aligned; `extents`, per region, the runs the file holds data for (the rest being holes). Nothing is
        read here: pages come in as they are touched."""
        return cls(sum(size for _, size, _ in layout), _file=(fd, layout, extents))

    def _add(self, gpa: int, length: int, mapping: mmap.mmap,
             file_extents: list[tuple[int, int]] | None = None) -> None:
        try:
            # As QEMU does for guest RAM: a child of the VMM (fork before exec) gets none of it, and
            # the flag keeps the region its own mapping, never merged by the kernel with a
            # neighbouring anonymous one (bench/startup.py finds guest RAM in smaps by its size).
            mapping.madvise(mmap.MADV_DONTFORK)
            anchor = _ffi.from_buffer(mapping)
            host_addr = int(_ffi.cast("uintptr_t", anchor))
            _ffi.release(anchor)  # drop the buffer export so the mapping can be closed later
        except BaseException:
            mapping.close()
            raise
        self.regions.append(MemoryRegion(gpa, length, mapping, host_addr, file_extents))

    def reset_to_zero(self) -> None:
        """Every byte of guest RAM zero again, at the same host addresses (KVM's memory slots keep pointing
        at them): anonymous pages are dropped; a file-backed region is replaced by anonymous memory mapped
        over it (MAP_FIXED), so the snapshot file is no longer used."""
        for region in self.regions:
            if not self.file_backed:
                region.mapping.madvise(mmap.MADV_DONTNEED)
                continue
            addr = _libc_mmap(region.host_addr, region.size, mmap.PROT_READ | mmap.PROT_WRITE,
                              mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE | _MAP_FIXED, -1, 0)
            if addr != region.host_addr:
                import ctypes

                raise OSError(ctypes.get_errno(), "mmap(MAP_FIXED) over guest RAM failed")
            region.mapping.madvise(mmap.MADV_DONTFORK)
            region.file_extents = None
        self.file_backed = False

    def close(self) -> None:
        for region in self.regions:
            region.mapping.close()
        self.regions = []

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _locate(self, gpa: int, length: int) -> tuple[MemoryRegion, int]:
        for region in self.regions:
            if region.gpa <= gpa and gpa + length <= region.end:
                return region, gpa - region.gpa
        raise GuestMemoryError(f"guest access {gpa:#x}..{gpa + length:#x} is outside guest RAM")

    def mapping_at(self, gpa: int, length: int) -> tuple[mmap.mmap, int]:
        """The host mapping that holds [gpa, gpa+length) and the offset in it, for I/O straight into guest
        RAM (a device's os.preadv into a memoryview of it); GuestMemoryError outside guest RAM."""
        region, off = self._locate(gpa, length)
        return region.mapping, off

    def contains(self, gpa: int, length: int = 1) -> bool:
        return any(r.gpa <= gpa and gpa + length <= r.end for r in self.regions)

    def read(self, gpa: int, length: int) -> bytes:
        region, off = self._locate(gpa, length)
        return region.mapping[off:off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        region, off = self._locate(gpa, len(data))
        region.mapping[off:off + len(data)] = data

    def zero(self, gpa: int, length: int) -> None:
        """Zero [gpa, gpa+length) without building the zeros on the host (an ELF's 1 GiB bss used to cost
        a 1 GiB bytes object): the partial pages at either end are written (< 4 KiB each), whole pages in
        between are dropped (MADV_DONTNEED: private anonymous memory reads back as zeros and costs nothing
        until the guest touches it)."""
        end = gpa + length
        if not self.contains(gpa, length) and not all(self.contains(a) for a in (gpa, end - 1)):
            raise GuestMemoryError(f"guest access {gpa:#x}..{end:#x} is outside guest RAM")
        for region in self.regions:
            lo, hi = max(gpa, region.gpa), min(end, region.end)
            if lo >= hi:
                continue
            off, stop = lo - region.gpa, hi - region.gpa
            first = min(-(-off // PAGE_SIZE) * PAGE_SIZE, stop)
            last = max(stop // PAGE_SIZE * PAGE_SIZE, first)
            if first > off:
                region.mapping[off:first] = bytes(first - off)
            if last > first and not self.file_backed:
                region.mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
            elif last > first:   # a private file mapping would read the file's pages back: write the zeros
                for at in range(first, last, 1 << 20):
                    n = min(1 << 20, last - at)
                    region.mapping[at:at + n] = bytes(n)
            if stop > last:
                region.mapping[last:stop] = bytes(stop - last)

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 4), "little")

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(4, "little"))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(8, "little"))

    def e820(self) -> list[tuple[int, int, int]]:
        """(base, length, type) entries as a PC firmware reports them: 1 = usable, 2 = reserved.
        The legacy area 640 KiB..1 MiB (EBDA, VGA, BIOS) is reserved, as on a PC."""
        entries: list[tuple[int, int, int]] = []
        for region in self.regions:
            if region.gpa == 0 and region.size > 0x100000:
                entries.append((0, 0x9FC00, 1))
                entries.append((0x9FC00, 0x100000 - 0x9FC00, 2))
                entries.append((0x100000, region.size - 0x100000, 1))
            else:
                entries.append((region.gpa, region.size, 1))
        return entries
