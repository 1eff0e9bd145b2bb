"""hvm/ioevents.py: the ioevent thread's mechanics on a real VM fd (KVM_IOEVENTFD assign/deassign), the
callbacks driven by writing the eventfds as KVM would. A guest's doorbell through KVM's matching is
tested with the virtio firmware drivers (tests/test_virtio_blk.py)."""
from __future__ import annotations

import os
import threading
import time

import pytest

from hvm.ioevents import IoEvents
from hvm.kvm import Kvm, KvmError


@pytest.fixture
def vm():
    with Kvm() as kvm:
        v = kvm.create_vm()
        yield v
        v.close()


def _wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_signals_run_the_callback_and_pause_holds_them(vm):
    calls: list[int] = []
    events = IoEvents(vm, on_error=lambda e: calls.append(-1))
    events.add(0xD000_0050, 4, 0, lambda: calls.append(0))
    events.add(0xD000_0050, 4, 1, lambda: calls.append(1))
    fds = [fd for *_, fd in events._events]
    os.eventfd_write(fds[1], 1)
    _wait(lambda: calls == [1])
    events.pause()
    os.eventfd_write(fds[0], 1)
    time.sleep(0.1)
    assert calls == [1]                    # paused: nothing handled
    events.resume()
    _wait(lambda: calls == [1, 0])
    assert events.signals == 2
    events.close()
    assert not any(t.name == "hvm-ioevents" for t in threading.enumerate())


def test_the_same_doorbell_twice_is_refused_by_kvm(vm):
    events = IoEvents(vm, on_error=lambda e: None)
    try:
        events.add(0xD000_0050, 4, 0, lambda: None)
        with pytest.raises(KvmError, match="KVM_IOEVENTFD"):
            events.add(0xD000_0050, 4, 0, lambda: None)
        assert len(events._events) == 1     # the refused one's eventfd closed, not kept
    finally:
        events.close()


def test_a_callback_that_raises_ends_with_on_error(vm):
    errors: list[BaseException] = []
    events = IoEvents(vm, on_error=errors.append)
    events.add(0xD000_1050, 4, None, lambda: 1 / 0)
    os.eventfd_write(events._events[0][3], 1)
    _wait(lambda: errors)
    assert isinstance(errors[0], ZeroDivisionError)
    events.close()
