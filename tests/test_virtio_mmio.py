"""The virtio-mmio transport (hvm/mmio/virtio/mmio.py) driven as Linux's virtio_mmio.c drives it: registers,
feature negotiation, queue setup, notify -> backend, level interrupts, NEEDS_RESET and recovery, config
space and its generation, save/load. No KVM: GuestMemory, a recording IRQ line, register reads/writes."""
from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
from hypothesis import given, strategies as st

from hvm.memory import MiB, GuestMemory
from hvm.mmio.bus import MmioBus
from hvm.mmio.device import DeviceStateError, IrqLine, StateReader
from hvm.mmio.virtio import VirtioBackend, VirtioMmio, attach
from hvm.mmio.virtio import constants as vc
from hvm.mmio.virtio.mmio import MAX_WARNINGS
from virtio_driver import GuestDriver, make_rig, memory  # noqa: F401 (memory: the fixture)

F_TEST = 1 << 5     # a device-specific feature bit the test backend offers


class RecordingIrq(IrqLine):
    """An IrqLine that records every level change it passes on (as KVM_IRQ_LINE would see them)."""

    def __init__(self, irq: int = 5):
        self.changes: list[int] = []
        super().__init__(irq, lambda irq, level: self.changes.append(level))


class Echo(VirtioBackend):
    """A test backend with two queues: each chain's readable bytes come back reversed in its writable ones."""
    device_id = 0x2A
    queue_max_sizes = (16, 8)

    def __init__(self, name: str = "echo0"):
        self.name = name
        self.calls: list[tuple] = []
        self.cfg = bytearray(b"\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa")
        self.state = 0
        self.queues = None

    def device_features(self) -> int:
        return F_TEST

    def config(self) -> bytes:
        return bytes(self.cfg)

    def config_write(self, offset: int, data: bytes) -> None:
        self.calls.append(("config_write", offset, data))
        self.cfg[offset:offset + len(data)] = data

    def activate(self, features, queues, signal):
        self.calls.append(("activate", features))
        self.queues, self.signal = queues, signal

    def notify(self, index):
        self.calls.append(("notify", index))
        q = self.queues[index]
        while (chain := q.pop()) is not None:
            q.push_used(chain, chain.write(chain.read()[::-1]))
            self.state += 1
        self.signal(index)

    def reset(self):
        self.calls.append(("reset",))
        self.queues = None
        self.state = 0

    def save(self) -> dict:
        return {"served": self.state}

    def load(self, state: dict) -> None:
        self.state = StateReader(self.name, state, ("served",)).integer("served", 0, 1 << 32)


@pytest.fixture
def dev(memory):
    return make_rig(memory, Echo(), queues=None, irq=RecordingIrq())


ALL_FEATURES = vc.TRANSPORT_FEATURES | F_TEST


# --- registers -----------------------------------------------------------------------------------
def test_identification_registers(dev):
    r = dev.drv.r
    assert r(vc.MMIO_MAGIC_VALUE) == 0x74726976
    assert r(vc.MMIO_VERSION) == 2
    assert r(vc.MMIO_DEVICE_ID) == 0x2A
    assert r(vc.MMIO_VENDOR_ID) == 0x004D5648           # "HVM\0"
    assert dev.drv.device_features() == ALL_FEATURES
    dev.drv.w(vc.MMIO_DEVICE_FEATURES_SEL, 2)
    assert r(vc.MMIO_DEVICE_FEATURES) == 0
    assert r(vc.MMIO_SHM_LEN_LOW) == 0xFFFFFFFF and r(vc.MMIO_SHM_LEN_HIGH) == 0xFFFFFFFF
    assert r(vc.MMIO_CONFIG_GENERATION) == 0 and r(vc.MMIO_STATUS) == 0


def test_queue_num_max_per_queue(dev):
    for index, expected in ((0, 16), (1, 8), (2, 0), (0xFFFFFFFF, 0)):
        dev.drv.w(vc.MMIO_QUEUE_SEL, index)
        assert dev.drv.r(vc.MMIO_QUEUE_NUM_MAX) == expected
        assert dev.drv.r(vc.MMIO_QUEUE_READY) == 0


