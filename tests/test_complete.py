"""hvm/vcpu/complete.py: decoding and architectural effects of the instructions hvm completes after an
emulation failure, on fake registers and memory (no KVM)."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from hvm.vcpu import complete as c
from hvm.vcpu.complete import Completion, Fault, SoftInterrupt, Trap, complete

GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
ALL = {c.MOVBE, c.XSAVE, c.SMAP, c.CLWB, c.CLFLUSHOPT, c.AVX, c.AVX2, c.MMX}


def seg(base=0, limit=0xFFFFFFFF, selector=0x10, db=1, l=0, type_=3, s=1, unusable=0):
    return SimpleNamespace(base=base, limit=limit, selector=selector, db=db, l=l, type=type_, s=s, dpl=selector & 3,
                           present=1, unusable=unusable)


@dataclass
class FakeCpu:
    """64-bit mode CPL0 by default; `pages` maps linear page -> physical page (others are not present)."""
    mode: str = "long"
    cpl: int = 0
    features: set = field(default_factory=lambda: set(ALL))
    xcrs: dict = field(default_factory=lambda: {0: 0x7})
    pages: dict = field(default_factory=dict)
    ram: dict = field(default_factory=dict)        # gpa -> byte
    mmio: list = field(default_factory=list)       # ("r"/"w", gpa, length, value)
    mmio_base: int = 0xFF000000

    def __post_init__(self):
        self.regs = SimpleNamespace(**{n: 0 for n in GPRS}, rip=0x1000, rflags=0x2)
        cs_sel = 0x08 | self.cpl
        if self.mode == "long":
            cs = seg(selector=cs_sel, db=0, l=1, type_=0xB)
            cr0, efer = 0x80000011, 0x500
        elif self.mode == "prot32":
            cs, cr0, efer = seg(selector=cs_sel, type_=0xB), 0x11, 0
        elif self.mode == "prot16":
            cs, cr0, efer = seg(selector=cs_sel, db=0, limit=0xFFFF, type_=0xB), 0x11, 0
        else:   # real
            cs, cr0, efer = seg(selector=0, db=0, limit=0xFFFF, type_=0xB), 0x10, 0
        self.sregs = SimpleNamespace(cs=cs, ds=seg(selector=0x10 | self.cpl), es=seg(), fs=seg(), gs=seg(),
                                     ss=seg(selector=0x10 | self.cpl), cr0=cr0, cr2=0, cr4=1 << 18, efer=efer,
                                     idt=SimpleNamespace(base=0x8000, limit=0xFFF),
                                     gdt=SimpleNamespace(base=0x9000, limit=0x3F),
                                     ldt=SimpleNamespace(base=0, limit=0, unusable=1))
        self.map(0, 0x100000)        # identity map the first MiB
        # GDT: 0x08 a present code segment (64-bit if long), 0x18 one not present, 0x20 a data segment
        code = 0x00AF9A000000FFFF if self.mode == "long" else 0x00CF9A000000FFFF
        for sel, desc in ((0x08, code), (0x18, code & ~(1 << 47)), (0x20, 0x00CF92000000FFFF)):
            self.poke(0x9000 + sel, desc.to_bytes(8, "little"))
        for vector in range(256):    # every IDT entry: an interrupt gate to 0x08:0x4000, DPL 0
            self.gate(vector)

    def gate(self, vector, sel=0x08, dpl=0, present=1, type_=0xE):
        lo = 0x4000 | sel << 16 | (type_ | dpl << 5 | present << 7) << 40
        size = 16 if self.mode == "long" else 8
        self.poke(0x8000 + vector * size, lo.to_bytes(8, "little") + bytes(size - 8))

    def map(self, linear: int, length: int, phys: int | None = None) -> None:
        phys = linear if phys is None else phys
        for off in range(0, length, 4096):
            self.pages[(linear + off) >> 12] = (phys + off) >> 12

    def translate(self, linear):
        page = self.pages.get(linear >> 12)
        return None if page is None else page << 12 | linear & 0xFFF

    def read_phys(self, gpa, length):
        if gpa >= self.mmio_base:
            self.mmio.append(("r", gpa, length, None))
            return bytes(range(0xA0, 0xA0 + length))
        return bytes(self.ram.get(gpa + i, 0) for i in range(length))

    def read_code(self, gpa, length):
        return None if gpa >= self.mmio_base else self.read_phys(gpa, length)

    def write_phys(self, gpa, data):
        if gpa >= self.mmio_base:
            self.mmio.append(("w", gpa, len(data), int.from_bytes(data, "little")))
            return
        for i, b in enumerate(data):
            self.ram[gpa + i] = b

    def has_feature(self, feature):
        return feature in self.features

    def xcr(self, index):
        return self.xcrs.get(index)

    def cpuid(self, leaf, sub):
        return {(0xD, 2): (256, 576, 0, 0), (0xD, 6): (512, 1152, 0, 0)}.get((leaf, sub))

    def xsave_area(self):
        if not hasattr(self, "area"):
            self.area = bytearray(4096)
        return self.area

    def mem(self, gpa, n):
        return bytes(self.ram.get(gpa + i, 0) for i in range(n))

    def poke(self, gpa, data):
        for i, b in enumerate(data):
            self.ram[gpa + i] = b


def run(cpu, hexbytes, fetch=None) -> Completion | None:
    return complete(bytes.fromhex(hexbytes), cpu, fetch)


# --- MOVBE -----------------------------------------------------------------------------------------------------
def test_movbe_64bit_store_swaps_and_advances_rip():
    cpu = FakeCpu()
    cpu.regs.rax, cpu.regs.rdi = 0x1122334455667788, 0x5000
    done = run(cpu, "48 0f 38 f1 07")                      # movbe %rax, (%rdi)
    assert done == Completion("movbe", True)
    assert cpu.mem(0x5000, 8) == bytes.fromhex("1122334455667788")
    assert int.from_bytes(cpu.mem(0x5000, 8), "little") == 0x8877665544332211
    assert cpu.regs.rip == 0x1005


def test_movbe_loads_32_zero_extends_and_16_keeps_upper_bits():
    cpu = FakeCpu()
    cpu.poke(0x5000, bytes.fromhex("1122334455667788"))
    cpu.regs.rdi, cpu.regs.rdx, cpu.regs.rsi = 0x5000, 2 ** 64 - 1, 2 ** 64 - 1
    assert run(cpu, "0f 38 f0 57 04").name == "movbe"      # movbe 4(%rdi), %edx
    assert cpu.regs.rdx == 0x55667788
    assert run(cpu, "66 0f 38 f0 37").name == "movbe"      # movbe (%rdi), %si
    assert cpu.regs.rsi == 0xFFFFFFFFFFFF1122
    assert run(cpu, "48 0f 38 f0 1f").name == "movbe"      # movbe (%rdi), %rbx
    assert cpu.regs.rbx == 0x1122334455667788
    assert cpu.regs.rip == 0x1000 + 5 + 5 + 5


def test_movbe_rex_extended_registers_and_sib():
    cpu = FakeCpu()
    cpu.poke(0x6000, bytes.fromhex("deadbeef"))
    cpu.regs.r9, cpu.regs.r10 = 0x6008, 2 ** 64 - 2        # r9 + r10*8 + 8 = 0x6000
    assert run(cpu, "47 0f 38 f0 5c d1 08").name == "movbe"   # movbe 8(%r9,%r10,8), %r11d
    assert cpu.regs.r11 == 0xDEADBEEF
    assert cpu.regs.rip == 0x1007


def test_movbe_rip_relative_counts_from_the_next_instruction():
    cpu = FakeCpu()
    cpu.regs.rax = 0x55667788
    cpu.regs.rip = 0x2000
    assert run(cpu, "0f 38 f1 05 f9 0f 00 00").name == "movbe"   # movbe %eax, 0xff9(%rip) -> 0x3001
    assert cpu.mem(0x3001, 4) == bytes.fromhex("55667788")
    assert cpu.regs.rip == 0x2008


def test_movbe_segment_override_fs_gs_in_64bit_and_ignored_ds():
    cpu = FakeCpu()
    cpu.sregs.gs.base = 0x7000
    cpu.sregs.ds.base = 0x9999999                           # ignored in 64-bit mode
    cpu.regs.rax, cpu.regs.rcx = 0x7788, 0x100
    assert run(cpu, "65 66 0f 38 f1 04 4d 00 0e 00 00").name == "movbe"   # movbe %ax, %gs:0xe00(,%rcx,2)
    assert cpu.mem(0x7000 + 0x1000, 2) == bytes.fromhex("7788")
    assert run(cpu, "3e 0f 38 f1 04 25 00 50 00 00").name == "movbe"       # movbe %eax, %ds:0x5000
    assert cpu.mem(0x5000, 4) == bytes.fromhex("00007788")


def test_movbe_disp8_negative_and_addr32():
    cpu = FakeCpu()
    cpu.regs.rbx = 0xFFFFFFFF00005010      # 67: the address is EBX - 0x10 truncated to 32 bits
    cpu.regs.rax = 0xAABBCCDD
    assert run(cpu, "67 0f 38 f1 43 f0").name == "movbe"     # movbe %eax, -0x10(%ebx)
    assert cpu.mem(0x5000, 4) == bytes.fromhex("aabbccdd")
    assert cpu.regs.rip == 0x1006


def test_movbe_32bit_protected_mode_segment_base_and_limit():
    cpu = FakeCpu(mode="prot32")
    cpu.sregs.ds.base = 0x4000
    cpu.regs.rax, cpu.regs.rbx = 0x01020304, 0x1000
    assert run(cpu, "0f 38 f1 03").name == "movbe"           # movbe %eax, (%ebx) -> ds.base + 0x1000
    assert cpu.mem(0x5000, 4) == bytes.fromhex("01020304")
    cpu.sregs.ds.limit = 0x1001                              # the dword crosses the limit: #GP(0)
    assert run(cpu, "0f 38 f1 03") == Completion("movbe #GP", False, Fault(c.GP, 0))
    cpu.regs.rbp = 0x1000                                    # EBP-based: SS, #SS(0) at its limit
    cpu.sregs.ss.limit = 0xFFF
    assert run(cpu, "0f 38 f1 45 00").event == Fault(c.SS, 0)


def test_movbe_16bit_addressing_forms():
    cpu = FakeCpu(mode="prot16")
    cpu.regs.rbx, cpu.regs.rsi, cpu.regs.rax = 0x5000, 0x0010, 0x1234
    assert run(cpu, "0f 38 f1 00").name == "movbe"           # movbe %ax, (%bx,%si)  (16-bit operand default)
    assert cpu.mem(0x5010, 2) == bytes.fromhex("1234")
    assert run(cpu, "66 0f 38 f1 06 00 52").name == "movbe"  # movbe %eax, 0x5200 (disp16)
    assert cpu.mem(0x5200, 4) == bytes.fromhex("00001234")
    assert cpu.regs.rip == 0x1000 + 4 + 7


def test_movbe_to_mmio_goes_to_the_bus():
    cpu = FakeCpu()
    cpu.map(0xFF000000, 0x1000)
    cpu.regs.rdi, cpu.regs.rax = 0xFF000000, 0x1122334455667788
    assert run(cpu, "48 0f 38 f1 07").name == "movbe"
    assert cpu.mmio == [("w", 0xFF000000, 8, 0x8877665544332211)]
    assert run(cpu, "0f 38 f0 07").name == "movbe"          # load: bytes a0 a1 a2 a3 reversed
    assert cpu.regs.rax == 0xA0A1A2A3


def test_movbe_page_fault_has_cr2_and_error_code_and_leaves_state():
    cpu = FakeCpu()
    cpu.regs.rdi, cpu.regs.rax = 0x700000000000, 5
    assert run(cpu, "0f 38 f1 47 10") == Completion("movbe #PF", False, Fault(c.PF, 2, 0x700000000010))
    assert run(cpu, "0f 38 f0 47 10").event == Fault(c.PF, 0, 0x700000000010)
    assert cpu.regs.rip == 0x1000 and cpu.regs.rax == 5
    user = FakeCpu(cpl=3)
    user.regs.rdi = 0x700000000000
    assert run(user, "0f 38 f0 07").event == Fault(c.PF, 4, 0x700000000000)


def test_movbe_across_a_page_boundary_checks_both_pages_before_storing():
    cpu = FakeCpu()
    cpu.regs.rdi, cpu.regs.rax = 0xFFFFE, 0x11223344          # the second page (0x100000) is not mapped
    assert run(cpu, "0f 38 f1 07").event == Fault(c.PF, 2, 0x100000)
    assert cpu.mem(0xFFFFE, 2) == b"\0\0"                     # nothing stored
    cpu.map(0x100000, 0x1000, phys=0x200000)
    assert run(cpu, "0f 38 f1 07").name == "movbe"
    assert cpu.mem(0xFFFFE, 2) == bytes.fromhex("1122") and cpu.mem(0x200000, 2) == bytes.fromhex("3344")


def test_movbe_noncanonical_address_is_gp_or_ss():
    cpu = FakeCpu()
    cpu.regs.rdi = 0x0000800000000000
    assert run(cpu, "0f 38 f0 07").event == Fault(c.GP, 0)
    cpu.regs.rsp = 0x0000800000000000
    assert run(cpu, "0f 38 f0 04 24").event == Fault(c.SS, 0)   # movbe (%rsp), %eax


def test_movbe_ud_forms():
    cpu = FakeCpu()
    assert run(cpu, "0f 38 f0 c0") == Completion("movbe #UD", False, Fault(c.UD))     # register operand
    assert run(cpu, "f0 0f 38 f0 07").event == Fault(c.UD)                          # LOCK
    cpu.features.discard(c.MOVBE)
    assert run(cpu, "0f 38 f0 07").event == Fault(c.UD)                             # CPUID without MOVBE
    assert cpu.regs.rip == 0x1000


def test_crc32_and_unknown_encodings_are_refused():
    cpu = FakeCpu()
    assert run(cpu, "f2 0f 38 f0 07") is None             # CRC32, not MOVBE
    assert run(cpu, "0f 38 00 c0") is None                 # PSHUFB
    assert run(cpu, "0f 0b") is None                       # UD2
    assert run(cpu, "90") is None
    assert run(cpu, "") is None
    assert cpu.regs.rip == 0x1000


def test_short_bytes_are_fetched_from_guest_memory():
    cpu = FakeCpu()
    cpu.regs.rax, cpu.regs.rdi = 0x11223344, 0x5000
    full = bytes.fromhex("0f 38 f1 47 10")
    assert complete(full[:3], cpu) is None                 # no fetch: not enough bytes -> refused
    assert complete(full[:3], cpu, lambda: full).name == "movbe"
    assert cpu.mem(0x5010, 4) == bytes.fromhex("11223344")
    cpu.poke(0x1005, full)                                 # fetch_bytes reads CS:RIP through the page tables
    assert c.fetch_bytes(cpu, full[:2])[:5] == full
    cpu.map(0x2000, 0x1000, phys=0xFF000000)               # code in MMIO: never read (no device access)
    cpu.regs.rip = 0x2000
    assert c.fetch_bytes(cpu, full[:2]) == full[:2] and cpu.mmio == []


def test_too_many_prefixes_is_gp():
    cpu = FakeCpu()
    assert run(cpu, "66" * 15 + "0f 01 ca").event == Fault(c.GP, 0)
    assert run(cpu, "66" * 12 + "0f 38 f1 07") == Completion("movbe #GP", False, Fault(c.GP, 0))   # 16 bytes


def test_rex_before_a_legacy_prefix_is_void():
    cpu = FakeCpu()
    cpu.regs.rax, cpu.regs.rdi = 0x1122334455667788, 0x5000
    assert run(cpu, "48 66 0f 38 f1 07").name == "movbe"   # REX.W voided by the 66 after it: 16-bit store
    assert cpu.mem(0x5000, 8) == bytes.fromhex("7788000000000000")


# --- CLAC / STAC -------------------------------------------------------------------------------------------------
def test_stac_sets_and_clac_clears_ac():
    cpu = FakeCpu()
    assert run(cpu, "0f 01 cb") == Completion("stac", True)
    assert cpu.regs.rflags == 0x2 | c.RFLAGS_AC and cpu.regs.rip == 0x1003
    assert run(cpu, "0f 01 ca") == Completion("clac", True)
    assert cpu.regs.rflags == 0x2 and cpu.regs.rip == 0x1006


@pytest.mark.parametrize("cpu", [FakeCpu(cpl=3), FakeCpu(features=set())], ids=["cpl3", "no-smap"])
def test_clac_ud_at_cpl3_or_without_smap(cpu):
    assert run(cpu, "0f 01 ca") == Completion("clac #UD", False, Fault(c.UD))
    assert run(cpu, "0f 01 cb").event == Fault(c.UD)
    assert cpu.regs.rip == 0x1000 and cpu.regs.rflags == 0x2


def test_clac_in_real_mode_and_32bit_rip_wraps():
    cpu = FakeCpu(mode="real")
    cpu.regs.rip = 0xFFFE
    cpu.regs.rflags |= c.RFLAGS_AC
    assert run(cpu, "0f 01 ca").name == "clac"
    assert cpu.regs.rip == 0x0001 and not cpu.regs.rflags & c.RFLAGS_AC


# --- XGETBV ------------------------------------------------------------------------------------------------------
def test_xgetbv_reads_xcr0():
    cpu = FakeCpu(xcrs={0: 0x2_0000_0007})
    cpu.regs.rax = cpu.regs.rdx = 2 ** 64 - 1
    assert run(cpu, "0f 01 d0") == Completion("xgetbv", True)
    assert (cpu.regs.rax, cpu.regs.rdx, cpu.regs.rip) == (7, 2, 0x1003)


def test_xgetbv_faults():
    cpu = FakeCpu()
    cpu.regs.rcx = 5
    assert run(cpu, "0f 01 d0") == Completion("xgetbv #GP", False, Fault(c.GP, 0))
    cpu.regs.rcx = 1                                       # XCR1 only with CPUID.(0xD,1):EAX[2]
    assert run(cpu, "0f 01 d0").event == Fault(c.GP, 0)
    cpu.features.add(c.XGETBV_ECX1)
    assert run(cpu, "0f 01 d0").name == "xgetbv"
    cpu.regs.rcx = 0x1_0000_0000                           # only ECX counts
    assert run(cpu, "0f 01 d0").name == "xgetbv"
    cpu.sregs.cr4 = 0                                      # CR4.OSXSAVE clear
    assert run(cpu, "0f 01 d0").event == Fault(c.UD)


# --- RDPRU -------------------------------------------------------------------------------------------------------
def test_rdpru_ud_without_cpuid_and_refused_with_it():
    cpu = FakeCpu()
    assert run(cpu, "0f 01 fd") == Completion("rdpru #UD", False, Fault(c.UD))
    cpu.features.add(c.RDPRU)
    assert run(cpu, "0f 01 fd") is None


# --- INVPCID -----------------------------------------------------------------------------------------------------
def test_invpcid_ud_without_cpuid_and_refused_with_it():
    """kvm-unit-tests pcid-disabled: INVPCID with no INVPCID in CPUID raises #UD (the backend cannot emulate it)."""
    cpu = FakeCpu()
    cpu.regs.rax = 0x5000
    assert run(cpu, "66 0f 38 82 18") == Completion("invpcid #UD", False, Fault(c.UD))   # invpcid (%rax),%rbx
    assert cpu.regs.rip == 0x1000                           # a fault: RIP stays at the instruction
    assert run(cpu, "66 0f 38 82 d8") == Completion("invpcid #UD", False, Fault(c.UD))   # register form
    cpu.features.add(c.INVPCID)
    assert run(cpu, "66 0f 38 82 18") is None                # the invalidation itself is not hvm's: refused
    assert run(cpu, "0f 38 82 18") is None                   # no 66 prefix: not INVPCID


