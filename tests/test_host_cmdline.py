"""The kernel options hvm adds on kvm_pvm (hvm/host.py): Linux 6.12 copies clearcpuid= into a 128-byte buffer
(127 characters and the NUL) and silently drops what does not fit, so a feature name added there must not
push the list past it."""
from __future__ import annotations

from hvm.host import PVM_CLEARCPUID, PVM_LINUX_CMDLINE


def test_clearcpuid_fits_linux_buffer():
    assert len(PVM_CLEARCPUID) <= 127, len(PVM_CLEARCPUID)
    assert f"clearcpuid={PVM_CLEARCPUID}" in PVM_LINUX_CMDLINE

