"""Review of issue 13's virtio devices: what a hostile guest or a bad host input did that it must not.
No KVM unless a test says otherwise: GuestMemory, a recording IRQ line, register reads/writes."""
from __future__ import annotations

import pytest

from hvm.memory import MiB, GuestMemory
from hvm.mmio.device import IrqLine
from hvm.mmio.virtio import VirtioMmio
from hvm.mmio.virtio import constants as vc
from hvm.mmio.virtio.rng import VirtioRng
from virtio_driver import GuestDriver


@pytest.fixture
def memory():
    with GuestMemory(16 * MiB) as mem:
        yield mem


def _rng(memory):
    t = VirtioMmio(memory, IrqLine(5, lambda irq, level: None), VirtioRng())
    return t, GuestDriver(t, memory)


def test_snapshot_of_a_device_whose_driver_asked_for_unoffered_features_loads_again(memory):
    # A guest writes feature bits the device does not offer; FEATURES_OK is refused, but the bits stay in
    # DriverFeatures (the spec lets the driver write anything there). A snapshot taken then must restore.
    t, drv = _rng(memory)
    assert not drv.negotiate(0xFFFF_FFFF_FFFF_FFFF)
    state = t.save()
    other, _ = _rng(memory)
    other.load(state)
    assert other.driver_features == t.driver_features
    assert not other.status & vc.STATUS_FEATURES_OK
    # and the driver can still negotiate properly afterwards
    assert GuestDriver(other, memory).negotiate(1 << vc.F_VERSION_1)
