"""Vm: one KVM virtual machine fd (memory slots, irqchip, PIT, IRQ lines, vCPUs)."""
from __future__ import annotations

import os

from hvm._types import TYPE_CHECKING
from hvm.kvm import ioctls
from hvm.kvm._ffi import ffi
from hvm.kvm.system import ioctl_ptr, ioctl_val

if TYPE_CHECKING:
    from hvm.kvm.system import Kvm
    from hvm.kvm.vcpu import Vcpu

# Where QEMU puts the three pages KVM needs for real-mode emulation on Intel (just below the BIOS).
DEFAULT_IDENTITY_MAP_ADDR = 0xFEFFC000
DEFAULT_TSS_ADDR = 0xFEFFD000
KVM_PIT_SPEAKER_DUMMY = 1
KVM_CAP_XSAVE2 = 208
KVM_CAP_DISABLE_QUIRKS2 = 213
# KVM_X86_QUIRK_FIX_HYPERCALL_INSN: on a VMCALL/VMMCALL that is not the host vendor's, KVM rewrites the
# instruction in guest memory (instead of raising #UD) and runs it again.
KVM_X86_QUIRK_FIX_HYPERCALL_INSN = 1 << 5
KVM_CAP_X86_MSR_FILTER = 189
KVM_MSR_FILTER_READ = 1
KVM_MSR_FILTER_WRITE = 2
KVM_MSR_FILTER_MAX_RANGES = 16


