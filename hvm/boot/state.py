"""BootState: the CPU state a loader asks for. Loaders fill it; the vCPU layer applies it to KVM."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Segment:
    """A segment register with its hidden (descriptor cache) part, as KVM's kvm_segment holds it."""

    selector: int
    base: int = 0
    limit: int = 0xFFFF
    type: int = 0x3      # 0x3 data RW accessed, 0xb code RX accessed
    present: int = 1
    dpl: int = 0
    db: int = 0          # 32-bit default operand size
    s: int = 1           # code/data (not system)
    l: int = 0           # 64-bit code
    g: int = 0           # limit in 4 KiB units


@dataclass
class BootState:
    mode: str                                  # "real", "protected" or "long"
    rip: int
    regs: dict[str, int] = field(default_factory=dict)   # rax, rbx, rsi, rsp, ...
    rflags: int = 0x2                          # bit 1 is always set
    cs: Segment = field(default_factory=lambda: Segment(0, type=0xB))
    data: Segment = field(default_factory=lambda: Segment(0))   # ds, es, fs, gs, ss
    gdt: tuple[int, int] = (0, 0xFFFF)         # (base, limit)
    idt: tuple[int, int] = (0, 0xFFFF)
    cr0: int = 0x60000010                      # reset value: CD, NW, ET
    cr3: int = 0
    cr4: int = 0
    efer: int = 0
    description: str = ""                      # one line for logs: what was loaded where
