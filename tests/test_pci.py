"""PCI bus 0 of the pc machine (hvm/mmio/pci.py) and QEMU's pci-testdev (hvm/mmio/pci_testdev.py):
configuration mechanism #1, BAR sizing/decoding/moves and their limits, device state, the registry and the
shim, and firmware/pci.S enumerating the bus in a real VM."""
from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import FIRMWARE, run_hvm, write_yaml
from hvm.config import ConfigError, parse_spec
from hvm.mmio.bus import MmioBus, PioBus
from hvm.mmio.device import DeviceStateError
from hvm.mmio.pci import ECAM_BASE, ECAM_SIZE, LOGGED_REFUSALS, PciBus, PciEcam
from hvm.mmio.pci_testdev import PciTestDev
from hvm.qemu_shim import translate

RAM = [(0, 128 << 20)]
TESTDEV = 0x8           # devfn 00:01.0


class Scratch:
    """A fixed device another BAR must not cover."""
    name = "scratch"

    def read(self, offset, size):
        return 0x5A

    def write(self, offset, size, value):
        pass


@pytest.fixture
def pc():
    pio, mmio = PioBus(), MmioBus()
    bus = PciBus(pio, mmio, RAM)
    pio.register(0xCF8, 8, bus)
    dev = PciTestDev()
    assert bus.add(dev) == TESTDEV
    bus.assign_bars()
    return pio, mmio, bus, dev


def addr(devfn: int, reg: int, bus: int = 0, enable: bool = True) -> int:
    return (0x8000_0000 if enable else 0) | bus << 16 | devfn << 8 | (reg & 0xFC)


def cfg_read(pio, devfn, reg, size=4, **kw):
    pio.write(0xCF8, 4, addr(devfn, reg, **kw))
    return pio.read(0xCFC + (reg & 3), size)


def cfg_write(pio, devfn, reg, value, size=4):
    pio.write(0xCF8, 4, addr(devfn, reg))
    pio.write(0xCFC + (reg & 3), size, value)


def ranges(bus):
    return [(hex(r.base), r.length, r.device.name) for r in bus.ranges]


# --- configuration mechanism #1 --------------------------------------------------------------------------
def test_address_register_reads_back_as_written(pc):
    pio, *_ = pc
    pio.write(0xCF8, 4, 0xFFFF_FFFF)
    assert pio.read(0xCF8, 4) == 0xFFFF_FFFF                  # as QEMU keeps it
    pio.write(0xCF8, 4, 0x8000_0000)
    pio.write(0xCFB, 1, 0x01)                 # Linux's type-1 probe: a byte write is not the register
    pio.write(0xCF8, 2, 0x1234)
    assert pio.read(0xCF8, 4) == 0x8000_0000
    assert pio.read(0xCF8, 1) == 0xFF and pio.read(0xCFA, 2) == 0xFFFF


def test_host_bridge_and_testdev_ids_at_every_data_offset(pc):
    pio, *_ = pc
    assert cfg_read(pio, 0, 0) == 0x1237_8086
    assert cfg_read(pio, 0, 0x08) >> 8 == 0x060000
    assert cfg_read(pio, TESTDEV, 0) == 0x0005_1B36
    assert cfg_read(pio, TESTDEV, 0x08) >> 8 == 0x00FF00
    assert cfg_read(pio, TESTDEV, 0x02, 2) == 0x0005           # port 0xCFE, 2 bytes
    assert cfg_read(pio, TESTDEV, 0x01, 1) == 0x1B             # port 0xCFD, 1 byte
    assert cfg_read(pio, TESTDEV, 0x03, 1) == 0x00
    pio.write(0xCF8, 4, addr(0, 0))
    assert pio.read(0xCFE, 4) == 0xFFFF_1237                   # bytes past the dword: all ones
    # kvm-unit-tests' pci_config_readw(dev, 2): the address's bits 1:0 pick the byte, as in QEMU
    pio.write(0xCF8, 4, addr(TESTDEV, 0) | 2)
    assert pio.read(0xCFC, 2) == 0x0005
    pio.write(0xCF8, 4, addr(TESTDEV, 0) | 1)
    assert pio.read(0xCFC, 1) == 0x1B and pio.read(0xCFE, 1) == 0x00   # offset 1 | 2 = 3