# --- CLWB / CLFLUSHOPT -------------------------------------------------------------------------------------------
def test_clwb_checks_its_operand_only():
    cpu = FakeCpu()
    cpu.regs.rdi = 0x5000
    before = dict(cpu.ram)
    assert run(cpu, "66 0f ae 77 08") == Completion("clwb", True)         # clwb 8(%rdi)
    assert cpu.regs.rip == 0x1005 and cpu.ram == before
    assert run(cpu, "66 0f ae 3f") == Completion("clflushopt", True)      # clflushopt (%rdi)
    cpu.regs.rdi = 0x700000000000
    assert run(cpu, "66 0f ae 37") == Completion("clwb #PF", False, Fault(c.PF, 0, 0x700000000000))
    cpu.features.discard(c.CLWB)
    assert run(cpu, "66 0f ae 37").event == Fault(c.UD)
    assert run(cpu, "66 0f ae f0") is None                 # register form (TPAUSE): not CLWB
    assert run(cpu, "0f ae 37") is None                    # no 66: XSAVEOPT


# --- INT3 / FWAIT / INT n ----------------------------------------------------------------------------------------
def test_int3_fwait_int_n():
    cpu = FakeCpu()
    assert run(cpu, "cc") == Completion("int3", True, Trap(c.BP)) and cpu.regs.rip == 0x1001
    assert run(cpu, "9b") == Completion("fwait", True) and cpu.regs.rip == 0x1002
    assert run(cpu, "cd 80") == Completion("int", True, SoftInterrupt(0x80)) and cpu.regs.rip == 0x1004
    assert run(cpu, "cd") is None                          # no vector byte
    real = FakeCpu(mode="real")
    assert run(real, "cd 10") is None                      # real mode: KVM's emulator does it
    prot = FakeCpu(mode="prot32")
    assert run(prot, "cd 21") == Completion("int", True, SoftInterrupt(0x21)) and prot.regs.rip == 0x1002


