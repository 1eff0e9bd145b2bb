"""The device path behind the C fast loop (VcpuThread._loop_fast handles a single port access inline): the
same guest-visible values, console output, statistics, last exits and device-fault messages as the
all-Python loop, for reads and writes of 1, 2 and 4 bytes."""
from __future__ import annotations

import pytest

from hvm import Machine
from hvm.config import FlatBoot, VmSpec
from hvm.console import Console

MiB = 1 << 20

# Real mode at 0x7c00 with COM1 at 0x3f8. bl = LSR (0x60) + LCR (3) + IER read as 2 bytes (0) + IER read as
# 4 bytes (0); "hi" through THR; a 2-byte write of 0x0103 to LCR (the UART keeps the low byte: 3); then bl to
# the debug-exit port: status (0x63 << 1) | 1 = 0xc7. (String I/O: tests/test_hostile_guest.py.)
UART_GUEST = bytes.fromhex(
    "bafd03 ec 88c3"            # mov dx,0x3fd; in al,dx; mov bl,al
    "baf803 b068 ee b069 ee"    # mov dx,0x3f8; mov al,'h'; out dx,al; mov al,'i'; out dx,al
    "bafb03 ec 00c3"            # mov dx,0x3fb; in al,dx; add bl,al
    "baf903 ed 00c3"            # mov dx,0x3f9; in ax,dx; add bl,al
    "66ed 00c3"                 # in eax,dx; add bl,al
    "bafb03 b80301 ef"          # mov dx,0x3fb; mov ax,0x0103; out dx,ax
    "88d8 baf400 ee f4"         # mov al,bl; mov dx,0xf4; out dx,al; hlt
)


def run(tmp_path, code: bytes, fast_loop: bool, device=None):
    image = tmp_path / "g.bin"
    image.write_bytes(code)
    spec = VmSpec(name="hotpath", boot=FlatBoot(image, 0x7C00, 0x7C00, "real"), memory=4 * MiB, timeout=10,
                  irqchip=False)
    with Machine(spec, console=Console("none", "none"), fast_loop=fast_loop) as vm:
        if device is not None:
            vm.pio.register(0x80, 1, device)
        result = vm.run()
        t = vm.threads[0]
        assert (t.fast is not None) == fast_loop
        return result, vm.stats(), t.describe_last_exits(), bytes(vm.console.history)


def test_uart_accesses_are_the_same_through_the_inline_path(tmp_path):
    fast = run(tmp_path, UART_GUEST, True)
    slow = run(tmp_path, UART_GUEST, False)
    for result, stats, last, out in (fast, slow):
        assert (result.status, result.reason) == (0xC7, "debug-exit")
        assert out == b"hi"
        assert stats.by_reason == {"IO": 8}
        assert stats.by_port == {0x3FD: 1, 0x3F8: 2, 0x3FB: 2, 0x3F9: 2, 0xF4: 1}
    assert fast[2] == slow[2]
    assert fast[2] == [
        "IO in port=0x03fd size=1 count=1 value=0x60",
        "IO out port=0x03f8 size=1 count=1 value=0x68",
        "IO out port=0x03f8 size=1 count=1 value=0x69",
        "IO in port=0x03fb size=1 count=1 value=0x3",
        "IO in port=0x03f9 size=2 count=1 value=0x0",
        "IO in port=0x03f9 size=4 count=1 value=0x0",
        "IO out port=0x03fb size=2 count=1 value=0x103",
        "IO out port=0x00f4 size=1 count=1 value=0x63",
    ]


class _Faulty:
    name = "faulty"

    def read(self, offset: int, size: int) -> int:
        raise KeyError(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class _Wide:
    """Returns more bits than any access has: the bus masks them to the access size."""
    name = "wide"

    def read(self, offset: int, size: int) -> int:
        return 0x1234_5678_9ABC

    def write(self, offset: int, size: int, value: int) -> None:
        pass


@pytest.mark.parametrize("fast_loop", [True, False])
def test_a_device_that_raises_on_a_read_is_one_fault_message(tmp_path, fast_loop):
    result, _, _, _ = run(tmp_path, bytes.fromhex("ba8000 ec f4"), fast_loop, _Faulty())   # in al,dx from 0x80
    assert (result.status, result.reason, result.message) == (
        70, "device-fault", "device fault on vCPU 0: device faulty (port 0x0080, 1-byte read) raised KeyError: 0 "
                            "(a bug in hvm)")


@pytest.mark.parametrize("fast_loop", [True, False])
def test_read_values_are_masked_to_the_access(tmp_path, fast_loop):
    # in ax,dx from 0x80 (the device returns 48 bits), then al to the debug-exit port: status (0xbc << 1 | 1) & 0xff
    result, stats, last, _ = run(tmp_path, bytes.fromhex("ba8000 ed baf400 ee f4"), fast_loop, _Wide())
    assert last[0] == "IO in port=0x0080 size=2 count=1 value=0x9abc"
    assert (result.status, result.reason) == (0x79, "debug-exit")
    assert stats.by_port == {0x80: 1, 0xF4: 1}


# rep outsb of 11 22 05 to COM1's SCR (0x3ff, published: one-byte accesses are answered in C), in al (C),
# rep insb of 2 bytes (string I/O: the device's Python), in ax (2 bytes: Python); bl = the sum of the four
# reads = 4 * 5, sent to the debug-exit port: status (0x14 << 1) | 1.
SCR_GUEST = bytes.fromhex(
    "be297c b90300 baff03 fc f36e"      # mov si,data; mov cx,3; mov dx,0x3ff; cld; rep outsb
    "ec 88c3"                           # in al,dx; mov bl,al
    "bf007e b90200 f36c"                # mov di,0x7e00; mov cx,2; rep insb
    "021e007e 021e017e ed 00c3"         # add bl,[0x7e00]; add bl,[0x7e01]; in ax,dx; add bl,al
    "88d8 baf400 ee f4"                 # mov al,bl; mov dx,0xf4; out dx,al; hlt
    "112205"                            # data (0x7c29)
)


def test_string_io_and_other_sizes_at_a_published_register_match_the_python_loop(tmp_path):
    fast = run(tmp_path, SCR_GUEST, True)
    slow = run(tmp_path, SCR_GUEST, False)
    for result, stats, last, _ in (fast, slow):
        assert (result.status, result.reason) == (0x29, "debug-exit")
        assert stats.by_port[0x3FF] == stats.by_reason["IO"] - 1
    assert fast[2] == slow[2]
    assert fast[2][-4:] == [
        "IO in port=0x03ff size=1 count=1 value=0x5",
        "IO in port=0x03ff size=1 count=2",
        "IO in port=0x03ff size=2 count=1 value=0x5",
        "IO out port=0x00f4 size=1 count=1 value=0x14",
    ]
