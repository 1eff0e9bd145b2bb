"""Linux x86 boot protocol (Documentation/arch/x86/boot.rst), 64-bit entry.

Two kernel forms:
- bzImage: the setup header is validated (boot flag, 'HdrS', protocol >= 2.06, relocatable,
  XLF_KERNEL_64), the protected-mode kernel is loaded at 1 MiB and entered at its 64-bit entry
  (load address + 0x200);
- vmlinux (uncompressed ELF64, as Firecracker boots it): PT_LOAD segments at their physical
  addresses, entered at e_entry; a setup header is synthesised.
Both get boot_params ("zero page") with an e820 map matching guest memory, the command line, the
initrd below initrd_addr_max, type_of_loader = 0xff, and start in long mode with hvm's identity page
tables and GDT (__BOOT_CS = 0x10, __BOOT_DS = 0x18), RSI = boot_params.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from hvm.boot.cpu_modes import long_mode_state
from hvm.boot.elf import EM_X86_64, is_elf, parse_elf
from hvm.boot.errors import BootError
from hvm.boot.layout import (BIOS_AREA, GDT, IVT, KERNEL_FILE_MAX, PAGE_TABLES, Layout, Region, load_piece,
                             read_input)
from hvm.boot.state import BootState
from hvm.memory import GuestMemory

BOOT_PARAMS_ADDR = 0x7000
BOOT_STACK = 0x8FF0       # below 0x9000, above boot_params (as Firecracker)
CMDLINE_ADDR = 0x20000
CMDLINE_MAX_DEFAULT = 2048
KERNEL_LOAD = 0x100000
BOOT_PARAMS = Region(BOOT_PARAMS_ADDR, BOOT_PARAMS_ADDR + 0x1000, "boot_params")
BOOT_STACK_AREA = Region(BOOT_PARAMS_ADDR + 0x1000, 0x9000, "the boot stack")
MIN_PROTOCOL = 0x0206
HDR_MAGIC = b"HdrS"

# setup header fields (offsets in the file and in boot_params)
OFF_SETUP_SECTS = 0x1F1
OFF_BOOT_FLAG = 0x1FE
OFF_JUMP = 0x200
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_CODE32_START = 0x214
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_HEAP_END_PTR = 0x224
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_KERNEL_ALIGNMENT = 0x230
OFF_RELOCATABLE = 0x234
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_INIT_SIZE = 0x260
# boot_params fields outside the setup header
OFF_ACPI_RSDP = 0x070
OFF_E820_ENTRIES = 0x1E8
OFF_E820_TABLE = 0x2D0
E820_MAX = 128

LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7
XLF_KERNEL_64 = 1 << 0
LOADER_OTHER = 0xFF


@dataclass(frozen=True)
class SetupHeader:
    setup_sects: int
    version: int
    loadflags: int
    relocatable: bool
    xloadflags: int
    initrd_addr_max: int
    cmdline_size: int
    kernel_alignment: int
    init_size: int


def kernel_kind(head: bytes) -> str | None:
    """'bzimage', 'elf' or None, from the first bytes of a file."""
    if len(head) >= OFF_HEADER + 4 and head[OFF_HEADER:OFF_HEADER + 4] == HDR_MAGIC:
        return "bzimage"
    if is_elf(head):
        return "elf"
    return None


def parse_setup_header(data: bytes, name: str) -> SetupHeader:
    if len(data) < 0x268:
        raise BootError(f"{name}: too short to be a bzImage")
    if data[OFF_HEADER:OFF_HEADER + 4] != HDR_MAGIC:
        raise BootError(f"{name}: not a bzImage (no 'HdrS' setup header at 0x202)")
    if struct.unpack_from("<H", data, OFF_BOOT_FLAG)[0] != 0xAA55:
        raise BootError(f"{name}: not a bzImage (boot flag at 0x1fe is not 0xaa55)")
    version = struct.unpack_from("<H", data, OFF_VERSION)[0]
    if version < MIN_PROTOCOL:
        raise BootError(f"{name}: boot protocol {version >> 8}.{version & 0xFF:02d} is too old "
                        f"(hvm needs 2.06 or later for a 64-bit entry)")
    setup_sects = data[OFF_SETUP_SECTS] or 4
    hdr = SetupHeader(
        setup_sects=setup_sects, version=version, loadflags=data[OFF_LOADFLAGS],
        relocatable=bool(data[OFF_RELOCATABLE]),
        xloadflags=struct.unpack_from("<H", data, OFF_XLOADFLAGS)[0],
        initrd_addr_max=struct.unpack_from("<I", data, OFF_INITRD_ADDR_MAX)[0],
        cmdline_size=struct.unpack_from("<I", data, OFF_CMDLINE_SIZE)[0] or CMDLINE_MAX_DEFAULT - 1,
        kernel_alignment=struct.unpack_from("<I", data, OFF_KERNEL_ALIGNMENT)[0],
        init_size=struct.unpack_from("<I", data, OFF_INIT_SIZE)[0])
    if not hdr.loadflags & LOADED_HIGH:
        raise BootError(f"{name}: a zImage (loaded low); hvm boots bzImages")
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise BootError(f"{name}: kernel has no 64-bit entry point (XLF_KERNEL_64 not set)")
    code32_start = struct.unpack_from("<I", data, OFF_CODE32_START)[0]
    if not hdr.relocatable and code32_start != KERNEL_LOAD:
        # hvm always loads the protected-mode kernel at 1 MiB, where a non-relocatable kernel
        # expects it unless its code32_start says otherwise.
        raise BootError(f"{name}: kernel is not relocatable and must be loaded at {code32_start:#x}; "
                        f"hvm loads kernels at {KERNEL_LOAD:#x}")
    header_end = OFF_JUMP + 2 + data[OFF_JUMP + 1]
    if header_end < OFF_INIT_SIZE + 4:
        # The jump at 0x200 marks the end of the setup header; a kernel of protocol 2.06+ has every field hvm
        # reads and copies into boot_params before it (Linux: 0x268 or later).
        raise BootError(f"{name}: setup header ends at {header_end:#x} (the jump at 0x200), before the fields "
                        f"boot protocol {version >> 8}.{version & 0xFF:02d} has")
    if (setup_sects + 1) * 512 >= len(data):
        raise BootError(f"{name}: setup ({setup_sects} sectors) is larger than the file")
    return hdr


def _synthetic_header() -> bytes:
    """The setup-header bytes a vmlinux lacks: just enough for the kernel to trust boot_params."""
    hdr = bytearray(0x268)
    struct.pack_into("<H", hdr, OFF_BOOT_FLAG, 0xAA55)
    hdr[OFF_HEADER:OFF_HEADER + 4] = HDR_MAGIC
    struct.pack_into("<H", hdr, OFF_VERSION, 0x020F)
    hdr[OFF_LOADFLAGS] = LOADED_HIGH
    struct.pack_into("<I", hdr, OFF_INITRD_ADDR_MAX, 0x7FFFFFFF)
    struct.pack_into("<I", hdr, OFF_KERNEL_ALIGNMENT, 0x1000000)
    struct.pack_into("<I", hdr, OFF_CMDLINE_SIZE, CMDLINE_MAX_DEFAULT - 1)
    return bytes(hdr)


def load_linux(mem: GuestMemory, kernel: Path, cmdline: str = "", initrd: Path | None = None,
               acpi_rsdp: int = 0) -> BootState:
    data = read_input(kernel, "kernel", KERNEL_FILE_MAX)
    name = str(kernel)
    kind = kernel_kind(data[:0x300])
    boot_params = bytearray(4096)
    raw_cmdline = cmdline.encode()
    # What hvm writes for every Linux boot, placed before the kernel so that a kernel overlapping any of it
    # is refused with one line (a vmlinux linked at 0 would otherwise be overwritten by the page tables and
    # triple-fault).
    layout = Layout(mem, name)
    layout.reserve(IVT, GDT, PAGE_TABLES, BOOT_PARAMS, BOOT_STACK_AREA, BIOS_AREA)
    layout.take(CMDLINE_ADDR, len(raw_cmdline) + 1, "the kernel command line")
    view = memoryview(data)
    pieces: list[tuple[int, memoryview, int]] = []   # (paddr, bytes, memsz), written once all are placed
    if kind == "bzimage":
        hdr = parse_setup_header(data, name)
        # Copy the setup header into boot_params: from 0x1f1 to the end given by the jump at 0x200.
        end = OFF_JUMP + 2 + data[OFF_JUMP + 1]     # >= 0x264: parse_setup_header checked
        boot_params[OFF_SETUP_SECTS:end] = data[OFF_SETUP_SECTS:end]
        payload = view[(hdr.setup_sects + 1) * 512:]
        load = KERNEL_LOAD
        need = max(len(payload), hdr.init_size)
        if not mem.contains(load, need):
            raise BootError(f"{name}: kernel needs {need >> 20} MiB from 1 MiB on; guest memory is "
                            f"{mem.size >> 20} MiB")
        layout.take(load, need, "kernel", loaded=True)
        # The kernel decompresses itself into init_size bytes from the load address: left as fresh RAM.
        pieces.append((load, payload, len(payload)))
        entry = load + 0x200
        initrd_max, cmdline_max = hdr.initrd_addr_max, hdr.cmdline_size
        what = f"bzImage {kernel.name} (boot protocol {hdr.version >> 8}.{hdr.version & 0xFF:02d})"
    elif kind == "elf":
        elf = parse_elf(data, name)
        if elf.bits != 64 or elf.machine != EM_X86_64:
            raise BootError(f"{name}: a vmlinux must be a 64-bit x86-64 ELF")
        for seg in elf.segments:
            layout.take(seg.paddr, seg.memsz, "segment", loaded=True)
            pieces.append((seg.paddr, view[seg.offset:seg.offset + seg.filesz], seg.memsz))
        entry = elf.entry
        if not layout.in_loaded(entry):
            raise BootError(f"{name}: ELF entry {entry:#x} is not in any loaded segment (a vmlinux's entry is "
                            "the physical address of startup_64)")
        boot_params[OFF_SETUP_SECTS:0x268] = _synthetic_header()[OFF_SETUP_SECTS:0x268]
        initrd_max, cmdline_max = 0x7FFFFFFF, CMDLINE_MAX_DEFAULT - 1
        what = f"vmlinux {kernel.name} (ELF, {len(elf.segments)} segments)"
    else:
        raise BootError(f"{name}: not a Linux kernel (neither a bzImage nor an ELF vmlinux)")

    if len(raw_cmdline) > cmdline_max:
        raise BootError(f"{name}: command line is {len(raw_cmdline)} bytes; this kernel takes at most {cmdline_max}")

    initrd_blob = b""
    initrd_addr = 0
    if initrd is not None:
        initrd_blob = read_input(initrd, "initrd", mem.size,
                                 f"initrd of {{size}} bytes does not fit in guest memory ({mem.size >> 20} MiB)")
        low_end = mem.regions[0].end
        limit = min(initrd_max + 1, low_end)
        initrd_addr = (limit - len(initrd_blob)) & ~0xFFF  # as high as allowed, page-aligned, as QEMU does
        in_the_way = layout.overlapping(initrd_addr, initrd_addr + len(initrd_blob))
        if initrd_addr < 0 or in_the_way is not None:
            raise BootError(f"{initrd}: initrd of {len(initrd_blob) >> 20} MiB does not fit between the kernel and "
                            f"{limit:#x} (guest memory {mem.size >> 20} MiB)")
        layout.take(initrd_addr, len(initrd_blob), "initrd", initrd)

    # Everything is placed: now write.
    for paddr, image, memsz in pieces:
        load_piece(mem, paddr, image, memsz)
    mem.write(CMDLINE_ADDR, raw_cmdline + b"\0")
    boot_params[OFF_TYPE_OF_LOADER] = LOADER_OTHER
    boot_params[OFF_LOADFLAGS] |= CAN_USE_HEAP
    struct.pack_into("<H", boot_params, OFF_HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", boot_params, OFF_CMD_LINE_PTR, CMDLINE_ADDR)
    struct.pack_into("<Q", boot_params, OFF_ACPI_RSDP, acpi_rsdp)

    initrd_desc = ""
    if initrd is not None:
        mem.write(initrd_addr, initrd_blob)
        struct.pack_into("<II", boot_params, OFF_RAMDISK_IMAGE, initrd_addr, len(initrd_blob))
        initrd_desc = f", initrd {initrd.name} {len(initrd_blob) >> 10} KiB at {initrd_addr:#x}"

    e820 = mem.e820()
    if len(e820) > E820_MAX:
        raise BootError("too many memory regions for the e820 map")
    boot_params[OFF_E820_ENTRIES] = len(e820)
    for i, (base, length, kind_) in enumerate(e820):
        struct.pack_into("<QQI", boot_params, OFF_E820_TABLE + 20 * i, base, length, kind_)
    mem.write(BOOT_PARAMS_ADDR, bytes(boot_params))

    state = long_mode_state(mem, entry)
    state.regs.update({"rsi": BOOT_PARAMS_ADDR, "rsp": BOOT_STACK})
    state.description = f"{what}: entry {entry:#x}{initrd_desc}, cmdline {cmdline!r}"
    return state