def test_register_accesses_that_are_not_32_bit_are_ignored(dev, caplog):
    assert dev.t.read(vc.MMIO_MAGIC_VALUE, 2) == 0
    assert dev.t.read(vc.MMIO_MAGIC_VALUE + 1, 4) == 0
    dev.t.write(vc.MMIO_STATUS, 1, vc.STATUS_ACKNOWLEDGE)
    assert dev.t.status == 0
    assert "1-byte write of 0x1 at +0x70 ignored (registers are 32-bit)" in caplog.text


def test_writes_to_read_only_registers_are_ignored(dev, caplog):
    dev.drv.w(vc.MMIO_MAGIC_VALUE, 0)
    dev.drv.w(vc.MMIO_INTERRUPT_STATUS, 3)
    assert dev.drv.r(vc.MMIO_MAGIC_VALUE) == vc.MMIO_MAGIC and dev.t.interrupt_status == 0
    assert "write of 0x0 to read-only or unknown register +0x0 ignored" in caplog.text


# --- the handshake --------------------------------------------------------------------------------
def test_linux_handshake(dev):
    rings = dev.drv.start(2)
    assert dev.t.status == (vc.STATUS_ACKNOWLEDGE | vc.STATUS_DRIVER | vc.STATUS_FEATURES_OK | vc.STATUS_DRIVER_OK)
    assert dev.backend.calls == [("reset",), ("activate", ALL_FEATURES)]
    for i, ring in enumerate(rings):
        q = dev.t.queues[i]
        assert q.ready and (q.desc_addr, q.avail_addr, q.used_addr) == (ring.desc, ring.avail, ring.used)
        assert q.event_idx and q.indirect
        dev.drv.w(vc.MMIO_QUEUE_SEL, i)
        assert dev.drv.r(vc.MMIO_QUEUE_READY) == 1
        assert dev.drv.r(vc.MMIO_QUEUE_DESC_LOW) == ring.desc and dev.drv.r(vc.MMIO_QUEUE_DESC_HIGH) == 0


def test_smaller_queue_than_the_maximum(dev):
    [ring] = dev.drv.start(1, size=4)
    assert dev.t.queues[0].size == 4
    head = ring.add([b"abc"], [3])
    dev.drv.kick(0)
    assert ring.take_used() == [(head, 3)] and ring.written(head) == b"cba"


def test_features_ok_refused_without_version_1(dev, caplog):
    assert not dev.drv.negotiate(ALL_FEATURES & ~(1 << vc.F_VERSION_1))
    assert dev.t.status == vc.STATUS_ACKNOWLEDGE | vc.STATUS_DRIVER
    assert "FEATURES_OK refused: the driver did not accept VIRTIO_F_VERSION_1" in caplog.text
    dev.drv.add_status(vc.STATUS_DRIVER_OK)           # a driver that ignores the refusal gets nowhere
    assert not dev.t.status & vc.STATUS_DRIVER_OK
    assert ("activate", ALL_FEATURES) not in dev.backend.calls and len(dev.backend.calls) == 1


def test_features_ok_refused_for_bits_not_offered(dev, caplog):
    assert not dev.drv.negotiate(ALL_FEATURES | 1 << 7 | 1 << 40)
    assert "FEATURES_OK refused: the driver asked for feature bits 0x10000000080 that were not offered" in caplog.text
    # the driver retries with what was offered, after a reset (as Linux would on a new probe)
    assert dev.drv.negotiate(1 << vc.F_VERSION_1)
    assert dev.t.driver_features == 1 << vc.F_VERSION_1


def test_driver_features_are_frozen_after_features_ok(dev, caplog):
    assert dev.drv.negotiate(1 << vc.F_VERSION_1)
    dev.drv.w(vc.MMIO_DRIVER_FEATURES_SEL, 0)
    dev.drv.w(vc.MMIO_DRIVER_FEATURES, F_TEST)
    assert dev.t.driver_features == 1 << vc.F_VERSION_1
    assert "driver features written in status 0xb ignored" in caplog.text