@pytest.mark.parametrize("mode", ["long", "prot32"])
def test_int_n_delivery_checks(mode):
    cpu = FakeCpu(mode=mode)
    cpu.gate(0x21, present=0)
    assert run(cpu, "cd 21") == Completion("int #NP", False, Fault(11, 0x21 * 8 + 2))    # gate not present
    cpu.gate(0x21, sel=0x18)
    assert run(cpu, "cd 21").event == Fault(11, 0x18)                                   # code segment not present
    cpu.gate(0x21, sel=0x20)
    assert run(cpu, "cd 21").event == Fault(c.GP, 0x20)                                 # not a code segment
    cpu.gate(0x21, sel=0x40)
    assert run(cpu, "cd 21").event == Fault(c.GP, 0x40)                                 # beyond the GDT limit
    cpu.gate(0x21, sel=0x3)
    assert run(cpu, "cd 21").event == Fault(c.GP, 0)                                    # null selector
    cpu.gate(0x21, type_=0x2)
    assert run(cpu, "cd 21").event == Fault(c.GP, 0x21 * 8 + 2)                        # not a gate
    cpu.sregs.idt.limit = 0x21 * (16 if mode == "long" else 8)
    assert run(cpu, "cd 21").event == Fault(c.GP, 0x21 * 8 + 2)                         # beyond the IDT limit
    cpu.sregs.idt.limit = 0xFFF
    cpu.pages.pop(0x8000 >> 12)
    assert run(cpu, "cd 21").event == Fault(c.PF, 0, 0x8000 + 0x21 * (16 if mode == "long" else 8))
    assert cpu.regs.rip == 0x1000
    user = FakeCpu(mode=mode, cpl=3)
    assert run(user, "cd 80").event == Fault(c.GP, 0x80 * 8 + 2)                       # gate DPL 0 < CPL 3
    user.gate(0x80, dpl=3)
    assert run(user, "cd 80") == Completion("int", True, SoftInterrupt(0x80))


