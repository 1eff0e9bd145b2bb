"""The snapshot file: a versioned header page, checksummed metadata sections, sparse guest memory.

    offset 0      header page (4096 bytes)
                    magic "HVMSNAP\\0", format version (u32), header size (u32), hvm version (32 bytes),
                    section count (u32), then a table of sections, each:
                      name (16 bytes), offset (u64), length (u64), aux (u64: a memory region's guest address),
                      crc32 (u32), flags (u32: 1 = guest memory)
                    the last 4 bytes: crc32 of the 4092 before them
    4096          metadata sections, each a canonical JSON encoding (hvm/snapshot/codec.py):
                    description (the VmSpec and machine facts), vcpuN (one per vCPU), vm (clock, irqchip,
                    PIT), devices (per bus range), memmap (the non-zero page runs of each memory region)
    page aligned  one section per guest RAM region, exactly as long as the region: page i of the region is
                  at section offset + i * 4096, so the region can be mmapped straight from the file. Zero
                  pages are never written: they are file holes (the file is sparse, `du` shows the used part).

A memory section's crc32 covers only the runs memmap lists (the pages that were written), in order. At
restore those are read once through the MAP_PRIVATE mapping itself (which leaves them in the page cache
for the guest), and the holes are checked to still be holes with SEEK_DATA (free on a filesystem with
holes; a filesystem without them is read and checked for zeros). The choice and its cost:
docs/lifecycle.md "Snapshot and restore".

A file is written to a temporary name in the target's directory, fsynced, then renamed over the target:
a failed save leaves no file behind and an older snapshot of that name intact.
"""
from __future__ import annotations

import errno
import mmap
import os
import stat
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from hvm.memory import PAGE_SIZE, GuestMemory
from hvm.snapshot import SnapshotError
from hvm.snapshot.codec import CodecError, decode, encode

MAGIC = b"HVMSNAP\0"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
_HEAD = struct.Struct("<8sII32sII")           # magic, version, header size, hvm version, nsections, reserved
_ENTRY = struct.Struct("<16sQQQII")           # name, offset, length, aux, crc32, flags
_TABLE_AT = 64
MAX_SECTIONS = (HEADER_SIZE - 4 - _TABLE_AT) // _ENTRY.size
FLAG_MEMORY = 1
META_LIMIT = 64 << 20                          # all metadata sections together: nowhere near this
SCAN_BLOCK = 256 << 10                         # zero detection: blocks first, pages only in non-zero blocks
_ZERO_BLOCK = bytes(SCAN_BLOCK)
_ZERO_PAGE = bytes(PAGE_SIZE)


@dataclass
class Section:
    name: str
    offset: int
    length: int
    aux: int = 0
    crc: int = 0
    flags: int = 0


@dataclass
class MemoryImage:
    gpa: int
    size: int
    offset: int                                     # in the file
    crc: int
    extents: list[tuple[int, int]] = field(default_factory=list)   # (byte offset, length) in the region


