"""virtio-mmio devices in the ACPI tables: the DSDT's LNRO0005 devices (hand-encoded AML, checked byte by byte
against the encodings of the ACPI spec, section 20 "AML" and 6.4 "Resource Data Types"), the MADT's
level-triggered interrupt source overrides and the MP table's level entries; `iasl` (acpica-tools) disassembles
the DSDT when it is installed. The slow tests boot the minimal Linux kernel and find a virtio-rng through the
DSDT alone (`virtio_cmdline: false`), and through the command line without a second probe of the same device."""
from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest

from conftest import ROOT, run_hvm, write_yaml
from hvm.boot import acpi
from hvm.boot.acpi import (aml_buffer, aml_device, aml_integer, aml_name, aml_nameseg, aml_pkg_length, aml_scope,
                           aml_string, extended_interrupt, madt_body, memory32_fixed, resource_template,
                           virtio_mmio_aml, write_acpi_tables)
from hvm.boot.mptable import LEVEL_HIGH, mp_config_table
from hvm.memory import GuestMemory

SLOT0 = (0xD000_0000, 0x1000, 5)
SLOT1 = (0xD000_1000, 0x1000, 6)
LINUX = ROOT / "build" / "linux"


# --- AML primitives -------------------------------------------------------------------------------

@pytest.mark.parametrize("body_len, encoded", [
    (0, [0x01]),                     # one byte: bits 5:0 = length including the PkgLength byte itself
    (62, [0x3F]),                    # the largest one-byte length (63)
    (63, [0x41, 0x04]),              # 63 + 2 = 65 = 0x41: lead 01 (one more byte) 00 0001, then 65 >> 4 = 4
    (0xFFD, [0x4F, 0xFF]),           # 0xFFF: the largest two-byte length (12 bits)
    (0xFFE, [0x81, 0x00, 0x01]),     # 0x1001 in three bytes: lead 10, nibble 1, then 0x100 little-endian
    (0xFFFFC, [0x8F, 0xFF, 0xFF]),   # 0xFFFFF: the largest three-byte length (20 bits)
    (0xFFFFD, [0xC1, 0x00, 0x00, 0x01]),   # 0x100001 in four bytes
])
def test_pkg_length_encodings(body_len, encoded):
    assert aml_pkg_length(body_len) == bytes(encoded)


def test_pkg_length_beyond_28_bits_is_refused():
    assert aml_pkg_length((1 << 28) - 5) == bytes([0xCF, 0xFF, 0xFF, 0xFF])
    with pytest.raises(ValueError, match="longer than PkgLength"):
        aml_pkg_length((1 << 28) - 4)


@pytest.mark.parametrize("value, encoded", [
    (0, [0x00]), (1, [0x01]), (2, [0x0A, 0x02]), (0xFF, [0x0A, 0xFF]), (0x100, [0x0B, 0x00, 0x01]),
    (0xD000_0000, [0x0C, 0x00, 0x00, 0x00, 0xD0]),
])
def test_integer_encodings(value, encoded):
    assert aml_integer(value) == bytes(encoded)


def test_integer_wider_than_a_dword_is_refused():
    with pytest.raises(ValueError, match="does not fit a DWord"):
        aml_integer(1 << 32)


def test_names_and_strings():
    assert aml_nameseg("_SB") == b"_SB_"
    assert aml_nameseg("VR0A") == b"VR0A"
    for bad in ("vr00", "0ABC", "TOOLONG", "A-B"):
        with pytest.raises(ValueError):
            aml_nameseg(bad)
    assert aml_string("LNRO0005") == b"\x0dLNRO0005\x00"
    assert aml_name("_UID", aml_integer(3)) == b"\x08_UID\x0a\x03"


