"""Completing instructions the host's instruction emulator gives up on (KVM_EXIT_INTERNAL_ERROR, emulation
failure), as the CPU would have executed them: decode the bytes, apply the architectural effect or raise the
architectural fault, advance RIP.

Seen on the kvm_pvm backend, where guest kernel-mode code is emulated by KVM's instruction emulator: INT3,
FWAIT, INT n (outside real mode), MOVBE, CLAC/STAC, CLWB/CLFLUSHOPT, XGETBV, RDPRU and INVPCID end there.

No KVM here: the instruction works on a `Cpu` (registers and segment state as plain attributes, guest
memory reached through callables), so it is unit-testable with fakes; hvm/vcpu/runner.py adapts a vCPU.
Every value read from the guest (addresses, lengths, instruction bytes) is bounded here: a guest that
hands over garbage gets a fault of its own or a refusal (the crash report), never an exception in hvm.
"""
from __future__ import annotations


# architectural bits: one definition, beside the boot code's (hvm/boot calls no KVM either)
from hvm._types import Callable, Protocol
from hvm.boot.cpu_modes import CR0_PE, CR0_TS, CR4_LA57, CR4_OSXSAVE, EFER_LMA, RFLAGS_AC, RFLAGS_VM
from hvm.plain import Frozen, Record

MAX_INSN = 15            # the architectural limit of an x86 instruction's length
PAGE = 4096

# exception vectors
UD, GP, SS, PF, BP = 6, 13, 12, 14, 3

# register order of ModRM/SIB encodings (kvm_regs attribute names)
GPR = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
       "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEG_PREFIX = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}

# CPUID feature bits: (leaf, subleaf, register, bit)
MOVBE = (1, 0, "ecx", 22)
XSAVE = (1, 0, "ecx", 26)
SMAP = (7, 0, "ebx", 20)
CLFLUSHOPT = (7, 0, "ebx", 23)
CLWB = (7, 0, "ebx", 24)
RDPRU = (0x80000008, 0, "ebx", 4)
INVPCID = (7, 0, "ebx", 10)
XGETBV_ECX1 = (0xD, 1, "eax", 2)
AVX = (1, 0, "ecx", 28)
AVX2 = (7, 0, "ebx", 5)
CR0_EM = 1 << 2
CR0_WP = 1 << 16
CR0_NE = 1 << 5
NM, MF = 7, 16
MMX = (1, 0, "edx", 23)


class Cpu(Protocol):
    """What an instruction needs. regs: rax..r15, rip, rflags (written back by the caller when changed);
    sregs: cs/ds/es/fs/gs/ss (each with base, limit, selector, type, dpl, db, l), cr0, cr4, efer."""

    regs: object
    sregs: object

    def translate(self, linear: int) -> int | None:
        """Guest-physical address of a linear one through the current paging, None if not mapped."""

    def read_phys(self, gpa: int, length: int) -> bytes: ...

    def read_code(self, gpa: int, length: int) -> bytes | None:
        """Instruction bytes: guest RAM only (None elsewhere: fetching never touches a device)."""

    def write_phys(self, gpa: int, data: bytes) -> None: ...

    def has_feature(self, feature: tuple[int, int, str, int]) -> bool:
        """The guest's CPUID bit (the table hvm gave the vCPU)."""

    def xcr(self, index: int) -> int | None:
        """The extended control register's value (KVM_GET_XCRS), None if the vCPU has none of that number."""

    def cpuid(self, leaf: int, sub: int) -> tuple[int, int, int, int] | None:
        """The guest's CPUID leaf (eax, ebx, ecx, edx), None if it has none."""

    def xsave_area(self) -> bytearray:
        """The vCPU's XSAVE area in the standard (non-compacted) format, KVM_GET_XSAVE's; written back when a
        Completion says xsave_changed."""


class Fault(Frozen):
    """An exception to deliver, RIP left at the faulting instruction. cr2: #PF's linear address.
    (Plain classes here: hvm/plain.py says why.)"""
    _fields = ("vector", "error_code", "cr2")

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None):
        self._set(vector=vector, error_code=error_code, cr2=cr2)


class SoftInterrupt(Frozen):
    """INT n: vector n delivered as a software interrupt (gate DPL checked), return RIP after the instruction."""
    _fields = ("vector",)

    def __init__(self, vector: int):
        self._set(vector=vector)


class Trap(Frozen):
    """A software exception raised after the instruction (INT3's #BP): RIP already advanced."""
    _fields = ("vector",)

    def __init__(self, vector: int):
        self._set(vector=vector)


class Completion(Frozen):
    """name: counted in VcpuThread.completed ("movbe", "clac", "rdpru #UD", ...); regs_changed: cpu.regs must
    be written back (RIP advanced, a result register); xsave_changed: cpu.xsave_area() must be written back
    (a vector register changed)."""
    _fields = ("name", "regs_changed", "event", "xsave_changed")

    def __init__(self, name: str, regs_changed: bool, event: Fault | SoftInterrupt | Trap | None = None,
                 xsave_changed: bool = False):
        self._set(name=name, regs_changed=regs_changed, event=event, xsave_changed=xsave_changed)


class _Short(Exception):
    """The decoder ran out of instruction bytes."""


class _Refuse(Exception):
    """An encoding hvm does not complete."""


