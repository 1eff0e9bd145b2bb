"""Applying a BootState and the per-vCPU CPUID a VMM owes to a KVM vCPU."""
from __future__ import annotations

from hvm.boot.state import BootState, Segment
from hvm.kvm import Vcpu

CPUID_HYPERVISOR_BIT = 1 << 31  # leaf 1 ECX: "running under a hypervisor"


def cpuid_for_vcpu(supported: list[dict[str, int]], index: int) -> list[dict[str, int]]:
    """KVM's supported CPUID with the fix-ups every VMM makes: this vCPU's APIC id in leaf 1, leaf 0xB and
    (AMD) leaf 0x8000001E, and the hypervisor bit set."""
    entries = []
    for e in supported:
        e = dict(e)
        if e["function"] == 1:
            e["ebx"] = (e["ebx"] & 0x00FFFFFF) | (index << 24)
            e["ecx"] |= CPUID_HYPERVISOR_BIT
        elif e["function"] == 0xB:
            e["edx"] = index
        elif e["function"] == 0x8000001E:
            # AMD's extended APIC id (and core id: one thread per core), which Linux reads on AMD hosts;
            # left at 0, every secondary CPU logs "[Firmware Bug]: CPU n: APIC ID mismatch".
            e["eax"] = index
            e["ebx"] = (e["ebx"] & ~0xFF) | (index & 0xFF)
        entries.append(e)
    return entries


# MSRs every VMM initialises before the first entry (the set Firecracker and QEMU write).
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_TSC = 0x10
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MISC_ENABLE_FAST_STRING = 1
MTRR_ENABLE_WB_DEFAULT = (1 << 11) | 6

BOOT_MSRS = {
    MSR_IA32_SYSENTER_CS: 0, MSR_IA32_SYSENTER_ESP: 0, MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0, MSR_CSTAR: 0, MSR_KERNEL_GS_BASE: 0, MSR_SYSCALL_MASK: 0, MSR_LSTAR: 0,
    MSR_IA32_TSC: 0, MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING, MSR_MTRR_DEF_TYPE: MTRR_ENABLE_WB_DEFAULT,
}


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

    vcpu.set_msrs(BOOT_MSRS)

    # x87 and SSE control words at their reset values, as Firecracker and QEMU set them.
    fpu = vcpu.get_fpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)
