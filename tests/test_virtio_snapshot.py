"""Snapshot and restore of a VM with virtio devices: the transport's queue positions and the device's own
state travel in the snapshot, so a restored guest's driver goes on with the same rings. And a VM holding a
host file (a disk) is refused in one line instead of being saved half."""
from __future__ import annotations

import pytest

from hvm.config import load_config
from hvm.console import Console
from hvm.machine import Machine
from hvm.snapshot import SnapshotError
from tests.test_virtio_console import vcon_image, vcon_yaml


def test_virtio_console_echo_goes_on_after_a_restore(tmp_path):
    image = vcon_image(tmp_path, 1, mode=1)        # echo: input upper-cased back through the transmit queue
    spec = load_config(vcon_yaml(tmp_path, image, "{output: none, input: none}"))
    snap = tmp_path / "vm.snap"
    with Machine(spec, console=Console("none", "none")) as vm:
        vm.start()
        vm.console.send(b"before\n")
        vm.console.expect_exact(b"BEFORE\n", timeout=10)
        vm.snapshot(snap)                          # the VM stays stopped (postmigrate)
        before = vm.devices["virtio-console"].save()
        vm.stop()
    with Machine.restore(snap, console=Console("none", "none"), timeout=20) as vm:
        assert vm.devices["virtio-console"].save() == before    # the rings where the driver left them
        vm.start()
        vm.console.send(b"after\nq")
        vm.console.expect_exact(b"AFTER\nbye\n", timeout=10)
        result = vm.wait(10)
        assert result is not None and (result.reason, result.status) == ("debug-exit", 1)
        assert "BEFORE" not in vm.console.text()   # a new console: only what the restored guest printed


def test_a_vm_with_a_device_that_holds_host_files_is_not_saved(tmp_path, monkeypatch):
    from hvm.mmio import registry

    image = vcon_image(tmp_path, 1, mode=1)
    spec = load_config(vcon_yaml(tmp_path, image, "{output: none, input: none}"))
    dt = registry.lookup("virtio-console")
    monkeypatch.setitem(registry._names, "virtio-console", dt.__class__(**{**dt.__dict__, "snapshot": False}))
    with Machine(spec, console=Console("none", "none")) as vm:
        vm.start()
        with pytest.raises(SnapshotError, match="the VM has a virtio-console device .virtio-console.: hvm cannot "
                                                "save a VM that holds host files or devices"):
            vm.snapshot(tmp_path / "no.snap")
        assert not (tmp_path / "no.snap").exists() and vm.state == "running"
        vm.stop()
