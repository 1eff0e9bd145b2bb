"""virtio-console (virtio 1.x device id 3): one port, no multiport, the console of `console=hvc0`.

Queue 0 (receiveq) carries console input to the guest, queue 1 (transmitq) the guest's output. The output
goes to the same Console as the UART's (sinks, history, pexpect, scripts); the input comes from the same
console input thread (stdin or a file, Ctrl-A x handled there), through feed(), once the Machine attaches
console input to this device instead of the UART (DeviceContext.set_console_input).

Input waits in a bounded queue (INPUT_QUEUE_LIMIT bytes): feed() blocks while it is full (backpressure:
the console stops reading stdin or the file) and lets go at close(). Bytes move into receive buffers when
the guest offers them (a notify of queue 0) and when input arrives (feed, on the input thread, under
the transport's lock). Input not yet taken stays queued across a device reset (a driver resets the device
when it probes it: input typed before the guest's driver was up is not lost, as the UART holds input
until the guest first looks at its receiver).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from hvm.mmio.device import InputGate, StateReader
from hvm.mmio.virtio import Queue, VirtioBackend, VirtqueueError, attach
from hvm.mmio.virtio import constants as vc

log = logging.getLogger(__name__)

RECEIVEQ = 0
TRANSMITQ = 1
QUEUE_SIZE = 128
INPUT_QUEUE_LIMIT = 4096     # bytes of host input waiting for a receive buffer; then feed() blocks
OUTPUT_CHUNK = 64 << 10      # what one console write takes at most: a huge buffer is copied piecewise
# Config space without VIRTIO_CONSOLE_F_SIZE / F_MULTIPORT / F_EMERG_WRITE: cols, rows, max_nr_ports,
# emerg_wr; a driver reads none of it unless those features are negotiated.
CONFIG = bytes(12)


class VirtioConsole(VirtioBackend):
    """The device logic (the transport, hvm.mmio.virtio.VirtioMmio, owns the registers and the queues)."""

    device_id = vc.VIRTIO_ID_CONSOLE
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, output: Callable[[bytes], None], name: str = "virtio-console0"):
        self.name = name
        self._output = output
        self._lock = threading.Lock()                 # the input queue (taken inside transport.lock)
        self._input = InputGate(self._lock)           # a feeder waits here for room
        self._pending = bytearray()
        self._paused = False
        self._queues: list[Queue] = []
        self._signal: Callable[[int], None] | None = None
        self.tx_bytes = 0            # statistics of this process, not state
        self.rx_bytes = 0

    # --- VirtioBackend ------------------------------------------------------------------------------
    def device_features(self) -> int:
        return 0

    def config(self) -> bytes:
        return CONFIG

    def activate(self, features: int, queues: list[Queue], signal: Callable[[int], None]) -> None:
        self._queues = queues
        self._signal = signal
        self._deliver()          # input that waited for the driver

    def notify(self, queue_index: int) -> None:
        # vCPU thread, transport.lock held
        if queue_index == TRANSMITQ:
            self._transmit()
        elif queue_index == RECEIVEQ:
            self._deliver()

    def reset(self) -> None:
        # The queues are gone; queued host input stays (see the module's docstring).
        self._queues = []
        self._signal = None

    def pause(self) -> None:
        # The input thread stops writing guest memory while the VM is paused (a snapshot stays consistent).
        with self._guard():
            self._paused = True

    def resume(self) -> None:
        with self._guard():
            self._paused = False
            self._deliver()

    STATE_FIELDS = ("pending_input",)

    def save(self) -> dict:
        with self._lock:
            return {"pending_input": bytes(self._pending)}

    def load(self, state: dict) -> None:
        pending = StateReader(self.name, state, self.STATE_FIELDS).blob("pending_input", INPUT_QUEUE_LIMIT)
        with self._lock:
            self._pending[:] = pending
            self._input.wake()

    def close(self) -> None:
        """The machine is stopping: blocked feeders return, later input is dropped. Never blocks."""
        self._input.close()

    # --- host side: console input ----------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Queue console input for the guest. Blocks while INPUT_QUEUE_LIMIT bytes wait (the guest offers
        no receive buffers); returns at once, dropping the rest, after close()."""
        view = memoryview(bytes(data))
        while view and not self._input.closed:
            with self._lock:
                room = INPUT_QUEUE_LIMIT - len(self._pending)
                if room <= 0:
                    self._input.wait()
                    continue
                self._pending += view[:room]
                view = view[room:]
            with self._guard():
                self._deliver()

    def stats(self) -> dict[str, int]:
        """For --stats and x-hvm-stats (the transport adds its own counters)."""
        return {"tx_bytes": self.tx_bytes, "rx_bytes": self.rx_bytes}

    @property
    def input_pending(self) -> int:
        return len(self._pending)

    # --- the queues -------------------------------------------------------------------------------------
    def _guard(self):
        transport = getattr(self, "transport", None)
        return transport.lock if transport is not None else _NO_LOCK

    def _deliver(self) -> None:
        """Move queued input into the guest's receive buffers (transport.lock held)."""
        signal = self._signal
        if self._paused or len(self._queues) <= RECEIVEQ or signal is None:
            return
        queue = self._queues[RECEIVEQ]
        if not queue.ready or not self._pending:
            return
        used = 0
        try:
            while self._pending:
                chain = queue.pop()
                if chain is None:
                    break
                with self._lock:
                    data = bytes(self._pending[:chain.writable_len])
                written = chain.write(data) if data else 0
                with self._lock:
                    del self._pending[:written]
                    self._input.wake()
                queue.push_used(chain, written)
                self.rx_bytes += written
                used += 1
        except VirtqueueError as e:
            self._broken(e)
        if used:
            signal(RECEIVEQ)

    def _transmit(self) -> None:
        """Send every available transmit buffer to the console (vCPU thread, transport.lock held). Large
        buffers go out in OUTPUT_CHUNK pieces, so what one notify makes hvm hold is bounded."""
        signal = self._signal
        if len(self._queues) <= TRANSMITQ or signal is None:
            return
        queue = self._queues[TRANSMITQ]
        out = bytearray()
        used = 0
        try:
            while True:
                chain = queue.pop()
                if chain is None:
                    break
                if chain.readable_len + len(out) <= OUTPUT_CHUNK:     # the common case: a line or a few
                    out += chain.read()
                    queue.push_used(chain, 0)
                    used += 1
                    continue
                offset = 0
                while offset < chain.readable_len:
                    piece = chain.read(min(OUTPUT_CHUNK, chain.readable_len - offset), offset)
                    offset += len(piece)
                    out += piece
                    if len(out) >= OUTPUT_CHUNK:
                        self._write(out)
                        out = bytearray()
                queue.push_used(chain, 0)      # the device wrote nothing into a transmit buffer
                used += 1
        except VirtqueueError as e:
            self._broken(e)
        if out:
            self._write(out)
        if used:
            signal(TRANSMITQ)      # (after an error too: the buffers completed before it stand)

    def _write(self, data: bytearray) -> None:
        # The console writes outside its own locks and gives up on a stalled sink once the machine stops
        # (Console.abandon_stalled_output), so holding the transport's lock here cannot hang a stop.
        self.tx_bytes += len(data)
        self._output(bytes(data))

    def _broken(self, error: VirtqueueError) -> None:
        transport = getattr(self, "transport", None)
        if transport is not None:
            transport.needs_reset(str(error))
        else:
            log.warning("%s: %s", self.name, error)
        self._queues = []
        self._signal = None


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


_NO_LOCK = _NoLock()


from hvm.mmio.registry import DeviceType  # noqa: E402


def create(ctx, props: dict):
    """DeviceType.create: the backend, its virtio-mmio transport in ctx.slot, and the console's input."""
    backend = VirtioConsole(ctx.console.write, name=ctx.name)
    transport = attach(ctx, backend)
    ctx.set_console_input(backend.feed, lambda: backend.input_pending, backend.close)
    return transport      # attach() runs backend.close() when the Machine closes


DEVICE = DeviceType(name="virtio-console", aliases=("virtconsole",), virtio=True, create=create, uses_console=True,
                    help="virtio-console (console=hvc0): the console's output and input, one port")
