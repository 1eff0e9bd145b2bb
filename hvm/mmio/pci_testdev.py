"""QEMU's pci-testdev (1b36:0005, class 0x00ff): the PCI device kvm-unit-tests measure exits with.

BAR0 is 4 KiB of memory, BAR1 256 I/O ports. Both start with the header of the current test (as QEMU's
hw/misc/pci-testdev.c lays it out; kvm-unit-tests' lib/pci-testdev.c and x86/vmexit.c are the guest side):
  0  test    u8  write: start test N of this BAR's kind (N < 3), anything else: no test
  1  width   u8  the access width the test writes with (1)
  4  offset  u32 where in this BAR the test writes
  8  data    u8  the value it writes (0xfa where the value must match, 0xce for the wildcard test)
  12 count   u32 the writes seen at `offset` since the test started
  16 name        "mmio-no-eventfd", "portio-wildcard-eventfd", ... NUL-terminated
Tests 0-2 of BAR0 are "mmio-{no,wildcard,datamatch}-eventfd" at offsets 2048-2050; of BAR1
"portio-{...}" at 131-133. The device works a byte at a time (wider accesses are split, as QEMU's
memory core splits them for this device): reads of the header return the current test's bytes (0
past its name, and 0 everywhere when no test runs), writes count at the test's offset (the datamatch
tests only when the byte is 0xfa).

QEMU attaches a KVM ioeventfd to the wildcard and datamatch tests' address, so there those writes never
reach the device and count stays 0 (the guest accepts 0 or exactly its 16 writes). hvm's device counts
them itself, as the no-eventfd test does: the guest sees 16 (the exits then cost what any hvm port or MMIO
exit costs; vmexit's numbers for the eventfd variants are not a measure of eventfd here).
"""
from __future__ import annotations

import threading
from typing import Any

from hvm.mmio.device import StateReader
from hvm.mmio.pci import PciFunction
from hvm.mmio.registry import DeviceType

VENDOR_REDHAT = 0x1B36
DEVICE_TEST = 0x0005
CLASS_OTHERS = 0x00FF00
MEM_SIZE = 4096          # IOTEST_MEMSIZE * 2
IO_SIZE = 256            # IOTEST_IOSIZE * 2
TESTS = ("no-eventfd", "wildcard-eventfd", "datamatch-eventfd")
KINDS = ("mmio", "portio")
DATAMATCH, NOMATCH = 0xFA, 0xCE
HEADER = 16              # bytes before the name


def _header(i: int) -> bytes:
    """Test i's header (count 0): i = kind * 3 + test."""
    kind, test = divmod(i, len(TESTS))
    offset = (MEM_SIZE if kind == 0 else IO_SIZE) // 2 + i
    data = NOMATCH if TESTS[test] == "wildcard-eventfd" else DATAMATCH
    name = f"{KINDS[kind]}-{TESTS[test]}".encode()
    return (bytes([i, 1, 0, 0]) + offset.to_bytes(4, "little") + bytes([data, 0, 0, 0]) + bytes(4)
            + name + b"\0")


HEADERS = tuple(_header(i) for i in range(len(KINDS) * len(TESTS)))


class PciTestDev(PciFunction):
    name = "pci-testdev"

    def __init__(self) -> None:
        super().__init__(VENDOR_REDHAT, DEVICE_TEST, CLASS_OTHERS)
        self.current = -1                        # the running test (index in HEADERS), -1: none
        self.counts = [0] * len(HEADERS)
        self._lock = threading.Lock()
        self.add_bar(0, False, MEM_SIZE, self._read, self._mmio_write)
        self.add_bar(1, True, IO_SIZE, self._read, self._pio_write)

    def _read(self, offset: int, size: int) -> int:
        with self._lock:
            return int.from_bytes(bytes(self._byte(offset + i) for i in range(size)), "little")

    def _byte(self, addr: int) -> int:
        if self.current < 0:
            return 0
        hdr = HEADERS[self.current]
        if addr + 1 >= len(hdr):                 # QEMU's bound: the name's NUL and beyond read 0
            return 0
        if 12 <= addr < 16:
            return (self.counts[self.current] >> (8 * (addr - 12))) & 0xFF
        return hdr[addr]

    def _mmio_write(self, offset: int, size: int, value: int) -> None:
        self._write(0, offset, size, value)

    def _pio_write(self, offset: int, size: int, value: int) -> None:
        self._write(1, offset, size, value)

    def _write(self, kind: int, offset: int, size: int, value: int) -> None:
        with self._lock:
            for i in range(size):
                self._write_byte(kind, offset + i, (value >> (8 * i)) & 0xFF)

    def _write_byte(self, kind: int, addr: int, value: int) -> None:
        if addr == 0:
            self.current = -1
            if value < len(TESTS):
                self.current = kind * len(TESTS) + value
                self.counts[self.current] = 0
            return
        if self.current < 0:
            return
        hdr = HEADERS[self.current]
        if addr != int.from_bytes(hdr[4:8], "little"):
            return
        if hdr[8] == DATAMATCH and value != DATAMATCH:
            return
        self.counts[self.current] = (self.counts[self.current] + 1) & 0xFFFF_FFFF

    def stats(self) -> dict[str, int]:
        return {"test": self.current, "count": self.counts[self.current] if self.current >= 0 else 0}

    # --- the function's own state (the PCI bus saves it with the configuration space)
    def save_state(self) -> dict:
        with self._lock:
            return {"current": self.current, "counts": list(self.counts)}

    def parse_state(self, state: object) -> Any:
        r = StateReader(self.name, state, ("current", "counts"))
        current = r.integer("current", -1, len(HEADERS) - 1)
        counts = state["counts"]
        if (not isinstance(counts, list) or len(counts) != len(HEADERS)
                or any(type(c) is not int or not 0 <= c <= 0xFFFF_FFFF for c in counts)):
            raise r.fail("counts", f"expected a list of {len(HEADERS)} 32-bit counts")
        return current, list(counts)

    def apply_state(self, parsed: Any) -> None:
        with self._lock:
            self.current, self.counts = parsed[0], list(parsed[1])

    def reset_state(self) -> None:
        with self._lock:
            self.current = -1
            self.counts = [0] * len(HEADERS)


def _create(ctx, props: dict) -> PciTestDev:
    device = PciTestDev()
    ctx.pci.add(device)
    return device


DEVICE = DeviceType(
    name="pci-testdev", create=_create, pci=True,
    help="QEMU's pci-testdev (1b36:0005) for kvm-unit-tests: BAR0 4 KiB memory and BAR1 256 ports of "
         "mmio/portio write tests (pc machine)")
