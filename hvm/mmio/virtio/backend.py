"""VirtioBackend: a virtio device type's own logic, apart from the transport (CONTRACT.md part B).

A backend never sees transport registers or KVM. The transport (VirtioMmio) negotiates features, sets up
the queues and, at DRIVER_OK, calls activate(features, queues, signal); after that each QueueNotify calls
notify(queue_index) on the vCPU thread with transport.lock held. A backend's own thread (net RX, console
input) takes transport.lock around any Queue use, calls signal(i) after push_used, and on a VirtqueueError
calls transport.needs_reset(str(err)).

Lifecycle rules the transport relies on:
- activate() binds the queues and the signal function and may start work; it must not clear the
  backend's own state (the transport calls it again after load() of a DRIVER_OK device, with the same
  Queue objects, once backend.load() restored that state);
- reset() forgets everything the driver set up (queues, negotiated features, in-flight requests). It runs
  at a driver reset (status 0), a system reset, and when the device enters NEEDS_RESET -- then possibly
  on the backend's own thread (the one that called needs_reset()), with transport.lock held: so reset()
  never joins the backend's threads (close() does);
- save()/load() are the backend's own guest-visible state (hvm/mmio/device.py rules: load() checks every
  field before assigning any); the transport nests them under its "backend" field.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from hvm.mmio.device import no_state

if TYPE_CHECKING:
    from hvm.mmio.virtio.mmio import VirtioMmio
    from hvm.mmio.virtio.queue import Queue


class VirtioBackend:
    device_id: int = 0
    name: str = "virtio"
    queue_max_sizes: tuple[int, ...] = ()
    transport: "VirtioMmio"

    def device_features(self) -> int:
        """The device-specific feature bits offered (the transport adds VERSION_1, INDIRECT_DESC, EVENT_IDX)."""
        return 0

    def config(self) -> bytes:
        """The current device configuration space (the guest may read any offset and size of it)."""
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        """A driver write into the configuration space: ignored unless the device type has writable fields."""

    def activate(self, features: int, queues: "list[Queue]", signal: Callable[[int], None]) -> None:
        """DRIVER_OK: `features` negotiated, `queues` (some may not be ready), signal(i) after push_used."""

    def notify(self, queue_index: int) -> None:
        """The driver notified a queue (vCPU thread, transport.lock held)."""

    def reset(self) -> None:
        """Device reset: forget the queues and everything the driver set up."""

    def save(self) -> dict:
        return {}

    def load(self, state: dict) -> None:
        no_state(self.name, state)

    def pause(self) -> None:
        """The VM pauses: stop touching guest memory from the backend's own threads."""

    def resume(self) -> None:
        """The VM resumes."""

    def close(self) -> None:
        """The Machine closes: release fds, stop threads."""