class _Raise(Exception):
    def __init__(self, fault: Fault) -> None:
        super().__init__(fault)
        self.fault = fault


class _Mode(Record):
    """long64: 64-bit mode (EFER.LMA and CS.L); op: default operand size in bytes (2/4); addr: default
    address size in bytes (2/4/8)."""
    _fields = ("long64", "op", "addr", "cpl", "real")

    def __init__(self, long64: bool, op: int, addr: int, cpl: int, real: bool):
        self._set(long64=long64, op=op, addr=addr, cpl=cpl, real=real)


def cpu_mode(cpu: Cpu) -> _Mode:
    s = cpu.sregs
    if not s.cr0 & CR0_PE:
        return _Mode(False, 2, 2, 0, True)
    if cpu.regs.rflags & RFLAGS_VM:
        return _Mode(False, 2, 2, 3, True)
    cpl = s.cs.selector & 3
    if s.efer & EFER_LMA and s.cs.l:
        return _Mode(True, 4, 8, cpl, False)
    size = 4 if s.cs.db else 2
    return _Mode(False, size, size, cpl, False)


class _Decoder:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= MAX_INSN:          # longer than any instruction: the CPU raises #GP(0)
            raise _Raise(Fault(GP, 0))
        if self.pos >= len(self.data):
            raise _Short()
        b = self.data[self.pos]
        self.pos += 1
        return b

    def signed(self, n: int) -> int:
        v = int.from_bytes(bytes(self.byte() for _ in range(n)), "little")
        return v - (1 << (8 * n)) if v >> (8 * n - 1) else v


class _Insn(Record):
    """Prefixes: opsize 66, addrsize 67, lock, rep F2/F3, a segment override, REX."""
    _fields = ("opsize", "addrsize", "lock", "rep", "seg", "rex")

    def __init__(self, opsize: bool = False, addrsize: bool = False, lock: bool = False, rep: int = 0,
                 seg: str | None = None, rex: int = 0):
        self._set(opsize=opsize, addrsize=addrsize, lock=lock, rep=rep, seg=seg, rex=rex)


class _ModRM(Record):
    """reg: with REX.R; rm: with REX.B (register form) -- unused for memory forms; offset: the effective
    address (memory forms), truncated to the address size."""
    _fields = ("mod", "reg", "rm", "offset", "seg", "rip_relative")

    def __init__(self, mod: int, reg: int, rm: int, offset: int = 0, seg: str = "ds", rip_relative: bool = False):
        self._set(mod=mod, reg=reg, rm=rm, offset=offset, seg=seg, rip_relative=rip_relative)


def _modrm(d: _Decoder, p: _Insn, m: _Mode, regs) -> _ModRM:
    b = d.byte()
    mod, reg, rm = b >> 6, (b >> 3) & 7, b & 7
    reg |= (p.rex & 4) << 1
    if mod == 3:
        return _ModRM(mod, reg, rm | (p.rex & 1) << 3)
    asize = _address_size(m, p)
    r = _ModRM(mod, reg, rm)
    if asize == 2:
        base = (("rbx", "rsi"), ("rbx", "rdi"), ("rbp", "rsi"), ("rbp", "rdi"), ("rsi",), ("rdi",), ("rbp",),
                ("rbx",))[rm]
        if mod == 0 and rm == 6:
            off, base = d.signed(2), ()
        else:
            off = d.signed(1) if mod == 1 else d.signed(2) if mod == 2 else 0
            if "rbp" in base:
                r.seg = "ss"
        off += sum(getattr(regs, n) & 0xFFFF for n in base)
        r.offset = off & 0xFFFF
        return r
    off = 0
    if rm == 4:
        sib = d.byte()
        scale, index, sbase = sib >> 6, (sib >> 3) & 7 | (p.rex & 2) << 2, sib & 7
        if index != 4:
            off += getattr(regs, GPR[index]) << scale
        if sbase == 5 and mod == 0:
            off += d.signed(4)
        else:
            sbase |= (p.rex & 1) << 3
            off += getattr(regs, GPR[sbase])
            if sbase in (4, 5):
                r.seg = "ss"
    elif rm == 5 and mod == 0:
        off = d.signed(4)
        r.rip_relative = m.long64     # relative to the next instruction: added once its length is known
    else:
        rm |= (p.rex & 1) << 3
        off = getattr(regs, GPR[rm])
        if rm == 5:
            r.seg = "ss"
    if mod == 1:
        off += d.signed(1)
    elif mod == 2:
        off += d.signed(4)
    r.offset = off
    return r


def _address_size(m: _Mode, p: _Insn) -> int:
    if not p.addrsize:
        return m.addr
    return 4 if m.long64 else (2 if m.addr == 4 else 4)


def _has(cpu: Cpu, feature) -> bool:
    return bool(cpu.has_feature(feature))


