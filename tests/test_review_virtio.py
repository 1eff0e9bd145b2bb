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


def test_a_serial_port_on_a_virtio_devices_irq_is_refused(tmp_path):
    # Both would drive line 5 on their own: the UART lowering it would hide the virtio device's level.
    from hvm.config import ConfigError, parse_spec

    image = tmp_path / "hlt.bin"
    image.write_bytes(b"\xF4")
    doc = {"memory": "16M", "boot": {"image": str(image), "load": 0x100000, "mode": "protected"},
           "devices": {"serial": {"irq": 5}, "virtio-rng": True}}
    with pytest.raises(ConfigError) as e:
        parse_spec(doc)
    assert str(e.value).endswith("devices.serial.irq: IRQ 5 is virtio-rng's (virtio devices take IRQs 5, in order)")
    doc["devices"]["serial"] = {"irq": 6}     # a line no virtio device has: accepted
    assert parse_spec(doc).serial.irq == 6