def test_hostile_bytes_never_raise():
    # Random instruction streams: complete() returns a Completion or None and never raises.
    import random
    rnd = random.Random(14)
    for _ in range(3000):
        cpu = FakeCpu(mode=rnd.choice(["long", "prot32", "prot16", "real"]))
        for n in GPRS:
            setattr(cpu.regs, n, rnd.getrandbits(64))
        count = rnd.choice([0, 1, 3, 12, 14])
        prefix = bytes(rnd.choice([0x66, 0x67, 0xF0, 0xF3, 0x2E, 0x65, 0x48, 0x4F]) for _ in range(count))
        body = rnd.choice([b"\x0f\x38\xf0", b"\x0f\x38\xf1", b"\x0f\x01", b"\x66\x0f\xae", b"\xcd", b"\xc5", b"\xc4"])
        data = prefix + body + bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 12)))
        result = complete(data, cpu, lambda: data + bytes(20))
        assert result is None or isinstance(result, Completion)


# --- AVX moves through the XSAVE area ----------------------------------------------------------------------------
Y0 = bytes(range(1, 33))


def avx_cpu(**kw):
    cpu = FakeCpu(xcrs={0: 0xE7}, **kw)
    cpu.xsave_area()
    return cpu


def ymm(cpu, i):
    a = cpu.area
    bv = int.from_bytes(a[512:520], "little")
    low = bytes(a[160 + 16 * i:176 + 16 * i]) if bv & 2 else bytes(16)
    high = bytes(a[576 + 16 * i:592 + 16 * i]) if bv & 4 else bytes(16)
    return low + high