class _Access:
    """Memory operand access: segmentation checks, linear address, page walk (KVM_TRANSLATE), RAM or MMIO."""

    def __init__(self, cpu: Cpu, m: _Mode, p: _Insn, mr: _ModRM, asize_mask: int) -> None:
        self.cpu, self.m = cpu, m
        self.seg_name = p.seg or mr.seg
        self.offset = mr.offset & asize_mask

    def linear(self, size: int) -> int:
        cpu, m = self.cpu, self.m
        seg = getattr(cpu.sregs, self.seg_name)
        stack = self.seg_name == "ss"
        if m.long64:
            base = seg.base if self.seg_name in ("fs", "gs") else 0
            la = (base + self.offset) & (2 ** 64 - 1)
            bits = 57 if cpu.sregs.cr4 & CR4_LA57 else 48
            for a in (la, (la + size - 1) & (2 ** 64 - 1)):
                top = a >> (bits - 1)
                if top not in (0, (1 << (65 - bits)) - 1):
                    raise _Raise(Fault(SS if stack else GP, 0))
            return la
        if not m.real:
            if seg.unusable:       # a null selector
                raise _Raise(Fault(SS if stack else GP, 0))
            end = self.offset + size - 1
            expand_down = seg.s and not seg.type & 8 and seg.type & 4
            top = 0xFFFFFFFF if seg.db else 0xFFFF
            bad = (self.offset <= seg.limit or end > top) if expand_down else end > seg.limit
            if bad:
                raise _Raise(Fault(SS if stack else GP, 0))
        return (seg.base + self.offset) & 0xFFFFFFFF

    def _pieces(self, la: int, size: int, write: bool):
        """(gpa, length) per page; #PF at the first page not mapped."""
        out = []
        while size:
            n = min(size, PAGE - (la & (PAGE - 1)))
            gpa = self.cpu.translate(la)
            if gpa is None:
                raise _Raise(Fault(PF, (2 if write else 0) | (4 if self.m.cpl == 3 else 0), la))
            out.append((gpa, n))
            la = (la + n) & (2 ** 64 - 1 if self.m.long64 else 0xFFFFFFFF)
            size -= n
        return out

    def check(self, size: int, write: bool) -> None:
        self._pieces(self.linear(size), size, write)

    def read(self, size: int) -> bytes:
        return b"".join(self.cpu.read_phys(gpa, n) for gpa, n in self._pieces(self.linear(size), size, False))

    def write(self, data: bytes) -> None:
        pieces = self._pieces(self.linear(len(data)), len(data), True)   # all pages checked before any store
        pos = 0
        for gpa, n in pieces:
            self.cpu.write_phys(gpa, data[pos:pos + n])
            pos += n


def fetch_bytes(cpu: Cpu, insn: bytes) -> bytes:
    """The instruction at CS:RIP from guest memory (up to MAX_INSN bytes, stopping at an unmapped page), for
    when the exit gave fewer bytes than the decoder needs."""
    rip = cpu.regs.rip
    m = cpu_mode(cpu)
    wrap = 2 ** 64 - 1 if m.long64 else 0xFFFFFFFF    # linear addresses wrap (KVM_TRANSLATE takes a __u64)
    la = rip & wrap if m.long64 else (cpu.sregs.cs.base + rip) & wrap
    out = b""
    while len(out) < MAX_INSN:
        n = min(MAX_INSN - len(out), PAGE - (la & (PAGE - 1)))
        gpa = cpu.translate(la)
        code = None if gpa is None else cpu.read_code(gpa, n)
        if code is None:
            break
        out += code
        la = (la + n) & wrap
    return out if len(out) > len(insn) else insn


def complete(insn: bytes, cpu: Cpu, fetch: Callable[[], bytes] | None = None) -> Completion | None:
    """Complete the instruction whose bytes are `insn` (from the exit; `fetch` gives more from guest memory
    if the decoder needs them). None: an instruction or encoding hvm does not complete."""
    done = _complete_insn(insn, cpu, fetch)
    if done is not None and isinstance(done.event, Fault) and done.event.vector != PF:
        pf = _delivery_fault(cpu, done.event)
        if pf is not None:
            return Completion(f"{done.name} -> #PF", False, pf)
    return done


def page_writable(read_phys: Callable[[int, int], bytes], cr3: int, linear: int) -> bool | None:
    """4-level paging: is `linear` mapped writable for a supervisor write (CR0.WP set)? None: not present.
    (KVM_TRANSLATE says writable for every page, so hvm walks the tables itself where it matters.)"""
    table, writable = cr3 & 0x000FFFFFFFFFF000, True
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = int.from_bytes(read_phys(table + ((linear >> shift) & 0x1FF) * 8, 8), "little")
        if not entry & 1:
            return None
        writable = writable and bool(entry & 2)
        if level in (1, 2) and entry & 0x80:        # a 1 GiB or 2 MiB page
            return writable
        table = entry & 0x000FFFFFFFFFF000
    return writable