def test_features_without_event_idx_and_indirect_reach_the_queues(dev):
    dev.drv.start(1, features=1 << vc.F_VERSION_1)
    q = dev.t.queues[0]
    assert not q.event_idx and not q.indirect
    assert dev.backend.calls[-1] == ("activate", 1 << vc.F_VERSION_1)


def test_status_bits_cannot_be_cleared_except_by_reset(dev, caplog):
    dev.drv.start(1)
    dev.drv.w(vc.MMIO_STATUS, vc.STATUS_ACKNOWLEDGE)
    assert dev.t.status & vc.STATUS_DRIVER_OK
    assert "clears bits of 0xf: ignored (only 0 resets)" in caplog.text


def test_queue_registers_are_frozen_while_ready(dev):
    [ring] = dev.drv.start(1)
    dev.drv.w(vc.MMIO_QUEUE_SEL, 0)
    dev.drv.w(vc.MMIO_QUEUE_NUM, 2)
    dev.drv.w(vc.MMIO_QUEUE_DESC_LOW, 0x5000)
    q = dev.t.queues[0]
    assert q.size == 16 and q.desc_addr == ring.desc


def test_queue_with_a_ring_outside_ram_needs_reset(dev, caplog):
    assert dev.drv.negotiate()
    dev.drv.w(vc.MMIO_QUEUE_SEL, 0)
    dev.drv.w(vc.MMIO_QUEUE_DESC_LOW, 0)
    dev.drv.w(vc.MMIO_QUEUE_DESC_HIGH, 0x10)             # 64 GiB: no RAM there
    dev.drv.w(vc.MMIO_QUEUE_READY, 1)
    assert dev.drv.r(vc.MMIO_QUEUE_READY) == 0
    assert dev.t.status & vc.STATUS_DEVICE_NEEDS_RESET
    assert "descriptor table 0x1000000000..0x1000000100 is outside guest RAM" in caplog.text
    assert dev.irq.changes == []                          # no DRIVER_OK yet: no config interrupt


def test_queue_size_not_a_power_of_two_needs_reset(dev, caplog):
    assert dev.drv.negotiate()
    dev.drv.w(vc.MMIO_QUEUE_SEL, 1)
    dev.drv.w(vc.MMIO_QUEUE_NUM, 6)
    dev.drv.w(vc.MMIO_QUEUE_READY, 1)
    assert dev.t.status & vc.STATUS_DEVICE_NEEDS_RESET
    assert "echo0 queue 1: size 6 is not a power of 2 in 1..8" in caplog.text


# --- notify and interrupts -------------------------------------------------------------------------
def test_notify_reaches_the_backend_and_raises_the_line(dev):
    rings = dev.drv.start(2)
    head = rings[1].add([b"hello"], [5])
    dev.drv.kick(1)
    assert ("notify", 1) in dev.backend.calls
    assert rings[1].take_used() == [(head, 5)] and rings[1].written(head) == b"olleh"
    assert dev.irq.level and dev.irq.changes == [1]
    assert dev.drv.r(vc.MMIO_INTERRUPT_STATUS) == vc.INT_USED_BUFFER
    assert dev.drv.ack_interrupt() == vc.INT_USED_BUFFER
    assert not dev.irq.level and dev.irq.changes == [1, 0]
    assert dev.t.stats() == {"notifications": 1, "interrupts": 1, "config_interrupts": 0, "errors": 0}


def test_line_stays_high_until_every_bit_is_acked(dev):
    [ring] = dev.drv.start(1)
    ring.add([b"x"], [1])
    dev.drv.kick(0)
    dev.t.config_changed()
    assert dev.drv.r(vc.MMIO_INTERRUPT_STATUS) == 3
    dev.drv.w(vc.MMIO_INTERRUPT_ACK, vc.INT_USED_BUFFER)
    assert dev.irq.level
    dev.drv.w(vc.MMIO_INTERRUPT_ACK, vc.INT_CONFIG_CHANGE)
    assert not dev.irq.level and dev.irq.changes == [1, 0]