def test_absent_functions_other_buses_and_disabled_reads_are_all_ones(pc):
    pio, *_ = pc
    assert cfg_read(pio, 0x10, 0) == 0xFFFF_FFFF               # 00:02.0
    assert cfg_read(pio, 0x09, 0) == 0xFFFF_FFFF               # 00:01.1
    assert cfg_read(pio, 0, 0, bus=1) == 0xFFFF_FFFF
    assert cfg_read(pio, 0, 0, enable=False) == 0xFFFF_FFFF
    assert cfg_read(pio, 0x10, 0, size=1) == 0xFF
    cfg_write(pio, 0x10, 0x3C, 0x55)                           # dropped, nothing raises


def test_read_only_bytes_ignore_writes_and_writable_ones_keep_them(pc):
    pio, *_ = pc
    cfg_write(pio, TESTDEV, 0, 0xDEAD_BEEF)
    assert cfg_read(pio, TESTDEV, 0) == 0x0005_1B36
    cfg_write(pio, TESTDEV, 0x3C, 0x0B, size=1)                # interrupt line: writable
    assert cfg_read(pio, TESTDEV, 0x3C) == 0x0000_000B          # pin 0: pci-testdev has none


def test_bar_sizing_protocol_and_firmware_assignment(pc):
    pio, mmio, _, _ = pc
    assert cfg_read(pio, TESTDEV, 0x10) == 0xC000_0000          # memory window, as SeaBIOS
    assert cfg_read(pio, TESTDEV, 0x14) == 0x0000_C001          # I/O from 0xc000
    assert cfg_read(pio, TESTDEV, 0x04, 2) == 0x3               # decoding enabled
    cfg_write(pio, TESTDEV, 0x10, 0xFFFF_FFFF)
    assert cfg_read(pio, TESTDEV, 0x10) == 0xFFFF_F000          # 4 KiB, 32-bit memory
    assert ranges(mmio) == []                                   # the sizing pattern decodes nothing
    cfg_write(pio, TESTDEV, 0x14, 0xFFFF_FFFF)
    assert cfg_read(pio, TESTDEV, 0x14) == 0xFFFF_FF01          # 256 ports
    cfg_write(pio, TESTDEV, 0x18, 0xFFFF_FFFF)
    assert cfg_read(pio, TESTDEV, 0x18) == 0                    # no BAR2
    cfg_write(pio, TESTDEV, 0x10, 0xC000_0000)
    cfg_write(pio, TESTDEV, 0x14, 0xC000)
    assert ranges(mmio) == [("0xc0000000", 4096, "pci-testdev-bar0")]
    assert ("0xc000", 256, "pci-testdev-bar1") in ranges(pio)


def test_bar_move_and_decode_enable(pc):
    pio, mmio, _, _ = pc
    mmio.write(0xC000_0000, 1, 0)                               # start test 0
    assert mmio.read(0xC000_0010, 4) == int.from_bytes(b"mmio", "little")
    cfg_write(pio, TESTDEV, 0x10, 0xC800_0000)
    assert ranges(mmio) == [("0xc8000000", 4096, "pci-testdev-bar0")]
    assert mmio.read(0xC000_0010, 4) == 0xFFFF_FFFF             # the old place: nothing
    assert mmio.read(0xC800_0010, 4) == int.from_bytes(b"mmio", "little")
    cfg_write(pio, TESTDEV, 0x04, 0x1, size=2)                  # I/O only
    assert ranges(mmio) == [] and ("0xc000", 256, "pci-testdev-bar1") in ranges(pio)
    assert mmio.read(0xC800_0010, 4) == 0xFFFF_FFFF
    cfg_write(pio, TESTDEV, 0x04, 0x0, size=2)
    assert [r for r in ranges(pio) if r[2].startswith("pci-testdev")] == []
    assert pio.read(0xC010, 1) == 0xFF
    cfg_write(pio, TESTDEV, 0x04, 0x3, size=2)
    assert pio.read(0xC010, 1) == ord("m")