def _delivery_fault(cpu: Cpu, fault: Fault) -> Fault | None:
    """The #PF the CPU would raise while delivering `fault` in 64-bit mode: the frame's stack (IST, the TSS's
    RSP of a more privileged target, or RSP aligned to 16) not writable. A contributory or benign exception
    whose delivery page-faults becomes that #PF (SDM vol. 3 6.15, table 6-5); RIP stays at the instruction, so
    the guest's #PF handler returns to it. The kvm_pvm backend turns such a delivery into a shutdown instead.
    None: delivery would not page-fault, or the check does not apply (not 4-level 64-bit paging, or the
    Cpu cannot tell writability)."""
    writable = getattr(cpu, "writable", None)
    s = cpu.sregs
    if writable is None or not s.efer & EFER_LMA or s.cr4 & CR4_LA57 or fault.vector >= 32:
        return None
    m = cpu_mode(cpu)
    try:
        if fault.vector * 16 + 15 > s.idt.limit:
            return None
        gate = int.from_bytes(_read_linear(cpu, m, s.idt.base + fault.vector * 16, 8), "little")
        if not gate >> 47 & 1:
            return None
        ist, sel = gate >> 32 & 7, gate >> 16 & 0xFFFC
        if sel == 0 or (sel | 7) > s.gdt.limit or sel & 4:
            return None
        desc = int.from_bytes(_read_linear(cpu, m, s.gdt.base + sel, 8), "little")
        dpl = desc >> 45 & 3
        if ist:
            rsp = int.from_bytes(_read_linear(cpu, m, s.tr.base + 0x24 + 8 * (ist - 1), 8), "little")
        elif dpl < m.cpl:
            rsp = int.from_bytes(_read_linear(cpu, m, s.tr.base + 4 + 8 * dpl, 8), "little")
        else:
            rsp = cpu.regs.rsp
    except _Raise:
        return None            # the tables themselves are not mapped: left to the backend's delivery
    rsp &= ~0xF
    pushes = 6 if fault.error_code is not None else 5
    for i in range(1, pushes + 1):
        la = (rsp - 8 * i) & (2 ** 64 - 1)
        ok = writable(la)
        if ok is False and not s.cr0 & CR0_WP:     # supervisor writes ignore R/W without CR0.WP
            ok = True
        if ok is None or not ok:
            return Fault(PF, 2 | (0 if ok is None else 1), la)
    return None


def _complete_insn(insn: bytes, cpu: Cpu, fetch: Callable[[], bytes] | None) -> Completion | None:
    data = bytes(insn[:MAX_INSN])
    for attempt in range(2):
        try:
            return _complete(data, cpu)
        except _Short:
            if attempt or fetch is None:
                return None
            more = fetch()
            if len(more) <= len(data):
                return None
            data = bytes(more[:MAX_INSN])
        except _Refuse:
            return None
        except _Raise as r:    # decoding past 15 bytes: #GP(0), as the CPU
            return Completion(_fault_name("insn", r.fault), False, r.fault)
    return None


def _complete(data: bytes, cpu: Cpu) -> Completion:
    m = cpu_mode(cpu)
    d = _Decoder(data)
    p = _Insn()
    try:
        while True:
            b = d.byte()
            if b == 0x66:
                p.opsize = True
            elif b == 0x67:
                p.addrsize = True
            elif b == 0xF0:
                p.lock = True
            elif b in (0xF2, 0xF3):
                p.rep = b
            elif b in SEG_PREFIX:
                p.seg = SEG_PREFIX[b]
            elif m.long64 and 0x40 <= b <= 0x4F:
                rex = b        # counts only if the opcode follows at once (a prefix after it voids it)
                b = d.byte()
                if 0x40 <= b <= 0x4F or b in SEG_PREFIX or b in (0x66, 0x67, 0xF0, 0xF2, 0xF3):
                    d.pos -= 1
                    continue
                p.rex = rex
                break
            else:
                break
    except _Raise as r:        # prefixes beyond 15 bytes: #GP(0), as the CPU
        return Completion(_fault_name("insn", r.fault), False, r.fault)
    if m.long64 and p.seg in ("es", "cs", "ss", "ds"):
        p.seg = None           # ignored in 64-bit mode
    return _execute(b, d, p, m, cpu)


_NAME_OF_FAULT = {UD: "#UD", GP: "#GP", PF: "#PF", SS: "#SS", 11: "#NP", 7: "#NM", 16: "#MF"}


def _fault_name(name: str, fault: Fault) -> str:
    return f"{name} {_NAME_OF_FAULT.get(fault.vector, f'#{fault.vector}')}"


def _advance(cpu: Cpu, m: _Mode, length: int) -> None:
    regs = cpu.regs
    mask = 2 ** 64 - 1 if m.long64 else (0xFFFFFFFF if m.op == 4 and not m.real else 0xFFFF)
    regs.rip = (regs.rip + length) & mask