def test_event_idx_suppresses_interrupts(dev):
    [ring] = dev.drv.start(1)
    ring.set_used_event(1)                   # the driver wants an interrupt once used idx passes 1
    ring.add([b"a"], [1])
    dev.drv.kick(0)
    assert not dev.irq.level and dev.t.interrupts == 0
    ring.add([b"b"], [1])
    dev.drv.kick(0)
    assert dev.irq.level and dev.t.interrupts == 1


def test_no_interrupt_flag_without_event_idx(dev):
    [ring] = dev.drv.start(1, features=1 << vc.F_VERSION_1)
    ring.set_avail_flags(vc.VIRTQ_AVAIL_F_NO_INTERRUPT)
    ring.add([b"a"], [1])
    dev.drv.kick(0)
    assert ring.used_idx() == 1 and not dev.irq.level


def test_queue_notify_from_outside_the_registers(dev):
    [ring, _] = dev.drv.start(2)
    head = ring.add([b"io"], [2])
    dev.t.queue_notify(0)                    # what an ioeventfd handler would call
    assert ring.take_used() == [(head, 2)] and dev.t.notifications == 1 and dev.irq.level


def test_notifications_that_are_ignored(dev):
    assert dev.drv.negotiate()
    ring = dev.drv.setup_queue(0)
    ring.add([b"a"], [1])
    dev.drv.kick(0)                          # before DRIVER_OK
    dev.drv.add_status(vc.STATUS_DRIVER_OK)
    dev.drv.kick(1)                          # queue 1 was never made ready
    dev.drv.kick(7)                          # no such queue
    assert [c for c in dev.backend.calls if c[0] == "notify"] == []
    assert ring.used_idx() == 0 and dev.t.notifications == 3


# --- NEEDS_RESET ------------------------------------------------------------------------------------
def test_hostile_ring_needs_reset_then_reset_recovers(dev, caplog):
    [ring, _] = dev.drv.start(2)
    ring.write_desc(0, 0xC000_0000, 512, vc.VIRTQ_DESC_F_WRITE)   # the PCI hole
    ring.publish(0)
    dev.drv.kick(0)
    assert dev.t.status & vc.STATUS_DEVICE_NEEDS_RESET
    assert dev.drv.r(vc.MMIO_INTERRUPT_STATUS) == vc.INT_CONFIG_CHANGE and dev.irq.level
    assert ("echo0: device needs reset: echo0 queue 0: chain 0: descriptor 0 buffer 0xc0000000..0xc0000200 "
            "is outside guest RAM") in caplog.text
    assert dev.t.errors == 1 and dev.backend.calls[-1] == ("reset",)    # the backend stopped at once
    # stopped: a good chain now is not served, a notification reaches nobody
    dev.backend.calls.clear()
    ring.add([b"a"], [1])
    dev.drv.kick(0)
    assert dev.backend.calls == [] and ring.used_idx() == 0
    # a backend thread that signals meanwhile raises nothing
    dev.drv.ack_interrupt()
    dev.t.signal(0)
    assert not dev.irq.level
    # the driver writes back status with NEEDS_RESET or without: it stays until reset
    dev.drv.add_status(vc.STATUS_FAILED)
    assert dev.t.status & vc.STATUS_DEVICE_NEEDS_RESET and dev.t.status & vc.STATUS_FAILED
    # reset, and the whole probe again: the device works
    dev.drv.w(vc.MMIO_STATUS, 0)
    assert dev.t.status == 0 and dev.backend.calls == [("reset",)]
    assert all(not q.ready and not q.broken for q in dev.t.queues)
    [ring, _] = dev.drv.start(2)
    head = ring.add([b"ok"], [2])
    dev.drv.kick(0)
    assert ring.take_used() == [(head, 2)] and ring.written(head) == b"ko"


def test_backend_thread_reports_needs_reset(dev):
    dev.drv.start(1)
    dev.t.needs_reset("rx: bad ring")
    dev.t.needs_reset("rx: again")                 # once set, not counted again
    assert dev.t.errors == 1 and dev.t.broken and dev.t.queues[0].pop() is None
    assert dev.backend.calls.count(("reset",)) == 2          # the driver's at probe, then NEEDS_RESET's
    assert dev.irq.level and dev.t.interrupt_status == vc.INT_CONFIG_CHANGE


