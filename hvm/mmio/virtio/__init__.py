"""hvm.mmio.virtio: virtio 1.x devices on the virtio-mmio transport (CONTRACT.md part B).

- constants: device IDs, feature and status bits, register offsets, ring layout;
- queue: split virtqueues (Queue, DescriptorChain, VirtqueueError): every guest value checked;
- backend: VirtioBackend, what a device type implements;
- mmio: VirtioMmio, the transport (registers, handshake, interrupts, reset, state);
- rng, ...: device types, each with its DEVICE declaration for the registry.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from hvm.mmio.virtio import constants
from hvm.mmio.virtio.backend import VirtioBackend
from hvm.mmio.virtio.mmio import VirtioMmio, attach_transport
from hvm.mmio.virtio.queue import DescriptorChain, Queue, VirtqueueError

if TYPE_CHECKING:
    from hvm.mmio.registry import DeviceContext


def attach(ctx: "DeviceContext", backend: VirtioBackend, ioeventfd: bool = False) -> VirtioMmio:
    """Make the transport for ctx.slot (base, size, irq), register it on ctx.mmio and return it (the
    registered Device). The backend's close() runs when the Machine closes.

    ioeventfd=True: a QueueNotify write of a queue's index signals an eventfd in KVM instead of exiting to
    hvm, and hvm's ioevent thread makes the same register write (hvm/ioevents.py): the vCPU runs on while
    the device works. Where that is not available (no KVM: a unit test) the write exits as usual."""
    slot = ctx.slot
    if slot is None:
        raise ValueError(f"{ctx.name}: a virtio device needs a virtio-mmio slot")
    transport = attach_transport(ctx.memory, ctx.irq_line(slot.irq), backend, ctx.mmio, slot.base,
                                 getattr(slot, "size", constants.MMIO_SIZE), ctx.on_close)
    if ioeventfd and ctx.ioevent is not None:
        for index in range(len(backend.queue_max_sizes)):
            ctx.ioevent(slot.base + constants.MMIO_QUEUE_NOTIFY, 4, index,
                        lambda index=index: transport.write(constants.MMIO_QUEUE_NOTIFY, 4, index))
    return transport


__all__ = ["DescriptorChain", "Queue", "VirtioBackend", "VirtioMmio", "VirtqueueError", "attach", "constants"]