def test_scope_device_buffer_framing():
    # Scope (\_SB) {}: ScopeOp, PkgLength 6 (itself + '\' + '_SB_'), RootChar, NameSeg
    assert aml_scope(b"\\_SB_", b"") == b"\x10\x06\\_SB_"
    # Device (VR00) {}: ExtOpPrefix DeviceOp, PkgLength 5, NameSeg
    assert aml_device("VR00", b"") == b"\x5b\x82\x05VR00"
    # Buffer () { 1, 2, 3 }: BufferOp, PkgLength 5 (itself, BytePrefix 3, 3 bytes)... ByteConst 3
    assert aml_buffer(b"\x01\x02\x03") == b"\x11\x06\x0a\x03\x01\x02\x03"


# --- resource descriptors -------------------------------------------------------------------------

def test_memory32_fixed_descriptor():
    # 6.4.3.4: tag 0x86, length 9, information (bit 0: read-write), base, length
    assert memory32_fixed(0xD000_0000, 0x1000) == bytes([0x86, 0x09, 0x00, 0x01,
                                                         0x00, 0x00, 0x00, 0xD0, 0x00, 0x10, 0x00, 0x00])
    assert memory32_fixed(0x1234_5678, 0x10, writable=False)[3] == 0x00


def test_extended_interrupt_descriptor_flags():
    # 6.4.3.6: tag 0x89, length 6, flags, table length 1, the interrupt number (DWord)
    assert extended_interrupt(5) == bytes([0x89, 0x06, 0x00, 0x01, 0x01, 0x05, 0x00, 0x00, 0x00])
    assert extended_interrupt(5, level=False)[3] == 0x03            # bit 1: edge
    assert extended_interrupt(5, active_high=False)[3] == 0x05      # bit 2: active low
    assert extended_interrupt(5, shared=True)[3] == 0x09            # bit 3: shared


def test_resource_template_ends_with_a_checksummed_end_tag():
    rt = resource_template(memory32_fixed(*SLOT0[:2]), extended_interrupt(SLOT0[2]))
    assert len(rt) == 12 + 9 + 2
    assert rt[-2] == 0x79                     # small item, End Tag, length 1
    assert sum(rt) % 256 == 0                 # 6.4.2.9: the checksum makes the template sum to zero


# --- the DSDT's virtio devices --------------------------------------------------------------------

def test_one_virtio_slot_is_encoded_as_the_spec_says():
    crs = (bytes([0x86, 0x09, 0x00, 0x01]) + struct.pack("<II", 0xD000_0000, 0x1000)
           + bytes([0x89, 0x06, 0x00, 0x01, 0x01]) + struct.pack("<I", 5) + b"\x79")
    crs += bytes([(-sum(crs)) & 0xFF])
    crs_buffer = b"\x11" + bytes([1 + 2 + len(crs)]) + b"\x0a" + bytes([len(crs)]) + crs
    body = (b"VR00"
            + b"\x08_HID\x0dLNRO0005\x00"
            + b"\x08_UID\x00"
            + b"\x08_CCA\x01"
            + b"\x08_CRS" + crs_buffer)
    assert len(body) == 63                         # 63 + 2 = 65 = 0x41: a two-byte PkgLength
    device = b"\x5b\x82\x41\x04" + body
    inner = b"\\_SB_" + device                     # 5 + 67 bytes, + 2 = 74 = 0x4A
    scope = b"\x10\x4a\x04" + inner
    assert virtio_mmio_aml([SLOT0]) == scope


def test_no_slots_no_scope_and_device_names_count_up_in_hex():
    assert virtio_mmio_aml([]) == b""
    aml = virtio_mmio_aml([(0xD000_0000 + n * 0x1000, 0x1000, irq)
                           for n, irq in enumerate((5, 6, 7, 10, 11, 14, 15, 5, 6, 7, 10, 11))])
    assert [m.group(1) for m in re.finditer(rb"\x5b\x82.{1,2}(VR[0-9A-F]{2})", aml, re.S)] == \
        [f"VR{n:02X}".encode() for n in range(12)]
    assert aml.count(b"LNRO0005") == 12
    assert aml[1] & 0xC0 == 0x40 and 64 <= len(aml) < 0xFFF   # the scope's PkgLength takes two bytes


