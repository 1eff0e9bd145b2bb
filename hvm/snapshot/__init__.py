"""Snapshot and restore of a whole Machine (QEMU's migrate to file:, Firecracker's snapshot).

`Machine.snapshot(path)` writes guest memory (sparse), every vCPU's and the VM's KVM state, every
device's state and the VM description into one file (format: hvm/snapshot/format.py);
`Machine.restore(path)` builds a Machine from it alone, guest memory mapped copy-on-write from the file.
Every problem with a file is a SnapshotError: one line naming the file (status 2 from the CLI).
"""
from __future__ import annotations

import logging
from pathlib import Path

from hvm._types import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hvm.config import VmSpec
    from hvm.machine import Machine
    from hvm.snapshot.format import SnapshotFile

log = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "SnapshotError", "SnapshotFile", "device_key", "parse_incoming", "save_machine",
           "spec_from_snapshot"]


class SnapshotError(Exception):
    """A snapshot could not be written or read; str() is one line naming the file and the problem."""


def __getattr__(name: str):
    # The file format (json, zlib) is imported when a snapshot is written or read, not by every `hvm run`.
    if name in ("SnapshotFile", "FORMAT_VERSION"):
        from hvm.snapshot import format as _format

        return getattr(_format, name)
    raise AttributeError(name)


def device_key(kind: str, base: int) -> str:
    """The key a device's state is saved under: its bus and the base of its range ("port:0x3f8")."""
    return f"{kind}:{base:#x}"


def parse_incoming(uri: str) -> Path:
    """`--incoming file:PATH` (QEMU's syntax) -> PATH. Other transports are refused with one line."""
    scheme, colon, rest = uri.partition(":")
    if not colon or scheme != "file" or not rest:
        raise SnapshotError(f"--incoming: {uri[:80]!r} is not file:PATH (hvm restores from files only)")
    if "\0" in rest:
        raise SnapshotError("--incoming: the path contains a NUL byte")
    return Path(rest).expanduser()


def devices_of(machine: "Machine") -> list[tuple[str, Any]]:
    """(key, device) for every range on the machine's buses, in bus order."""
    out = []
    for bus in (machine.pio, machine.mmio):
        for r in bus.ranges:
            out.append((device_key(bus.kind, r.base), r.device))
    return out


def save_devices(machine: "Machine") -> dict[str, Any]:
    # Devices without save() (before every device has one) are left out; restore leaves them as built.
    return {key: dev.save() for key, dev in devices_of(machine) if callable(getattr(dev, "save", None))}


def load_devices(machine: "Machine", states: Any, path: Path) -> None:
    if not isinstance(states, dict):
        raise SnapshotError(f"{path}: section devices: not a mapping")
    devices = dict(devices_of(machine))
    for key in states:
        if key not in devices:
            raise SnapshotError(f"{path}: section devices: the snapshot has a device at {key}, this machine "
                                "does not")
    for key, state in states.items():
        load = getattr(devices[key], "load", None)
        if not callable(load):
            log.warning("%s: device %s at %s cannot load its saved state; it starts from reset", path,
                        devices[key].name, key)
            continue
        try:
            load(state)
        except ValueError as e:    # DeviceStateError (a ValueError) names the device and field
            raise SnapshotError(f"{path}: device state: {e}") from None


def save_machine(machine: "Machine", path: Path | str) -> int:
    """Write `machine` (stopped: not started, paused, or postmigrate) to `path`; returns the file size."""
    from hvm import __version__
    from hvm.snapshot import kvmstate
    from hvm.snapshot.codec import spec_to_dict
    from hvm.snapshot.format import write_snapshot

    path = Path(path)
    spec = machine.spec
    kvm, vm = machine.kvm, machine.vm
    description = {
        "spec": spec_to_dict(spec),
        "vcpus": len(machine.vcpus),
        "is_linux": machine.is_linux,
        "adapt_to_host": machine.adapt_to_host,
        "host": machine.host.backend,
        "hvm": __version__,
    }
    try:
        xsave_size = vm.xsave_size()
        msrs = kvmstate.msrs_to_save(kvm)
        meta: list[tuple[str, Any]] = [("description", description)]
        for vcpu in machine.vcpus:
            meta.append((f"vcpu{vcpu.index}", kvmstate.save_vcpu(vcpu, msrs, xsave_size, spec.irqchip)))
        meta.append(("vm", kvmstate.save_vm(vm, spec.irqchip, spec.irqchip and spec.pit)))
    except OSError as e:
        raise SnapshotError(f"{path}: cannot read the VM's state: {e}") from None
    meta.append(("devices", save_devices(machine)))
    return write_snapshot(path, meta, machine.memory)


def spec_from_snapshot(snap: "SnapshotFile") -> "VmSpec":
    from hvm.snapshot.codec import CodecError, spec_from_dict

    desc = snap.description
    try:
        spec = spec_from_dict(desc.get("spec"), f"snapshot {snap.path}")
    except CodecError as e:
        raise SnapshotError(f"{snap.path}: section description: {e}") from None
    if spec.vcpus != desc.get("vcpus"):
        raise SnapshotError(f"{snap.path}: section description: vCPU count does not match")
    return spec