def _execute(op: int, d: _Decoder, p: _Insn, m: _Mode, cpu: Cpu) -> Completion:
    if op == 0xCC:             # INT3: a trap, #BP delivered with RIP after the instruction
        _advance(cpu, m, d.pos)
        return Completion("int3", True, Trap(BP))
    if op == 0x9B:             # FWAIT: no x87 exception can be pending here -> a no-op
        _advance(cpu, m, d.pos)
        return Completion("fwait", True)
    if op in (0xC4, 0xC5) and not m.real:
        return _vex(op, d, p, m, cpu)
    if op == 0xDF and d.data[d.pos:d.pos + 1] == b"\xe0" and not p.lock:   # FNSTSW AX
        d.byte()
        if cpu.sregs.cr0 & (CR0_EM | CR0_TS):
            return Completion("fnstsw #NM", False, Fault(NM))
        cpu.regs.rax = cpu.regs.rax & ~0xFFFF | _Mmx(cpu).fsw    # no-wait form: no #MF check
        _advance(cpu, m, d.pos)
        return Completion("fnstsw", True)
    if op == 0xCD:             # INT n
        vector = d.byte()
        if m.real:             # KVM's emulator does real-mode INT itself; vm86 needs IOPL checks hvm lacks
            raise _Refuse()
        try:
            _int_checks(vector, m, cpu)
        except _Raise as e:
            return Completion(_fault_name("int", e.fault), False, e.fault)
        _advance(cpu, m, d.pos)
        return Completion("int", True, SoftInterrupt(vector))
    if op != 0x0F:
        raise _Refuse()
    op2 = d.byte()
    if op2 == 0x38:
        op3 = d.byte()
        if op3 in (0xF0, 0xF1) and p.rep == 0:
            return _guarded("movbe", _movbe, op3, d, p, m, cpu)
        if op3 == 0x82 and p.opsize and not p.rep:
            return _guarded("invpcid", _invpcid, op3, d, p, m, cpu)
        raise _Refuse()
    if op2 == 0x01:
        modrm = d.byte()
        fn = {0xCA: ("clac", _clac_stac), 0xCB: ("stac", _clac_stac), 0xD0: ("xgetbv", _xgetbv),
              0xFD: ("rdpru", _rdpru)}.get(modrm)
        if fn is None or p.rep:
            raise _Refuse()
        return _guarded(fn[0], fn[1], modrm, d, p, m, cpu)
    if op2 in MMX_MOVES and not p.opsize and not p.rep:
        name = MMX_MOVES[op2]
        try:
            _mmx_move(op2, d, p, m, cpu)
        except _Raise as e:
            return Completion(_fault_name(name, e.fault), False, e.fault)
        _advance(cpu, m, d.pos)
        return Completion(name, True, None, True)
    if op2 == 0xAE and p.opsize and not p.rep:
        peek = d.data[d.pos] if d.pos < len(d.data) else None
        if peek is None:
            raise _Short()
        if peek >> 6 != 3 and (peek >> 3) & 7 in (6, 7):
            name = "clwb" if (peek >> 3) & 7 == 6 else "clflushopt"
            return _guarded(name, _flush, name, d, p, m, cpu)
    raise _Refuse()


NP = 11


def _read_linear(cpu: Cpu, m: _Mode, la: int, n: int) -> bytes:
    """A system-table read (IDT, GDT/LDT) at a linear address: supervisor access, #PF if not mapped."""
    out = b""
    # a table near the top of the linear address space wraps, as on the CPU (KVM_TRANSLATE takes a __u64)
    wrap = 2 ** 64 - 1 if cpu.sregs.efer & EFER_LMA else 0xFFFFFFFF
    la &= wrap
    while n:
        k = min(n, PAGE - (la & (PAGE - 1)))
        gpa = cpu.translate(la)
        if gpa is None:
            raise _Raise(Fault(PF, 0, la))
        out += cpu.read_phys(gpa, k)
        la, n = (la + k) & wrap, n - k
    return out


def _int_checks(vector: int, m: _Mode, cpu: Cpu) -> None:
    """What INT n checks before it delivers through the IDT (SDM vol. 2 "INT n", protected/IA-32e mode): the
    gate inside the IDT, of a valid type, DPL >= CPL, present; its code segment selector not null, inside its
    descriptor table, a code segment of DPL <= CPL, present. The delivery itself is left to KVM."""
    s = cpu.sregs
    long_mode = bool(s.efer & EFER_LMA)
    size = 16 if long_mode else 8
    idt_error = vector * 8 + 2
    if vector * size + size - 1 > s.idt.limit:
        raise _Raise(Fault(GP, idt_error))
    gate = int.from_bytes(_read_linear(cpu, m, s.idt.base + vector * size, 8), "little")
    gtype, dpl, present, sel = gate >> 40 & 0xF, gate >> 45 & 3, gate >> 47 & 1, gate >> 16 & 0xFFFF
    if gtype not in ((0xE, 0xF) if long_mode else (0x5, 0x6, 0x7, 0xE, 0xF)) or gate >> 44 & 1:
        raise _Raise(Fault(GP, idt_error))
    if dpl < m.cpl:
        raise _Raise(Fault(GP, idt_error))
    if not present:
        raise _Raise(Fault(NP, idt_error))
    if gtype == 0x5:
        raise _Refuse()          # a task gate: a task switch, not something hvm completes
    if sel & ~3 == 0:
        raise _Raise(Fault(GP, 0))
    table = s.ldt if sel & 4 else s.gdt
    if (sel | 7) > table.limit or sel & 4 and getattr(table, "unusable", 0):
        raise _Raise(Fault(GP, sel & 0xFFFC))
    desc = int.from_bytes(_read_linear(cpu, m, table.base + (sel & ~7), 8), "little")
    if not desc >> 44 & 1 or not desc >> 43 & 1 or (desc >> 45 & 3) > m.cpl:
        raise _Raise(Fault(GP, sel & 0xFFFC))     # not a code segment, or its DPL above the CPL
    if not desc >> 47 & 1:
        raise _Raise(Fault(NP, sel & 0xFFFC))


def _guarded(name: str, fn, arg, d: _Decoder, p: _Insn, m: _Mode, cpu: Cpu) -> Completion:
    try:
        fn(arg, d, p, m, cpu)
    except _Raise as r:
        return Completion(_fault_name(name, r.fault), False, r.fault)
    _advance(cpu, m, d.pos)
    return Completion(name, True)


