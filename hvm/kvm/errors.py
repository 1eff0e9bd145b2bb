"""Exceptions raised by the KVM layer: each names the ioctl and the errno."""
from __future__ import annotations

import errno as _errno
import os

_HINTS = {
    _errno.EACCES: "is /dev/kvm readable and writable by you?",
    _errno.EPERM: "is /dev/kvm readable and writable by you?",
    _errno.ENOENT: "is the kvm module loaded (no /dev/kvm)?",
    _errno.ENXIO: "is the kvm module loaded for this CPU?",
    _errno.EEXIST: "the object (memory slot, irqchip, vCPU id) already exists",
    _errno.ENOMEM: "the host is out of memory",
}


class KvmError(OSError):
    """A KVM ioctl (or open of /dev/kvm) failed."""

    def __init__(self, what: str, err: int):
        self.what = what
        text = f"{what}: {os.strerror(err)}"
        hint = _HINTS.get(err)
        if hint:
            text += f" — {hint}"
        super().__init__(err, text)

    def __str__(self) -> str:
        return self.args[1]