def test_bar_over_ram_or_another_device_stays_unmapped_with_a_bounded_log(pc, caplog):
    pio, mmio, _, _ = pc
    mmio.register(0xC100_0000, 0x1000, Scratch())
    caplog.set_level(logging.WARNING, "hvm.mmio.pci")
    cfg_write(pio, TESTDEV, 0x10, 0x0010_0000)                  # RAM
    assert ranges(mmio) == [("0xc1000000", 4096, "scratch")]
    assert "pci pci-testdev BAR0 left unmapped: 0x100000-0x100fff is over RAM" in caplog.text
    cfg_write(pio, TESTDEV, 0x10, 0xC100_0000)                  # another device
    assert ranges(mmio) == [("0xc1000000", 4096, "scratch")]
    assert mmio.read(0xC100_0000, 1) == 0x5A
    assert "overlaps 0xc1000000..0xc1000fff of scratch" in caplog.text
    cfg_write(pio, TESTDEV, 0x14, 0x0100)                       # the chipset's ports
    assert "pci pci-testdev BAR1 left unmapped: ports 0x100-0x1ff are the chipset's (below 0x1000)" in caplog.text
    assert len(caplog.records) == 3                             # BAR0's refusal is not said again
    cfg_write(pio, TESTDEV, 0x10, 0xFEBF_F000)                  # right below the IOAPIC: fine
    assert ("0xfebff000", 4096, "pci-testdev-bar0") in ranges(mmio)
    cfg_write(pio, TESTDEV, 0x10, 0xFEC0_0000)                  # the IOAPIC's: not decoded (silently)
    assert ranges(mmio) == [("0xc1000000", 4096, "scratch")]
    for i in range(100):
        cfg_write(pio, TESTDEV, 0x10, 0x0020_0000 + i * 0x1000)
    refusals = [r for r in caplog.records if r.name == "hvm.mmio.pci"]
    assert len(refusals) == LOGGED_REFUSALS + 1                 # then one "not logged" line
    cfg_write(pio, TESTDEV, 0x10, 0xC000_0000)                  # the guest can always move it back
    assert ("0xc0000000", 4096, "pci-testdev-bar0") in ranges(mmio)


def test_ecam_is_the_same_configuration_space(pc):
    pio, mmio, bus, _ = pc
    ecam = PciEcam(bus)
    mmio.register(ECAM_BASE, ECAM_SIZE, ecam)
    assert mmio.read(ECAM_BASE, 4) == 0x1237_8086
    assert mmio.read(ECAM_BASE + 0x8002, 2) == 0x0005                # 00:01.0, any size and offset
    assert mmio.read(ECAM_BASE + 0x8000, 8) == cfg_read(pio, TESTDEV, 4) << 32 | 0x0005_1B36
    assert mmio.read(ECAM_BASE + 0x8100, 4) == 0xFFFF_FFFF            # no extended space
    assert mmio.read(ECAM_BASE + 0x1_0000, 4) == 0xFFFF_FFFF          # 00:02.0: absent
    mmio.write(ECAM_BASE + 0x8010, 4, 0xC900_0000)                   # BAR0 moved through ECAM
    assert cfg_read(pio, TESTDEV, 0x10) == 0xC900_0000
    assert ("0xc9000000", 4096, "pci-testdev-bar0") in ranges(mmio)
    mmio.write(ECAM_BASE + 0x8000, 4, 0)                             # read-only: ignored
    assert cfg_read(pio, TESTDEV, 0) == 0x0005_1B36
    cfg_write(pio, TESTDEV, 0x10, ECAM_BASE)                         # a BAR over the ECAM window: refused
    assert mmio.read(ECAM_BASE, 4) == 0x1237_8086


