"""Property-based fuzzing of every loader (flat, multiboot ELF and a.out, bzImage, vmlinux) on mutated
headers of real images: whatever the bytes, a load ends in a BootState or in the loader's one-line
BootError naming the file, never another exception, within a time and host-memory bound. In-process and
without KVM (loaders only write GuestMemory). Example counts come from conftest's Hypothesis profiles:
a short deterministic run in the test suite, a long one under `make fuzz` (HVM_FUZZ=long)."""
from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import FIRMWARE
from hvm.boot import BootError, BootState, Module, cpu_modes, elf, linux, load_flat, load_multiboot
from hvm.boot.linux import kernel_kind, load_linux
from hvm.boot.multiboot import HEADER_MAGIC, HF_AOUT_KLUDGE, find_header, is_multiboot
from hvm.memory import GuestMemory
from test_linux_loader import bzimage, elf64

pytestmark = pytest.mark.fuzz

RAM = 32 << 20
SECONDS_PER_CASE = 2.0
# Host memory one load may add at its peak, besides twice the size of its input files (read, then written
# to guest RAM): the images are a few KiB, so a loader that builds a header-sized buffer on the host (a
# bss of p_memsz zeros) or touches guest RAM it need not shows up as tens of MiB.
PEAK_GROWTH = 16 << 20

# Values that sit on the edges loaders compare against: 0, sign bits, page and region boundaries, the
# addresses hvm uses, sizes larger than RAM, the largest 32- and 64-bit values.
INTERESTING = [0, 1, 2, 4, 0x34, 0x38, 0x40, 0x7F, 0x80, 0xFF, 0x100, 0x200, 0x400, 0x500, 0xFFF, 0x1000,
               0x7000, 0x7C00, 0x8000, 0xFFFF, 0x10000, 0x20000, 0x9FC00, 0xA0000, 0xFFFFF, 0x100000, 0x1000000,
               RAM - 0x1000, RAM, 0x7FFFFFFF, 0x80000000, 0xFFFFF000, 0xFFFFFFFF, 1 << 32, 1 << 40,
               (1 << 63), (1 << 64) - 1]


def _reset_hwm() -> bool:
    """Reset this process's peak RSS (clear_refs 5, Linux >= 4.0), so VmHWM after a load is that load's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@st.composite
def mutated(draw, seed: bytes, hot: list[int]) -> bytes:
    """`seed` with a few mutations: header fields (at `hot` offsets) set to edge values or random ones,
    single bytes flipped, the file cut short or extended."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["field", "field", "field", "byte", "truncate", "extend"]))
        if kind == "field":
            off = draw(st.sampled_from(hot))
            width = draw(st.sampled_from([1, 2, 4, 8]))
            value = draw(st.sampled_from(INTERESTING) | st.integers(0, (1 << 64) - 1))
            if off + width <= len(data):
                data[off:off + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        elif kind == "byte" and data:
            data[draw(st.integers(0, min(len(data), 0x1200) - 1))] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif kind == "extend":
            data += draw(st.binary(max_size=256))
    return bytes(data)


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(field + ":"))


def _intact(mem: GuestMemory, state: BootState, kernel: bytes | None) -> None:
    """What a successful load promises: hvm's own structures are as written (no segment overwrote them, and
    they overwrote no segment: every loaded segment's bytes are in guest memory as in the file)."""
    if state.mode != "real":
        gdt_base, gdt_limit = state.gdt
        expected = cpu_modes.CODE64 if state.mode == "long" else cpu_modes.CODE32
        assert mem.read(gdt_base, gdt_limit + 1) == struct.pack("<4Q", 0, 0, expected, cpu_modes.DATA)
    if state.mode == "long":
        assert mem.read(cpu_modes.PML4_ADDR, 8) == struct.pack("<Q", cpu_modes.PDPT_ADDR | 3)
        assert mem.read(cpu_modes.PD_ADDR + 8 * 2047, 8) == struct.pack("<Q", (2047 << 21) | 0x83)
    if "rsi" in state.regs:                                   # Linux: boot_params
        bp = mem.read(linux.BOOT_PARAMS_ADDR, 4096)
        assert bp[0x202:0x206] == b"HdrS" and bp[0x210] == 0xFF
    if kernel is not None and elf.is_elf(kernel):
        image = elf.parse_elf(kernel, "kernel")
        for seg in image.segments:
            assert mem.read(seg.paddr, seg.filesz) == kernel[seg.offset:seg.offset + seg.filesz], hex(seg.paddr)


