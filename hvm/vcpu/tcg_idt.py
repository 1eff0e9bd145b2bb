"""Exception and software-interrupt delivery for the tcg accelerator, done by hvm where Unicorn does not.

Unicorn calls a hook instead of delivering an interrupt through the guest's IDT, and for a fault raised inside
translated code the EIP it leaves is not the faulting instruction's. Two cases are precise, and those hvm
delivers itself, as the CPU would (SDM vol. 3, 6.12; real mode: the IVT):
- #UD: Unicorn stops at the instruction it cannot execute (UC_ERR_INSN_INVALID), RIP at that instruction;
- software interrupts: INT n, INT3, INTO and INT1, recognised by their bytes just before the return address
  Unicorn leaves (it has moved RIP past the instruction, as the pushed return address must be).
Delivery: the gate read from the IDT (64-bit gates in long mode, 32-bit interrupt/trap gates in protected mode,
the IVT in real mode), its checks (limit, present, type, DPL for software interrupts), the frame pushed on the
current stack (or the TSS's IST stack in long mode), RFLAGS.IF cleared for interrupt gates, CS:RIP loaded.
A delivery that would need more (a privilege change, a task gate, a fault while pushing) raises DeliveryError
with the reason, and the vCPU stops with that in its crash report: never a guess.
"""
from __future__ import annotations

from hvm.memory import GuestMemoryError

MSR_EFER = 0xC0000080
EFER_LMA = 1 << 10
CR0_PE, CR0_PG = 1, 1 << 31
CR4_PSE, CR4_PAE = 1 << 4, 1 << 5
RFLAGS_TF, RFLAGS_IF, RFLAGS_NT, RFLAGS_RF, RFLAGS_VM, RFLAGS_AC = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17, 1 << 18
UD_VECTOR = 6
# Software-interrupt instructions: (opcode bytes before the return address, vector or None for INT n's operand)
_SOFT = {0xCC: 3, 0xCE: 4, 0xF1: 1}


class DeliveryError(Exception):
    """hvm cannot deliver this vector as the CPU would; the message says why."""


class _Cpu:
    """Register and linear-memory access over a TcgCpu (hvm/vcpu/tcg.py) and the guest's RAM."""

    def __init__(self, tcg, memory) -> None:
        self.uc, self.x, self.memory = tcg.uc, tcg._x, memory
        self.sp_reg = self.x.UC_X86_REG_RSP        # (TcgCpu runs Unicorn's 64-bit mode for every guest mode)
        self.flags_reg = tcg._flags_reg
        self.pc_reg = tcg._pc_reg
        uc, x = self.uc, self.x
        self.cr0 = uc.reg_read(x.UC_X86_REG_CR0)
        self.cr3 = uc.reg_read(x.UC_X86_REG_CR3)
        self.cr4 = uc.reg_read(x.UC_X86_REG_CR4)
        self.efer = uc.msr_read(MSR_EFER)

    @property
    def long(self) -> bool:
        return bool(self.efer & EFER_LMA)

    def reg(self, name: str) -> int:
        return self.uc.reg_read(getattr(self.x, f"UC_X86_REG_{name}"))

    def phys(self, linear: int) -> int:
        """Linear -> guest-physical through the guest's page tables (present pages; writability is not checked)."""
        if not self.cr0 & CR0_PG:
            return linear & 0xFFFFFFFF
        read = self._read_phys_u
        if self.long:
            table, levels = self.cr3 & 0x000FFFFFFFFFF000, ((39, 8), (30, 8), (21, 8), (12, 8))
        elif self.cr4 & CR4_PAE:
            entry = read((self.cr3 & 0xFFFFFFE0) + ((linear >> 30) & 3) * 8, 8)
            if not entry & 1:
                raise DeliveryError(f"page of {linear:#x} not present")
            table, levels = entry & 0x000FFFFFFFFFF000, ((21, 8), (12, 8))
        else:
            table, levels = self.cr3 & 0xFFFFF000, ((22, 4), (12, 4))
        for depth, (shift, size) in enumerate(levels):
            index = (linear >> shift) & ((1 << (12 - (3 if size == 8 else 2))) - 1)
            entry = read(table + index * size, size)
            if not entry & 1:
                raise DeliveryError(f"page of {linear:#x} not present")
            last = depth == len(levels) - 1
            large = entry & 0x80 and not last and (size == 8 and shift in (30, 21) or size == 4 and self.cr4 & CR4_PSE)
            if large:
                return (entry & ~((1 << shift) - 1) & 0x000FFFFFFFFFF000) | (linear & ((1 << shift) - 1))
            table = entry & (0x000FFFFFFFFFF000 if size == 8 else 0xFFFFF000)
        return table | (linear & 0xFFF)

    def _read_phys_u(self, gpa: int, n: int) -> int:
        try:
            return int.from_bytes(self.memory.read(gpa, n), "little")
        except GuestMemoryError:
            raise DeliveryError(f"page table at {gpa:#x} outside RAM") from None

    def read(self, linear: int, n: int) -> int:
        out = bytearray()
        for i in range(n):       # byte by byte: a table entry may cross a page (never on a hot path)
            try:
                out += self.memory.read(self.phys(linear + i), 1)
            except GuestMemoryError:
                raise DeliveryError(f"{linear + i:#x} is not in guest RAM") from None
        return int.from_bytes(out, "little")

    def write(self, linear: int, value: int, n: int) -> None:
        for i, b in enumerate(value.to_bytes(n, "little")):
            try:
                self.memory.write(self.phys(linear + i), bytes([b]))
            except GuestMemoryError:
                raise DeliveryError(f"the frame at {linear + i:#x} is not in guest RAM") from None

    def seg_base(self, selector: int) -> int:
        """A protected-mode segment's base from the GDT (hvm's guests keep LDTs out of this)."""
        if selector & 4:
            raise DeliveryError(f"selector {selector:#x} is in an LDT")
        gdtr = self.reg("GDTR")
        desc = self.read(gdtr[1] + (selector & ~7), 8)
        return (desc >> 16) & 0xFFFFFF | ((desc >> 56) & 0xFF) << 24

    def code_base(self) -> int:
        cs = self.reg("CS")
        if not self.cr0 & CR0_PE:
            return cs << 4
        return 0 if self.long else self.seg_base(cs)