def _pkg(data: bytes, at: int) -> tuple[int, int]:
    """Decode a PkgLength at `at`: (length, bytes it took)."""
    lead = data[at]
    extra = lead >> 6
    if extra == 0:
        return lead & 0x3F, 1
    return (lead & 0xF) | int.from_bytes(data[at + 1:at + 1 + extra], "little") << 4, extra + 1


def test_package_lengths_span_exactly_their_contents():
    aml = virtio_mmio_aml([SLOT0, SLOT1, (0xD000_2000, 0x1000, 7)])
    length, _ = _pkg(aml, 1)
    assert 1 + length == len(aml)                  # the scope is the whole block
    at = 1 + _pkg(aml, 1)[1] + 5                   # after ScopeOp, PkgLength, \_SB_
    devices = 0
    while at < len(aml):
        assert aml[at:at + 2] == b"\x5b\x82"
        length, _ = _pkg(aml, at + 2)
        at += 2 + length
        devices += 1
    assert at == len(aml) and devices == 3


def _read_table(mem: GuestMemory, at: int) -> bytes:
    length = struct.unpack("<I", mem.read(at + 4, 4))[0]
    return mem.read(at, length)


def test_tables_in_memory_describe_the_slots():
    mem = GuestMemory(16 << 20)
    placed = write_acpi_tables(mem, 2, 0x600, virtio_slots=[SLOT0, SLOT1])
    dsdt = _read_table(mem, placed["DSDT"])
    assert sum(dsdt) % 256 == 0
    assert dsdt[36:] == acpi.S3_AML + acpi.S5_AML + virtio_mmio_aml([SLOT0, SLOT1])
    madt = _read_table(mem, placed["APIC"])
    assert sum(madt) % 256 == 0
    overrides = [struct.unpack("<BBBBIH", madt[i:i + 10]) for i in range(44, len(madt)) if madt[i:i + 2] == b"\x02\x0a"]
    assert (2, 10, 0, 5, 5, 0x000D) in overrides and (2, 10, 0, 6, 6, 0x000D) in overrides
    assert (2, 10, 0, 9, 9, 0x000D) in overrides and (2, 10, 0, 0, 2, 0) in overrides
    assert len(overrides) == 4


def test_without_slots_the_tables_are_as_before():
    mem = GuestMemory(16 << 20)
    placed = write_acpi_tables(mem, 1, 0x600)
    assert _read_table(mem, placed["DSDT"])[36:] == acpi.S3_AML + acpi.S5_AML
    assert _read_table(mem, placed["APIC"])[44:] == madt_body(1)[8:]
    assert b"\x02\x0a\x00\x05" not in madt_body(1)


def test_mp_table_level_entries():
    def flags_by_irq(table: bytes) -> dict[int, int]:
        out = {}
        at = 44
        while at < len(table):
            kind = table[at]
            if kind == 0:
                at += 20
                continue
            if kind == 3:
                _, _, flags, _, irq, _, _ = struct.unpack("<BBHBBBB", table[at:at + 8])
                out[irq] = flags
            at += 8
        return out

    plain = flags_by_irq(mp_config_table(2))
    levels = flags_by_irq(mp_config_table(2, level_irqs=[5, 6]))
    assert plain[5] == plain[6] == 0 and plain[9] == LEVEL_HIGH == 0x000D
    assert levels[5] == levels[6] == LEVEL_HIGH and levels[9] == LEVEL_HIGH
    assert {k: v for k, v in levels.items() if k not in (5, 6)} == {k: v for k, v in plain.items() if k not in (5, 6)}