def test_machine_tables_have_pci0_the_ecam_reservation_and_mcfg():
    import struct

    from hvm.boot import acpi
    from hvm.console import Console
    from hvm.machine import Machine

    spec = parse_spec({"memory": "16M", "timeout": 5, "devices": {"pci-testdev": True},
                       "boot": {"image": str(FIRMWARE / "pci.bin"), "mode": "protected", "load": 0x100000}})
    with Machine(spec, console=Console("none", "none", open_now=False)) as vm:
        rsdp = vm.memory.read(acpi.ACPI_BASE, 20)
        rsdt_at = struct.unpack_from("<I", rsdp, 16)[0]
        length = struct.unpack("<I", vm.memory.read(rsdt_at + 4, 4))[0]
        entries = struct.unpack_from(f"<{(length - 36) // 4}I", vm.memory.read(rsdt_at + 36, length - 36))
        tables = {vm.memory.read(a, 4): a for a in entries}
        assert set(tables) == {b"FACP", b"APIC", b"MCFG"}
        mcfg = vm.memory.read(tables[b"MCFG"], 60)
        assert sum(mcfg) % 256 == 0 and mcfg[36:] == bytes(8) + struct.pack("<QHBBI", 0xE000_0000, 0, 0, 0, 0)
        dsdt_at = struct.unpack("<I", vm.memory.read(tables[b"FACP"] + 40, 4))[0]
        dsdt_len = struct.unpack("<I", vm.memory.read(dsdt_at + 4, 4))[0]
        assert vm.memory.read(dsdt_at + 36, dsdt_len - 36) == (acpi.S3_AML + acpi.S5_AML + acpi.pci_host_aml()
                                                                     + acpi.ecam_reserve_aml())
        assert [(hex(r.base), r.length, r.device.name) for r in vm.mmio.ranges if r.device.name.startswith("pci")] == \
            [("0xc0000000", 4096, "pci-testdev-bar0"), ("0xe0000000", ECAM_SIZE, "pci-ecam")]


# --- pci-testdev -----------------------------------------------------------------------------------------
def header(read, base, n=40) -> bytes:
    return bytes(read(base + i, 1) for i in range(n))


def test_testdev_headers_and_counts_as_qemu_lays_them_out(pc):
    pio, mmio, _, dev = pc
    assert header(mmio.read, 0xC000_0000, 8) == bytes(8)       # no test running: zeros
    expected = {0: (b"mmio-no-eventfd", 0x800, 0xFA), 1: (b"mmio-wildcard-eventfd", 0x801, 0xCE),
                2: (b"mmio-datamatch-eventfd", 0x802, 0xFA)}
    for n, (name, offset, data) in expected.items():
        mmio.write(0xC000_0000, 1, n)
        h = header(mmio.read, 0xC000_0000)
        assert h[:2] == bytes([n, 1]) and int.from_bytes(h[4:8], "little") == offset and h[8] == data
        assert h[16:16 + len(name) + 1] == name + b"\0"
        for _ in range(16):
            mmio.write(0xC000_0000 + offset, 1, data)
        mmio.write(0xC000_0000 + offset, 1, 0x11)              # counts only where data need not match
        assert mmio.read(0xC000_000C, 4) == (17 if n == 1 else 16)
    pio.write(0xC000, 1, 2)
    assert header(pio.read, 0xC000, 44)[16:44] == b"portio-datamatch-eventfd\0\0\0\0"
    assert pio.read(0xC004, 4) == 0x85
    pio.write(0xC000 + 0x85, 2, 0xFAFA)        # a word is two byte writes (as QEMU splits it): one at 0x85
    assert pio.read(0xC00C, 4) == 1
    pio.write(0xC000, 1, 3)                                     # no test 3: none runs
    assert pio.read(0xC001, 1) == 0 and dev.current == -1


