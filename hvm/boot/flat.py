"""Flat binary loader: copy the image to `load`, start the CPU in the requested mode at `entry`."""
from __future__ import annotations

from pathlib import Path

from hvm.boot.cpu_modes import RESERVED_END, state_for_mode
from hvm.boot.errors import BootError
from hvm.boot.state import BootState
from hvm.memory import GuestMemory


def load_flat(mem: GuestMemory, image: Path, load: int, entry: int, mode: str) -> BootState:
    data = image.read_bytes()
    if not data:
        raise BootError(f"{image}: image is empty")
    if load < RESERVED_END:
        raise BootError(f"{image}: load address {load:#x} is below {RESERVED_END:#x}, where hvm keeps the GDT "
                        "and page tables")
    if not mem.contains(load, len(data)):
        raise BootError(f"{image}: {len(data)} bytes at {load:#x} do not fit in guest memory ({mem.size >> 20} MiB)")
    mem.write(load, data)
    state = state_for_mode(mode, mem, entry)
    state.description = f"flat image {image.name}: {len(data)} bytes at {load:#x}, {mode} mode, entry {entry:#x}"
    return state