def test_vmovdqa_load_reg_reg_store_and_vmovntdq():
    cpu = avx_cpu()
    cpu.poke(0x5000, Y0)
    cpu.regs.rdi = 0x5000
    done = run(cpu, "c5 fd 6f 07")                          # vmovdqa (%rdi), %ymm0
    assert done == Completion("vmovdqa", True, None, True)
    assert ymm(cpu, 0) == Y0 and int.from_bytes(cpu.area[512:520], "little") == 6   # SSE|YMM now in use
    assert run(cpu, "c5 7d 6f f8").name == "vmovdqa"        # vmovdqa %ymm0, %ymm15
    assert ymm(cpu, 15) == Y0
    assert run(cpu, "c5 7d e7 7f 20").name == "vmovntdq"    # vmovntdq %ymm15, 0x20(%rdi)
    assert cpu.mem(0x5020, 32) == Y0
    assert run(cpu, "c5 f9 7f 47 40").name == "vmovdqa"     # vmovdqa %xmm0, 0x40(%rdi): 16 bytes
    assert cpu.mem(0x5040, 32) == Y0[:16] + bytes(16)
    assert cpu.regs.rip == 0x1000 + 4 + 4 + 5 + 5


def test_vex128_load_zeroes_the_upper_half_and_vmovntdqa():
    cpu = avx_cpu()
    cpu.poke(0x5000, Y0)
    cpu.regs.rdi = 0x5000
    assert run(cpu, "c4 e2 7d 2a 0f").name == "vmovntdqa"  # vmovntdqa (%rdi), %ymm1
    assert ymm(cpu, 1) == Y0
    assert run(cpu, "c5 f9 6f 4f 10").name == "vmovdqa"     # vmovdqa 0x10(%rdi), %xmm1
    assert ymm(cpu, 1) == Y0[16:] + bytes(16)


