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


# --- the bus as the boundary between a hostile guest and the devices ---------------------------------
from hvm.mmio import DeviceFault  # noqa: E402
from hvm.mmio import bus as busmod  # noqa: E402


@pytest.mark.parametrize("size,mask", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF)])
def test_values_are_masked_to_the_access_size_both_ways(size, mask):
    for bus, addr in ((PioBus(), 0x70), (MmioBus(), 0xFED00000)):
        dev = Recorder("wide", value=(1 << 70) - 1)     # a device returning more bits than the access has
        bus.register(addr, 8, dev)
        assert bus.read(addr, size) == mask
        bus.write(addr, size, 0x1234567890ABCDEF)
        assert dev.log[-1] == ("w", 0, size, 0x1234567890ABCDEF & mask)


class Broken:
    name = "broken"

    def read(self, offset: int, size: int) -> int:
        return None          # not an int: the mask raises TypeError

    def write(self, offset: int, size: int, value: int) -> None:
        raise KeyError(value)


def test_an_exception_in_a_device_is_one_fault_naming_device_address_access_and_error():
    bus = PioBus()
    bus.register(0x70, 2, Broken())
    with pytest.raises(DeviceFault) as info:
        bus.write(0x71, 2, 0x12345)
    assert str(info.value) == "device broken (port 0x0071, 2-byte write of 0x2345) raised KeyError: 9029"
    with pytest.raises(DeviceFault) as info:
        bus.read(0x70, 1)
    assert str(info.value) == ("device broken (port 0x0070, 1-byte read) raised TypeError: "
                               "unsupported operand type(s) for &: 'NoneType' and 'int'")
    mmio = MmioBus()
    mmio.register(0xFEE00000, 0x1000, Broken())
    with pytest.raises(DeviceFault, match=r"^device broken \(mmio 0xfee00010, 4-byte write of 0x7\) raised KeyError"):
        mmio.write(0xFEE00010, 4, 7)
    with pytest.raises(DeviceFault):
        bus.write_string(0x71, 1, b"ab")
    with pytest.raises(DeviceFault):
        bus.read_string(0x70, 1, 3)


def test_string_io_is_one_access_per_exit():
    bus = PioBus()
    dev = Recorder("d", 0x41)
    bus.register(0x3F8, 8, dev)
    assert bus.read_string(0x3F8, 1, 5) == [0x41] * 5
    bus.write_string(0x3F8, 2, [0x12345, 2, 3])
    assert dev.log[5:] == [("w", 0, 2, 0x2345), ("w", 0, 2, 2), ("w", 0, 2, 3)]
    assert bus.counts == {0x3F8: 2}
    assert bus.write_string(0x80, 1, b"xyz") is None and bus.read_string(0x80, 2, 2) == [0xFFFF, 0xFFFF]
    assert bus.unhandled == {0x80: 2}


def test_unclaimed_mmio_state_is_bounded_with_an_other_bucket(caplog):
    """A scan of 20000 RAM-less addresses (a hostile guest, or rep insb past RAM): exact counts for the first
    TRACKED_ADDRESSES, the rest in one bucket; LOGGED_MISSES warning lines, then one summary line."""
    bus = MmioBus()
    n = 20000
    with caplog.at_level(logging.WARNING, logger="hvm.mmio.bus"):
        for i in range(n):
            bus.write(0xD0000000 + 4 * i, 4, i)
        bus.read(0xD0000000, 4)                       # a tracked address stays exact
        bus.log_summary()
    tracked = busmod.TRACKED_ADDRESSES
    assert len(bus._hits) == tracked + 1 and len(bus._routes) == tracked and len(bus._seen) == tracked
    assert len(bus._unlogged) <= busmod.OTHER_DISTINCT_LIMIT
    assert bus.unhandled == {0xD0000000: 2, **{0xD0000000 + 4 * i: 1 for i in range(1, tracked)}}
    assert bus.other == n - tracked
    messages = [r.getMessage() for r in caplog.records]
    logged = busmod.LOGGED_MISSES
    assert len(messages) == logged + 2
    assert messages[logged] == "mmio: further accesses to unclaimed addresses are not logged one by one (a summary follows)"
    assert messages[-1] == (f"{n - logged} more unclaimed mmio accesses not logged (to more than "
                            f"{busmod.OTHER_DISTINCT_LIMIT} addresses in all)")