def _check(load, *paths: Path, kernel: bytes | None = None) -> BootState | None:
    """Run one load in fresh guest RAM: a BootState or a one-line BootError naming one of the files; nothing
    else, in bounded time and host memory; after a load, `_intact`."""
    measured = _reset_hwm()
    before = _vm("VmRSS")
    t0 = time.monotonic()
    with GuestMemory(RAM) as mem:
        try:
            state = load(mem)
        except BootError as e:
            message = str(e)
            assert "\n" not in message and any(str(p) in message for p in paths), message
            state = None
        else:
            assert isinstance(state, BootState) and state.mode in ("real", "protected", "long")
            assert 0 <= state.rip < 1 << 64
            _intact(mem, state, kernel)
    elapsed = time.monotonic() - t0
    assert elapsed < SECONDS_PER_CASE, f"a load took {elapsed:.1f} s"
    if measured:
        growth = _vm("VmHWM") - before
        inputs = sum(p.stat().st_size for p in paths if p.is_file())
        assert growth < PEAK_GROWTH + 2 * inputs, f"peak RSS grew by {growth >> 20} MiB"
    return state


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loader-fuzz")


def _write(fuzz_dir: Path, name: str, data: bytes) -> Path:
    p = fuzz_dir / name
    p.write_bytes(data)
    return p


def _load_kernel(path: Path, cmdline: str = "", initrd: Path | None = None):
    """The dispatch hvm's Machine uses (a multiboot header wins, then a Linux kernel): mutations that
    change the kind of file reach the other loader."""
    def load(mem: GuestMemory):
        data = path.read_bytes()
        if is_multiboot(data[:16384]):
            return load_multiboot(mem, path, cmdline, (Module(initrd),) if initrd else ())
        if kernel_kind(data[:0x300]) is None:
            raise BootError(f"{path}: not a kernel")      # what the Machine says, without calling a loader
        return load_linux(mem, path, cmdline, initrd)
    return load


# --- seeds: real images and the crafted headers the loader tests use ---

MBTEST = (FIRMWARE / "mbtest.elf").read_bytes()
MB_OFF = find_header(MBTEST).offset
ELF32_HOT = list(range(16, 52, 2)) + [52 + i for i in range(0, 32 * 4, 4)]
MB_HOT = [MB_OFF + i for i in range(0, 32, 4)]


def aout_kernel() -> bytes:
    load = 0x100000
    flags = HF_AOUT_KLUDGE
    header = struct.pack("<3I5I", HEADER_MAGIC, flags, -(HEADER_MAGIC + flags) & 0xFFFFFFFF,
                         load, load, load + 64, load + 0x1000, load + 32)
    return header + b"\xf4" * 32


AOUT = aout_kernel()
# Mutating the flags, addresses or checksum of an a.out header mostly breaks its checksum; these seeds
# keep it valid so the address fields themselves are explored.
ADDR32 = st.sampled_from([v for v in INTERESTING if v < 1 << 32]) | st.integers(0, 0xFFFFFFFF)
AOUT_FIELDS = st.tuples(*[ADDR32] * 5)
VMLINUX = elf64()
ELF64_HOT = list(range(16, 64, 2)) + [64 + i for i in range(0, 56, 4)]
BZIMAGE = bzimage()
BZ_HOT = list(range(0x1F0, 0x268))
FLAT_IMAGES = sorted(p.name for p in FIRMWARE.glob("*.bin"))


@given(data=mutated(MBTEST, ELF32_HOT + MB_HOT), cmdline=st.text(max_size=64))
def test_multiboot_elf(fuzz_dir, data, cmdline):
    _check(_load_kernel(_write(fuzz_dir, "mbtest.elf", data), cmdline), fuzz_dir / "mbtest.elf", kernel=data)


@given(fields=AOUT_FIELDS, data=mutated(AOUT, list(range(0, 32))), with_module=st.booleans())
def test_multiboot_aout(fuzz_dir, fields, data, with_module):
    flags = HF_AOUT_KLUDGE
    header = struct.pack("<3I5I", HEADER_MAGIC, flags, -(HEADER_MAGIC + flags) & 0xFFFFFFFF, *fields)
    path = _write(fuzz_dir, "aout.bin", header + data[32:])
    module = _write(fuzz_dir, "module", b"M" * 5000) if with_module else None
    _check(_load_kernel(path, "x", module), path, fuzz_dir / "module")
    _check(_load_kernel(_write(fuzz_dir, "aout2.bin", data)), fuzz_dir / "aout2.bin")


@given(data=mutated(VMLINUX, ELF64_HOT), cmdline=st.text(max_size=64), initrd=st.integers(0, 3) | st.just(RAM))
def test_vmlinux(fuzz_dir, data, cmdline, initrd):
    blob = _write(fuzz_dir, "initrd", b"I" * initrd) if initrd else None
    _check(_load_kernel(_write(fuzz_dir, "vmlinux", data), cmdline, blob), fuzz_dir / "vmlinux", fuzz_dir / "initrd",
           kernel=data)


