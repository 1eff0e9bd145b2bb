"""KVM ioctl request numbers, computed with ioctl-opt from the sizes cffi reports."""
from __future__ import annotations

from ioctl_opt import IOC, IOC_NONE, IOC_READ, IOC_WRITE

from hvm.kvm._ffi import ffi

KVMIO = 0xAE


def _io(nr: int) -> int:
    return IOC(IOC_NONE, KVMIO, nr, 0)


def _ior(nr: int, ctype: str) -> int:
    return IOC(IOC_READ, KVMIO, nr, ffi.sizeof(ctype))


def _iow(nr: int, ctype: str) -> int:
    return IOC(IOC_WRITE, KVMIO, nr, ffi.sizeof(ctype))


def _iowr(nr: int, ctype: str) -> int:
    return IOC(IOC_READ | IOC_WRITE, KVMIO, nr, ffi.sizeof(ctype))


# system ioctls (on /dev/kvm)
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, "struct kvm_cpuid2")
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, "struct kvm_msr_list")
# vm ioctls
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, "unsigned long long")
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_GET_IRQCHIP = _iowr(0x62, "struct kvm_irqchip")
KVM_SET_IRQCHIP = _ior(0x63, "struct kvm_irqchip")
KVM_IRQ_LINE = _iow(0x61, "struct kvm_irq_level")
KVM_CREATE_PIT2 = _iow(0x77, "struct kvm_pit_config")
KVM_IOEVENTFD = _iow(0x79, "struct kvm_ioeventfd")
KVM_SET_BOOT_CPU_ID = _io(0x78)
KVM_GET_PIT2 = _ior(0x9F, "struct kvm_pit_state2")
KVM_SET_PIT2 = _iow(0xA0, "struct kvm_pit_state2")
KVM_SET_CLOCK = _iow(0x7B, "struct kvm_clock_data")
KVM_GET_CLOCK = _ior(0x7C, "struct kvm_clock_data")
# vcpu ioctls
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, "struct kvm_regs")
KVM_SET_REGS = _iow(0x82, "struct kvm_regs")
KVM_GET_SREGS = _ior(0x83, "struct kvm_sregs")
KVM_TRANSLATE = _iowr(0x85, "struct kvm_translation")
KVM_SET_SREGS = _iow(0x84, "struct kvm_sregs")
KVM_GET_MSRS = _iowr(0x88, "struct kvm_msrs")
KVM_SET_MSRS = _iow(0x89, "struct kvm_msrs")
KVM_GET_FPU = _ior(0x8C, "struct kvm_fpu")
KVM_SET_FPU = _iow(0x8D, "struct kvm_fpu")
KVM_GET_LAPIC = _ior(0x8E, "struct kvm_lapic_state")
KVM_SET_LAPIC = _iow(0x8F, "struct kvm_lapic_state")
KVM_SET_CPUID2 = _iow(0x90, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _ior(0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _iow(0x99, "struct kvm_mp_state")
KVM_GET_VCPU_EVENTS = _ior(0x9F, "struct kvm_vcpu_events")
KVM_SET_VCPU_EVENTS = _iow(0xA0, "struct kvm_vcpu_events")
KVM_GET_DEBUGREGS = _ior(0xA1, "struct kvm_debugregs")
KVM_SET_DEBUGREGS = _iow(0xA2, "struct kvm_debugregs")
KVM_GET_XSAVE = _ior(0xA4, "struct kvm_xsave")
KVM_SET_XSAVE = _iow(0xA5, "struct kvm_xsave")
KVM_GET_XCRS = _ior(0xA6, "struct kvm_xcrs")
KVM_SET_XCRS = _iow(0xA7, "struct kvm_xcrs")
KVM_GET_XSAVE2 = _ior(0xCF, "struct kvm_xsave")
# struct kvm_enable_cap (u32 cap, u32 flags, u64 args[4], u8 pad[64]) is not in the cdef: its size is fixed.
KVM_ENABLE_CAP_SIZE = 104
KVM_ENABLE_CAP = IOC(IOC_WRITE, KVMIO, 0xA3, KVM_ENABLE_CAP_SIZE)
# struct kvm_msr_filter: u32 flags, (pad), 16 x struct kvm_msr_filter_range {u32 flags, u32 nmsrs, u32 base,
# (pad), u8 *bitmap} = 8 + 16 * 24 bytes; packed by hand in Vm.set_msr_filter.
KVM_MSR_FILTER_SIZE = 8 + 16 * 24
KVM_X86_SET_MSR_FILTER = IOC(IOC_WRITE, KVMIO, 0xC6, KVM_MSR_FILTER_SIZE)

# For error messages: request number -> name.
NAMES = {v: k for k, v in dict(globals()).items() if k.startswith("KVM_") and isinstance(v, int) and k != "KVMIO"}
