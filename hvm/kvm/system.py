"""Kvm: the /dev/kvm system fd (API version, capabilities, supported CPUID)."""
from __future__ import annotations

import errno
import os

from hvm._types import TYPE_CHECKING
from hvm.kvm import ioctls
from hvm.kvm._ffi import ffi, ioctl_int, lib
from hvm.kvm.errors import KvmError

if TYPE_CHECKING:
    from hvm.kvm.vm import Vm

KVM_API_VERSION = 12
MAX_CPUID_ENTRIES = 256


def _check(ret: int, request: int) -> int:
    if ret < 0:
        raise KvmError(ioctls.NAMES.get(request, hex(request)), ffi.errno)
    return ret


def ioctl_ptr(fd: int, request: int, arg) -> int:
    """ioctl with a cffi pointer argument; raises KvmError on failure."""
    return _check(lib.ioctl(fd, request, arg), request)


def ioctl_val(fd: int, request: int, arg: int = 0) -> int:
    """ioctl with an integer argument; raises KvmError on failure."""
    return _check(ioctl_int(fd, request, arg), request)


class Kvm:
    """The KVM subsystem handle. Use as a context manager; `create_vm()` makes a Vm."""

    def __init__(self, path: str = "/dev/kvm"):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(f"open {path}", e.errno or 0) from None
        try:
            version = ioctl_val(self.fd, ioctls.KVM_GET_API_VERSION)
            if version != KVM_API_VERSION:
                raise KvmError(f"KVM_GET_API_VERSION returned {version}, need {KVM_API_VERSION}", 0)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_extension(self, cap: int) -> int:
        return ioctl_val(self.fd, ioctls.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return ioctl_val(self.fd, ioctls.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[dict[str, int]]:
        """KVM_GET_SUPPORTED_CPUID as a list of plain dicts (function, index, flags, eax..edx)."""
        size = ffi.sizeof("struct kvm_cpuid2") + MAX_CPUID_ENTRIES * ffi.sizeof("struct kvm_cpuid_entry2")
        buf = ffi.new("char[]", size)
        cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
        cpuid.nent = MAX_CPUID_ENTRIES
        ioctl_ptr(self.fd, ioctls.KVM_GET_SUPPORTED_CPUID, cpuid)
        fields = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")
        return [{f: getattr(cpuid.entries[i], f) for f in fields} for i in range(cpuid.nent)]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: every MSR KVM saves and restores for a vCPU (TSC, SYSCALL, PAT, kvmclock...).
        The first call with room for none returns E2BIG and the count; the second fills the list."""
        count = ffi.new("struct kvm_msr_list *")
        if lib.ioctl(self.fd, ioctls.KVM_GET_MSR_INDEX_LIST, count) < 0 and ffi.errno != errno.E2BIG:
            _check(-1, ioctls.KVM_GET_MSR_INDEX_LIST)
        n = count.nmsrs
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_msr_list") + 4 * n)
        msrs = ffi.cast("struct kvm_msr_list *", buf)
        msrs.nmsrs = n
        ioctl_ptr(self.fd, ioctls.KVM_GET_MSR_INDEX_LIST, msrs)
        return [msrs.indices[i] for i in range(msrs.nmsrs)]

    def create_vm(self) -> "Vm":
        from hvm.kvm.vm import Vm

        fd = ioctl_val(self.fd, ioctls.KVM_CREATE_VM, 0)
        return Vm(self, fd)