def _align(n: int, to: int = PAGE_SIZE) -> int:
    return -(-n // to) * to


def _hvm_version() -> str:
    from hvm import __version__

    return __version__


# --- writing ----------------------------------------------------------------------------------------
_PAGES_PER_BLOCK = SCAN_BLOCK // PAGE_SIZE
# /proc/self/pagemap: one u64 per page; bit 63 "present", bit 62 "swapped" (the top byte's 0xc0).
_TOUCHED = bytes(1 if b & 0xC0 else 0 for b in range(256))


def _untouched_blocks(host_addr: int, size: int) -> bytearray | None:
    """For private anonymous memory: per SCAN_BLOCK, 1 when no page of it is present or swapped (so every
    page reads as zero, whatever it held before a MADV_DONTNEED), from /proc/self/pagemap. None when the
    pagemap cannot be read (the scan then reads every block)."""
    pages = size // PAGE_SIZE
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            f.seek(host_addr // PAGE_SIZE * 8)
            raw = bytearray()
            while len(raw) < pages * 8:
                chunk = f.read(min(pages * 8 - len(raw), 4 << 20))
                if not chunk:
                    return None
                raw += chunk
    except OSError:
        return None
    touched = bytes(raw[7::8]).translate(_TOUCHED)
    return bytearray(0 if 1 in touched[i:i + _PAGES_PER_BLOCK] else 1
                     for i in range(0, pages, _PAGES_PER_BLOCK))


def _skippable_blocks(region, file_backed: bool) -> bytearray | None:
    """Blocks of a region that read as zero without reading them: no page present or swapped (pagemap) and,
    for a region mapped from a snapshot file, no data of the file in them (the file's holes read as zero;
    its data does not, touched or not). None: read every block."""
    untouched = _untouched_blocks(region.host_addr, region.size)
    if untouched is None or not file_backed:
        return untouched
    if region.file_extents is None:
        return None
    for off, n in region.file_extents:
        for block in range(off // SCAN_BLOCK, (off + n - 1) // SCAN_BLOCK + 1):
            untouched[block] = 0
    return untouched


def _nonzero_runs(mapping: mmap.mmap, size: int, untouched: bytearray | None = None) -> Iterator[tuple[int, int]]:
    """(offset, length) of the runs of non-zero pages in a mapping. Blocks `untouched` marks are skipped
    without reading them; reading a never-touched page of anonymous memory would map the shared zero page
    (no allocation, but a page fault per page: 0.3 s per GiB)."""
    start = None
    for block in range(0, size, SCAN_BLOCK):
        n = min(SCAN_BLOCK, size - block)
        if untouched is not None and untouched[block // SCAN_BLOCK]:
            if start is not None:
                yield start, block - start
                start = None
            continue
        data = mapping[block:block + n]
        if data == _ZERO_BLOCK[:n]:
            if start is not None:
                yield start, block - start
                start = None
            continue
        for page in range(0, n, PAGE_SIZE):
            zero = data[page:page + PAGE_SIZE] == _ZERO_PAGE
            if zero and start is not None:
                yield start, block + page - start
                start = None
            elif not zero and start is None:
                start = block + page
    if start is not None:
        yield start, size - start


def write_snapshot(path: Path, meta: list[tuple[str, Any]], memory: GuestMemory) -> int:
    """Write the file: `meta` is [(section name, value)] in order, then every region of `memory`.
    Returns the file's size. Raises SnapshotError (and leaves nothing behind) on any failure."""
    path = Path(path)
    if "\0" in str(path):   # os.open would raise ValueError (QMP migrate's uri, a Python caller's path)
        raise SnapshotError(f"{str(path)[:200]!r}: the path contains a NUL byte")
    directory = path.parent
    tmp = directory / f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise SnapshotError(f"{path}: cannot create a file in {directory}: {e.strerror}") from None
    try:
        sections: list[Section] = []
        pos = HEADER_SIZE
        blobs = [(name, encode(value)) for name, value in meta]
        runs_of = [list(_nonzero_runs(r.mapping, r.size, _skippable_blocks(r, memory.file_backed)))
                   for r in memory.regions]
        blobs.append(("memmap", encode([[[o, n] for o, n in runs] for runs in runs_of])))
        if len(blobs) + len(memory.regions) > MAX_SECTIONS:
            raise SnapshotError(f"{path}: too many sections ({len(blobs) + len(memory.regions)})")
        for name, data in blobs:
            _pwrite_all(fd, data, pos)
            sections.append(Section(name, pos, len(data), 0, zlib.crc32(data)))
            pos += len(data)
        pos = _align(pos)
        for index, (region, runs) in enumerate(zip(memory.regions, runs_of)):
            crc = 0
            view = memoryview(region.mapping)
            try:
                for off, n in runs:
                    chunk = view[off:off + n]
                    crc = zlib.crc32(chunk, crc)
                    _pwrite_all(fd, chunk, pos + off)
                    chunk.release()
            finally:
                view.release()
            sections.append(Section(f"mem{index}", pos, region.size, region.gpa, crc, FLAG_MEMORY))
            pos += region.size
        os.ftruncate(fd, pos)          # the trailing zero pages: a hole up to the file's full length
        _pwrite_all(fd, _header(sections), 0)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
        return pos
    except OSError as e:
        raise SnapshotError(f"{path}: cannot write the snapshot: {e.strerror or e}") from None
    except CodecError as e:
        raise SnapshotError(f"{path}: cannot encode the machine's state: {e}") from None
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp.exists():
            tmp.unlink()


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    try:
        while len(view):
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
    finally:
        view.release()


def _header(sections: list[Section]) -> bytes:
    head = bytearray(HEADER_SIZE)
    _HEAD.pack_into(head, 0, MAGIC, FORMAT_VERSION, HEADER_SIZE, _hvm_version().encode()[:32], len(sections), 0)
    for i, s in enumerate(sections):
        _ENTRY.pack_into(head, _TABLE_AT + i * _ENTRY.size, s.name.encode(), s.offset, s.length, s.aux, s.crc,
                         s.flags)
    struct.pack_into("<I", head, HEADER_SIZE - 4, zlib.crc32(head[:HEADER_SIZE - 4]))
    return bytes(head)


# --- reading ----------------------------------------------------------------------------------------
class SnapshotFile:
    """An open snapshot whose header and metadata sections have been checked. Memory is verified by
    verify_memory() on the mappings map_memory() made. Use as a context manager (closes the fd)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.fd = -1
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise self._error(e.strerror or str(e)) from None
        try:
            self._read()
        except BaseException:
            self.close()
            raise

    def _error(self, message: str) -> SnapshotError:
        return SnapshotError(f"{self.path}: {message}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "SnapshotFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self) -> None:
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            raise self._error("not a regular file (a snapshot is a file written by hvm)")
        self.file_size = size = st.st_size
        head = os.pread(self.fd, HEADER_SIZE, 0)
        if len(head) < len(MAGIC) or head[:len(MAGIC)] != MAGIC:
            raise self._error("not an hvm snapshot (no HVMSNAP magic at the start)")
        if len(head) < _HEAD.size:
            raise self._error(f"truncated: {size} bytes, shorter than the snapshot header")
        _, version, header_size, hvm_version, count, _ = _HEAD.unpack_from(head)
        self.hvm_version = hvm_version.rstrip(b"\0").decode("ascii", "replace")
        if version > FORMAT_VERSION:
            raise self._error(f"snapshot format version {version} (written by hvm {self.hvm_version}) is newer "
                              f"than this hvm reads ({FORMAT_VERSION})")
        if version != FORMAT_VERSION or header_size != HEADER_SIZE:
            raise self._error(f"unknown snapshot format version {version}")
        if len(head) < HEADER_SIZE:
            raise self._error(f"truncated: {size} bytes, shorter than the snapshot header")
        (crc,) = struct.unpack_from("<I", head, HEADER_SIZE - 4)
        if zlib.crc32(head[:HEADER_SIZE - 4]) != crc:
            raise self._error("header checksum mismatch (the file is corrupted)")
        if not 0 < count <= MAX_SECTIONS:
            raise self._error(f"header lists {count} sections")
        self.sections: dict[str, Section] = {}
        for i in range(count):
            name, off, length, aux, scrc, flags = _ENTRY.unpack_from(head, _TABLE_AT + i * _ENTRY.size)
            sec = Section(name.rstrip(b"\0").decode("ascii", "replace"), off, length, aux, scrc, flags)
            if off < HEADER_SIZE or off + length > size:
                raise self._error(f"truncated: section {sec.name} ends at byte {off + length}, the file has "
                                  f"{size}")
            self.sections[sec.name] = sec
        # Each metadata section is read and decoded whole, and kept (the vCPU states): bound them together,
        # not only one by one, or a crafted file of 64 vCPU sections near the limit each takes gigabytes.
        meta_total = sum(s.length for s in self.sections.values() if not s.flags & FLAG_MEMORY)
        if meta_total > META_LIMIT:
            raise self._error(f"metadata sections of {meta_total} bytes in all, more than hvm reads ({META_LIMIT})")
        for name in ("description", "vm", "devices", "memmap"):
            if name not in self.sections:
                raise self._error(f"section {name} is missing")
        self._check_gaps(size)
        self.description = self._meta("description")
        if not isinstance(self.description, dict):
            raise self._error("section description: not a mapping")
        self.vm_state = self._meta("vm")
        self.devices = self._meta("devices")
        vcpus = self.description.get("vcpus")
        if not isinstance(vcpus, int) or not 1 <= vcpus <= 64:
            raise self._error("section description: bad vCPU count")
        self.vcpu_states = [self._meta(f"vcpu{i}") for i in range(vcpus)]
        memmap = self._meta("memmap")
        mem_sections = [s for s in self.sections.values() if s.flags & FLAG_MEMORY]
        if not isinstance(memmap, list) or len(memmap) != len(mem_sections):
            raise self._error("section memmap does not match the memory sections")
        self.memory: list[MemoryImage] = []
        for sec, runs in zip(mem_sections, memmap):
            if sec.offset % PAGE_SIZE or sec.length % PAGE_SIZE or not isinstance(runs, list):
                raise self._error(f"section {sec.name}: not page aligned")
            extents = []
            end = 0
            for r in runs:
                if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r)
                        and r[0] >= end and r[1] > 0 and r[0] + r[1] <= sec.length):
                    raise self._error(f"section memmap: bad run {str(r)[:40]} for {sec.name}")
                extents.append((r[0], r[1]))
                end = r[0] + r[1]
            self.memory.append(MemoryImage(sec.aux, sec.length, sec.offset, sec.crc, extents))

    def _check_gaps(self, size: int) -> None:
        """Every byte of the file belongs to the header or a section, except the zero padding before the
        first memory section (page alignment): a byte changed there, or bytes appended, refuse the file too."""
        pos = HEADER_SIZE
        for sec in sorted(self.sections.values(), key=lambda s: s.offset):
            if sec.offset < pos:
                raise self._error(f"section {sec.name} overlaps the one before it")
            gap = sec.offset - pos
            if gap:
                if gap >= PAGE_SIZE:
                    raise self._error(f"{gap} bytes before section {sec.name} belong to no section")
                if os.pread(self.fd, gap, pos).count(0) != gap:
                    raise self._error(f"the padding before section {sec.name} is not zero (the file is corrupted)")
            pos = sec.offset + sec.length
        if size != pos:
            raise self._error(f"{size - pos} bytes after the last section (the file is corrupted)")

    def _meta(self, name: str) -> Any:
        sec = self.sections.get(name)
        if sec is None:
            raise self._error(f"section {name} is missing")
        if sec.flags & FLAG_MEMORY or sec.length > META_LIMIT:
            raise self._error(f"section {name}: not a metadata section")
        data = os.pread(self.fd, sec.length, sec.offset)
        if len(data) != sec.length:
            raise self._error(f"truncated: section {name} is cut short")
        if zlib.crc32(data) != sec.crc:
            raise self._error(f"section {name}: checksum mismatch (the file is corrupted)")
        try:
            return decode(data)
        except CodecError as e:
            raise self._error(f"section {name}: {e}") from None

    def raw_section(self, name: str) -> bytes:
        sec = self.sections[name]
        return os.pread(self.fd, sec.length, sec.offset)

    # --- memory ------------------------------------------------------------------------------------
    def map_memory(self, expected: list[tuple[int, int]]) -> GuestMemory:
        """Guest RAM mapped copy-on-write (MAP_PRIVATE) from the file: no page is read until the guest or
        verify_memory() touches it. `expected` is the (gpa, size) layout the description implies."""
        layout = [(m.gpa, m.size) for m in self.memory]
        if layout != expected:
            raise self._error(f"memory sections {layout} do not match the described RAM {expected}")
        return GuestMemory.from_file(self.fd, [(m.gpa, m.size, m.offset) for m in self.memory],
                                     [list(m.extents) for m in self.memory])

    def verify_memory(self, memory: GuestMemory) -> None:
        for image, region in zip(self.memory, memory.regions):
            crc = 0
            view = memoryview(region.mapping)
            try:
                for off, n in image.extents:
                    crc = zlib.crc32(view[off:off + n], crc)
            finally:
                view.release()
            if crc != image.crc:
                raise self._error(f"guest memory at {image.gpa:#x}: checksum mismatch (the file is corrupted)")
            self._check_holes(image)

    def _check_holes(self, image: MemoryImage) -> None:
        """The pages memmap does not list must read as zeros: find any data the filesystem holds there
        (SEEK_DATA) and check it."""
        start = 0
        for off, n in image.extents + [(image.size, 0)]:
            lo, hi = image.offset + start, image.offset + off
            while lo < hi:
                try:
                    data_at = os.lseek(self.fd, lo, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:   # no data up to the end of the file
                        return
                    data_at = lo                  # SEEK_DATA unsupported: read the hole
                if data_at >= hi:
                    break
                try:
                    data_end = min(os.lseek(self.fd, data_at, os.SEEK_HOLE), hi)
                except OSError:
                    data_end = hi
                pos = data_at
                while pos < data_end:
                    chunk = os.pread(self.fd, min(SCAN_BLOCK, data_end - pos), pos)
                    if not chunk:
                        raise self._error("truncated: guest memory is cut short")
                    if chunk.count(0) != len(chunk):
                        raise self._error(f"guest memory at {image.gpa + pos - image.offset:#x}: a page "
                                          "saved as zero is not (the file is corrupted)")
                    pos += len(chunk)
                lo = data_end
            start = off + n
