"""pc-testdev as QEMU's hw/misc/pc-testdev.c: the iomem MMIO region, the flush-page port, the scratch byte view."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from hvm.config import parse_devices
from hvm.memory import GuestMemory
from hvm.mmio.bus import MmioBus, PioBus
from hvm.mmio.device import DeviceStateError
from hvm.mmio.testdev import (IOMEM_BASE, IOMEM_LEN, PcTestDev, PcTestDevByteView, PcTestDevIomem, PageFlusher,
                              byte_view_ports)


def test_iomem_reads_back_every_size_at_any_offset():
    mem = PcTestDevIomem()
    mem.write(0x10, 8, 0x1122334455667788)
    assert mem.read(0x10, 8) == 0x1122334455667788
    assert (mem.read(0x10, 1), mem.read(0x11, 2), mem.read(0x13, 4)) == (0x88, 0x6677, 0x22334455)
    mem.write(0x12, 2, 0xABCD)                  # a narrow write into a wider value
    assert mem.read(0x10, 8) == 0x11223344ABCD7788
    mem.write(0x1001, 4, 0xCAFEF00D)            # unaligned
    assert mem.read(0x1000, 8) == 0xCAFEF00D00


def test_iomem_access_crossing_the_end_is_bounded():
    mem = PcTestDevIomem()
    mem.write(IOMEM_LEN - 2, 8, 0xFFEEDDCCBBAA9988)     # only the 2 bytes inside land
    assert len(mem.buf) == IOMEM_LEN
    assert mem.read(IOMEM_LEN - 2, 8) == 0x9988         # the rest reads as zero
    assert mem.read(IOMEM_LEN - 1, 1) == 0x99


def test_iomem_through_the_mmio_bus_at_0xff000000():
    bus = MmioBus()
    bus.register(IOMEM_BASE, IOMEM_LEN, PcTestDevIomem())
    bus.write(IOMEM_BASE + 0x100, 4, 0x12345678)
    assert bus.read(IOMEM_BASE + 0x100, 4) == 0x12345678
    assert bus.read(IOMEM_BASE + IOMEM_LEN, 4) == 0xFFFFFFFF     # past the region: nobody's


def test_iomem_state_save_load_reset_and_validation():
    a = PcTestDevIomem()
    a.write(0xFFF8, 8, 0x0102030405060708)
    b = PcTestDevIomem()
    b.load(a.save())
    assert b.read(0xFFF8, 8) == 0x0102030405060708 and b.save() == a.save()
    for bad, why in (({"iomem": bytes(IOMEM_LEN - 1)}, "65535 bytes, exactly 65536 allowed"),
                     ({"iomem": "x"}, "expected bytes, got str"), ({}, "'iomem' is missing")):
        with pytest.raises(DeviceStateError, match=why):
            b.load(bad)
    assert b.read(0xFFF8, 8) == 0x0102030405060708          # a refused state changes nothing
    b.reset()
    assert b.save() == {"iomem": bytes(IOMEM_LEN)}


def test_scratch_byte_view_at_0xe8():
    dev = PcTestDev()
    views = [PcTestDevByteView(dev, i) for i in range(4)]
    dev.write(0, 4, 0xDEADBEEF)
    assert [v.read(0, 1) for v in views] == [0xEF, 0xBE, 0xAD, 0xDE]
    assert views[0].read(0, 4) == 0xDEADBEEF and views[2].read(0, 4) == 0xFFFFDEAD   # past 0xeb: all ones
    views[1].write(0, 1, 0x55)
    views[3].write(0, 2, 0x7766)                             # only the byte inside the register lands
    assert dev.read(0, 4) == 0x66AD55EF and dev.save() == {"data": 0x66AD55EF}


def test_byte_view_leaves_isa_debugcon_its_port():
    spec = SimpleNamespace(devices=parse_devices({"testdev": True, "debugcon": True}))
    assert byte_view_ports(spec) == [0xE8, None, 0xEA, 0xEB]
    assert byte_view_ports(None) == [0xE8, 0xE9, 0xEA, 0xEB]


def test_flush_page_port_changes_protection_of_the_ram_page_only():
    calls = []
    with GuestMemory(1 << 20) as ram:
        dev = PcTestDev(ram)
        real = dev.flusher._libc_mprotect()

        def spy(addr, length, prot):
            calls.append((addr, length, prot))
            return real(addr, length, prot)
        dev.flusher._mprotect = spy
        ram.write(0x5000, b"kept")
        dev.write(4, 4, 0x5123)                  # flush the page holding 0x5123
        host = ram.regions[0].host_addr + 0x5000
        assert calls == [(host, 4096, 7), (host, 4096, 3)]   # RWX then RW: never inaccessible
        assert ram.read(0x5000, 4) == b"kept"
        ram.write(0x5000, b"more")                # still writable by hvm
        assert dev.flusher.flushed == 1
        calls.clear()
        dev.write(4, 4, 0xFF000000)               # not RAM (the iomem): ignored
        dev.write(4, 4, (1 << 20) - 1 + 1)        # just past RAM
        dev.write(4, 2, 0x5000)                   # not a 4-byte write: invalid, ignored
        dev.write(5, 1, 0x50)
        assert calls == [] and dev.flusher.ignored == 2 and dev.flusher.flushed == 1
        assert dev.read(4, 4) == 0


def test_flush_page_without_memory_is_ignored():
    f = PageFlusher(None)
    assert f.flush(0x1000) is False and f.ignored == 1


def test_firmware_reads_and_writes_iomem_byte_view_and_flushes_a_page(hvm, tmp_path):
    """firmware/testdev64.S: 15 checks of iomem (1/2/4/8-byte, unaligned, at the end, rep movsb/cmpsb),
    the byte view at 0xe8 and the flush-page port; prints ok and exits 0 through debug-exit (status 1)."""
    from conftest import FIRMWARE, write_yaml

    cfg = write_yaml(tmp_path, f"""
name: testdev64
memory: 16M
timeout: 15
boot: {{image: {FIRMWARE / 'testdev64.bin'}, load: 0x100000, mode: long}}
devices: {{testdev: true}}
""")
    r = hvm("run", str(cfg), "--stats")
    assert r.stdout.decode().splitlines()[0] == "testdev: ok", (r.stdout, r.stderr)
    assert r.status == 1, r.stderr


def test_firmware_without_testdev_fails_its_first_check(hvm, tmp_path):
    """The same guest with no pc-testdev: 0xff000000 is nobody's (reads all ones), check 1 fails."""
    from conftest import FIRMWARE, write_yaml

    cfg = write_yaml(tmp_path, f"""
name: testdev64
memory: 16M
timeout: 15
boot: {{image: {FIRMWARE / 'testdev64.bin'}, load: 0x100000, mode: long}}
""")
    r = hvm("run", str(cfg))
    assert r.stdout.decode().splitlines()[0] == "testdev: FAIL 1"
    assert r.status == (1 << 1) | 1
