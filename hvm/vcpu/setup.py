"""Applying a BootState and the per-vCPU CPUID a VMM owes to a KVM vCPU."""
from __future__ import annotations

from hvm.boot.state import BootState, Segment
from hvm.kvm import Vcpu

CPUID_HYPERVISOR_BIT = 1 << 31  # leaf 1 ECX: "running under a hypervisor"


def cpuid_for_vcpu(supported: list[dict[str, int]], index: int) -> list[dict[str, int]]:
    """KVM's supported CPUID with the fix-ups every VMM makes: this vCPU's APIC id in leaf 1 and
    leaf 0xB, and the hypervisor bit set."""
    entries = []
    for e in supported:
        e = dict(e)
        if e["function"] == 1:
            e["ebx"] = (e["ebx"] & 0x00FFFFFF) | (index << 24)
            e["ecx"] |= CPUID_HYPERVISOR_BIT
        elif e["function"] == 0xB:
            e["edx"] = index
        entries.append(e)
    return entries


def _set_segment(kseg, seg: Segment) -> None:
    kseg.base = seg.base
    kseg.limit = seg.limit
    kseg.selector = seg.selector
    kseg.type = seg.type
    kseg.present = seg.present
    kseg.dpl = seg.dpl
    kseg.db = seg.db
    kseg.s = seg.s
    kseg.l = seg.l
    kseg.g = seg.g
    kseg.unusable = 0


def apply_boot_state(vcpu: Vcpu, state: BootState) -> None:
    sregs = vcpu.get_sregs()
    _set_segment(sregs.cs, state.cs)
    for name in ("ds", "es", "fs", "gs", "ss"):
        _set_segment(getattr(sregs, name), state.data)
    sregs.gdt.base, sregs.gdt.limit = state.gdt
    sregs.idt.base, sregs.idt.limit = state.idt
    sregs.cr0 = state.cr0
    sregs.cr3 = state.cr3
    sregs.cr4 = state.cr4
    sregs.efer = state.efer
    vcpu.set_sregs(sregs)

    regs = vcpu.get_regs()
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"):
        setattr(regs, name, 0)
    for name, value in state.regs.items():
        setattr(regs, name, value)
    regs.rip = state.rip
    regs.rflags = state.rflags
    vcpu.set_regs(regs)

    # x87 and SSE control words at their reset values, as Firecracker and QEMU set them.
    fpu = vcpu.get_fpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)
