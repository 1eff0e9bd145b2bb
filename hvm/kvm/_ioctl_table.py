"""The KVM ioctl requests hvm uses, as (direction, number, argument type or size), and their numbers computed
with ioctl-opt's IOC() from those sizes.

Plain data and one function, no import of hvm: `_build.py` loads this file at install time and compiles
the numbers into the cffi module (each checked against <linux/kvm.h> by the C compiler), so `hvm run`
neither imports ioctl-opt (and with it ctypes) nor computes ~50 numbers at every start; `ioctls.py`
computes them here at import when the compiled module has none (a source tree never built, or a module
built before this table existed)."""
from __future__ import annotations

KVMIO = 0xAE
# struct kvm_enable_cap (u32 cap, u32 flags, u64 args[4], u8 pad[64]) is not in the cdef: its size is fixed.
KVM_ENABLE_CAP_SIZE = 104
# struct kvm_msr_filter: u32 flags, (pad), 16 x struct kvm_msr_filter_range {u32 flags, u32 nmsrs, u32 base,
# (pad), u8 *bitmap} = 8 + 16 * 24 bytes; packed by hand in Vm.deny_msrs.
KVM_MSR_FILTER_SIZE = 8 + 16 * 24

# name: (direction: "" | "r" | "w" | "rw", number, argument's C type or size in bytes, or None for none)
REQUESTS: dict[str, tuple[str, int, str | int | None]] = {
    # system ioctls (on /dev/kvm)
    "KVM_GET_API_VERSION": ("", 0x00, None),
    "KVM_CREATE_VM": ("", 0x01, None),
    "KVM_CHECK_EXTENSION": ("", 0x03, None),
    "KVM_GET_VCPU_MMAP_SIZE": ("", 0x04, None),
    "KVM_GET_SUPPORTED_CPUID": ("rw", 0x05, "struct kvm_cpuid2"),
    "KVM_GET_MSR_INDEX_LIST": ("rw", 0x02, "struct kvm_msr_list"),
    # vm ioctls
    "KVM_CREATE_VCPU": ("", 0x41, None),
    "KVM_SET_USER_MEMORY_REGION": ("w", 0x46, "struct kvm_userspace_memory_region"),
    "KVM_SET_TSS_ADDR": ("", 0x47, None),
    "KVM_SET_IDENTITY_MAP_ADDR": ("w", 0x48, "unsigned long long"),
    "KVM_CREATE_IRQCHIP": ("", 0x60, None),
    "KVM_GET_IRQCHIP": ("rw", 0x62, "struct kvm_irqchip"),
    "KVM_SET_IRQCHIP": ("r", 0x63, "struct kvm_irqchip"),
    "KVM_IRQ_LINE": ("w", 0x61, "struct kvm_irq_level"),
    "KVM_CREATE_PIT2": ("w", 0x77, "struct kvm_pit_config"),
    "KVM_IOEVENTFD": ("w", 0x79, "struct kvm_ioeventfd"),
    "KVM_SET_BOOT_CPU_ID": ("", 0x78, None),
    "KVM_GET_PIT2": ("r", 0x9F, "struct kvm_pit_state2"),
    "KVM_SET_PIT2": ("w", 0xA0, "struct kvm_pit_state2"),
    "KVM_SET_CLOCK": ("w", 0x7B, "struct kvm_clock_data"),
    "KVM_GET_CLOCK": ("r", 0x7C, "struct kvm_clock_data"),
    # vcpu ioctls
    "KVM_RUN": ("", 0x80, None),
    "KVM_GET_REGS": ("r", 0x81, "struct kvm_regs"),
    "KVM_SET_REGS": ("w", 0x82, "struct kvm_regs"),
    "KVM_GET_SREGS": ("r", 0x83, "struct kvm_sregs"),
    "KVM_TRANSLATE": ("rw", 0x85, "struct kvm_translation"),
    "KVM_SET_SREGS": ("w", 0x84, "struct kvm_sregs"),
    "KVM_GET_MSRS": ("rw", 0x88, "struct kvm_msrs"),
    "KVM_SET_MSRS": ("w", 0x89, "struct kvm_msrs"),
    "KVM_GET_FPU": ("r", 0x8C, "struct kvm_fpu"),
    "KVM_SET_FPU": ("w", 0x8D, "struct kvm_fpu"),
    "KVM_GET_LAPIC": ("r", 0x8E, "struct kvm_lapic_state"),
    "KVM_SET_LAPIC": ("w", 0x8F, "struct kvm_lapic_state"),
    "KVM_SET_CPUID2": ("w", 0x90, "struct kvm_cpuid2"),
    "KVM_GET_MP_STATE": ("r", 0x98, "struct kvm_mp_state"),
    "KVM_SET_MP_STATE": ("w", 0x99, "struct kvm_mp_state"),
    "KVM_GET_VCPU_EVENTS": ("r", 0x9F, "struct kvm_vcpu_events"),
    "KVM_SET_VCPU_EVENTS": ("w", 0xA0, "struct kvm_vcpu_events"),
    "KVM_GET_DEBUGREGS": ("r", 0xA1, "struct kvm_debugregs"),
    "KVM_SET_DEBUGREGS": ("w", 0xA2, "struct kvm_debugregs"),
    "KVM_GET_XSAVE": ("r", 0xA4, "struct kvm_xsave"),
    "KVM_SET_XSAVE": ("w", 0xA5, "struct kvm_xsave"),
    "KVM_GET_XCRS": ("r", 0xA6, "struct kvm_xcrs"),
    "KVM_SET_XCRS": ("w", 0xA7, "struct kvm_xcrs"),
    "KVM_GET_XSAVE2": ("r", 0xCF, "struct kvm_xsave"),
    "KVM_ENABLE_CAP": ("w", 0xA3, KVM_ENABLE_CAP_SIZE),
    "KVM_X86_SET_MSR_FILTER": ("w", 0xC6, KVM_MSR_FILTER_SIZE),
}


def compute(sizeof) -> dict[str, int]:
    """Every request number, from ioctl-opt's IOC() and `sizeof` (an FFI's sizeof) for the argument types."""
    from ioctl_opt import IOC, IOC_NONE, IOC_READ, IOC_WRITE

    directions = {"": IOC_NONE, "r": IOC_READ, "w": IOC_WRITE, "rw": IOC_READ | IOC_WRITE}
    out = {}
    for name, (direction, nr, arg) in REQUESTS.items():
        size = 0 if arg is None else arg if isinstance(arg, int) else sizeof(arg)
        out[name] = IOC(directions[direction], KVMIO, nr, size)
    return out
