"""The Linux boot-protocol loader on crafted kernels: every error it reports, and the boot_params it
builds. No KVM involved (loaders only write GuestMemory)."""
from __future__ import annotations

import struct

import pytest

from hvm.boot import BootError
from hvm.boot import linux
from hvm.boot.linux import BOOT_PARAMS_ADDR, CMDLINE_ADDR, load_linux
from hvm.memory import GuestMemory


def bzimage(version=0x020F, relocatable=1, xloadflags=1, loadflags=1, setup_sects=4, payload=b"\x90" * 4096,
            cmdline_size=255, initrd_max=0x37FFFFFF, magic=b"HdrS", boot_flag=0xAA55, init_size=0x10000,
            code32_start=0x100000) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200:0x202] = b"\xeb\x66"                       # jmp: header ends at 0x268
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, code32_start)
    struct.pack_into("<I", setup, 0x22C, initrd_max)
    struct.pack_into("<I", setup, 0x230, 0x200000)
    setup[0x234] = relocatable
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + payload


@pytest.fixture
def mem():
    with GuestMemory(64 << 20) as m:
        yield m


def kernel_file(tmp_path, data: bytes, name="bzImage"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_bzimage_boot_params(mem, tmp_path):
    initrd = kernel_file(tmp_path, b"INITRD" * 1000, "initrd.cpio")
    state = load_linux(mem, kernel_file(tmp_path, bzimage()), "console=ttyS0 quiet", initrd, acpi_rsdp=0xE0000)
    assert state.mode == "long" and state.rip == 0x100000 + 0x200
    assert state.regs["rsi"] == BOOT_PARAMS_ADDR
    assert state.cs.selector == 0x10 and state.data.selector == 0x18 and state.cs.l == 1
    bp = mem.read(BOOT_PARAMS_ADDR, 4096)
    assert bp[0x202:0x206] == b"HdrS" and bp[0x210] == 0xFF                 # type_of_loader
    assert struct.unpack_from("<I", bp, 0x228)[0] == CMDLINE_ADDR
    assert mem.read(CMDLINE_ADDR, 20) == b"console=ttyS0 quiet\0"
    image, size = struct.unpack_from("<II", bp, 0x218)
    assert size == 6000 and image % 4096 == 0 and image + size <= 64 << 20
    assert mem.read(image, size) == b"INITRD" * 1000
    assert struct.unpack_from("<Q", bp, 0x70)[0] == 0xE0000
    n = bp[0x1E8]
    e820 = [struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i) for i in range(n)]
    assert e820 == [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, (64 << 20) - 0x100000, 1)]
    assert mem.read(0x100000, 16) == b"\x90" * 16                            # payload at 1 MiB


def test_non_relocatable_kernel_at_its_default_address(mem, tmp_path):
    state = load_linux(mem, kernel_file(tmp_path, bzimage(relocatable=0)))
    assert state.rip == 0x100200


def test_initrd_stays_below_initrd_addr_max(mem, tmp_path):
    initrd = kernel_file(tmp_path, b"x" * 8192, "initrd")
    load_linux(mem, kernel_file(tmp_path, bzimage(initrd_max=0x01FFFFFF)), "", initrd)
    image, size = struct.unpack_from("<II", mem.read(BOOT_PARAMS_ADDR, 4096), 0x218)
    assert image + size <= 0x02000000


@pytest.mark.parametrize("kwargs,message", [
    ({"magic": b"XXXX"}, "not a Linux kernel (neither a bzImage nor an ELF vmlinux)"),
    ({"boot_flag": 0x1234}, "not a bzImage (boot flag at 0x1fe is not 0xaa55)"),
    ({"version": 0x0205}, "boot protocol 2.05 is too old (hvm needs 2.06 or later for a 64-bit entry)"),
    ({"relocatable": 0, "code32_start": 0x1000000},
     "kernel is not relocatable and must be loaded at 0x1000000; hvm loads kernels at 0x100000"),
    ({"xloadflags": 0}, "kernel has no 64-bit entry point (XLF_KERNEL_64 not set)"),
    ({"loadflags": 0}, "a zImage (loaded low); hvm boots bzImages"),
    ({"init_size": 100 << 20}, "kernel needs 100 MiB from 1 MiB on; guest memory is 64 MiB"),
])
def test_bzimage_errors(mem, tmp_path, kwargs, message):
    with pytest.raises(BootError) as e:
        load_linux(mem, kernel_file(tmp_path, bzimage(**kwargs)))
    assert str(e.value) == f"{tmp_path / 'bzImage'}: {message}"


def test_cmdline_too_long(mem, tmp_path):
    with pytest.raises(BootError, match="command line is 300 bytes; this kernel takes at most 255"):
        load_linux(mem, kernel_file(tmp_path, bzimage(cmdline_size=255)), "x" * 300)


def test_initrd_too_large(tmp_path):
    with GuestMemory(8 << 20) as small:
        big = kernel_file(tmp_path, b"\0" * (8 << 20), "big.cpio")
        with pytest.raises(BootError, match="big.cpio: initrd of 8 MiB does not fit between the kernel and"):
            load_linux(small, kernel_file(tmp_path, bzimage()), "", big)


def elf64(entry=0x1000000, paddr=0x1000000, code=b"\xf4" * 64) -> bytes:
    eh = struct.pack("<4sBBBB8sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, bytes(8), 2, 62, 1, entry, 64, 0, 0,
                     64, 56, 1, 64, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, paddr | 0xFFFFFFFF80000000, paddr, len(code), len(code) + 4096,
                     0x1000)
    return (eh + ph).ljust(0x1000, b"\0") + code


