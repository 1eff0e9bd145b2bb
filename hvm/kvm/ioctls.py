"""KVM ioctl request numbers, computed with ioctl-opt from the sizes cffi reports (hvm/kvm/_ioctl_table.py).

The compiled cffi module carries them, computed the same way at install time (hvm/kvm/_build.py) and
checked there against <linux/kvm.h>: a start reads them instead of importing ioctl-opt (and ctypes with
it). Without them (ABI mode, or a module built before they existed) they are computed here."""
from __future__ import annotations

from hvm.kvm._ffi import API_MODE, ffi, lib
from hvm.kvm._ioctl_table import KVM_ENABLE_CAP_SIZE, KVM_MSR_FILTER_SIZE, KVMIO, REQUESTS, compute

__all__ = ["KVMIO", "KVM_ENABLE_CAP_SIZE", "KVM_MSR_FILTER_SIZE", "NAMES", *REQUESTS]


def _compiled() -> dict[str, int] | None:
    if not API_MODE or not hasattr(lib, "HVM_IOC_KVM_RUN"):
        return None
    return {name: getattr(lib, "HVM_IOC_" + name) for name in REQUESTS}


_NUMBERS = _compiled() or compute(ffi.sizeof)
# The module's names (KVM_RUN, KVM_GET_REGS, ...): one per entry of REQUESTS.
globals().update(_NUMBERS)

# For error messages: request number -> name.
NAMES = {v: k for k, v in _NUMBERS.items()}
