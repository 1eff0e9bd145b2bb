"""Vcpu: one KVM vCPU fd, its registers, and its mmapped kvm_run area."""
from __future__ import annotations

import mmap
import os

from hvm._types import TYPE_CHECKING, Iterable, Mapping
from hvm.kvm import ioctls
from hvm.kvm._ffi import ffi
from hvm.kvm.system import ioctl_ptr, ioctl_val

if TYPE_CHECKING:
    from hvm.kvm.vm import Vm


class Vcpu:
    def __init__(self, vm: "Vm", fd: int, index: int, mmap_size: int):
        self.vm = vm
        self.fd = fd
        self.index = index
        self._mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # Two zero-copy views of the same kvm_run page: a typed cffi struct for clarity,
        # and a memoryview for the run loop's hot path (struct.unpack_from on fixed offsets).
        self._run_buffer = ffi.from_buffer(self._mmap)
        self.run_struct = ffi.cast("struct kvm_run *", self._run_buffer)
        self.run_view = memoryview(self._mmap)

    def close(self) -> None:
        if self.fd < 0:
            return
        self.run_view.release()
        self.run_struct = None
        ffi.release(self._run_buffer)
        try:
            self._mmap.close()
        except BufferError:  # a caller still holds a view; the mapping goes when it is collected
            pass
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "Vcpu":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- registers -------------------------------------------------------------------------
    def get_regs(self):
        regs = ffi.new("struct kvm_regs *")
        ioctl_ptr(self.fd, ioctls.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs) -> None:
        ioctl_ptr(self.fd, ioctls.KVM_SET_REGS, regs)

    def get_sregs(self):
        sregs = ffi.new("struct kvm_sregs *")
        ioctl_ptr(self.fd, ioctls.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs) -> None:
        ioctl_ptr(self.fd, ioctls.KVM_SET_SREGS, sregs)

    def translate(self, linear_address: int) -> tuple[int, bool, bool] | None:
        """KVM_TRANSLATE: the guest-physical address of a guest-virtual (linear) one through the vCPU's current
        paging, and whether the page is writeable and user-accessible; None if it is not mapped."""
        tr = ffi.new("struct kvm_translation *", {"linear_address": linear_address})
        ioctl_ptr(self.fd, ioctls.KVM_TRANSLATE, tr)
        if not tr.valid:
            return None
        return tr.physical_address, bool(tr.writeable), bool(tr.usermode)

    def get_fpu(self):
        fpu = ffi.new("struct kvm_fpu *")
        ioctl_ptr(self.fd, ioctls.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu) -> None:
        ioctl_ptr(self.fd, ioctls.KVM_SET_FPU, fpu)

    def set_msrs(self, msrs: Mapping[int, int]) -> None:
        buf, kmsrs = _msr_buffer(list(msrs.items()))
        n = ioctl_ptr(self.fd, ioctls.KVM_SET_MSRS, kmsrs)
        if n != len(msrs):
            bad = list(msrs)[n]
            raise OSError(0, f"KVM_SET_MSRS: MSR {bad:#x} was refused")

    def set_msrs_partial(self, pairs: list[tuple[int, int]]) -> int:
        """KVM_SET_MSRS; returns how many of `pairs` KVM took (it stops at the first it refuses)."""
        buf, kmsrs = _msr_buffer(list(pairs))
        return ioctl_ptr(self.fd, ioctls.KVM_SET_MSRS, kmsrs)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        idx = list(indices)
        buf, kmsrs = _msr_buffer([(i, 0) for i in idx])
        n = ioctl_ptr(self.fd, ioctls.KVM_GET_MSRS, kmsrs)
        return {kmsrs.entries[i].index: kmsrs.entries[i].data for i in range(n)}

    def set_cpuid2(self, entries: list[dict[str, int]]) -> None:
        size = ffi.sizeof("struct kvm_cpuid2") + len(entries) * ffi.sizeof("struct kvm_cpuid_entry2")
        buf = ffi.new("char[]", size)
        cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
        cpuid.nent = len(entries)
        for i, e in enumerate(entries):
            for k, v in e.items():
                setattr(cpuid.entries[i], k, v)
        ioctl_ptr(self.fd, ioctls.KVM_SET_CPUID2, cpuid)

    def get_mp_state(self) -> int:
        st = ffi.new("struct kvm_mp_state *")
        ioctl_ptr(self.fd, ioctls.KVM_GET_MP_STATE, st)
        return st.mp_state

    def set_mp_state(self, state: int) -> None:
        ioctl_ptr(self.fd, ioctls.KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *", {"mp_state": state}))

    def get_vcpu_events(self):
        ev = ffi.new("struct kvm_vcpu_events *")
        ioctl_ptr(self.fd, ioctls.KVM_GET_VCPU_EVENTS, ev)
        return ev

    def set_vcpu_events(self, ev) -> None:
        ioctl_ptr(self.fd, ioctls.KVM_SET_VCPU_EVENTS, ev)

    # --- the rest of the state a snapshot needs (struct copies; see hvm/snapshot/kvmstate.py) ------------
    def get_lapic(self):
        lapic = ffi.new("struct kvm_lapic_state *")
        ioctl_ptr(self.fd, ioctls.KVM_GET_LAPIC, lapic)
        return lapic

    def set_lapic(self, lapic) -> None:
        ioctl_ptr(self.fd, ioctls.KVM_SET_LAPIC, lapic)

    def get_xsave(self, size: int = 4096):
        """The XSAVE area: KVM_GET_XSAVE (4 KiB), or KVM_GET_XSAVE2 when KVM_CAP_XSAVE2 reports a larger
        area (dynamically enabled features such as AMX). Returns a char[] of `size` bytes."""
        size = max(size, ffi.sizeof("struct kvm_xsave"))
        buf = ffi.new("char[]", size)
        request = ioctls.KVM_GET_XSAVE2 if size > ffi.sizeof("struct kvm_xsave") else ioctls.KVM_GET_XSAVE
        ioctl_ptr(self.fd, request, ffi.cast("struct kvm_xsave *", buf))
        return buf

    def set_xsave(self, buf) -> None:
        # KVM_SET_XSAVE reads as many bytes as KVM_CAP_XSAVE2 says: the caller passes a buffer that large.
        ioctl_ptr(self.fd, ioctls.KVM_SET_XSAVE, ffi.cast("struct kvm_xsave *", buf))

    def get_xcrs(self):
        xcrs = ffi.new("struct kvm_xcrs *")
        ioctl_ptr(self.fd, ioctls.KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs) -> None:
        ioctl_ptr(self.fd, ioctls.KVM_SET_XCRS, xcrs)

    def get_debugregs(self):
        dregs = ffi.new("struct kvm_debugregs *")
        ioctl_ptr(self.fd, ioctls.KVM_GET_DEBUGREGS, dregs)
        return dregs

    def set_debugregs(self, dregs) -> None:
        ioctl_ptr(self.fd, ioctls.KVM_SET_DEBUGREGS, dregs)

    def run(self) -> None:
        """One KVM_RUN (GIL released by cffi). Raises KvmError; EINTR means a kick arrived."""
        ioctl_val(self.fd, ioctls.KVM_RUN)


def _msr_buffer(pairs: list[tuple[int, int]]):
    size = ffi.sizeof("struct kvm_msrs") + len(pairs) * ffi.sizeof("struct kvm_msr_entry")
    buf = ffi.new("char[]", size)
    kmsrs = ffi.cast("struct kvm_msrs *", buf)
    kmsrs.nmsrs = len(pairs)
    for i, (index, data) in enumerate(pairs):
        kmsrs.entries[i].index = index
        kmsrs.entries[i].data = data
    return buf, kmsrs
