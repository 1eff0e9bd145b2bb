"""CrashReport: what a guest crash looked like, in one screen."""
from __future__ import annotations

from hvm.plain import Record


class CrashReport(Record):
    """reason: e.g. "SHUTDOWN (triple fault)". (Plain: hvm/plain.py says why.)"""
    _fields = ("vcpu", "reason", "detail", "regs", "sregs", "last_exits")

    def __init__(self, vcpu: int, reason: str, detail: str = "", regs: dict[str, int] | None = None,
                 sregs: dict[str, int] | None = None, last_exits: list[str] | None = None):
        self._set(vcpu=vcpu, reason=reason, detail=detail, regs={} if regs is None else regs,
                  sregs={} if sregs is None else sregs, last_exits=[] if last_exits is None else last_exits)

    def format(self) -> str:
        lines = [f"guest crashed: {self.reason} on vCPU {self.vcpu}"]
        if self.detail:
            lines.append(f"  {self.detail}")
        if self.regs:
            r = self.regs
            lines.append(f"  RIP={r['rip']:016x} RFLAGS={r['rflags']:08x}")
            names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                     "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
            for i in range(0, len(names), 4):
                lines.append("  " + " ".join(f"{n.upper():>3}={r[n]:016x}" for n in names[i:i + 4]))
        if self.sregs:
            s = self.sregs
            lines.append("  " + " ".join(f"{k.upper()}={v:x}" for k, v in s.items()))
        if self.last_exits:
            lines.append(f"  last {len(self.last_exits)} exits (oldest first):")
            lines.extend(f"    {e}" for e in self.last_exits)
        return "\n".join(lines)
