"""The interface every emulated device speaks, and the IRQ line it may raise.

Devices never import hvm.kvm: they get an IrqLine and byte sinks at construction,
so the same device runs under any accelerator (or in a unit test with no VM at all).

Device state (QEMU's VMState in spirit): every device says what its guest-visible state is with
save() -> dict and takes it back with load(dict); reset() returns it to its power-on state. The dict
holds only int, bool, str, bytes, None and lists/dicts of those, so a snapshot writer can encode it
without knowing the device. Host wiring (output sinks, callbacks, IRQ setters, guest memory) and
host-side statistics are not state: a device loaded into a new process keeps the wiring it was built
with. load() checks every field (the file it came from may be corrupt or hostile) before it assigns
any, so a refused state leaves the device as it was.
"""
from __future__ import annotations

import contextlib
import threading

from hvm._types import Any, Iterable, Protocol


class DeviceStateError(ValueError):
    """A device state that load() refuses; the message is one line naming the device and the field."""


class Device(Protocol):
    name: str

    def read(self, offset: int, size: int) -> int:
        """A guest read of `size` bytes at `offset` within the device's range."""
        ...

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write of `size` bytes (value little-endian) at `offset`."""
        ...

    def save(self) -> dict:
        """The device's guest-visible state (int, bool, str, bytes, None, lists and dicts of those)."""
        ...

    def load(self, state: dict) -> None:
        """Take back a state save() made; raises DeviceStateError (device unchanged) on a bad one."""
        ...

    def reset(self) -> None:
        """Back to the power-on state (QMP system_reset): afterwards save() equals a new device's."""
        ...


def state_lock(device: object) -> contextlib.AbstractContextManager:
    """The device's own lock, if it has one (a device used from several threads), else a no-op."""
    lock = getattr(device, "_lock", None)
    return lock if lock is not None else contextlib.nullcontext()


def _shown(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class StateReader:
    """Checks a state dict field by field for one device; every failure is a DeviceStateError naming both.
    Construct it with the exact set of fields the device saves: a missing or an unknown field is refused."""

    def __init__(self, device_name: str, state: object, fields: Iterable[str]):
        self.device = device_name
        if not isinstance(state, dict):
            raise DeviceStateError(f"device {device_name}: state is {type(state).__name__}, not a dict")
        fields = tuple(fields)
        for key in state:
            if key not in fields:
                raise DeviceStateError(f"device {device_name}: unknown state field {_shown(key)}")
        for key in fields:
            if key not in state:
                raise DeviceStateError(f"device {device_name}: state field {key!r} is missing")
        self.state = state

    def fail(self, key: str, why: str) -> DeviceStateError:
        return DeviceStateError(f"device {self.device}: state field {key!r}: {why}")

    def integer(self, key: str, lo: int, hi: int) -> int:
        v = self.state[key]
        if type(v) is not int:  # bool is an int subclass: refused here, as is any other type
            raise self.fail(key, f"expected an int, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise self.fail(key, f"{_shown(v)} is out of range {lo:#x}..{hi:#x}")
        return v

    def flag(self, key: str) -> bool:
        v = self.state[key]
        if type(v) is not bool:
            raise self.fail(key, f"expected a bool, got {type(v).__name__}")
        return v

    def blob(self, key: str, max_len: int, min_len: int = 0) -> bytes:
        v = self.state[key]
        if type(v) is not bytes:
            raise self.fail(key, f"expected bytes, got {type(v).__name__}")
        if not min_len <= len(v) <= max_len:
            limit = f"exactly {max_len}" if min_len == max_len else f"at most {max_len}"
            raise self.fail(key, f"{len(v)} bytes, {limit} allowed")
        return v

    def optional_int(self, key: str, allowed: Iterable[int]) -> int | None:
        v = self.state[key]
        allowed = tuple(allowed)
        if v is None:
            return None
        if type(v) is not int or v not in allowed:
            raise self.fail(key, f"{_shown(v)} is not None or one of {', '.join(hex(a) for a in allowed)}")
        return v


def no_state(device_name: str, state: object) -> None:
    """load() of a device with no state: only an empty dict is one."""
    StateReader(device_name, state, ())


class Stateless:
    """The device-state interface of a device with no state of its own: save() is {}, load() takes only {},
    reset() has nothing to do. Subclasses set `name`."""
    name: str

    def save(self) -> dict:
        return {}

    def load(self, state: dict) -> None:
        no_state(self.name, state)

    def reset(self) -> None:
        pass



class InputGate:
    """Backpressure for the host input a console device queues for its guest (uart16550, virtio-console):
    a feeder with the device's lock held waits for room; the device wakes it when the guest took bytes (or
    the queue was emptied); close() lets every feeder go. The queue itself, and what delivering it means,
    stay the device's."""

    def __init__(self, lock: threading.Lock):
        self._lock = lock
        self._room = threading.Condition(lock)
        self._feeders = 0
        self.closed = False

    def wait(self) -> None:
        """Until wake() or 0.5 s (lock held): a feeder looks at `closed` at least that often."""
        self._feeders += 1
        try:
            self._room.wait(0.5)
        finally:
            self._feeders -= 1

    def wake(self) -> None:
        """The queue may have room now (lock held)."""
        if self._feeders:
            self._room.notify_all()

    def close(self) -> None:
        """The machine is stopping: blocked feeders return, later input is dropped. Never blocks (it may run
        in a signal handler that interrupted a thread holding the lock): a feeder looks at the flag at least
        every 0.5 s, and is woken at once when the lock is free."""
        self.closed = True
        if self._lock.acquire(blocking=False):
            try:
                self._room.notify_all()
            finally:
                self._lock.release()


class IrqLine:
    """A level-triggered interrupt line. The Machine binds it to the VM's irqchip;
    unbound (no irqchip) it only records the level."""

    def __init__(self, irq: int, setter=None):
        self.irq = irq
        self.level = False
        self._setter = setter  # callable(irq, level) or None

    def set_level(self, level: bool) -> None:
        if level == self.level:
            return
        self.level = level
        if self._setter is not None:
            self._setter(self.irq, 1 if level else 0)

    def raise_(self) -> None:
        self.set_level(True)

    def lower(self) -> None:
        self.set_level(False)
