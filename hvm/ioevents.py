"""Doorbells that do not exit to hvm: KVM_IOEVENTFD.

A virtio driver tells the device "there is work in queue N" by writing N to the QueueNotify register. As
an ordinary MMIO write that is an exit to user space: the vCPU waits while Python handles the request.
With an ioeventfd, KVM matches the write (address, length, value) inside the kernel, signals an eventfd and
resumes the guest at once; one thread here waits on all the eventfds and calls the device. The vCPU and
the device then work in parallel (what QEMU's `ioeventfd=on` and Firecracker's queue events do).

The thread takes the same path as the MMIO exit (the device's write(), under its lock), so the device
cannot tell the difference. While the VM is paused the thread handles nothing (pause() waits for a
callback under way), so a snapshot never races a device writing guest memory.
"""
from __future__ import annotations

import logging
import os
import selectors
import threading
from typing import Callable

log = logging.getLogger(__name__)

MAX_IOEVENTS = 64        # 7 virtio slots x a few queues each: far below


class IoEvents:
    def __init__(self, vm, on_error: Callable[[BaseException], None]):
        self._vm = vm
        self._on_error = on_error
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._events: list[tuple[int, int, int | None, int]] = []   # addr, length, datamatch, fd
        self._thread: threading.Thread | None = None
        self._stop = False
        self._paused = False
        self._busy = False
        self._cond = threading.Condition()
        self.signals = 0       # doorbells handled through an eventfd

    def add(self, addr: int, length: int, datamatch: int | None, callback: Callable[[], None]) -> None:
        """A guest write at `addr` (of `datamatch`) runs `callback` on the ioevent thread instead of exiting."""
        if len(self._events) >= MAX_IOEVENTS:
            raise ValueError(f"more than {MAX_IOEVENTS} ioeventfds")
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self._vm.ioeventfd(addr, length, fd, datamatch)
        except BaseException:
            os.close(fd)
            raise
        self._events.append((addr, length, datamatch, fd))
        self._selector.register(fd, selectors.EVENT_READ, callback)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hvm-ioevents", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            ready = self._selector.select()
            with self._cond:
                while self._paused and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                self._busy = True
            try:
                for key, _ in ready:
                    if key.data is None:
                        try:
                            os.read(self._wake_r, 64)
                        except BlockingIOError:
                            pass
                        continue
                    try:
                        os.eventfd_read(key.fd)
                    except BlockingIOError:
                        continue
                    self.signals += 1
                    key.data()
            except BaseException as e:    # a device bug: the VM ends with status 70, as on a vCPU thread
                log.debug("ioevent callback failed", exc_info=True)
                self._on_error(e)
                return
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def pause(self) -> None:
        """No callback runs until resume(); waits for one under way."""
        with self._cond:
            self._paused = True
            while self._busy:
                self._cond.wait()

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        for addr, length, datamatch, fd in self._events:
            try:
                self._vm.ioeventfd(addr, length, fd, datamatch, deassign=True)
            except OSError:
                pass      # the VM fd may be gone already: the kernel dropped its ioeventfds with it
            os.close(fd)
        self._events = []
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