# --- device state ----------------------------------------------------------------------------------------
def test_state_round_trip_moves_the_bars_and_keeps_the_test(pc):
    pio, mmio, bus, dev = pc
    cfg_write(pio, TESTDEV, 0x10, 0xC800_0000)
    pio.write(0xC000, 1, 1)
    for _ in range(5):
        pio.write(0xC000 + 0x84, 1, 0)
    cfg_write(pio, TESTDEV, 0x04, 0x2, size=2)                  # BAR1 not decoded
    state = bus.save()
    bus.reset()                                                 # back to the firmware's assignment
    assert ("0xc0000000", 4096, "pci-testdev-bar0") in ranges(mmio) and dev.current == -1
    assert pio.read(0xCF8, 4) == 0
    bus.load(state)
    assert ranges(mmio) == [("0xc8000000", 4096, "pci-testdev-bar0")]
    assert not [r for r in ranges(pio) if r[2].startswith("pci-testdev")]
    assert mmio.read(0xC800_000C, 4) == 5 and mmio.read(0xC800_0010, 4) == int.from_bytes(b"port", "little")
    assert bus.save() == state


def test_state_with_a_bar_over_ram_or_another_device_is_refused_unchanged(pc):
    pio, mmio, bus, _ = pc
    good = bus.save()
    bad = bus.save()
    config = bytearray(bad["functions"]["00:01.0"]["config"])
    config[0x10:0x14] = (0x0010_0000).to_bytes(4, "little")
    bad["functions"]["00:01.0"]["config"] = bytes(config)
    with pytest.raises(DeviceStateError) as e:
        bus.load(bad)
    assert str(e.value) == ("device pci 00:01.0 (pci-testdev): state field 'config': BAR0 is saved as mapped, "
                            "but 0x100000-0x100fff is over RAM")
    assert bus.save() == good
    mmio.register(0xC100_0000, 0x1000, Scratch())
    config[0x10:0x14] = (0xC100_0000).to_bytes(4, "little")
    bad["functions"]["00:01.0"]["config"] = bytes(config)
    with pytest.raises(DeviceStateError, match="BAR0 at 0xc1000000 overlaps scratch"):
        bus.load(bad)
    other = bus.save()
    config = bytearray(other["functions"]["00:01.0"]["config"])
    config[0] = 0x86                                            # another vendor
    other["functions"]["00:01.0"]["config"] = bytes(config)
    with pytest.raises(DeviceStateError, match="read-only byte 0x00 is 0x86, this machine's pci-testdev has 0x36"):
        bus.load(other)
    del other["functions"]["00:01.0"]
    with pytest.raises(DeviceStateError, match="'functions': has 00:00.0, this machine has 00:00.0, 00:01.0"):
        bus.load(other)
    assert bus.save() == good


# --- configuration, registry, shim ----------------------------------------------------------------------
def test_yaml_pci_testdev_asks_for_a_pc_and_refuses_machine_none(tmp_path):
    image = str(FIRMWARE / "pci.bin")
    spec = parse_spec({"boot": {"image": image, "mode": "protected", "load": 0x100000},
                       "devices": {"pci-testdev": True}})
    assert spec.machine == "pc" and [d.type for d in spec.devices] == ["pci-testdev"]
    with pytest.raises(ConfigError, match="devices.pci-testdev: a PCI device: it needs machine: pc"):
        parse_spec({"boot": {"image": image}, "machine": "none", "devices": {"pci-testdev": True}})


def test_shim_passes_pci_testdev_to_the_registry():
    args = translate(["-device", "pci-testdev", "-kernel", "x.flat"])
    assert args[-4:] == ["--device", "pci-testdev", "--kernel", "x.flat"]


