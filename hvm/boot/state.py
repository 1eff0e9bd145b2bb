"""BootState: the CPU state a loader asks for. Loaders fill it; the vCPU layer applies it to KVM."""
from __future__ import annotations

from hvm.plain import Record


class Segment(Record):
    """A segment register with its hidden (descriptor cache) part, as KVM's kvm_segment holds it.
    type: 0x3 data RW accessed, 0xb code RX accessed; db: 32-bit default operand size; s: code/data (not
    system); l: 64-bit code; g: limit in 4 KiB units. (Plain classes: hvm/plain.py says why.)"""
    _fields = ("selector", "base", "limit", "type", "present", "dpl", "db", "s", "l", "g")

    def __init__(self, selector: int, base: int = 0, limit: int = 0xFFFF, type: int = 0x3, present: int = 1,
                 dpl: int = 0, db: int = 0, s: int = 1, l: int = 0, g: int = 0):  # noqa: E741
        self._set(selector=selector, base=base, limit=limit, type=type, present=present, dpl=dpl, db=db, s=s,
                  l=l, g=g)


class BootState(Record):
    """mode: "real", "protected" or "long"; regs: rax, rbx, rsi, rsp, ...; rflags: bit 1 is always set;
    data: ds, es, fs, gs, ss; gdt, idt: (base, limit); cr0's reset value: CD, NW, ET; description: one line
    for logs, what was loaded where."""
    _fields = ("mode", "rip", "regs", "rflags", "cs", "data", "gdt", "idt", "cr0", "cr3", "cr4", "efer",
               "description")

    def __init__(self, mode: str, rip: int, regs: dict[str, int] | None = None, rflags: int = 0x2,
                 cs: Segment | None = None, data: Segment | None = None, gdt: tuple[int, int] = (0, 0xFFFF),
                 idt: tuple[int, int] = (0, 0xFFFF), cr0: int = 0x60000010, cr3: int = 0, cr4: int = 0,
                 efer: int = 0, description: str = ""):
        self._set(mode=mode, rip=rip, regs={} if regs is None else regs, rflags=rflags,
                  cs=Segment(0, type=0xB) if cs is None else cs, data=Segment(0) if data is None else data,
                  gdt=gdt, idt=idt, cr0=cr0, cr3=cr3, cr4=cr4, efer=efer, description=description)