def software_vector(tcg, memory, vector: int) -> bool:
    """Whether Unicorn's interrupt `vector` came from a software-interrupt instruction just before RIP (INT n,
    INT3, INTO, INT1): then RIP is already the return address and delivery is precise."""
    cpu = _Cpu(tcg, memory)
    try:
        at = cpu.code_base() + tcg.pc()
        if vector in _SOFT.values() and _SOFT.get(cpu.read(at - 1, 1)) == vector:
            return True
        return cpu.read(at - 2, 2) == (0xCD | vector << 8)
    except DeliveryError:
        return False


def linear_byte(tcg, memory, offset: int) -> int | None:
    """The code byte at CS:RIP + offset (None where it cannot be read)."""
    cpu = _Cpu(tcg, memory)
    try:
        return cpu.read(cpu.code_base() + tcg.pc() + offset, 1)
    except DeliveryError:
        return None


def deliver(tcg, memory, vector: int, software: bool) -> None:
    """Deliver `vector` (no error code: #UD or a software interrupt) at the vCPU's current RIP, which is the
    return address; raises DeliveryError if hvm cannot do it as the CPU would."""
    cpu = _Cpu(tcg, memory)
    if not cpu.cr0 & CR0_PE:
        _real(cpu, vector)
    elif cpu.long:
        _long(cpu, vector, software)
    else:
        _protected(cpu, vector, software)


def _real(cpu: _Cpu, vector: int) -> None:
    idtr = cpu.reg("IDTR")
    if vector * 4 + 3 > idtr[2]:
        raise DeliveryError(f"vector {vector:#x} is beyond the IVT limit {idtr[2]:#x}")
    entry = cpu.read(idtr[1] + vector * 4, 4)
    _load_cs(cpu, entry >> 16)
    ss, sp = cpu.reg("SS"), cpu.uc.reg_read(cpu.sp_reg) & 0xFFFF
    flags, cs, ip = cpu.uc.reg_read(cpu.flags_reg), cpu.reg("CS"), cpu.uc.reg_read(cpu.pc_reg) & 0xFFFF
    for value in (flags & 0xFFFF, cs, ip):
        sp = (sp - 2) & 0xFFFF
        cpu.write((ss << 4) + sp, value, 2)
    uc, x = cpu.uc, cpu.x
    uc.reg_write(x.UC_X86_REG_RSP, sp)
    uc.reg_write(cpu.flags_reg, flags & ~(RFLAGS_IF | RFLAGS_TF | RFLAGS_AC))
    uc.reg_write(cpu.pc_reg, entry & 0xFFFF)