def test_device_help_lists_pci_testdev():
    run = run_hvm("run", "--device", "help", timeout=30)
    assert "pci-testdev: QEMU's pci-testdev (1b36:0005)" in run.out


# --- a real VM -------------------------------------------------------------------------------------------
FIRMWARE_OUT = """\
pci 00:00.0 8086:1237 class 060000
pci 00:01.0 1b36:0005 class 00ff00
bus1 ffffffff disabled ffffffff
ecam 12378086 00051b36 ffffffff
bar0 c0000000 bar1 0000c001
size0 fffff000 size1 ffffff01
mem mmio-no-eventfd offset 00000800 data fa count 00000010
mem mmio-wildcard-eventfd offset 00000801 data ce count 00000010
mem mmio-datamatch-eventfd offset 00000802 data fa count 00000010
io portio-no-eventfd offset 00000083 data fa count 00000010
io portio-wildcard-eventfd offset 00000084 data ce count 00000010
io portio-datamatch-eventfd offset 00000085 data fa count 00000010
off ffffffff on 6f696d6d
moved 6f696d6d old ffffffff
"""


def pci_yaml(tmp_path: Path) -> Path:
    return write_yaml(tmp_path, f"name: pcifw\nmemory: 16M\n"
                      f"boot: {{image: '{FIRMWARE / 'pci.bin'}', load: 0x100000, mode: protected}}\n", "pci.yaml")


def test_firmware_enumerates_bus_0_and_runs_the_testdev(tmp_path):
    run = run_hvm("run", str(pci_yaml(tmp_path)), "--device", "pci-testdev", "--timeout", "10", timeout=60)
    assert run.status == 1, run.stderr
    assert run.out == FIRMWARE_OUT


def test_firmware_without_pci_testdev_sees_the_host_bridge_only(tmp_path):
    run = run_hvm("run", str(pci_yaml(tmp_path)), "--machine", "pc", "--timeout", "10", timeout=60)
    assert run.status == 1, run.stderr
    assert run.out == ("pci 00:00.0 8086:1237 class 060000\nbus1 ffffffff disabled ffffffff\n"
                       "ecam 12378086 ffffffff ffffffff\n")


def test_snapshot_keeps_a_moved_bar_and_the_running_test(tmp_path):
    from hvm.config import load_config
    from hvm.console import Console
    from hvm.machine import Machine

    cfg = write_yaml(tmp_path, pci_yaml(tmp_path).read_text() + "timeout: 20\ndevices: {pci-testdev: true}\n")
    path = tmp_path / "pci.snap"
    with Machine(load_config(cfg), console=Console("none", "none", open_now=False)) as vm:
        cfg_write(vm.pio, TESTDEV, 0x10, 0xC800_0000)
        vm.mmio.write(0xC800_0000, 1, 2)
        vm.mmio.write(0xC800_0802, 1, 0xFA)
        vm.snapshot(path)
    with Machine.restore(path, console=Console("none", "none", open_now=False), timeout=20) as vm:
        assert ("0xc8000000", 4096, "pci-testdev-bar0") in ranges(vm.mmio)
        assert cfg_read(vm.pio, TESTDEV, 0x10) == 0xC800_0000
        assert vm.mmio.read(0xC800_000C, 4) == 1
        assert vm.mmio.read(0xC800_0010, 4) == int.from_bytes(b"mmio", "little")
        vm.system_reset()
        assert cfg_read(vm.pio, TESTDEV, 0x10) == 0xC000_0000


