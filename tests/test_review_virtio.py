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


def test_a_vm_started_frozen_receives_no_frames_until_it_runs(tmp_path, monkeypatch):
    """-S (start(paused=True)), as after `--incoming ... -S`: the vCPUs wait for `cont`, and a NIC's reader
    thread must not write guest memory meanwhile (QEMU's virtio-net does not receive while the VM is
    stopped), or a snapshot taken then (QMP migrate) saves the used ring and the device at different
    moments. The frame waits and arrives once the VM runs."""
    import os
    import socket
    import time

    from hvm import Machine
    from hvm.config import parse_spec
    from hvm.console import Console
    from hvm.mmio.virtio import net
    from virtio_driver import Arena

    host, dev_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dev_end.setblocking(False)
    monkeypatch.setattr(net, "open_tap", lambda name: os.dup(dev_end.fileno()))   # "tap": the socketpair's end
    image = tmp_path / "spin.bin"
    image.write_bytes(b"\xEB\xFE")      # jmp $
    spec = parse_spec({"memory": "16M", "timeout": 20, "machine": "none",
                       "boot": {"image": str(image), "load": 0x100000, "mode": "protected"},
                       "devices": {"serial": "none", "virtio-net": [{"tap": "pair0"}]}})
    with Machine(spec, console=Console("none", "none")) as m:
        t = m.mmio.find(0xD000_0000).device
        rx, _ = GuestDriver(t, m.memory, Arena(0x400000)).start(2, 16)
        rx.add(in_lens=[2048])
        t.write(vc.MMIO_QUEUE_NOTIFY, 4, 0)
        m.start(paused=True)
        host.send(bytes(range(60)))
        time.sleep(0.3)
        assert rx.used_idx() == 0 and t.backend.rx_frames == 0
        m.resume()
        deadline = time.monotonic() + 5
        while rx.used_idx() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rx.take_used() == [(0, 12 + 60)]
    host.close()
    dev_end.close()


def test_a_snapshot_of_a_vm_never_started_holds_the_device_threads(tmp_path, monkeypatch):
    """Machine.restore() then snapshot() before start() (or any unstarted VM): the NIC's reader runs from the
    device's creation, so the save must hold it as a pause does, and let it go after."""
    import os
    import socket

    import hvm.snapshot
    from hvm import Machine
    from hvm.config import parse_spec
    from hvm.console import Console
    from hvm.mmio.virtio import net

    host, dev_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dev_end.setblocking(False)
    monkeypatch.setattr(net, "open_tap", lambda name: os.dup(dev_end.fileno()))
    image = tmp_path / "spin.bin"
    image.write_bytes(b"\xEB\xFE")
    spec = parse_spec({"memory": "16M", "timeout": 20, "machine": "none",
                       "boot": {"image": str(image), "load": 0x100000, "mode": "protected"},
                       "devices": {"serial": "none", "virtio-net": [{"tap": "pair0"}]}})
    with Machine(spec, console=Console("none", "none")) as m:     # a NIC holds a host tap: not saved
        with pytest.raises(hvm.snapshot.SnapshotError, match="the VM has a virtio-net device .virtio-net0."):
            m.snapshot(tmp_path / "refused.snap")
        assert not (tmp_path / "refused.snap").exists()
    # The mechanism for a device with a thread of its own that can be saved: as if the NIC could be.
    from hvm.mmio import registry

    dt = registry.lookup("virtio-net")
    monkeypatch.setitem(registry._names, "virtio-net", dt.__class__(**{**dt.__dict__, "snapshot": True}))
    seen = []
    real_save = hvm.snapshot.save_machine

    def save(machine, path):
        seen.append(machine.mmio.find(0xD000_0000).device.backend._paused)
        return real_save(machine, path)

    monkeypatch.setattr(hvm.snapshot, "save_machine", save)
    with Machine(spec, console=Console("none", "none")) as m:
        m.snapshot(tmp_path / "vm.snap")
        assert seen == [True]
        assert m.mmio.find(0xD000_0000).device.backend._paused is False
    host.close()
    dev_end.close()