def _machine_tables(spec) -> tuple[bytes, bytes, str]:
    """Build (not run) a Machine for `spec`: its DSDT, its MADT and its kernel command line."""
    from hvm.console import Console
    from hvm.machine import Machine

    with Machine(spec, console=Console("none", "none", open_now=False)) as vm:
        rsdt = _read_table(vm.memory, struct.unpack("<I", vm.memory.read(acpi.ACPI_BASE + 16, 4))[0])
        tables = {vm.memory.read(addr, 4): addr for (addr,) in struct.iter_unpack("<I", rsdt[36:])}
        fadt = _read_table(vm.memory, tables[b"FACP"])
        dsdt = _read_table(vm.memory, struct.unpack("<I", fadt[40:44])[0])
        madt = _read_table(vm.memory, tables[b"APIC"])
        cmdline = vm.boot_state.description if vm.boot_state is not None else ""
    return dsdt, madt, cmdline


def test_builder_passes_the_registry_slots():
    """A pc machine (a flat image: no command line) with two virtio devices: the DSDT has both slots, the
    MADT their level-triggered overrides."""
    from hvm.config import parse_spec

    image = ROOT / "firmware" / "build" / "hello.bin"
    if not image.is_file():
        pytest.skip("needs `make firmware` (firmware/build/hello.bin)")
    spec = parse_spec({"memory": "64M", "timeout": 5, "machine": "pc",
                       "devices": {"virtio-rng": True, "virtio-console": True}, "boot": {"image": str(image)}})
    dsdt, madt, _ = _machine_tables(spec)
    assert dsdt[36:] == (acpi.S3_AML + acpi.S5_AML + acpi.pci_host_aml() + acpi.ecam_reserve_aml()
                         + virtio_mmio_aml([SLOT0, SLOT1]))
    assert struct.pack("<BBBBIH", 2, 10, 0, 5, 5, 0x000D) in madt
    assert struct.pack("<BBBBIH", 2, 10, 0, 6, 6, 0x000D) in madt


@pytest.mark.slow          # (it boots nothing, but needs the minimal kernel built: `make linux`)
@pytest.mark.parametrize("virtio_cmdline", [True, False])
def test_linux_gets_one_description_of_each_device(virtio_cmdline, built_linux):
    """A Linux kernel: with the command-line path (the default) the DSDT leaves the slots out (Linux would
    probe the same range twice, the second -EBUSY); with `virtio_cmdline: false` the DSDT alone has them.
    The MADT's level-triggered override is there either way."""
    from hvm.config import parse_spec

    kernel = LINUX / "vmlinux-minimal"
    spec = parse_spec({"memory": "64M", "timeout": 5, "virtio_cmdline": virtio_cmdline,
                       "devices": {"virtio-rng": True},
                       "boot": {"kernel": str(kernel), "cmdline": "console=ttyS0"}})
    dsdt, madt, _ = _machine_tables(spec)
    assert struct.pack("<BBBBIH", 2, 10, 0, 5, 5, 0x000D) in madt
    if virtio_cmdline:
        assert dsdt[36:] == acpi.S3_AML + acpi.S5_AML + acpi.pci_host_aml() + acpi.ecam_reserve_aml()
    else:
        assert dsdt[36:] == acpi.S3_AML + acpi.S5_AML + acpi.pci_host_aml() + acpi.ecam_reserve_aml() + virtio_mmio_aml([SLOT0])


# --- iasl --------------------------------------------------------------------------------------------

IASL = shutil.which("iasl")