def _movbe(op3: int, d: _Decoder, p: _Insn, m: _Mode, cpu: Cpu) -> None:
    regs = cpu.regs
    mr = _modrm(d, p, m, regs)
    if p.lock or mr.mod == 3 or not _has(cpu, MOVBE):
        raise _Raise(Fault(UD))
    size = 8 if p.rex & 8 else (2 if (m.op == 4) == p.opsize else 4)
    acc = _access(d, p, m, mr, cpu)
    name = GPR[mr.reg]
    if op3 == 0xF0:            # MOVBE r, m: load, bytes reversed
        value = int.from_bytes(acc.read(size), "big")
        old = getattr(regs, name)
        # a 32-bit destination zero-extends into the 64-bit register; a 16-bit one keeps the upper bits
        setattr(regs, name, (old & ~0xFFFF) | value if size == 2 else value)
    else:                      # MOVBE m, r: store, bytes reversed
        value = getattr(regs, name) & ((1 << (8 * size)) - 1)
        acc.write(value.to_bytes(size, "big"))


def _access(d: _Decoder, p: _Insn, m: _Mode, mr: _ModRM, cpu: Cpu) -> _Access:
    mask = (1 << (8 * _address_size(m, p))) - 1
    if mr.rip_relative:        # the end of this instruction: every byte of it is decoded by now
        mr.offset += cpu.regs.rip + d.pos
    return _Access(cpu, m, p, mr, mask)


def _clac_stac(modrm: int, d: _Decoder, p: _Insn, m: _Mode, cpu: Cpu) -> None:
    if p.lock or not _has(cpu, SMAP) or m.cpl > 0:     # vm86 is CPL 3
        raise _Raise(Fault(UD))
    if modrm == 0xCA:
        cpu.regs.rflags &= ~RFLAGS_AC
    else:
        cpu.regs.rflags |= RFLAGS_AC


def _xgetbv(_modrm: int, d: _Decoder, p: _Insn, m: _Mode, cpu: Cpu) -> None:
    regs = cpu.regs
    if p.lock or not _has(cpu, XSAVE) or not cpu.sregs.cr4 & CR4_OSXSAVE:
        raise _Raise(Fault(UD))
    index = regs.rcx & 0xFFFFFFFF
    if index == 1 and _has(cpu, XGETBV_ECX1):
        # XINUSE: a 1 may stand for a component in its initial state (SDM 13.6), so XCR0's bits are a
        # valid answer without the vCPU's state-tracking the CPU has.
        value = cpu.xcr(0)
    elif index == 0:
        value = cpu.xcr(0)
    else:
        value = None
    if value is None:
        raise _Raise(Fault(GP, 0))
    regs.rax = value & 0xFFFFFFFF
    regs.rdx = value >> 32 & 0xFFFFFFFF


def _rdpru(_modrm: int, d: _Decoder, p: _Insn, m: _Mode, cpu: Cpu) -> None:
    if p.lock or not _has(cpu, RDPRU):
        raise _Raise(Fault(UD))
    # MPERF/APERF as this vCPU sees them are not hvm's to read: refused (crash report) rather than made up
    raise _Refuse()


def _invpcid(_op3: int, d: _Decoder, p: _Insn, m: _Mode, cpu: Cpu) -> None:
    mr = _modrm(d, p, m, cpu.regs)
    # #UD comes first (no INVPCID in CPUID, LOCK, a register descriptor, real/vm86 mode), as the SDM orders them
    if p.lock or mr.mod == 3 or not _has(cpu, INVPCID) or m.real:
        raise _Raise(Fault(UD))
    # With INVPCID in the guest's CPUID the TLB invalidation is the backend's to do, not hvm's: refused (crash
    # report) rather than pretended.
    raise _Refuse()


def _flush(name: str, d: _Decoder, p: _Insn, m: _Mode, cpu: Cpu) -> None:
    mr = _modrm(d, p, m, cpu.regs)
    if p.lock or not _has(cpu, CLWB if name == "clwb" else CLFLUSHOPT):
        raise _Raise(Fault(UD))
    # No architectural effect on a coherent guest RAM beyond the operand's checks: segment limit/canonical
    # form and a mapped page (a CLWB of an unmapped address raises #PF like a read of one byte).
    _access(d, p, m, mr, cpu).check(1, False)


# --- AVX moves through the XSAVE area (the xsave entry of kvm-unit-tests: VZEROALL, VMOVDQA, VMOVNTDQ(A)) ----------
XSTATE_BV = 512
SSE_BIT, YMM_BIT, ZMM_HI256_BIT = 1, 2, 6
XMM_OFFSET = 160
STANDARD_OFFSET = {YMM_BIT: 576, ZMM_HI256_BIT: 1152}     # CPUID.(0xD, i).EBX on every CPU so far