def test_vzeroall_and_vzeroupper():
    cpu = avx_cpu()
    cpu.poke(0x5000, Y0)
    cpu.regs.rdi = 0x5000
    run(cpu, "c5 fd 6f 07")
    run(cpu, "c5 7d 6f f8")
    assert run(cpu, "c5 f8 77") == Completion("vzeroupper", True, None, True)
    assert ymm(cpu, 0) == Y0[:16] + bytes(16) and ymm(cpu, 15) == Y0[:16] + bytes(16)
    assert run(cpu, "c5 fc 77").name == "vzeroall"
    assert ymm(cpu, 0) == bytes(32) and ymm(cpu, 15) == bytes(32)


def test_avx_faults():
    cpu = avx_cpu()
    cpu.regs.rdi = 0x5010
    assert run(cpu, "c5 fd 6f 07") == Completion("vmovdqa #GP", False, Fault(c.GP, 0))   # not 32-byte aligned
    cpu.regs.rdi = 0x5000
    assert run(cpu, "c5 fd e7 c0").event == Fault(c.UD)     # vmovntdq with a register operand
    assert run(cpu, "c5 f5 6f 07").event == Fault(c.UD)     # VEX.vvvv names a register
    assert run(cpu, "66 c5 fd 6f 07").event == Fault(c.UD)  # legacy 66 before VEX
    assert run(cpu, "40 c5 fd 6f 07").event == Fault(c.UD)  # REX before VEX
    cpu.xcrs[0] = 3                                         # YMM state not enabled
    assert run(cpu, "c5 fd 6f 07").event == Fault(c.UD)
    cpu.xcrs[0] = 7
    cpu.sregs.cr0 |= c.CR0_TS
    assert run(cpu, "c5 fd 6f 07").event == Fault(c.NM)
    cpu.sregs.cr0 &= ~c.CR0_TS
    cpu.features.discard(c.AVX2)
    assert run(cpu, "c4 e2 7d 2a 0f").event == Fault(c.UD)  # VEX.256 VMOVNTDQA is AVX2
    assert cpu.regs.rip == 0x1000 and bytes(cpu.area) == bytes(4096)
    assert run(cpu, "c5 fd 58 c0") is None                  # vaddpd: not completed
    legacy = FakeCpu(mode="prot32")
    assert run(legacy, "c5 07") is None                     # LDS in 32-bit mode


class U64Cpu(FakeCpu):
    """KVM_TRANSLATE takes a __u64: cffi raises OverflowError for a linear address of 2**64 or more."""

    def translate(self, linear):
        if not 0 <= linear < 2 ** 64:
            raise OverflowError("int too big to convert")
        return super().translate(linear)


def test_int_n_idt_at_the_top_of_the_address_space_wraps():
    # A guest IDT whose base is near 2**64 (canonical, LIDT takes it): the gate's address wraps to 0x400 as on
    # the CPU, never a linear address of 2**64 or more handed to KVM_TRANSLATE (an exception in the vCPU thread).
    cpu = U64Cpu()
    cpu.sregs.idt.base = 2 ** 64 - 0x400
    cpu.map(2 ** 64 - 0x1000, 0x1000, 0x20000)
    assert run(cpu, "cd 80").event == Fault(c.GP, 0x80 * 8 + 2)     # the wrapped gate at 0x400 is zero: invalid
    prot = U64Cpu(mode="prot32")
    prot.sregs.idt.base = 0xFFFFFC00                                 # 32-bit linear addresses wrap at 4 GiB
    prot.gate(0x80)                                                  # at 0x8400; the wrapped one (0x0) is zero
    assert run(prot, "cd 80").event == Fault(c.GP, 0x80 * 8 + 2)


def test_fetch_bytes_at_the_top_of_the_address_space_wraps():
    cpu = U64Cpu()
    cpu.regs.rip = 2 ** 64 - 2
    cpu.map(2 ** 64 - 0x1000, 0x1000, 0x20000)
    cpu.poke(0x20FFE, b"\x0f\x38")
    cpu.poke(0, b"\xf1\x07")
    assert c.fetch_bytes(cpu, b"\x0f")[:4] == b"\x0f\x38\xf1\x07"
    prot = U64Cpu(mode="prot32")
    prot.regs.rip = 0xFFFFFFFE
    prot.map(0xFFFFF000, 0x1000, 0x20000)
    prot.poke(0x20FFE, b"\x0f\x38")
    prot.poke(0, b"\xf1\x07")
    assert c.fetch_bytes(prot, b"\x0f")[:4] == b"\x0f\x38\xf1\x07"