def test_vmlinux_elf(mem, tmp_path):
    state = load_linux(mem, kernel_file(tmp_path, elf64(), "vmlinux"), "console=ttyS0")
    assert state.rip == 0x1000000
    assert mem.read(0x1000000, 64) == b"\xf4" * 64
    assert mem.read(0x1000000 + 64, 4096) == bytes(4096)          # bss zeroed
    bp = mem.read(BOOT_PARAMS_ADDR, 4096)
    assert bp[0x202:0x206] == b"HdrS" and struct.unpack_from("<H", bp, 0x1FE)[0] == 0xAA55
    assert bp[0x210] == 0xFF and struct.unpack_from("<I", bp, 0x228)[0] == CMDLINE_ADDR


def test_vmlinux_must_fit(tmp_path):
    with GuestMemory(8 << 20) as small:
        with pytest.raises(BootError, match="segment 0x1000000..0x1001040 does not fit in guest memory \\(8 MiB\\)"):
            load_linux(small, kernel_file(tmp_path, elf64(), "vmlinux"))


def test_kernel_kind():
    assert linux.kernel_kind(bzimage()[:0x300]) == "bzimage"
    assert linux.kernel_kind(elf64()[:0x300]) == "elf"
    assert linux.kernel_kind(b"MZ" + bytes(1000)) is None


# --- hardening (issue 11): the vmlinux loader checks placements as the multiboot loader does ---

@pytest.mark.parametrize("paddr,what", [
    (0x0, "the real-mode IVT (machine pc) at 0x0..0x400"),
    (0x400, "the GDT hvm keeps at 0x500..0x600"),
    (0x2000, "the page tables hvm keeps at 0x1000..0x7000"),
    (0x7000, "boot_params at 0x7000..0x8000"),
    (0x8800, "the boot stack at 0x8000..0x9000"),
    (0x1F000, "the kernel command line at 0x20000..0x2000e"),
    (0xE0000, "the BIOS area (EBDA, VGA, ACPI tables), reserved in the memory map at 0x9fc00..0x100000"),
])
def test_vmlinux_overlapping_what_hvm_writes(mem, tmp_path, paddr, what):
    k = kernel_file(tmp_path, elf64(entry=paddr, paddr=paddr), "vmlinux")
    with pytest.raises(BootError) as e:
        load_linux(mem, k, "console=ttyS0")
    assert str(e.value) == f"{k}: segment {paddr:#x}..{paddr + 64 + 4096:#x} overlaps {what}"
    assert mem.read(0, 0x10000) == bytes(0x10000)          # nothing written


def test_vmlinux_entry_outside_its_segments(mem, tmp_path):
    k = kernel_file(tmp_path, elf64(entry=0x2000000), "vmlinux")
    with pytest.raises(BootError) as e:
        load_linux(mem, k)
    assert str(e.value) == (f"{k}: ELF entry 0x2000000 is not in any loaded segment (a vmlinux's entry is the "
                            "physical address of startup_64)")


def test_initrd_overlapping_a_high_vmlinux_segment(mem, tmp_path):
    initrd = kernel_file(tmp_path, b"x" * 8192, "initrd")
    k = kernel_file(tmp_path, elf64(entry=0x3FFD000, paddr=0x3FFD000), "vmlinux")
    with pytest.raises(BootError) as e:
        load_linux(mem, k, "", initrd)
    assert str(e.value) == f"{initrd}: initrd of 0 MiB does not fit between the kernel and 0x4000000 (guest memory 64 MiB)"


def test_bzimage_initrd_max_below_the_kernel(mem, tmp_path):
    initrd = kernel_file(tmp_path, b"x" * 8192, "initrd")
    with pytest.raises(BootError, match="initrd of 0 MiB does not fit between the kernel and 0x100000"):
        load_linux(mem, kernel_file(tmp_path, bzimage(initrd_max=0xFFFFF)), "", initrd)


def test_elf_with_tiny_program_headers(mem, tmp_path):
    data = bytearray(elf64())
    struct.pack_into("<H", data, 54, 8)                    # e_phentsize: 8, every header read at one place
    k = kernel_file(tmp_path, bytes(data), "vmlinux")
    with pytest.raises(BootError) as e:
        load_linux(mem, k)
    assert str(e.value) == f"{k}: program header size 8 is smaller than an ELF64 program header"


def test_host_executable_as_kernel_is_refused_in_one_line():
    """`hvm run --kernel /bin/true` (a PIE linked at 0): status 2 and one line, not a triple fault."""
    from conftest import run_hvm
    r = run_hvm("run", "--kernel", "/bin/true", "--timeout", "5")   # no -q: the host's line waits for a load
    assert r.status == 2, r.stderr
    assert r.stderr.startswith("hvm: /bin/true: segment 0x0..") and r.stderr.endswith(   # the path as given
        " overlaps the real-mode IVT (machine pc) at 0x0..0x400\n")
    assert r.stderr.count("\n") == 1


def test_bzimage_setup_header_cut_short_by_its_jump(mem, tmp_path):
    """Found by tests/test_loader_fuzz.py: a jump at 0x200 that ends the header before init_size loaded
    'fine' and left boot_params without its 'HdrS' magic."""
    data = bytearray(bzimage())
    data[0x201] = 0x10
    k = kernel_file(tmp_path, bytes(data))
    with pytest.raises(BootError) as e:
        load_linux(mem, k)
    assert str(e.value) == (f"{k}: setup header ends at 0x212 (the jump at 0x200), before the fields boot protocol "
                            "2.15 has")