# --- the DSDT's root bridge ------------------------------------------------------------------------------
PCI0_ASL = """DefinitionBlock ("", "SSDT", 1, "HVM", "HVMTABLE", 1) {
    Scope (\\_SB) {
        Device (PCI0) {
            Name (_HID, EisaId ("PNP0A03"))
            Name (_ADR, 0)
            Name (_UID, 0)
            Name (_CRS, ResourceTemplate () {
                WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, 0, 0xFF, 0, 0x100)
                IO (Decode16, 0xCF8, 0xCF8, 1, 8)
                WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, 0, 0xCF7, 0, 0xCF8)
                WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, 0xD00, 0xFFFF, 0, 0xF300)
                DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable, ReadWrite,
                             0, 0xA0000, 0xBFFFF, 0, 0x20000)
                DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
                             0, 0xC0000000, 0xCFFFFFFF, 0, 0x10000000)
            })
        }
    }
}
"""


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl not installed (Debian acpica-tools)")
def test_iasl_compiles_the_same_pci0(tmp_path):
    """The root bridge as QEMU's pc DSDT writes it in ASL, compiled by iasl: hvm's hand-encoded AML is the
    same bytes (but the End Tag checksum, which iasl leaves 0)."""
    from hvm.boot import acpi

    (tmp_path / "p.asl").write_text(PCI0_ASL)
    proc = subprocess.run(["iasl", "-p", str(tmp_path / "p"), str(tmp_path / "p.asl")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    theirs = (tmp_path / "p.aml").read_bytes()[36:]
    ours = acpi.pci_host_aml()
    assert len(theirs) == len(ours)
    end = ours.index(bytes([0x79]), len(ours) - 3)        # the End Tag: 0x79, checksum
    assert theirs[:end + 1] == ours[:end + 1] and theirs[end + 2:] == ours[end + 2:]
    assert theirs[end + 1] == 0 and sum(ours[ours.index(bytes([0x88])):end + 2]) % 256 == 0


# --- kvm-unit-tests' vmexit guest: its pci-testdev exit measurements -------------------------------------
UPSTREAM = next((d for d in (Path(__file__).resolve().parents[1].parent / "shared" / "kvm-unit-tests" / "upstream",
                             Path(__file__).resolve().parents[2].parent / "shared" / "kvm-unit-tests" / "upstream")
                 if d.is_dir()), Path("/nonexistent"))


@pytest.mark.skipif(not (UPSTREAM / "x86" / "vmexit.flat").is_file(), reason="no shared kvm-unit-tests tree")
@pytest.mark.parametrize("bar, kind", [("pci-mem", "mmio"), ("pci-io", "portio")])
def test_kut_vmexit_measures_every_pci_testdev_test(tmp_path, bar, kind):
    """x86/vmexit.flat with `pci-mem`/`pci-io` (upstream's command line through hvm-qemu): it finds the
    device through 0xCF8/0xCFC, reads its BIOS-assigned BARs, and times each test the device lists."""
    import sys

    flat = tmp_path / "vmexit.flat"
    shutil.copy(UPSTREAM / "x86" / "vmexit.flat", flat)
    argv = ["--no-reboot", "-nodefaults", "-device", "pc-testdev", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4",
            "-display", "none", "-serial", "stdio", "-device", "pci-testdev", "-machine", "accel=kvm",
            "-kernel", str(flat), "-append", bar]
    proc = subprocess.run([sys.executable, "-c", "from hvm.qemu_shim import entry_point; entry_point()", *argv],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr     # exit(0): (0 << 1) | 1
    assert "pci-testdev at 0x8 membar c0000000 iobar c000\n" in proc.stdout
    for test in ("no-eventfd", "wildcard-eventfd", "datamatch-eventfd"):
        line = next(l for l in proc.stdout.splitlines() if l.startswith(f"{kind}-{test}:{bar} "))
        assert int(line.split()[1]) > 0


def test_cli_pci_testdev_on_machine_none_is_one_line_status_2(tmp_path):
    run = run_hvm("run", str(pci_yaml(tmp_path)), "--machine", "none", "--device", "pci-testdev", "--timeout", "5",
                  timeout=60)
    assert run.status == 2
    assert run.stderr == "hvm: --device pci-testdev: a PCI device: it needs machine: pc (the PCI bus is the PC's)\n"