def test_log_lines_are_bounded(dev, caplog):
    caplog.set_level(logging.DEBUG)
    for _ in range(100):
        dev.t.read(0, 1)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == MAX_WARNINGS + 1
    assert "16 guest mistakes logged; further ones at debug level" in warnings[-1].getMessage()
    dev.t.needs_reset("a bad ring")          # still a warning: errors have their own bound
    last = caplog.records[-1]
    assert last.levelno == logging.WARNING and last.getMessage() == "echo0: device needs reset: a bad ring"


# --- configuration space ---------------------------------------------------------------------------
def test_config_space_reads_of_any_size(dev):
    r = dev.drv.r
    assert r(vc.MMIO_CONFIG, 1) == 0x11
    assert r(vc.MMIO_CONFIG + 1, 2) == 0x3322
    assert r(vc.MMIO_CONFIG + 2, 4) == 0x66554433
    assert r(vc.MMIO_CONFIG, 8) == 0x8877665544332211
    assert r(vc.MMIO_CONFIG + 8, 4) == 0                   # past the 10 bytes


def test_config_space_write_goes_to_the_backend(dev):
    dev.drv.w(vc.MMIO_CONFIG + 2, 0xBEEF, 2)
    assert dev.backend.calls == [("config_write", 2, b"\xef\xbe")]
    assert dev.drv.r(vc.MMIO_CONFIG + 2, 2) == 0xBEEF
    dev.drv.w(vc.MMIO_CONFIG + 9, 0x1234, 2)              # crosses the end: ignored
    assert len(dev.backend.calls) == 1


def test_config_generation(dev):
    dev.t.config_changed()                                 # before DRIVER_OK: a new generation, no interrupt
    assert dev.drv.r(vc.MMIO_CONFIG_GENERATION) == 1 and not dev.irq.level
    dev.drv.start(1)                                       # its reset starts the count again
    assert dev.drv.r(vc.MMIO_CONFIG_GENERATION) == 0
    dev.t.config_changed()
    dev.t.config_changed()
    assert dev.drv.r(vc.MMIO_CONFIG_GENERATION) == 2
    assert dev.drv.r(vc.MMIO_INTERRUPT_STATUS) == vc.INT_CONFIG_CHANGE and dev.irq.level
    assert dev.t.config_interrupts == 2


# --- state -----------------------------------------------------------------------------------------
def _busy(dev):
    """A device mid-run: two chains served on queue 0, an interrupt pending, a config change."""
    [ring, _] = dev.drv.start(2)
    for text in (b"one", b"two"):
        ring.add([text], [3])
        dev.drv.kick(0)
    dev.t.config_changed()
    return ring


def test_save_load_round_trip(dev, memory):
    ring = _busy(dev)
    state = dev.t.save()
    assert state["backend"] == {"served": 2} and state["interrupt_status"] == 3
    assert state["queues"][0]["last_avail_idx"] == 2 and state["queues"][0]["used_idx"] == 2

    irq, backend = RecordingIrq(), Echo()
    t2 = VirtioMmio(memory, irq, backend)
    t2.load(copy.deepcopy(state))
    assert t2.save() == state
    assert irq.level and backend.calls == [("activate", ALL_FEATURES)] and backend.state == 2
    # the restored device goes on where the first one stopped
    GuestDriver(t2, memory).ack_interrupt()
    ring.set_used_event(2)                   # as Linux's callback re-arms: interrupt after used idx 2
    head = ring.add([b"three"], [5])
    t2.write(vc.MMIO_QUEUE_NOTIFY, 4, 0)
    assert ring.take_used()[-1] == (head, 5) and ring.written(head) == b"eerht"
    assert t2.queues[0].used_idx == 3 and irq.level


def test_state_survives_the_snapshot_codec(dev, memory):
    from hvm.snapshot.codec import decode, encode

    _busy(dev)
    dev.drv.w(vc.MMIO_QUEUE_SEL, 1)
    dev.drv.w(vc.MMIO_QUEUE_READY, 0)                     # a queue not ready may hold any u64 address
    dev.drv.w(vc.MMIO_QUEUE_DESC_HIGH, 0xFFFFFFFF)
    state = dev.t.save()
    t2 = VirtioMmio(memory, RecordingIrq(), Echo())
    t2.load(decode(encode(state)))
    assert t2.save() == state