# --- MMX moves (x87 registers in the XSAVE area's legacy region) ----------------------------------------------------
def st_slot(cpu, i):
    return bytes(cpu.area[32 + 16 * i:32 + 16 * i + 10])


def test_movq_mm_from_gpr_then_store_to_mmio_from_initial_x87_state():
    cpu = FakeCpu()
    cpu.xsave_area()[0:32] = bytes(range(1, 33))      # garbage: XSTATE_BV.x87 clear, so the initial state counts
    cpu.area[24:28] = (0x1F80).to_bytes(4, "little")  # MXCSR is SSE state: kept
    cpu.regs.rax = 0x0102030405060708
    assert run(cpu, "48 0f 6e c0") == Completion("movd/q mm,r/m", True, None, True)    # movq %rax, %mm0
    assert st_slot(cpu, 0) == bytes.fromhex("0807060504030201ffff")
    assert int.from_bytes(cpu.area[0:2], "little") == 0x037F                     # FCW: initial
    assert cpu.area[4] == 0xFF and int.from_bytes(cpu.area[2:4], "little") == 0   # all valid, TOP 0
    assert int.from_bytes(cpu.area[24:28], "little") == 0x1F80
    assert int.from_bytes(cpu.area[512:520], "little") & 1
    cpu.map(0xFFFFFFFFFFFFA000, 0x2000, 0xFF000000)
    cpu.regs.r12 = 0xFFFFFFFFFFFFA000
    done = run(cpu, "41 0f 7f 84 24 00 10 00 00")       # movq %mm0, 0x1000(%r12): an MMIO store
    assert done == Completion("movq mm/m,mm", True, None, True)
    assert cpu.mmio == [("w", 0xFF001000, 8, 0x0102030405060708)]
    assert cpu.regs.rip == 0x1000 + 4 + 9


def test_mmx_load_movd_and_register_forms():
    cpu = FakeCpu()
    cpu.poke(0x5000, (0x8070605040302010).to_bytes(8, "little"))
    cpu.regs.rdi = 0x5000
    assert run(cpu, "0f 6f 0f").name == "movq mm,mm/m"               # movq (%rdi), %mm1
    assert run(cpu, "48 0f 7e c8").name == "movd/q r/m,mm"        # movq %mm1, %rax
    assert cpu.regs.rax == 0x8070605040302010
    cpu.regs.rbx = 0xFFFFFFFFFFFFFFFF
    assert run(cpu, "0f 7e cb").name == "movd/q r/m,mm"           # movd %mm1, %ebx: zero-extends
    assert cpu.regs.rbx == 0x40302010
    cpu.regs.rcx = 0xAAAABBBBCCCCDDDD
    run(cpu, "0f 6e d1")                                        # movd %ecx, %mm2: upper half 0
    assert st_slot(cpu, 2)[:8] == (0xCCCCDDDD).to_bytes(8, "little")
    run(cpu, "0f 6f da")                                        # movq %mm2, %mm3
    run(cpu, "0f 7f 5f 08")                                     # movq %mm3, 8(%rdi)
    assert cpu.mem(0x5008, 8) == (0xCCCCDDDD).to_bytes(8, "little")
    run(cpu, "0f 7e 4f 10")                                     # movd %mm1, 0x10(%rdi): 4 bytes
    assert cpu.mem(0x5010, 8) == (0x40302010).to_bytes(4, "little") + bytes(4)


def test_mmx_registers_are_physical_registers_and_top_becomes_0():
    cpu = FakeCpu()
    area = cpu.xsave_area()
    area[512] = 1                                       # x87 state in use
    area[2:4] = (3 << 11).to_bytes(2, "little")         # TOP = 3: slot i holds ST(i) = R((3 + i) mod 8)
    for i in range(8):
        area[32 + 16 * i:32 + 16 * i + 10] = bytes([0x10 + i] * 8) + b"\x00\x40"
    assert run(cpu, "48 0f 7e c0").name == "movd/q r/m,mm"        # movq %mm0, %rax: R0 was slot 5
    assert cpu.regs.rax == 0x1515151515151515
    assert int.from_bytes(area[2:4], "little") >> 11 & 7 == 0 and area[4] == 0xFF
    assert [st_slot(cpu, r)[0] for r in range(8)] == [0x15, 0x16, 0x17, 0x10, 0x11, 0x12, 0x13, 0x14]
    assert st_slot(cpu, 3)[8:] == b"\x00\x40"                   # a read leaves the exponent as it was


def test_mmx_faults():
    cpu = FakeCpu()
    cpu.regs.rdi = 0x5000
    cpu.sregs.cr0 |= c.CR0_EM
    assert run(cpu, "0f 6f 07") == Completion("movq mm,mm/m #UD", False, Fault(c.UD))
    cpu.sregs.cr0 &= ~c.CR0_EM
    assert run(cpu, "f0 0f 6f 07").event == Fault(c.UD)         # LOCK
    cpu.sregs.cr0 |= c.CR0_TS
    assert run(cpu, "0f 6f 07").event == Fault(c.NM)
    cpu.sregs.cr0 &= ~c.CR0_TS
    cpu.xsave_area()[512] = 1
    cpu.area[2:4] = (0x80 | 0x04).to_bytes(2, "little")         # ES|ZE: an unmasked divide-by-zero pending
    cpu.sregs.cr0 |= c.CR0_NE
    assert run(cpu, "0f 7f 07") == Completion("movq mm/m,mm #MF", False, Fault(c.MF))
    cpu.area[2:4] = bytes(2)
    assert run(cpu, "0f 7f 87 00 00 f0 00").event == Fault(c.PF, 2, 0xF05000)   # store to an unmapped page
    assert cpu.regs.rip == 0x1000
    cpu.features.discard(c.MMX)
    assert run(cpu, "0f 6f 07").event == Fault(c.UD)
    assert run(cpu, "66 0f 6f 07") is None                      # movdqa (SSE2): not an MMX move