def _gate_checks(cpu: _Cpu, vector: int, software: bool, size: int, types: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(gate low 8 bytes, high 8 bytes or 0, type, DPL) after the IDT limit, present and type checks."""
    idtr = cpu.reg("IDTR")
    if vector * size + size - 1 > idtr[2]:
        raise DeliveryError(f"vector {vector:#x} is beyond the IDT limit {idtr[2]:#x} (#GP)")
    lo = cpu.read(idtr[1] + vector * size, 8)
    hi = cpu.read(idtr[1] + vector * size + 8, 8) if size == 16 else 0
    kind, dpl = (lo >> 40) & 0xF, (lo >> 45) & 3
    if kind not in types:
        raise DeliveryError(f"IDT gate {vector:#x} has type {kind:#x}, which hvm does not deliver through")
    if software and dpl < (cpu.reg("CS") & 3):
        raise DeliveryError(f"software interrupt {vector:#x} through a gate of DPL {dpl} from CPL {cpu.reg('CS') & 3} (#GP)")
    if not (lo >> 47) & 1:
        raise DeliveryError(f"IDT gate {vector:#x} not present (#NP)")
    return lo, hi, kind, dpl


def _same_privilege(cpu: _Cpu, selector: int) -> None:
    gdtr = cpu.reg("GDTR")
    if selector & 4 or (selector | 7) > gdtr[2]:
        raise DeliveryError(f"gate selector {selector:#x} is not in the GDT (#GP)")
    desc = cpu.read(gdtr[1] + (selector & ~7), 8)
    if ((desc >> 45) & 3) != (cpu.reg("CS") & 3):
        raise DeliveryError("the handler runs at another privilege level (a stack switch hvm's tcg does not do)")


def _load_cs(cpu: _Cpu, selector: int) -> None:
    """The handler's CS: Unicorn's 64-bit register interface sets a segment register's selector but not its
    hidden part, so hvm delivers only to handlers in the code segment the guest runs in (the rule in hvm's
    guests and kvm-unit-tests); another one is refused before anything is written."""
    if selector != cpu.reg("CS"):
        raise DeliveryError(f"the handler's code segment {selector:#x} is not the current one "
                            f"({cpu.reg('CS'):#x}): hvm's tcg cannot load a segment's hidden part")


def _finish(cpu: _Cpu, kind_is_interrupt: bool, flags: int, rip: int, sp: int) -> None:
    uc = cpu.uc
    uc.reg_write(cpu.sp_reg, sp)
    cleared = RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM | (RFLAGS_IF if kind_is_interrupt else 0)
    uc.reg_write(cpu.flags_reg, flags & ~cleared)
    uc.reg_write(cpu.pc_reg, rip)


def _long(cpu: _Cpu, vector: int, software: bool) -> None:
    lo, hi, kind, _ = _gate_checks(cpu, vector, software, 16, (0xE, 0xF))
    selector = (lo >> 16) & 0xFFFF
    _same_privilege(cpu, selector)
    _load_cs(cpu, selector)
    rip = (lo & 0xFFFF) | ((lo >> 48) & 0xFFFF) << 16 | (hi & 0xFFFFFFFF) << 32
    ist = (lo >> 32) & 7
    old_sp = cpu.uc.reg_read(cpu.sp_reg)
    sp = old_sp
    if ist:
        tr = cpu.reg("TR")
        sp = cpu.read(tr[1] + 0x24 + 8 * (ist - 1), 8)
    sp &= ~0xF
    flags = cpu.uc.reg_read(cpu.flags_reg)
    for value in (cpu.reg("SS"), old_sp, flags, cpu.reg("CS"), cpu.uc.reg_read(cpu.pc_reg)):
        sp = (sp - 8) & 0xFFFF_FFFF_FFFF_FFFF
        cpu.write(sp, value, 8)
    _finish(cpu, kind == 0xE, flags, rip, sp)


def _protected(cpu: _Cpu, vector: int, software: bool) -> None:
    lo, _, kind, _ = _gate_checks(cpu, vector, software, 8, (0xE, 0xF))
    selector = (lo >> 16) & 0xFFFF
    _same_privilege(cpu, selector)
    _load_cs(cpu, selector)
    eip = (lo & 0xFFFF) | ((lo >> 48) & 0xFFFF) << 16
    ss_base = cpu.seg_base(cpu.reg("SS"))
    sp = cpu.uc.reg_read(cpu.sp_reg) & 0xFFFFFFFF
    flags = cpu.uc.reg_read(cpu.flags_reg)
    for value in (flags & 0xFFFFFFFF, cpu.reg("CS"), cpu.uc.reg_read(cpu.pc_reg) & 0xFFFFFFFF):
        sp = (sp - 4) & 0xFFFFFFFF
        cpu.write(ss_base + sp, value, 4)
    _finish(cpu, kind == 0xE, flags, eip, sp)
