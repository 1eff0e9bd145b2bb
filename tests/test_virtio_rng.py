"""virtio-rng (hvm/mmio/virtio/rng.py): the backend behind the transport, driven as Linux's virtio-rng does
(one writable buffer per request)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from hvm.memory import MiB, GuestMemory
from hvm.mmio.bus import MmioBus
from hvm.mmio.device import IrqLine
from hvm.mmio.virtio import VirtioMmio
from hvm.mmio.virtio import constants as vc
from hvm.mmio.virtio import rng
from virtio_driver import GuestDriver


def counting_source(n: int) -> bytes:
    return bytes(i & 0xFF for i in range(n))


@pytest.fixture
def memory():
    with GuestMemory(16 * MiB) as mem:
        yield mem


def make(memory, source=counting_source):
    backend = rng.VirtioRng("virtio-rng0", source=source)
    irq = IrqLine(5)
    t = VirtioMmio(memory, irq, backend)
    drv = GuestDriver(t, memory)
    [ring] = drv.start(1)
    return SimpleNamespace(backend=backend, t=t, irq=irq, drv=drv, ring=ring)


def test_identity(memory):
    d = make(memory)
    assert d.drv.r(vc.MMIO_DEVICE_ID) == vc.VIRTIO_ID_RNG == 4
    assert d.drv.r(vc.MMIO_QUEUE_NUM_MAX) == rng.QUEUE_SIZE
    assert d.drv.device_features() == vc.TRANSPORT_FEATURES     # no device-specific features
    assert d.t.backend.config() == b""


def test_fills_a_buffer(memory):
    d = make(memory)
    head = d.ring.add(in_lens=[32])
    d.drv.kick(0)
    assert d.ring.take_used() == [(head, 32)]
    assert d.ring.written(head) == bytes(range(32))
    assert d.irq.level and d.drv.ack_interrupt() == vc.INT_USED_BUFFER
    assert (d.backend.requests, d.backend.bytes_served) == (1, 32)


def test_from_urandom(memory):
    d = make(memory, source=rng.os.urandom)
    head = d.ring.add(in_lens=[64])
    d.drv.kick(0)
    data = d.ring.written(head)
    assert len(data) == 64 and data != bytes(64)     # 2^-512 odds of a false failure


def test_requests_are_bounded(memory):
    d = make(memory)
    asked = []
    d.backend._source = lambda n: asked.append(n) or counting_source(n)
    head = d.ring.add(in_lens=[100 << 10])
    d.drv.kick(0)
    assert d.ring.take_used() == [(head, rng.MAX_REQUEST)] and asked == [64 << 10]
    assert d.ring.written(head)[rng.MAX_REQUEST:] == bytes((100 << 10) - rng.MAX_REQUEST)


def test_several_chains_one_interrupt(memory):
    d = make(memory)
    heads = [d.ring.add(in_lens=[n]) for n in (8, 16, 1)]
    d.drv.kick(0)
    assert d.ring.take_used() == [(heads[0], 8), (heads[1], 16), (heads[2], 1)]
    assert d.t.interrupts == 1
    assert d.t.stats() == {"notifications": 1, "interrupts": 1, "config_interrupts": 0, "errors": 0,
                           "requests": 3, "bytes_served": 25}


def test_readable_only_chain_gets_nothing(memory):
    d = make(memory)
    head = d.ring.add([b"ignored"])
    d.drv.kick(0)
    assert d.ring.take_used() == [(head, 0)] and d.backend.bytes_served == 0


def test_hostile_ring_needs_reset(memory):
    d = make(memory)
    d.ring.write_desc(0, 0xE000_0000, 64, vc.VIRTQ_DESC_F_WRITE)
    d.ring.publish(0)
    d.drv.kick(0)
    assert d.t.broken and d.backend.bytes_served == 0


def test_reset_forgets_the_queue(memory):
    d = make(memory)
    d.drv.w(vc.MMIO_STATUS, 0)
    d.backend.notify(0)                   # a stray call after reset touches nothing
    assert d.backend.requests == 0
    assert d.t.save()["backend"] == {}


def test_device_declaration(memory):
    if rng.DEVICE is None:
        pytest.skip("hvm.mmio.registry is not on this branch yet (CONTRACT.md part A)")
    assert rng.DEVICE.name == "virtio-rng" and rng.DEVICE.aliases == ("virtio-rng-device",)
    assert rng.DEVICE.virtio and rng.DEVICE.help


def test_create_attaches_to_the_slot(memory):
    bus, closers = MmioBus(), []
    ctx = SimpleNamespace(name="virtio-rng0", index=0, memory=memory, mmio=bus, on_close=closers.append,
                          slot=SimpleNamespace(base=0xD000_0000, size=0x1000, irq=5), irq_line=IrqLine)
    t = rng.create(ctx, {})
    assert bus.read(0xD000_0000 + vc.MMIO_DEVICE_ID, 4) == 4
    assert t.name == "virtio-rng0" and t.irq.irq == 5 and closers == [t.close]