def test_fnstsw_ax_reads_the_status_word():
    cpu = FakeCpu()
    cpu.regs.rax = 0x1234567890ABCDEF
    assert run(cpu, "df e0") == Completion("fnstsw", True)          # initial x87 state: FSW 0
    assert cpu.regs.rax == 0x1234567890AB0000 and cpu.regs.rip == 0x1002
    cpu.area[512] = 1
    cpu.area[2:4] = (0x3884).to_bytes(2, "little")                   # TOP 7, ES, ZE: still no #MF (no-wait form)
    run(cpu, "df e0")
    assert cpu.regs.rax & 0xFFFF == 0x3884
    cpu.sregs.cr0 |= c.CR0_TS
    assert run(cpu, "df e0") == Completion("fnstsw #NM", False, Fault(c.NM))


# --- a fault whose delivery page-faults (the frame's stack not writable) becomes that #PF --------------------------
def test_page_writable_walks_four_levels():
    mem = {}

    def put(addr, value):
        mem[addr] = value.to_bytes(8, "little")

    put(0x1000, 0x2000 | 3)              # PML4[0]
    put(0x2000, 0x3000 | 3)              # PDPT[0]
    put(0x3000, 0x4000 | 3)              # PD[0] -> page table
    put(0x3008, 0x200000 | 0x83)         # PD[1]: a writable 2 MiB page
    put(0x3010, 0x400000 | 0x81)         # PD[2]: a read-only 2 MiB page
    put(0x4000 + 5 * 8, 0x5000 | 1)      # read-only 4 KiB page
    put(0x4000 + 6 * 8, 0x6000 | 3)
    read = lambda gpa, n: mem.get(gpa, bytes(8))   # noqa: E731
    assert c.page_writable(read, 0x1000, 0x5123) is False
    assert c.page_writable(read, 0x1000, 0x6FFF) is True
    assert c.page_writable(read, 0x1000, 0x7000) is None
    assert c.page_writable(read, 0x1000, 0x3FFFFF) is True
    assert c.page_writable(read, 0x1000, 0x400000) is False
    assert c.page_writable(read, 0x1000, 1 << 39) is None


@dataclass
class PagedCpu(FakeCpu):
    readonly: set = field(default_factory=set)     # linear pages mapped read-only

    def writable(self, linear):
        if self.translate(linear) is None:
            return None
        return linear >> 12 not in self.readonly


def test_np_delivered_onto_a_read_only_stack_becomes_a_page_fault():
    cpu = PagedCpu()
    cpu.sregs.cr0 |= c.CR0_WP
    cpu.sregs.tr = SimpleNamespace(base=0xA000)
    cpu.gate(0x21, present=0)
    cpu.regs.rsp = 0x7FFF                  # the frame goes below 0x7FF0, all on page 7
    cpu.readonly.add(7)
    done = run(cpu, "cd 21")
    assert done == Completion("int #NP -> #PF", False, Fault(c.PF, 3, 0x7FE8))
    assert cpu.regs.rip == 0x1000          # the #PF handler returns to the INT, which faults again
    cpu.sregs.cr0 &= ~c.CR0_WP             # without CR0.WP a supervisor write ignores R/W
    assert run(cpu, "cd 21").event == Fault(c.NP, 0x21 * 8 + 2)
    cpu.sregs.cr0 |= c.CR0_WP
    cpu.regs.rsp = 0x8010                  # the frame straddles: 0x8008 is fine, page 7 is not
    assert run(cpu, "cd 21").event == Fault(c.PF, 3, 0x7FF8)
    cpu.regs.rsp = 0x200010                # outside the identity-mapped MiB: not present
    assert run(cpu, "cd 21").event == Fault(c.PF, 2, 0x200008)


def test_np_through_an_ist_gate_uses_the_ist_stack():
    cpu = PagedCpu()
    cpu.sregs.cr0 |= c.CR0_WP
    cpu.sregs.tr = SimpleNamespace(base=0xA000)
    cpu.poke(0xA024, (0x9000).to_bytes(8, "little"))     # TSS IST1
    cpu.gate(0x21, present=0)
    lo = int.from_bytes(bytes(cpu.mem(0x8000 + 11 * 16, 8)), "little") | 1 << 32   # #NP's gate: IST 1
    cpu.poke(0x8000 + 11 * 16, lo.to_bytes(8, "little"))
    cpu.regs.rsp = 0x7FFF
    cpu.readonly.add(7)
    assert run(cpu, "cd 21") == Completion("int #NP", False, Fault(c.NP, 0x21 * 8 + 2))
    cpu.readonly.add(8)                    # the IST stack itself read-only
    assert run(cpu, "cd 21").event == Fault(c.PF, 3, 0x8FF8)