@pytest.mark.skipif(IASL is None, reason="iasl not installed (Debian acpica-tools)")
def test_iasl_disassembles_the_dsdt(tmp_path):
    aml = tmp_path / "dsdt.aml"
    aml.write_bytes(acpi._table(b"DSDT", 1, acpi.S3_AML + acpi.S5_AML
                                + virtio_mmio_aml([SLOT0, (0xD000_1000, 0x1000, 14)])))
    proc = subprocess.run([IASL, "-d", str(aml)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    compact = re.sub(r"\s+", " ", re.sub(r"//[^\n]*", "", dsl))
    assert "Scope (\\_SB)" in compact
    assert "Name (_S3, Package (0x04) { One, One, Zero, Zero })" in compact, compact
    assert "Name (_S5, Package (0x04) { 0x05, 0x05, Zero, Zero })" in compact, compact
    for n, (base, irq) in enumerate(((0xD000_0000, 5), (0xD000_1000, 14))):
        assert (f'Device (VR0{n}) {{ Name (_HID, "LNRO0005") Name (_UID, {("Zero", "One")[n]}) '
                f'Name (_CCA, One) Name (_CRS, ResourceTemplate () {{ Memory32Fixed (ReadWrite, '
                f'0x{base:08X}, 0x00001000, ) Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,, ) '
                f'{{ 0x{irq:08X}, }} }}) }}') in compact, compact


@pytest.mark.skipif(IASL is None, reason="iasl not installed (Debian acpica-tools)")
def test_iasl_compiles_the_same_aml(tmp_path):
    """The ASL the encoder means, compiled by iasl: the same bytes (iasl leaves the End Tag checksum 0,
    which the spec allows, so that byte is compared apart)."""
    (tmp_path / "v.asl").write_text('''DefinitionBlock ("", "SSDT", 1, "HVM", "HVMTABLE", 1) {
    Scope (\\_SB) {
        Device (VR00) {
            Name (_HID, "LNRO0005")
            Name (_UID, 0)
            Name (_CCA, One)
            Name (_CRS, ResourceTemplate () {
                Memory32Fixed (ReadWrite, 0xD0000000, 0x1000)
                Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive) { 5 }
            })
        }
    }
}
''')
    proc = subprocess.run([IASL, "-p", str(tmp_path / "v"), str(tmp_path / "v.asl")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    theirs = (tmp_path / "v.aml").read_bytes()[36:]
    ours = virtio_mmio_aml([SLOT0])
    assert len(theirs) == len(ours)
    assert theirs[:-1] == ours[:-1] and theirs[-1] == 0 and ours[-1] == resource_template(
        memory32_fixed(*SLOT0[:2]), extended_interrupt(SLOT0[2]))[-1]


# --- Linux finds the devices (slow: a Linux boot) ---------------------------------------------------

BOOT_TIMEOUT = 600
DUPLICATE_PROBE = ("error -16", "EBUSY", "can't request region", "failed to claim resource")


def kernel_has(option: str) -> bool:
    config = LINUX / "kbuild-minimal" / ".config"
    return config.is_file() and f"{option}=y" in config.read_text().splitlines()


def _boot_with_rng(virtio_cmdline: bool):
    """Boot the minimal kernel (ud2 initramfs) with a registry virtio-rng in the first slot; return the
    console text, the transport and the Linux command line the kernel printed."""
    from hvm.config import parse_spec
    from hvm.console import Console
    from hvm.machine import Machine

    spec = parse_spec({"memory": "256M", "timeout": BOOT_TIMEOUT, "virtio_cmdline": virtio_cmdline,
                       "devices": {"virtio-rng": True},
                       "boot": {"kernel": str(LINUX / "vmlinux-minimal"),
                                "initrd": [str(LINUX / "initramfs-ud2.cpio")], "cmdline": "console=ttyS0 panic=-1"}})
    with Machine(spec, console=Console("none", "none", open_now=False)) as vm:
        rng = vm.mmio.find(SLOT0[0]).device
        vm.start()
        vm.wait_for_console(b"Run /init as init process", timeout=BOOT_TIMEOUT)
        vm.wait(BOOT_TIMEOUT + 30)
        console = vm.console.text()
    return console, rng


def _needs_linux():
    if not kernel_has("CONFIG_HW_RANDOM_VIRTIO"):
        pytest.skip("the minimal kernel has no HW_RANDOM_VIRTIO")


@pytest.mark.slow
def test_linux_finds_virtio_rng_through_the_dsdt_alone(built_linux):
    """`virtio_cmdline: false`: nothing on the command line, the DSDT's LNRO0005 device is the only way the
    kernel can know the rng is there; the rng serving bytes proves virtio_mmio bound to it."""
    _needs_linux()
    if not kernel_has("CONFIG_PCI"):
        # Linux 6.12's ACPICA installs a default PCI_Config region handler while loading the tables, and
        # without CONFIG_PCI it has none (AE_BAD_PARAMETER, "Unable to load the System Description
        # Tables"): the namespace, and so every DSDT device, is never enumerated.
        pytest.skip("the minimal kernel needs CONFIG_PCI for ACPI to load the DSDT (ACPICA's PCI_Config handler)")
    console, rng = _boot_with_rng(virtio_cmdline=False)
    assert "Run /init as init process" in console, console[-3000:]
    assert "virtio_mmio.device=" not in console
    assert "Unable to load the System Description Tables" not in console
    assert rng.backend.bytes_served > 0 and rng.errors == 0 and rng.driver_ok, console[-3000:]
    assert not any(s in console for s in DUPLICATE_PROBE)


@pytest.mark.slow
def test_linux_cmdline_path_probes_the_device_once(built_linux):
    """The default: `virtio_mmio.device=` on the command line (and the DSDT leaves the slot out): the rng is
    fed, and no second probe of the same range fails with -EBUSY."""
    _needs_linux()
    console, rng = _boot_with_rng(virtio_cmdline=True)
    assert "Run /init as init process" in console, console[-3000:]
    assert f"virtio_mmio.device=4K@{SLOT0[0]:#x}:{SLOT0[2]}" in console
    assert f"virtio-mmio.0 at {SLOT0[0]:#x}-{SLOT0[0] + 0xfff:#x}, IRQ {SLOT0[2]}." in console
    assert rng.backend.bytes_served > 0 and rng.errors == 0 and rng.driver_ok
    assert not any(s in console for s in DUPLICATE_PROBE), [s for s in DUPLICATE_PROBE if s in console]
    assert "virtio-mmio.1" not in console


@pytest.mark.slow
def test_linux_boots_from_the_rootfs_disk(tmp_path, built_linux):
    """configs/linux.yaml's VM on a copy of its disk: the kernel mounts the ext4 root from virtio-blk, writes
    its superblock (rw) and runs /init from it. On a kvm_pvm host /init's first system call kills it, as from
    the initramfs; the ud2 disk's /init ends the same way on any host."""
    import shutil as _shutil
    import yaml

    disk = tmp_path / "root.ext4"
    _shutil.copyfile(LINUX / "rootfs-ud2.ext4", disk)
    before = disk.read_bytes()
    config = yaml.safe_load((ROOT / "configs" / "linux.yaml").read_text())
    config["boot"]["kernel"] = str(LINUX / "vmlinux-minimal")
    config["devices"] = {"serial": "stdio", "virtio-blk": [{"file": str(disk)}]}
    assert "initrd" not in config["boot"] and "root=/dev/vda rw" in config["boot"]["cmdline"]
    vm_yaml = write_yaml(tmp_path, yaml.safe_dump(config))
    r = run_hvm("run", str(vm_yaml), "--timeout", str(BOOT_TIMEOUT), timeout=BOOT_TIMEOUT + 60)
    assert "EXT4-fs (vda): mounted filesystem" in r.out, r.out[-3000:]
    assert "VFS: Mounted root (ext4 filesystem) on device" in r.out
    assert "Run /init as init process" in r.out
    assert "Kernel panic - not syncing: Attempted to kill init!" in r.out
    assert r.status == 4
    assert disk.read_bytes() != before          # the rw mount's superblock write reached the host file
