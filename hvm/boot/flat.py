"""Flat binary loader: copy the image to `load`, start the CPU in the requested mode at `entry`."""
from __future__ import annotations

from pathlib import Path

from hvm.boot.cpu_modes import RESERVED_END, state_for_mode
from hvm.boot.errors import BootError
from hvm.boot.layout import LOW_TABLES, VGA_BIOS_AREA, Layout, load_piece, read_input
from hvm.boot.state import BootState
from hvm.memory import GuestMemory

# Real mode addresses CS:IP = 16 * CS + IP; with the largest CS that leaves IP room (0xF000) that is the
# first 1 MiB. Above it a CS:IP cannot be formed (hvm does not enable A20 tricks), so an entry or an image
# beyond it could never run.
REAL_MODE_LIMIT = 0x100000


def load_flat(mem: GuestMemory, image: Path, load: int, entry: int, mode: str) -> BootState:
    name = str(image)
    data = read_input(image, "image", mem.size,
                      f"{{size}} bytes do not fit in guest memory ({mem.size >> 20} MiB)")
    if not data:
        raise BootError(f"{image}: image is empty")
    if mode == "real":
        if entry >= REAL_MODE_LIMIT:
            raise BootError(f"{image}: real-mode entry {entry:#x} is beyond the first 1 MiB, all that real mode "
                            "can address")
        if load + len(data) > REAL_MODE_LIMIT:
            raise BootError(f"{image}: {len(data)} bytes at {load:#x} reach beyond the first 1 MiB, all that "
                            "real mode can address")
    if load < RESERVED_END:  # the Layout would refuse it too; this says what to change
        raise BootError(f"{image}: load address {load:#x} is below {RESERVED_END:#x}, where hvm keeps the GDT "
                        "and page tables")
    layout = Layout(mem, name)
    layout.reserve(LOW_TABLES, VGA_BIOS_AREA)
    layout.take(load, len(data), "image", loaded=True)
    load_piece(mem, load, data, len(data))
    state = state_for_mode(mode, mem, entry)
    state.description = f"flat image {image.name}: {len(data)} bytes at {load:#x}, {mode} mode, entry {entry:#x}"
    return state