def test_unclaimed_port_logs_are_rate_limited(caplog):
    bus = PioBus()
    with caplog.at_level(logging.WARNING, logger="hvm.mmio.bus"):
        for port in range(0x1000, 0x1000 + 1000):
            bus.read(port, 1)
            bus.read(port, 1)
        bus.log_summary()
    assert len(bus.unhandled) == 1000 and set(bus.unhandled.values()) == {2}     # ports: exact, 64 K at most
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == busmod.LOGGED_MISSES + 2
    assert messages[0] == "port read (1 bytes) from 0x1000: no device there, reads as all ones"
    assert messages[-1] == (f"{2 * (1000 - busmod.LOGGED_MISSES)} more unclaimed port accesses not logged "
                            f"(to {1000 - busmod.LOGGED_MISSES} addresses in all)")


def test_summary_lines_come_periodically_while_misses_go_on(caplog, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(busmod.time, "monotonic", lambda: now[0])
    bus = PioBus()
    with caplog.at_level(logging.WARNING, logger="hvm.mmio.bus"):
        for port in range(100):
            now[0] += 1.0
            bus.write(port, 1, 0)
        bus.log_summary()           # the machine's, at the end
    summaries = [r.getMessage() for r in caplog.records if "more unclaimed" in r.getMessage()]
    # misses of ports 8..99 (not logged) span 91 s: a line every SUMMARY_INTERVAL (10 s), counting what is new
    assert summaries == (["11 more unclaimed port accesses not logged (to 11 addresses in all)"]
                         + [f"10 more unclaimed port accesses not logged (to {n} addresses in all)"
                            for n in range(21, 92, 10)]
                         + ["1 more unclaimed port accesses not logged (to 92 addresses in all)"])


def test_a_guest_touching_every_port_costs_a_fixed_amount_of_memory():
    """Found by `make fuzz` (2 minutes of random ports: +13 MiB): the ports seen were a Python set, per bus
    and again per vCPU in the fast loop, ~4 MiB each with all 64 K ports in them. Now fixed-size maps."""
    import tracemalloc

    from hvm.vcpu import fastloop

    bus = PioBus()
    loops = [fastloop.FastLoop(-1, 0)] if fastloop.AVAILABLE else []
    tracemalloc.start()
    try:
        for port in range(0x10000):
            bus.read(port, 1)
            bus.write(port, 1, 0)
            for loop in loops:
                loop.port_unclaimed(port)
        grown = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert grown < 512 * 1024, grown
    assert sum(bus.unhandled.values()) == 2 * 0x10000
    assert [p for p in bus._seen] == list(range(0x10000))


def test_a_moving_range_leaves_no_counts_behind():
    # A PCI BAR the guest moves around (hvm/mmio/pci.py): each place it sat had its own per-address counts,
    # which stayed after the move (reported as unclaimed addresses): a guest moving a BAR and touching it
    # grew hvm's memory without bound. The counts of a range go with it.
    bus = MmioBus()
    view = bus.for_vcpu()
    dev = Recorder("bar")
    for i in range(50):
        base = 0xC000_0000 + i * 0x1000
        bus.register(base, 0x100, dev)
        for off in range(0x100):
            view.read(base + off, 1)
            bus.write(base + off, 1, 0)
        bus.unregister(base, dev)
    assert len(view._hits) + len(bus._hits) == 0
    assert bus.unhandled == {} and bus.counts == {}
    bus.register(0xD000_0000, 0x100, dev)
    view.read(0xD000_0000, 4)
    assert bus.counts == {0xD000_0000: 1}