def test_reset_returns_to_the_power_on_state(dev, memory):
    _busy(dev)
    dev.t.reset()
    assert dev.t.save() == VirtioMmio(memory, IrqLine(5), Echo()).save()
    assert not dev.irq.level


def _bad(state, path, value):
    state = copy.deepcopy(state)
    target = state
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return state


@pytest.mark.parametrize("path,value,message", [
    (("status",), 0x100, "state field 'status': 256 is out of range 0x0..0xff"),
    (("status",), vc.STATUS_DRIVER_OK | vc.STATUS_DRIVER, "has DRIVER_OK without FEATURES_OK"),
    (("driver_features",), 1 << 7 | 1 << 32, "has bits not offered"),
    (("driver_features",), F_TEST, "FEATURES_OK without VIRTIO_F_VERSION_1"),
    (("interrupt_status",), 4, "'interrupt_status': 4 is out of range 0x0..0x3"),
    (("queue_sel",), True, "'queue_sel': expected an int, got bool"),
    (("config_generation",), KeyError, "state field 'config_generation' is missing"),
    (("bogus",), 1, "unknown state field 'bogus'"),
    (("queues",), [], "'queues': expected a list of 2 queues"),
    (("queues", 0, "last_avail_idx"), 0x10000, "'last_avail_idx': 65536 is out of range 0x0..0xffff"),
    (("queues", 0, "desc"), 0xC000_0000, "descriptor table 0xc0000000..0xc0000100 is outside guest RAM"),
    (("queues", 0, "num"), 3, "size 3 is not a power of 2 in 1..16"),
    (("queues", 1, "ready"), 1, "'ready': expected a bool, got int"),
    (("backend",), [], "'backend': expected a dict, got list"),
    (("backend", "served"), -1, "device echo0: state field 'served': -1 is out of range"),
])
def test_load_refuses_bad_states_and_leaves_the_device_unchanged(dev, path, value, message):
    _busy(dev)
    before = dev.t.save()
    calls = list(dev.backend.calls)
    with pytest.raises(DeviceStateError) as e:
        dev.t.load(_bad(before, path, value))
    assert message in str(e.value) and str(e.value).startswith("device echo0")
    assert dev.t.save() == before and dev.backend.calls == calls


def test_load_of_a_needs_reset_device_keeps_it_stopped(dev, memory):
    [ring, _] = dev.drv.start(2)
    ring.write_desc(0, 1 << 50, 8)
    ring.publish(0)
    dev.drv.kick(0)
    state = dev.t.save()
    backend = Echo()
    t2 = VirtioMmio(memory, RecordingIrq(), backend)
    t2.load(state)
    assert t2.broken and t2.queues[0].broken and backend.calls == []


# --- attach -----------------------------------------------------------------------------------------
def test_attach_registers_the_transport_on_the_bus(memory):
    bus, closers, lines = MmioBus(), [], []

    def irq_line(n):
        lines.append(RecordingIrq(n))
        return lines[-1]

    ctx = SimpleNamespace(name="echo3", index=3, memory=memory, mmio=bus, on_close=closers.append,
                          slot=SimpleNamespace(base=0xD000_3000, size=0x1000, irq=10), irq_line=irq_line)
    backend = Echo("echo3")
    t = attach(ctx, backend)
    assert isinstance(t, VirtioMmio) and t.name == "echo3" and backend.transport is t
    assert bus.read(0xD000_3000, 4) == vc.MMIO_MAGIC
    assert bus.read(0xD000_3000 + vc.MMIO_DEVICE_ID, 4) == 0x2A
    assert bus.read(0xD000_3FFC, 4) == 0 and bus.find(0xD000_4000) is None
    assert t.irq is lines[0] and lines[0].irq == 10
    assert closers == [t.close]


