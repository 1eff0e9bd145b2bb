"""The virtio-mmio transport, register layout version 2 ("modern"; virtio 1.x spec 4.2).

One VirtioMmio is one 4 KiB slot on the MmioBus: the registers below 0x100 and the backend's configuration
space from 0x100. It negotiates features (the driver must accept VERSION_1 and nothing not offered), runs
the status handshake, configures the split virtqueues, passes QueueNotify to the backend and raises the
interrupt line.

Interrupts are level-triggered: the line is held high exactly while InterruptStatus != 0 (set by a
used-buffer signal or a configuration change, cleared by InterruptACK or a reset).

A VirtqueueError (a hostile or broken ring) never leaves the device: the transport sets
DEVICE_NEEDS_RESET, resets the backend, raises a configuration-change interrupt (when the driver is
running), logs the reason (the first MAX_WARNINGS guest mistakes as warnings, then at debug level) and
ignores the queues until the driver resets the device (status 0).

Registers are 32-bit: other sizes are ignored (reads 0), as are writes to read-only registers; each such
guest mistake is logged under the same bound. The configuration space takes any size.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from hvm.memory import GuestMemory
from hvm.mmio.device import DeviceStateError, IrqLine, StateReader
from hvm.mmio.virtio import constants as vc
from hvm.mmio.virtio.backend import VirtioBackend
from hvm.mmio.virtio.queue import Queue, VirtqueueError

log = logging.getLogger(__name__)

MAX_WARNINGS = 16     # per transport: guest mistakes logged as warnings; the rest at debug level
U32 = 0xFFFF_FFFF
U64 = (1 << 64) - 1

_STATE_FIELDS = ("status", "device_features_sel", "driver_features_sel", "driver_features", "queue_sel",
                 "interrupt_status", "config_generation", "queues", "backend")


class VirtioMmio:
    """The transport of one virtio device: a Device for the MmioBus (hvm/mmio/device.py protocol)."""

    def __init__(self, memory: GuestMemory, irq: IrqLine, backend: VirtioBackend, name: str | None = None):
        self.name = name or backend.name
        self.memory = memory
        self.irq = irq
        self.backend = backend
        self.lock = threading.RLock()
        self._lock = self.lock          # device.state_lock() finds it: snapshots see a consistent device
        self.queues = [Queue(memory, i, n, self.name) for i, n in enumerate(backend.queue_max_sizes)]
        # Host-side statistics (not state): for --stats.
        self.notifications = 0          # QueueNotify writes
        self.interrupts = 0             # used-buffer interrupts raised (signals not suppressed)
        self.config_interrupts = 0
        self.errors = 0                 # VirtqueueErrors (times the device entered NEEDS_RESET)
        self._warnings = 0
        backend.transport = self
        self._clear()

    def _clear(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        for q in self.queues:
            q.reset()

    # --- helpers -----------------------------------------------------------------------------------
    def _warn(self, fmt: str, *args: object) -> None:
        self._warnings += 1
        level = logging.WARNING if self._warnings <= MAX_WARNINGS else logging.DEBUG
        log.log(level, "%s: " + fmt, self.name, *args)
        if self._warnings == MAX_WARNINGS:
            log.warning("%s: %d guest mistakes logged; further ones at debug level", self.name, MAX_WARNINGS)

    def device_features(self) -> int:
        return (self.backend.device_features() | vc.TRANSPORT_FEATURES) & U64

    def _update_irq(self) -> None:
        self.irq.set_level(self.interrupt_status != 0)

    def _queue(self) -> Queue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    @property
    def broken(self) -> bool:
        """DEVICE_NEEDS_RESET is set: the device ignores its queues until the driver resets it."""
        return bool(self.status & vc.STATUS_DEVICE_NEEDS_RESET)

    @property
    def driver_ok(self) -> bool:
        return bool(self.status & vc.STATUS_DRIVER_OK)

    # --- what backends call ------------------------------------------------------------------------
    def signal(self, queue_index: int) -> None:
        """A backend pushed used buffers on a queue: interrupt the driver unless the queue suppresses it."""
        with self.lock:
            if self.broken or not 0 <= queue_index < len(self.queues):
                return
            if self.queues[queue_index].needs_interrupt():
                self.interrupts += 1
                self.interrupt_status |= vc.INT_USED_BUFFER
                self._update_irq()

    def config_changed(self) -> None:
        """The backend's configuration space changed: a new generation and, when running, an interrupt."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & U32
            self._config_interrupt()

    def _config_interrupt(self) -> None:
        if self.driver_ok:
            self.config_interrupts += 1
            self.interrupt_status |= vc.INT_CONFIG_CHANGE
            self._update_irq()

    def needs_reset(self, reason: str) -> None:
        """The device cannot go on (a bad ring): DEVICE_NEEDS_RESET until the driver resets the device."""
        with self.lock:
            if self.broken:
                return
            self.errors += 1
            # Its own bound: a driver's earlier register mistakes do not hide why the device stopped.
            level = logging.WARNING if self.errors <= MAX_WARNINGS else logging.DEBUG
            log.log(level, "%s: device needs reset: %s", self.name, reason)
            if self.errors == MAX_WARNINGS:
                log.warning("%s: %d resets needed; further ones at debug level", self.name, MAX_WARNINGS)
            self.status |= vc.STATUS_DEVICE_NEEDS_RESET
            for q in self.queues:
                q.broken = True
            # The backend stops now (CONTRACT.md: reset() on NEEDS_RESET), not at the driver's reset: it may
            # be called here from the backend's own thread, so a backend's reset() never joins that thread.
            self.backend.reset()
            self._config_interrupt()

    # --- the Device protocol -----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self.lock:
            if offset >= vc.MMIO_CONFIG:
                return self._config_read(offset - vc.MMIO_CONFIG, size)
            if size != 4 or offset % 4:
                self._warn("%d-byte read at +%#x ignored (registers are 32-bit)", size, offset)
                return 0
            return self._register(offset) & U32

    def _register(self, offset: int) -> int:
        q = self._queue()
        if offset == vc.MMIO_MAGIC_VALUE:
            return vc.MMIO_MAGIC
        if offset == vc.MMIO_VERSION:
            return vc.MMIO_VERSION_2
        if offset == vc.MMIO_DEVICE_ID:
            return self.backend.device_id
        if offset == vc.MMIO_VENDOR_ID:
            return vc.MMIO_VENDOR
        if offset == vc.MMIO_DEVICE_FEATURES:
            sel = self.device_features_sel
            return self.device_features() >> (32 * sel) if sel < 2 else 0
        if offset == vc.MMIO_QUEUE_NUM_MAX:
            return q.max_size if q is not None else 0
        if offset == vc.MMIO_QUEUE_NUM:
            return q.size if q is not None else 0
        if offset == vc.MMIO_QUEUE_READY:
            return int(q is not None and q.ready)
        if offset == vc.MMIO_INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == vc.MMIO_STATUS:
            return self.status
        if offset in (vc.MMIO_QUEUE_DESC_LOW, vc.MMIO_QUEUE_DESC_HIGH, vc.MMIO_QUEUE_DRIVER_LOW,
                      vc.MMIO_QUEUE_DRIVER_HIGH, vc.MMIO_QUEUE_DEVICE_LOW, vc.MMIO_QUEUE_DEVICE_HIGH):
            if q is None:
                return 0
            value = {vc.MMIO_QUEUE_DESC_LOW: q.desc_addr, vc.MMIO_QUEUE_DRIVER_LOW: q.avail_addr,
                     vc.MMIO_QUEUE_DEVICE_LOW: q.used_addr}[offset & ~4]
            return value >> 32 if offset & 4 else value
        if offset in (vc.MMIO_SHM_LEN_LOW, vc.MMIO_SHM_LEN_HIGH, vc.MMIO_SHM_BASE_LOW, vc.MMIO_SHM_BASE_HIGH):
            return U32    # no shared memory regions: a length of -1 (spec 4.2.2)
        if offset == vc.MMIO_CONFIG_GENERATION:
            return self.config_generation
        return 0          # write-only registers, QueueReset (not offered) and holes read as 0

    def _config_read(self, offset: int, size: int) -> int:
        config = self.backend.config()
        if offset + size > len(config):
            self._warn("%d-byte read at config +%#x beyond the %d-byte configuration space", size, offset,
                       len(config))
            return 0
        return int.from_bytes(config[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if offset >= vc.MMIO_CONFIG:
                offset -= vc.MMIO_CONFIG
                if offset + size > len(self.backend.config()):
                    self._warn("%d-byte write at config +%#x beyond the configuration space ignored", size, offset)
                    return
                self.backend.config_write(offset, value.to_bytes(size, "little"))
                return
            if size != 4 or offset % 4:
                self._warn("%d-byte write of %#x at +%#x ignored (registers are 32-bit)", size, value, offset)
                return
            self._write_register(offset, value & U32)

    def _write_register(self, offset: int, value: int) -> None:
        if offset == vc.MMIO_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == vc.MMIO_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == vc.MMIO_DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == vc.MMIO_QUEUE_SEL:
            self.queue_sel = value
        elif offset == vc.MMIO_QUEUE_NOTIFY:
            self._notify(value)
        elif offset == vc.MMIO_INTERRUPT_ACK:
            self.interrupt_status &= ~value
            self._update_irq()
        elif offset == vc.MMIO_STATUS:
            self._write_status(value)
        elif offset in (vc.MMIO_QUEUE_NUM, vc.MMIO_QUEUE_READY, vc.MMIO_QUEUE_DESC_LOW, vc.MMIO_QUEUE_DESC_HIGH,
                        vc.MMIO_QUEUE_DRIVER_LOW, vc.MMIO_QUEUE_DRIVER_HIGH, vc.MMIO_QUEUE_DEVICE_LOW,
                        vc.MMIO_QUEUE_DEVICE_HIGH):
            self._write_queue(offset, value)
        elif offset == vc.MMIO_SHM_SEL:
            pass          # no shared memory regions: every selection reads as absent
        else:
            self._warn("write of %#x to read-only or unknown register +%#x ignored", value, offset)

    def _write_driver_features(self, value: int) -> None:
        if self.status & vc.STATUS_FEATURES_OK or not self.status & vc.STATUS_DRIVER:
            self._warn("driver features written in status %#x ignored", self.status)
            return
        sel = self.driver_features_sel
        if sel >= 2:
            if value:
                self._warn("driver features %#x for bits %d.. ignored (none offered)", value, 32 * sel)
            return
        shift = 32 * sel
        self.driver_features = (self.driver_features & ~(U32 << shift)) | (value << shift)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = self.status
        # NEEDS_RESET is the device's bit: a driver writing back what it read may carry it or not.
        new = (value & ~vc.STATUS_DEVICE_NEEDS_RESET & 0xFF) | (old & vc.STATUS_DEVICE_NEEDS_RESET)
        if old & ~new:
            self._warn("status write %#x clears bits of %#x: ignored (only 0 resets)", value, old)
            return
        added = new & ~old
        if added & vc.STATUS_FEATURES_OK:
            why = self._features_refused(new)
            if why:
                self._warn("FEATURES_OK refused: %s", why)
                new &= ~vc.STATUS_FEATURES_OK
                added &= ~vc.STATUS_FEATURES_OK
        if added & vc.STATUS_DRIVER_OK and not new & vc.STATUS_FEATURES_OK:
            self._warn("DRIVER_OK without FEATURES_OK ignored")
            new &= ~vc.STATUS_DRIVER_OK
            added &= ~vc.STATUS_DRIVER_OK
        self.status = new
        if added & vc.STATUS_FAILED:
            log.info("%s: the driver gave up on the device (status FAILED)", self.name)
        if added & vc.STATUS_DRIVER_OK and not self.broken:
            for q in self.queues:
                q.set_features(self.driver_features)
            self.backend.activate(self.driver_features, self.queues, self.signal)

    def _features_refused(self, status: int) -> str:
        offered = self.device_features()
        if not status & vc.STATUS_DRIVER:
            return "DRIVER is not set"
        if not self.driver_features >> vc.F_VERSION_1 & 1:
            return "the driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)"
        extra = self.driver_features & ~offered
        if extra:
            return f"the driver asked for feature bits {extra:#x} that were not offered"
        return ""

    def _write_queue(self, offset: int, value: int) -> None:
        q = self._queue()
        if q is None:
            self._warn("write of %#x to queue register +%#x of queue %d, which does not exist", value, offset,
                       self.queue_sel)
            return
        if offset == vc.MMIO_QUEUE_READY:
            if not value & 1:
                q.ready = False
                return
            if q.ready:
                return
            if self.broken:
                self._warn("queue %d made ready while the device needs a reset: ignored", q.index)
                return
            try:
                q.check()
            except VirtqueueError as e:
                self.needs_reset(str(e))
                return
            q.set_features(self.driver_features)
            q.ready = True
            return
        if q.ready:
            self._warn("write of %#x to register +%#x of queue %d while it is ready ignored", value, offset, q.index)
            return
        if offset == vc.MMIO_QUEUE_NUM:
            q.size = value        # checked when the queue is made ready
            return
        attr = {vc.MMIO_QUEUE_DESC_LOW: "desc_addr", vc.MMIO_QUEUE_DRIVER_LOW: "avail_addr",
                vc.MMIO_QUEUE_DEVICE_LOW: "used_addr"}[offset & ~4]
        old = getattr(q, attr)
        new = (old & U32) | (value << 32) if offset & 4 else (old & ~U32) | value
        setattr(q, attr, new)

    def queue_notify(self, index: int) -> None:
        """A notification that did not come through a register write (an ioeventfd on QueueNotify, whose
        datamatch is the queue index): the same as the guest writing `index` to QueueNotify."""
        with self.lock:
            self._notify(index)

    def _notify(self, value: int) -> None:
        self.notifications += 1
        if self.broken:
            return        # stopped until reset: no more errors, no more log lines
        if not self.driver_ok:
            self._warn("notification of queue %d before DRIVER_OK ignored", value)
            return
        if value >= len(self.queues) or not self.queues[value].ready:
            self._warn("notification of queue %d, which is not ready, ignored", value)
            return
        try:
            self.backend.notify(value)
        except VirtqueueError as e:
            self.needs_reset(str(e))

    # --- state ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Device reset (status 0, or system reset): the backend forgets its queues, the line goes low."""
        with self.lock:
            self.backend.reset()
            self._clear()
            self._update_irq()

    def stats(self) -> dict[str, int]:
        """Host-side counters (for --stats): the transport's, then the backend's own if it has stats()."""
        out = {"notifications": self.notifications, "interrupts": self.interrupts,
               "config_interrupts": self.config_interrupts, "errors": self.errors}
        backend_stats = getattr(self.backend, "stats", None)
        if callable(backend_stats):
            out.update(backend_stats())
        return out

    def pause(self) -> None:
        self.backend.pause()

    def resume(self) -> None:
        self.backend.resume()

    def close(self) -> None:
        self.backend.close()

    def save(self) -> dict:
        with self.lock:
            return {"status": self.status, "device_features_sel": self.device_features_sel,
                    "driver_features_sel": self.driver_features_sel, "driver_features": self.driver_features,
                    "queue_sel": self.queue_sel, "interrupt_status": self.interrupt_status,
                    "config_generation": self.config_generation, "queues": [q.save() for q in self.queues],
                    "backend": self.backend.save()}

    def load(self, state: dict) -> None:
        """Check every field (the queues' rings against guest RAM too), then the backend's load() (which
        checks its own), then assign; a DRIVER_OK device is activated again with the same Queue objects."""
        with self.lock:
            r = StateReader(self.name, state, _STATE_FIELDS)
            status = r.integer("status", 0, 0xFF)
            values = {k: r.integer(k, 0, U32) for k in ("device_features_sel", "driver_features_sel",
                                                         "queue_sel", "config_generation")}
            features = r.integer("driver_features", 0, U64)
            interrupt_status = r.integer("interrupt_status", 0, vc.INT_USED_BUFFER | vc.INT_CONFIG_CHANGE)
            # Only a FEATURES_OK device has a negotiated set: before that the driver may have written any bits
            # (FEATURES_OK is then refused), and such a saved state must load again.
            if status & vc.STATUS_FEATURES_OK and features & ~self.device_features():
                raise r.fail("driver_features", f"{features:#x} has bits not offered ({self.device_features():#x})")
            if status & vc.STATUS_FEATURES_OK and not features >> vc.F_VERSION_1 & 1:
                raise r.fail("driver_features", "FEATURES_OK without VIRTIO_F_VERSION_1")
            if status & vc.STATUS_DRIVER_OK and not status & vc.STATUS_FEATURES_OK:
                raise r.fail("status", f"{status:#x} has DRIVER_OK without FEATURES_OK")
            queues = state["queues"]
            if type(queues) is not list or len(queues) != len(self.queues):
                raise r.fail("queues", f"expected a list of {len(self.queues)} queues")
            loaded = [self._check_queue(i, q) for i, q in enumerate(queues)]
            backend_state = state["backend"]
            if type(backend_state) is not dict:
                raise r.fail("backend", f"expected a dict, got {type(backend_state).__name__}")
            self.backend.load(backend_state)     # raises DeviceStateError with the backend unchanged
            self.status = status
            self.device_features_sel = values["device_features_sel"]
            self.driver_features_sel = values["driver_features_sel"]
            self.queue_sel = values["queue_sel"]
            self.config_generation = values["config_generation"]
            self.driver_features = features
            self.interrupt_status = interrupt_status
            for q, fields in zip(self.queues, loaded):
                q.reset()
                for attr, value in fields.items():
                    setattr(q, attr, value)
                q.set_features(features)
                q.broken = self.broken
            self._update_irq()
            if self.driver_ok and not self.broken:
                self.backend.activate(features, self.queues, self.signal)

    def _check_queue(self, i: int, state: object) -> dict:
        r = StateReader(f"{self.name} queue {i}", state, Queue.QUEUE_FIELDS)
        fields = {"size": r.integer("num", 0, U32), "ready": r.flag("ready"),
                  "desc_addr": r.integer("desc", 0, U64), "avail_addr": r.integer("driver", 0, U64),
                  "used_addr": r.integer("device", 0, U64),
                  "last_avail_idx": r.integer("last_avail_idx", 0, 0xFFFF),
                  "used_idx": r.integer("used_idx", 0, 0xFFFF),
                  "signalled_used": r.integer("signalled_used", 0, 0xFFFF)}
        if fields["ready"]:
            probe = Queue(self.memory, i, self.queues[i].max_size, self.name)
            for attr in ("size", "desc_addr", "avail_addr", "used_addr"):
                setattr(probe, attr, fields[attr])
            try:
                probe.check()
            except VirtqueueError as e:
                raise DeviceStateError(f"device {self.name}: state field 'queues': {e}") from None
        return fields


def attach_transport(memory: GuestMemory, irq: IrqLine, backend: VirtioBackend, mmio, base: int,
                     size: int = vc.MMIO_SIZE, on_close: Callable[[Callable[[], None]], None] | None = None
                     ) -> VirtioMmio:
    """Make the transport for a backend and register it on the bus at [base, base+size)."""
    transport = VirtioMmio(memory, irq, backend)
    mmio.register(base, size, transport)
    if on_close is not None:
        on_close(transport.close)
    return transport