class Vm:
    def __init__(self, kvm: "Kvm", fd: int):
        self.kvm = kvm
        self.fd = fd
        self.has_irqchip = False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_extension(self, cap: int) -> int:
        return ioctl_val(self.fd, ioctls.KVM_CHECK_EXTENSION, cap)

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, size: int, host_addr: int, flags: int = 0) -> None:
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {"slot": slot, "flags": flags, "guest_phys_addr": guest_phys_addr, "memory_size": size,
             "userspace_addr": host_addr},
        )
        ioctl_ptr(self.fd, ioctls.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_address(self, addr: int = DEFAULT_TSS_ADDR) -> None:
        ioctl_val(self.fd, ioctls.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_address(self, addr: int = DEFAULT_IDENTITY_MAP_ADDR) -> None:
        ioctl_ptr(self.fd, ioctls.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("unsigned long long *", addr))

    def create_irqchip(self) -> None:
        """In-kernel PIC, IOAPIC and one LAPIC per vCPU (create before the vCPUs)."""
        ioctl_val(self.fd, ioctls.KVM_CREATE_IRQCHIP)
        self.has_irqchip = True

    def create_pit2(self) -> None:
        ioctl_ptr(self.fd, ioctls.KVM_CREATE_PIT2, ffi.new("struct kvm_pit_config *", {"flags": KVM_PIT_SPEAKER_DUMMY}))

    def get_pic(self, chip: int):
        """State of the in-kernel 8259 PIC: chip 0 = master, 1 = slave (a struct kvm_pic_state)."""
        irqchip = ffi.new("struct kvm_irqchip *", {"chip_id": chip})
        ioctl_ptr(self.fd, ioctls.KVM_GET_IRQCHIP, irqchip)
        return irqchip

    def set_pic(self, irqchip) -> None:
        ioctl_ptr(self.fd, ioctls.KVM_SET_IRQCHIP, irqchip)

    def get_irqchip(self, chip: int):
        """Any in-kernel irqchip: 0 = master PIC, 1 = slave PIC, 2 = IOAPIC (a struct kvm_irqchip)."""
        return self.get_pic(chip)

    def set_irqchip(self, irqchip) -> None:
        ioctl_ptr(self.fd, ioctls.KVM_SET_IRQCHIP, irqchip)

    def get_clock(self):
        """The kvmclock base (struct kvm_clock_data): what a guest's kvm-clock reads, in ns."""
        data = ffi.new("struct kvm_clock_data *")
        ioctl_ptr(self.fd, ioctls.KVM_GET_CLOCK, data)
        return data

    def set_clock(self, data) -> None:
        ioctl_ptr(self.fd, ioctls.KVM_SET_CLOCK, data)

    def enable_cap(self, cap: int, *args: int) -> None:
        """KVM_ENABLE_CAP on the VM with up to four arguments."""
        if len(args) > 4:
            raise ValueError("KVM_ENABLE_CAP takes at most 4 arguments")
        buf = ffi.new("unsigned long long[]", ioctls.KVM_ENABLE_CAP_SIZE // 8)
        buf[0] = cap   # u32 cap, u32 flags = 0 (little-endian)
        for i, a in enumerate(args):
            buf[1 + i] = a
        ioctl_ptr(self.fd, ioctls.KVM_ENABLE_CAP, buf)

    def disable_quirks(self, quirks: int) -> int:
        """Disable the KVM_X86_QUIRK_* bits of `quirks` that this KVM can disable; returns those disabled
        (0 when KVM_CAP_DISABLE_QUIRKS2 is missing)."""
        try:
            can = self.check_extension(KVM_CAP_DISABLE_QUIRKS2)
        except OSError:
            return 0
        quirks &= can
        if quirks:
            self.enable_cap(KVM_CAP_DISABLE_QUIRKS2, quirks)
        return quirks

    def deny_msrs(self, ranges: list[tuple[int, int]]) -> None:
        """KVM_X86_SET_MSR_FILTER (default allow) denying reads and writes of each (base, count) range: the
        guest's RDMSR/WRMSR of them raises #GP (hvm does not enable KVM_CAP_X86_USER_SPACE_MSR exits)."""
        if not 0 < len(ranges) <= KVM_MSR_FILTER_MAX_RANGES:
            raise ValueError(f"deny_msrs: 1..{KVM_MSR_FILTER_MAX_RANGES} ranges, not {len(ranges)}")
        buf = ffi.new("unsigned char[]", ioctls.KVM_MSR_FILTER_SIZE)
        words = ffi.cast("unsigned int *", buf)
        bitmaps = []
        for i, (base, count) in enumerate(ranges):
            if not 0 < count <= 0x600 or not 0 <= base <= 0xFFFFFFFF:
                raise ValueError(f"deny_msrs: bad range {base:#x}+{count}")
            bitmap = ffi.new("unsigned char[]", (count + 7) // 8)   # all 0: every MSR of the range denied
            bitmaps.append(bitmap)                                   # alive until KVM has copied it
            off = (8 + 24 * i) // 4
            words[off] = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE
            words[off + 1] = count
            words[off + 2] = base
            ffi.cast("unsigned long long *", buf + 8 + 24 * i + 16)[0] = int(ffi.cast("uintptr_t", bitmap))
        ioctl_ptr(self.fd, ioctls.KVM_X86_SET_MSR_FILTER, buf)

    def xsave_size(self) -> int:
        """Bytes of a vCPU's XSAVE area: KVM_CAP_XSAVE2's answer (at least 4096), or 4096 without it."""
        try:
            return max(self.check_extension(KVM_CAP_XSAVE2), 4096)
        except OSError:
            return 4096

    def get_pit2(self):
        state = ffi.new("struct kvm_pit_state2 *")
        ioctl_ptr(self.fd, ioctls.KVM_GET_PIT2, state)
        return state

    def set_pit2(self, state) -> None:
        ioctl_ptr(self.fd, ioctls.KVM_SET_PIT2, state)

    def set_irq_line(self, irq: int, level: int) -> None:
        # A fresh struct per call: device threads (vCPUs, console input) may raise lines concurrently.
        ioctl_ptr(self.fd, ioctls.KVM_IRQ_LINE, ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level}))

    def ioeventfd(self, addr: int, length: int, fd: int, datamatch: int | None = None, pio: bool = False,
                  deassign: bool = False) -> None:
        """KVM_IOEVENTFD: a guest write of `length` bytes to `addr` (of `datamatch`, if given) signals the
        eventfd `fd` inside the kernel instead of exiting to hvm; deassign=True takes it back."""
        flags = ((1 << 0) if datamatch is not None else 0) | ((1 << 1) if pio else 0) | ((1 << 2) if deassign else 0)
        ioctl_ptr(self.fd, ioctls.KVM_IOEVENTFD, ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": addr, "len": length, "fd": fd, "flags": flags}))

    def create_vcpu(self, index: int) -> "Vcpu":
        from hvm.kvm.vcpu import Vcpu

        fd = ioctl_val(self.fd, ioctls.KVM_CREATE_VCPU, index)
        try:
            return Vcpu(self, fd, index, self.kvm.vcpu_mmap_size())
        except BaseException:
            os.close(fd)
            raise