# --- fuzz: random register accesses --------------------------------------------------------------
REGISTER = st.sampled_from([vc.MMIO_DEVICE_FEATURES_SEL, vc.MMIO_DRIVER_FEATURES, vc.MMIO_DRIVER_FEATURES_SEL,
                            vc.MMIO_QUEUE_SEL, vc.MMIO_QUEUE_NUM, vc.MMIO_QUEUE_READY, vc.MMIO_QUEUE_NOTIFY,
                            vc.MMIO_INTERRUPT_ACK, vc.MMIO_STATUS, vc.MMIO_QUEUE_DESC_LOW, vc.MMIO_QUEUE_DESC_HIGH,
                            vc.MMIO_QUEUE_DRIVER_LOW, vc.MMIO_QUEUE_DRIVER_HIGH, vc.MMIO_QUEUE_DEVICE_LOW,
                            vc.MMIO_QUEUE_DEVICE_HIGH, vc.MMIO_CONFIG_GENERATION])
VALUE = st.one_of(st.integers(0, 16), st.sampled_from([0x100000, 0x200000, 0x300000, 0x3, 0xB, 0xF]),
                  st.integers(0, 0xFFFFFFFF))
ACCESS = st.one_of(
    st.tuples(st.just("w"), REGISTER, st.just(4), VALUE),
    st.tuples(st.just("w"), st.integers(0, 0x1FF), st.sampled_from([1, 2, 4, 8]), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("r"), st.integers(0, 0x1FF), st.sampled_from([1, 2, 4, 8]), st.just(0)),
    st.tuples(st.just("config_changed"), st.just(0), st.just(0), st.just(0)))


@pytest.mark.fuzz
@given(accesses=st.lists(ACCESS, max_size=60), handshake=st.booleans())
def test_fuzz_register_accesses(accesses, handshake):
    """Any sequence of accesses: no exception, the line high exactly while InterruptStatus != 0, and a state
    that saves, loads into a new device and saves the same."""
    with GuestMemory(16 * MiB) as memory:
        irq, backend = RecordingIrq(), Echo()
        t = VirtioMmio(memory, irq, backend)
        if handshake:
            [ring, _] = GuestDriver(t, memory).start(2)
            ring.add([b"abc"], [3])
        for kind, offset, size, value in accesses:
            if kind == "w":
                t.write(offset, size, value & ((1 << 8 * size) - 1))
            elif kind == "r":
                assert 0 <= t.read(offset, size) < 1 << 8 * size
            else:
                t.config_changed()
            assert irq.level == (t.interrupt_status != 0)
            assert 0 <= t.status <= 0xFF and t.interrupt_status in (0, 1, 2, 3)
        state = t.save()
        t2 = VirtioMmio(memory, RecordingIrq(), Echo())
        t2.load(state)
        assert t2.save() == state


# --- a backend with its own thread -----------------------------------------------------------------
def test_backend_thread_and_driver_resets_interleave(memory):
    """A net-RX-like thread fills queue 0 under transport.lock while the driver resets and re-probes the
    device over and over: no exception on either side, and the line always matches InterruptStatus."""
    import threading

    class Rx(Echo):
        def notify(self, index):
            pass

    backend, irq = Rx(), RecordingIrq()
    t = VirtioMmio(memory, irq, backend)
    drv = GuestDriver(t, memory)
    errors: list[BaseException] = []
    stop = threading.Event()
    served = [0]

    def rx():
        try:
            while not stop.is_set():
                with t.lock:
                    queues = backend.queues
                    if queues is None:
                        continue
                    chain = queues[0].pop()
                    if chain is not None:
                        queues[0].push_used(chain, chain.write(b"packet"))
                        backend.signal(0)
                        served[0] += 1
        except BaseException as e:   # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=rx)
    thread.start()
    try:
        for _ in range(30):
            [ring, _] = drv.start(2)
            for _ in range(4):
                ring.add(in_lens=[8])
            for _ in range(200):
                if ring.used_idx() == 4:
                    break
                threading.Event().wait(0.001)
            assert irq.level == (t.interrupt_status != 0)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive() and errors == []
    assert served[0] > 0 and t.errors == 0