class _Vectors:
    """YMM registers in a standard-format XSAVE area: XMM i at 160 + 16 i (SSE), bits 255:128 in component 2,
    bits 511:256 of ZMM0-15 in component 6. A component whose XSTATE_BV bit is clear is in its initial state
    (all zero) whatever the area's bytes say."""

    def __init__(self, cpu: Cpu) -> None:
        self.area = cpu.xsave_area()
        self.xcr0 = cpu.xcr(0) or 0
        self.offsets = {SSE_BIT: XMM_OFFSET}
        for comp in (YMM_BIT, ZMM_HI256_BIT):
            leaf = cpu.cpuid(0xD, comp)
            off = leaf[1] if leaf and leaf[0] else STANDARD_OFFSET[comp]
            size = 32 if comp == ZMM_HI256_BIT else 16
            if self.xcr0 >> comp & 1 and off + 16 * size <= len(self.area):
                self.offsets[comp] = off

    def _bv(self) -> int:
        return int.from_bytes(self.area[XSTATE_BV:XSTATE_BV + 8], "little")

    def _slot(self, comp: int, reg: int) -> tuple[int, int]:
        size = 32 if comp == ZMM_HI256_BIT else 16
        return self.offsets[comp] + size * reg, size

    def _get(self, comp: int, reg: int) -> bytes:
        off, size = self._slot(comp, reg)
        return bytes(self.area[off:off + size]) if self._bv() >> comp & 1 else bytes(size)

    def _put(self, comp: int, reg: int, data: bytes) -> None:
        if comp not in self.offsets:
            return
        bv = self._bv()
        if not bv >> comp & 1:    # from its initial state: every register of the component reads 0 first
            first, size = self._slot(comp, 0)
            self.area[first:first + 16 * size] = bytes(16 * size)
            self.area[XSTATE_BV:XSTATE_BV + 8] = (bv | 1 << comp).to_bytes(8, "little")
        off, size = self._slot(comp, reg)
        self.area[off:off + size] = data

    def read(self, reg: int, width: int) -> bytes:
        low = self._get(SSE_BIT, reg)
        return low if width == 16 else low + self._get(YMM_BIT, reg)

    def write(self, reg: int, data: bytes) -> None:
        """A VEX-encoded write: bits above the operand up to the register's maximum width become 0."""
        self._put(SSE_BIT, reg, data[:16])
        self._put(YMM_BIT, reg, data[16:32].ljust(16, b"\0"))
        if ZMM_HI256_BIT in self.offsets and self._bv() >> ZMM_HI256_BIT & 1:
            self._put(ZMM_HI256_BIT, reg, bytes(32))


def _vex(op: int, d: _Decoder, p: _Insn, m: _Mode, cpu: Cpu) -> Completion:
    b1 = d.data[d.pos] if d.pos < len(d.data) else None
    if b1 is None:
        raise _Short()
    if not m.long64 and b1 >> 6 != 3:
        raise _Refuse()          # LES/LDS in legacy modes: KVM's emulator does those
    d.byte()
    legacy_rex = p.rex           # a REX prefix before VEX: #UD (checked once the instruction is decoded)
    if op == 0xC5:
        r, x, b, mmmmm, w, b2 = (~b1 >> 7) & 1, 0, 0, 1, 0, b1
    else:
        r, x, b, mmmmm = (~b1 >> 7) & 1, (~b1 >> 6) & 1, (~b1 >> 5) & 1, b1 & 0x1F
        b2 = d.byte()
        w = b2 >> 7
    vvvv, wide, pp = (~b2 >> 3) & 0xF, b2 >> 2 & 1, b2 & 3
    opcode = d.byte()
    if not m.long64:
        r = x = b = 0
    p.rex = 0x40 | w << 3 | r << 2 | x << 1 | b
    name = {(1, 0x77, 0): "vzeroall" if wide else "vzeroupper", (1, 0x6F, 1): "vmovdqa", (1, 0x7F, 1): "vmovdqa",
            (1, 0xE7, 1): "vmovntdq", (2, 0x2A, 1): "vmovntdqa"}.get((mmmmm, opcode, pp))
    if name is None:
        raise _Refuse()
    try:
        if legacy_rex:
            raise _Raise(Fault(UD))
        _vex_op(name, opcode, wide, vvvv, d, p, m, cpu)
    except _Raise as e:
        return Completion(_fault_name(name, e.fault), False, e.fault)
    _advance(cpu, m, d.pos)
    return Completion(name, True, None, True)


def _vex_op(name: str, opcode: int, wide: int, vvvv: int, d: _Decoder, p: _Insn, m: _Mode, cpu: Cpu) -> None:
    mr = None if opcode == 0x77 else _modrm(d, p, m, cpu.regs)
    xcr0 = cpu.xcr(0) or 0
    need = AVX2 if name == "vmovntdqa" and wide else AVX
    if (p.lock or p.opsize or p.rep or not cpu.sregs.cr4 & CR4_OSXSAVE or (xcr0 & 6) != 6 or not _has(cpu, need)
            or vvvv != 0):             # VEX.vvvv (stored inverted) must name no register: 1111b
        raise _Raise(Fault(UD))
    if mr is not None and mr.mod == 3 and opcode in (0xE7, 0x2A):
        raise _Raise(Fault(UD))
    if cpu.sregs.cr0 & CR0_TS:
        raise _Raise(Fault(NM))
    vec = _Vectors(cpu)
    nregs = 16 if m.long64 else 8
    if opcode == 0x77:
        for reg in range(nregs):
            vec.write(reg, vec.read(reg, 16) if not wide else bytes(32))
        return
    width = 32 if wide else 16
    if mr.mod == 3:             # register to register (VMOVDQA only)
        src, dst = (mr.rm, mr.reg) if opcode == 0x6F else (mr.reg, mr.rm)
        vec.write(dst, vec.read(src, width))
        return
    acc = _access(d, p, m, mr, cpu)
    if acc.linear(width) & (width - 1):   # aligned forms: #GP(0) (#SS(0) through SS) off a width boundary
        raise _Raise(Fault(SS if acc.seg_name == "ss" else GP, 0))
    if opcode in (0x6F, 0x2A):
        vec.write(mr.reg, acc.read(width))
    else:
        acc.write(vec.read(mr.reg, width))


