"""PioBus / MmioBus routing, overlap rejection and accesses with no device."""
from __future__ import annotations

import logging

import pytest

from hvm.mmio import BusError, MmioBus, PioBus


class Recorder:
    def __init__(self, name: str, value: int = 0):
        self.name = name
        self.value = value
        self.log: list[tuple] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))


def test_pio_routes_offsets_within_the_range():
    bus = PioBus()
    a, b = Recorder("a", 0x11), Recorder("b", 0x22)
    bus.register(0x3F8, 8, a)
    bus.register(0x60, 1, b)
    assert bus.read(0x3FD, 1) == 0x11
    bus.write(0x3F8, 1, 0x41)
    assert bus.read(0x60, 1) == 0x22
    assert a.log == [("r", 5, 1), ("w", 0, 1, 0x41)]
    assert bus.counts == {0x3FD: 1, 0x3F8: 1, 0x60: 1}
    assert bus.counts_by_device() == {"a": 2, "b": 1}


@pytest.mark.parametrize("base,length", [(0x3F8, 1), (0x3F0, 9), (0x3FF, 4), (0x3F0, 0x20)])
def test_overlapping_ranges_are_rejected(base, length):
    bus = PioBus()
    bus.register(0x3F8, 8, Recorder("uart"))
    with pytest.raises(BusError, match="overlaps 0x3f8..0x3ff of uart"):
        bus.register(base, length, Recorder("other"))


def test_adjacent_ranges_are_fine():
    bus = MmioBus()
    bus.register(0x1000, 0x1000, Recorder("lo"))
    bus.register(0x2000, 0x1000, Recorder("hi"))
    bus.register(0x0, 0x1000, Recorder("zero"))
    assert [r.device.name for r in bus.ranges] == ["zero", "lo", "hi"]
    assert bus.find(0x1FFF).device.name == "lo"
    assert bus.find(0x2000).device.name == "hi"
    assert bus.find(0x3000) is None


@pytest.mark.parametrize("size,expect", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF)])
def test_unhandled_reads_are_all_ones(size, expect):
    assert PioBus().read(0x80, size) == expect
    assert MmioBus().read(0xD0000000, size) == expect


def test_unhandled_accesses_are_counted_and_logged_once_per_address(caplog):
    bus = MmioBus()
    with caplog.at_level(logging.WARNING, logger="hvm.mmio.bus"):
        for _ in range(3):
            bus.write(0xD0000000, 4, 0x1234)
        bus.read(0xD0000004, 4)
    assert bus.unhandled == {0xD0000000: 3, 0xD0000004: 1}
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["mmio write of 0x1234 (4 bytes) to 0xd0000000: no device there, dropped",
                        "mmio read (4 bytes) from 0xd0000004: no device there, reads as all ones"]


def test_port_range_must_fit_in_port_space():
    with pytest.raises(BusError, match="outside 0..0xffff"):
        PioBus().register(0xFFFC, 8, Recorder("x"))
