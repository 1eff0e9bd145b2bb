"""QEMU's pc-testdev, as kvm-unit-tests use it (QEMU's hw/misc/pc-testdev.c):
- port 0xe0: a 4-byte scratch register (what is written reads back, any size at any offset in it);
- port 0xe4: the flush-page port: a 4-byte write of a guest-physical address makes KVM drop its mappings
  of that page of RAM, so the guest's next access to it faults into KVM again (emulator tests use it);
- port 0xe8: the same scratch register seen byte by byte (a wide access is split into byte accesses);
- ports 0x2000-0x2017: set ISA/IOAPIC interrupt line n to the written value (0 or not 0);
- MMIO 0xff000000-0xff00ffff ("iomem"): 64 KiB that read back what was written, any access size (1, 2, 4, 8)
  at any offset; an access running past the end touches only the bytes inside (the rest read as zero).
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import threading
from typing import TYPE_CHECKING, Callable

from hvm.mmio.device import StateReader
from hvm.mmio.registry import DeviceType

if TYPE_CHECKING:
    from hvm.memory import GuestMemory

log = logging.getLogger(__name__)

TESTDEV_PORT = 0xE0
TESTDEV_LEN = 8             # 0xe0 scratch, 0xe4 flush-page
FLUSH_OFFSET = 4
BYTE_VIEW_PORT = 0xE8       # the scratch byte view: 0xe8-0xeb, each port a range of its own (see _create)
TESTDEV_IRQ_PORT = 0x2000
TESTDEV_IRQ_LINES = 24
IOMEM_BASE = 0xFF00_0000
IOMEM_LEN = 0x10000
PAGE = 4096


class PageFlusher:
    """Makes KVM forget its mappings of one page of guest RAM (the flush-page port).

    QEMU mprotects the page PROT_NONE and back to read/write: the kernel's MMU notifier then tells KVM to
    drop its mappings (shadow or EPT/NPT entries) and the next guest access refaults. hvm changes the
    protection to read/write/exec and back instead: the same notifier call (KVM drops the range whatever
    the new protection is), but with no moment where the page is inaccessible, so another hvm thread
    touching that guest page at that instant (a virtio device's DMA, an emulation read) cannot fault and
    bring the whole VMM down as it could with PROT_NONE. If PROT_EXEC is refused (a noexec mapping), it
    falls back to read-only and back: reads by other threads stay safe."""

    def __init__(self, memory: "GuestMemory | None"):
        self._memory = memory
        self._mprotect = None
        self.flushed = 0            # pages flushed (for tests)
        self.ignored = 0            # addresses outside RAM

    def _libc_mprotect(self):
        if self._mprotect is None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mprotect.restype = ctypes.c_int
            libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self._mprotect = libc.mprotect
        return self._mprotect

    def host_page(self, gpa: int) -> int | None:
        """The host address of the RAM page holding guest-physical `gpa`, or None if it is not RAM."""
        memory = self._memory
        if memory is None:
            return None
        page = gpa & ~(PAGE - 1)
        for region in memory.regions:
            # RAM regions are page aligned and whole pages long (GuestMemory checks the size)
            if region.gpa <= page and page + PAGE <= region.end:
                return region.host_addr + (page - region.gpa)
        return None

    def flush(self, gpa: int) -> bool:
        addr = self.host_page(gpa)
        if addr is None:
            self.ignored += 1      # not RAM: nothing KVM maps from hvm's memory there (QEMU ignores it too)
            return False
        mprotect = self._libc_mprotect()
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        if mprotect(addr, PAGE, rw | mmap.PROT_EXEC) != 0 and mprotect(addr, PAGE, mmap.PROT_READ) != 0:
            log.warning("pc-testdev: flush of page %#x failed (errno %d)", gpa & ~(PAGE - 1), ctypes.get_errno())
            return False
        if mprotect(addr, PAGE, rw) != 0:
            # The page would stay non-writable for hvm's own threads: that is a bug worth ending on.
            raise OSError(ctypes.get_errno(), f"pc-testdev: restoring the protection of guest page {gpa:#x}")
        self.flushed += 1
        return True


class PcTestDev:
    """The ports at 0xe0-0xe7: scratch register and flush-page port."""

    name = "pc-testdev"

    def __init__(self, memory: "GuestMemory | None" = None) -> None:
        self.data = 0
        self.flusher = PageFlusher(memory)
        self._lock = threading.Lock()   # partial writes are read-modify-writes; several vCPUs may make them

    # --- device state (hvm.mmio.device): the scratch register (the flush-page port keeps nothing)
    def save(self) -> dict:
        return {"data": self.data}

    def load(self, state: dict) -> None:
        self.data = StateReader(self.name, state, ("data",)).integer("data", 0, 0xFFFFFFFF)

    def reset(self) -> None:
        self.data = 0

    def read(self, offset: int, size: int) -> int:
        if offset < FLUSH_OFFSET:
            return (self.data >> (8 * offset)) & ((1 << (8 * size)) - 1)
        return 0   # the flush-page port has nothing to read

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < FLUSH_OFFSET:
            # The register is 4 bytes: a wide write near its end (offset 2, size 4) keeps only what lands
            # in it, so the value stays what save() may give and load() takes.
            self._merge(offset, size, value)
        elif offset == FLUSH_OFFSET and size == 4:
            self.flusher.flush(value)
        # other accesses to the flush-page port are invalid (QEMU takes 4-byte writes only): ignored

    def read_bytes(self, first: int, size: int) -> int:
        """The byte view: bytes first.. of the register one by one; past its end (port 0xec on): all ones."""
        value = 0
        for i in range(size):
            o = first + i
            value |= ((self.data >> (8 * o)) & 0xFF if o < 4 else 0xFF) << (8 * i)
        return value

    def _merge(self, offset: int, size: int, value: int) -> None:
        mask = (((1 << (8 * size)) - 1) << (8 * offset)) & 0xFFFFFFFF
        with self._lock:
            self.data = (self.data & ~mask) | ((value << (8 * offset)) & mask)


class PcTestDevByteView:
    """Port 0xe8 + index: the scratch register's byte `index` (QEMU's pc-testdev-ioport-byte, which splits every
    access into byte accesses). One range per port, so a device at one of them (isa-debugcon's 0xe9) keeps it."""

    name = "pc-testdev-byte"

    def __init__(self, dev: PcTestDev, index: int) -> None:
        self.dev, self.index = dev, index

    def save(self) -> dict:      # the state is the register's, saved by PcTestDev
        return {}

    def load(self, state: dict) -> None:
        StateReader(self.name, state, ())

    def reset(self) -> None:
        pass

    def read(self, offset: int, size: int) -> int:
        return self.dev.read_bytes(self.index + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        first = self.index + offset
        if first < 4:
            self.dev._merge(first, min(size, 4 - first), value)


class PcTestDevIomem:
    """64 KiB of memory-like MMIO at 0xff000000: a guest access that KVM cannot serve from RAM, so every one
    goes through the instruction emulator (what kvm-unit-tests' emulator tests exercise)."""

    name = "pc-testdev-iomem"

    def __init__(self) -> None:
        self.buf = bytearray(IOMEM_LEN)
        self._lock = threading.Lock()   # save() must see no half-written access of another vCPU

    def save(self) -> dict:
        with self._lock:
            return {"iomem": bytes(self.buf)}

    def load(self, state: dict) -> None:
        data = StateReader(self.name, state, ("iomem",)).blob("iomem", IOMEM_LEN, IOMEM_LEN)
        with self._lock:
            self.buf[:] = data

    def reset(self) -> None:
        with self._lock:
            self.buf[:] = bytes(IOMEM_LEN)

    def read(self, offset: int, size: int) -> int:
        # the bus gives offsets inside the range; an access running past the end reads zeros there
        with self._lock:
            return int.from_bytes(self.buf[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        n = max(0, min(size, IOMEM_LEN - offset))
        with self._lock:
            self.buf[offset:offset + n] = value.to_bytes(size, "little")[:n]


class PcTestDevIrq:
    """Port 0x2000 + n sets interrupt line n to the written value (0 or not 0)."""

    name = "pc-testdev-irq"

    def __init__(self, set_line: Callable[[int, int], None] | None):
        self._set_line = set_line
        self.levels = 0   # bit n: the level the guest last set on line n

    # --- device state (hvm.mmio.device): the line levels. KVM's irqchip state does not carry the levels
    # of the lines into it, so load() sets again every line whose level differs from this device's view.
    def save(self) -> dict:
        return {"levels": self.levels}

    def load(self, state: dict) -> None:
        self._drive(StateReader(self.name, state, ("levels",)).integer("levels", 0, (1 << TESTDEV_IRQ_LINES) - 1))

    def reset(self) -> None:
        self._drive(0)

    def _drive(self, levels: int) -> None:
        changed, self.levels = self.levels ^ levels, levels
        for line in range(TESTDEV_IRQ_LINES):
            if changed >> line & 1 and self._set_line is not None:
                self._set_line(line, levels >> line & 1)

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        level = 1 if value else 0
        self.levels = (self.levels & ~(1 << offset)) | (level << offset)
        if self._set_line is not None:
            self._set_line(offset, level)


def byte_view_ports(spec) -> list[int | None]:
    """Ports 0xe8-0xeb of the byte view, None for each one another device of `spec` declares (isa-debugcon sits
    at 0xe9 by default: in QEMU the two overlap and one of them wins; here the other device keeps its port)."""
    from hvm.mmio import registry

    taken: set[int] = set()
    for d in (spec.devices if spec is not None else ()):
        dt = registry.lookup(d.type)
        if dt is not None and dt.name != "testdev" and dt.ports is not None:
            for base, length in dt.ports(d.values):
                taken.update(range(base, base + length))
    return [None if p in taken else p for p in range(BYTE_VIEW_PORT, BYTE_VIEW_PORT + 4)]


def _create(ctx, props: dict) -> PcTestDev:
    device = PcTestDev(ctx.memory)
    ctx.pio.register(TESTDEV_PORT, TESTDEV_LEN, device)
    ctx.pio.register(TESTDEV_IRQ_PORT, TESTDEV_IRQ_LINES, PcTestDevIrq(ctx.irq_setter))
    for index, port in enumerate(byte_view_ports(ctx.machine.spec if ctx.machine is not None else None)):
        if port is not None and ctx.pio.find(port) is None:   # nor a built-in device's (debug_exit, serial)
            ctx.pio.register(port, 1, PcTestDevByteView(device, index))
    ctx.mmio.register(IOMEM_BASE, IOMEM_LEN, PcTestDevIomem())
    return device


DEVICE = DeviceType(
    name="testdev", aliases=("pc-testdev",), create=_create,
    help="QEMU's pc-testdev for kvm-unit-tests: scratch port 0xe0 (byte view 0xe8), flush-page port 0xe4, "
         "IRQ lines at 0x2000, 64 KiB MMIO iomem at 0xff000000",
    ports=lambda p: [(TESTDEV_PORT, TESTDEV_LEN), (TESTDEV_IRQ_PORT, TESTDEV_IRQ_LINES)])
