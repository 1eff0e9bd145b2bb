"""virtio-rng (virtio 1.x spec 5.4, device ID 4): entropy for the guest's hwrng from os.urandom.

One queue ("requestq"): the driver makes device-writable buffers available; the device fills each with
random bytes (at most MAX_REQUEST per chain: a guest cannot make one notification cost the VMM an
unbounded urandom read) and returns it used with the count written. No features, no configuration space,
no state beyond the transport's. Linux's virtio-rng driver registers it as /dev/hwrng and pulls from it at
boot ("random: crng init done" comes sooner); `bytes_served` and `requests` count what it got.
"""
from __future__ import annotations

import os
from typing import Callable

from hvm.mmio.virtio import attach
from hvm.mmio.virtio import constants as vc
from hvm.mmio.virtio.backend import VirtioBackend
from hvm.mmio.virtio.queue import Queue

from hvm.mmio.registry import DeviceContext, DeviceType

MAX_REQUEST = 64 << 10    # bytes of entropy one chain gets at most
QUEUE_SIZE = 64


class VirtioRng(VirtioBackend):
    device_id = vc.VIRTIO_ID_RNG
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, name: str = "virtio-rng0", source: Callable[[int], bytes] = os.urandom):
        self.name = name
        self._source = source
        self._queues: list[Queue] = []
        self._signal: Callable[[int], None] | None = None
        self.bytes_served = 0     # host-side statistics (not device state)
        self.requests = 0

    def activate(self, features: int, queues: list[Queue], signal: Callable[[int], None]) -> None:
        self._queues, self._signal = queues, signal

    def reset(self) -> None:
        self._queues, self._signal = [], None

    def notify(self, queue_index: int) -> None:
        if queue_index != 0 or not self._queues or self._signal is None:
            return
        q = self._queues[0]
        served = False
        while (chain := q.pop()) is not None:
            # Readable buffers have no meaning for this device (the spec has none): they are ignored.
            n = min(chain.writable_len, MAX_REQUEST)
            written = chain.write(self._source(n)) if n else 0
            q.push_used(chain, written)
            self.bytes_served += written
            self.requests += 1
            served = True
        if served:
            self._signal(0)

    def stats(self) -> dict[str, int]:
        return {"requests": self.requests, "bytes_served": self.bytes_served}


def create(ctx: "DeviceContext", props: dict) -> object:
    return attach(ctx, VirtioRng(ctx.name))


DEVICE = DeviceType(
    name="virtio-rng", aliases=("virtio-rng-device",), virtio=True, create=create,
    help="virtio entropy source for the guest's hwrng, fed from the host's os.urandom")