# --- MMX moves through the x87 part of the XSAVE area (the emulator entry's test_mmx) ------------------------------
X87_BIT = 0
FCW, FSW, FTW = 0, 2, 4            # legacy-region offsets: control, status, abridged tag (one bit per register)
ST_OFFSET = 32                     # ST(i) at 32 + 16 i: an 80-bit register in each 16-byte slot
FSW_ES = 1 << 7                    # an unmasked x87 exception is pending
MMX_MOVES = {0x6E: "movd/q mm,r/m", 0x7E: "movd/q r/m,mm", 0x6F: "movq mm,mm/m", 0x7F: "movq mm/m,mm"}


class _Mmx:
    """MM0-7 are the mantissas (bits 63:0) of the physical x87 registers R0-R7. The XSAVE area holds them in
    stack order (slot i = ST(i) = R((TOP + i) mod 8)). Every MMX instruction but EMMS sets TOP to 0 and tags all
    eight registers valid; a write also sets the register's exponent and sign (bits 79:64) to all ones."""

    def __init__(self, cpu: Cpu) -> None:
        self.area = cpu.xsave_area()
        bv = int.from_bytes(self.area[XSTATE_BV:XSTATE_BV + 8], "little")
        if not bv >> X87_BIT & 1:      # the x87 state is in its initial configuration, whatever the bytes say
            self.area[FCW:FCW + 2] = (0x037F).to_bytes(2, "little")
            self.area[FSW:24] = bytes(22)      # FSW, FTW, FOP, FIP, FDP; MXCSR (at 24) is SSE state
            self.area[ST_OFFSET:ST_OFFSET + 128] = bytes(128)
            self.area[XSTATE_BV:XSTATE_BV + 8] = (bv | 1 << X87_BIT).to_bytes(8, "little")
        self.fsw = int.from_bytes(self.area[FSW:FSW + 2], "little")

    def pending(self) -> bool:
        return bool(self.fsw & FSW_ES)

    def enter(self) -> None:
        """The MMX-mode transition: registers moved to their physical slots, TOP = 0, all tagged valid."""
        top = self.fsw >> 11 & 7
        slots = [bytes(self.area[ST_OFFSET + 16 * i:ST_OFFSET + 16 * i + 16]) for i in range(8)]
        for phys in range(8):
            off = ST_OFFSET + 16 * phys
            self.area[off:off + 16] = slots[(phys - top) & 7]
        self.fsw &= ~(7 << 11)
        self.area[FSW:FSW + 2] = self.fsw.to_bytes(2, "little")
        self.area[FTW] = 0xFF

    def read(self, reg: int) -> int:
        off = ST_OFFSET + 16 * reg
        return int.from_bytes(self.area[off:off + 8], "little")

    def write(self, reg: int, value: int) -> None:
        off = ST_OFFSET + 16 * reg
        self.area[off:off + 10] = (value & (2 ** 64 - 1)).to_bytes(8, "little") + b"\xff\xff"


def _mmx_move(op2: int, d: _Decoder, p: _Insn, m: _Mode, cpu: Cpu) -> None:
    """MOVD/MOVQ between an MMX register and a general register or memory (NP 0F 6E/7E with REX.W for 64
    bits; NP 0F 6F/7F: 64 bits, MMX register or memory). Faults in the SDM's order: #UD (LOCK, CR0.EM, no
    MMX), #NM (CR0.TS), #MF (a pending unmasked x87 exception), then the memory operand's."""
    regs = cpu.regs
    mr = _modrm(d, p, m, regs)
    if p.lock or cpu.sregs.cr0 & CR0_EM or not _has(cpu, MMX):
        raise _Raise(Fault(UD))
    if cpu.sregs.cr0 & CR0_TS:
        raise _Raise(Fault(NM))
    mmx = _Mmx(cpu)
    if mmx.pending():
        if not cpu.sregs.cr0 & CR0_NE:
            raise _Refuse()      # FERR#/IGNNE# external reporting: no such pin here
        raise _Raise(Fault(MF))
    mm = mr.reg & 7              # REX.R does not extend an MMX register number
    if op2 in (0x6E, 0x7E):
        size = 8 if p.rex & 8 else 4
    else:
        size = 8
    if mr.mod == 3:
        if op2 in (0x6E, 0x7E):
            gpr = GPR[mr.rm]
            if op2 == 0x6E:
                value = getattr(regs, gpr) & ((1 << (8 * size)) - 1)
                mmx.enter()
                mmx.write(mm, value)
            else:
                mmx.enter()
                setattr(regs, gpr, mmx.read(mm) & ((1 << (8 * size)) - 1))   # a 32-bit write zero-extends
            return
        src, dst = (mr.rm & 7, mm) if op2 == 0x6F else (mm, mr.rm & 7)
        mmx.enter()
        mmx.write(dst, mmx.read(src))
        return
    acc = _access(d, p, m, mr, cpu)
    if op2 in (0x6E, 0x6F):
        value = int.from_bytes(acc.read(size), "little")
        mmx.enter()
        mmx.write(mm, value)
    else:
        mmx.enter()
        acc.write((mmx.read(mm) & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
