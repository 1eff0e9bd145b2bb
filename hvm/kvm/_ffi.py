"""Loads the cffi binding: the API-mode module compiled at install time if present,
otherwise the same declarations in ABI mode (slower calls, same behaviour)."""
from __future__ import annotations

import signal
import threading

try:  # built by setup.py (cffi_modules) during `pip install`
    from hvm.kvm._kvm_cffi import ffi, lib  # type: ignore[import-not-found]

    API_MODE = True
except ImportError:  # running from a source tree that was never built
    from cffi import FFI

    from hvm.kvm._cdef import CDEF

    ffi = FFI()
    ffi.cdef(CDEF)
    lib = ffi.dlopen(None)
    API_MODE = False

# The signal used to kick a vCPU thread out of KVM_RUN (kvmtool uses SIGRTMIN too).
KICK_SIGNAL = signal.SIGRTMIN + 2
_kick_installed = False
_kick_lock = threading.Lock()


def install_kick_handler() -> None:
    """Install a no-op handler for KICK_SIGNAL so that delivering it makes KVM_RUN return EINTR."""
    global _kick_installed
    with _kick_lock:
        if _kick_installed:
            return
        if API_MODE:
            if lib.hvm_install_kick_handler(int(KICK_SIGNAL)) != 0:
                raise OSError(ffi.errno, "sigaction failed for the vCPU kick signal")
        else:
            # Python-level handler: only settable from the main thread.
            signal.signal(KICK_SIGNAL, lambda signo, frame: None)
            signal.siginterrupt(KICK_SIGNAL, True)
        _kick_installed = True


def ioctl_int(fd: int, request: int, arg: int = 0) -> int:
    """ioctl with an integer argument; returns the raw result (-1 on error, errno in ffi.errno)."""
    if API_MODE:
        return lib.hvm_ioctl_int(fd, request, arg)
    return lib.ioctl(fd, request, ffi.cast("void *", arg))