@given(data=mutated(BZIMAGE, BZ_HOT), cmdline=st.text(max_size=300), initrd=st.integers(0, 8192))
def test_bzimage(fuzz_dir, data, cmdline, initrd):
    blob = _write(fuzz_dir, "initrd", b"I" * initrd) if initrd else None
    _check(_load_kernel(_write(fuzz_dir, "bzImage", data), cmdline, blob), fuzz_dir / "bzImage", fuzz_dir / "initrd")


@given(name=st.sampled_from(FLAT_IMAGES), data=st.data(), load=ADDR32, entry=ADDR32,
       mode=st.sampled_from(["real", "protected", "long"]))
def test_flat(fuzz_dir, name, data, load, entry, mode):
    """Flat images have no header: the loader's inputs are the image's length and the config's load
    address, entry and mode (the config allows any 32-bit value for both)."""
    seed = (FIRMWARE / name).read_bytes()
    image = data.draw(mutated(seed, list(range(0, min(len(seed), 64)))))
    path = _write(fuzz_dir, "flat.bin", image)
    state = _check(lambda mem: load_flat(mem, path, load, entry, mode), path)
    if state is not None and mode == "real":
        assert state.cs.base + state.rip == entry and state.rip <= 0xFFFF and entry < 0x100000


# Structured ELF kernels: every program-header field drawn from the edge values, so that placements at,
# across and beyond what hvm keeps in low memory, huge bss sizes and overlapping segments come up often
# (random mutation of a real file rarely hits them).
FIELD = st.sampled_from([v for v in INTERESTING if v < 1 << 32]) | st.integers(0, 0x3000000)
# Addresses at and around what hvm keeps (IVT, GDT, page tables, boot_params and stack, command line, BIOS
# area, the kernel's 1 MiB), at the end of RAM, and anywhere in it.
ADDR = st.sampled_from([0, 0x400, 0x4F0, 0x500, 0xFF0, 0x1000, 0x6000, 0x6FF0, 0x7000, 0x8000, 0x8F00, 0x1F000,
                        0x20000, 0x9F000, 0x9FC00, 0xA0000, 0xE0000, 0xFF000, 0x100000, 0x200000, 0x1000000,
                        RAM - 0x1000, RAM, 0xFFFFF000, 0xFFFFFFFF]) | st.integers(0, RAM + 0x1000)
# bss beyond the file bytes: small, a few MiB (host memory if built as zeros), or an edge value.
BSS = st.integers(0, 0x2000) | st.integers(0, 8 << 20) | st.sampled_from([v for v in INTERESTING if v < 1 << 32])


@st.composite
def elf_kernel(draw, bits: int) -> bytes:
    segments = []
    for _ in range(draw(st.integers(1, 3))):
        paddr, filesz, bss = draw(ADDR), draw(st.integers(0, 256)), draw(BSS)
        segments.append((paddr, filesz, min(filesz + bss, 0xFFFFFFFF) if draw(st.integers(0, 7)) else draw(FIELD)))
    code_off = 0x1000
    # A multiboot header for the 32-bit kernels; a vmlinux has none (with one, the multiboot loader takes it).
    mb = struct.pack("<3I", HEADER_MAGIC, 0, -HEADER_MAGIC & 0xFFFFFFFF) if bits == 32 else b"\x90" * 12
    body = mb + b"\xf4" * 256
    n = len(segments)
    entry = draw(st.sampled_from([(p + 12) & 0xFFFFFFFF for p, _f, _m in segments]) | FIELD)
    if bits == 32:
        eh = struct.pack("<4sBBBB8sHHIIIIIHHHHHH", b"\x7fELF", 1, 1, 1, 0, bytes(8), 2, 3, 1, entry, 52, 0, 0, 52,
                         32, n, 40, 0, 0)
        phs = b"".join(struct.pack("<8I", 1, code_off, p, p, fs, ms, 5, 0) for p, fs, ms in segments)
    else:
        eh = struct.pack("<4sBBBB8sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, bytes(8), 2, 62, 1, entry, 64, 0, 0, 64,
                         56, n, 64, 0, 0)
        phs = b"".join(struct.pack("<IIQQQQQQ", 1, 5, code_off, p, p, fs, ms, 0) for p, fs, ms in segments)
    return (eh + phs).ljust(code_off, b"\0") + bytes(body)


@given(data=elf_kernel(32), cmdline=st.text(max_size=16))
def test_multiboot_elf_fields(fuzz_dir, data, cmdline):
    _check(_load_kernel(_write(fuzz_dir, "mb32.elf", data), cmdline), fuzz_dir / "mb32.elf", kernel=data)


@given(data=elf_kernel(64), cmdline=st.text(max_size=16))
def test_vmlinux_fields(fuzz_dir, data, cmdline):
    _check(_load_kernel(_write(fuzz_dir, "vm64.elf", data), cmdline), fuzz_dir / "vm64.elf", kernel=data)
