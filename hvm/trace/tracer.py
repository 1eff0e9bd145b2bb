"""Tracer: takes raw exit records from vCPU threads (a deque append: the only hot-path cost) and,
on its own thread, filters, resolves devices, encodes and writes them, keeps them for scripts,
or keeps only the last N (ring mode: written when the VM ends, crash or not).

Records are streamed to the file while the guest runs, in batches: the writer wakes every
WRITE_INTERVAL and encodes and writes everything queued then, in chunks, so a killed hvm (SIGKILL, the
OOM killer) leaves a file that holds every exit up to about a second before the kill. Batching keeps
the cost to the vCPU threads low: one wake-up per interval, no per-record work on the vCPU threads,
and the GIL is taken by the encoder in bursts that the interpreter's switch interval slices."""
from __future__ import annotations

import errno
import logging
import os
import select
import signal
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Callable, Iterator

from hvm.files import open_output
from hvm.kvm import constants as kc
from hvm.trace.filter import parse_filter
from hvm.trace.record import REASON, REASON_NAMES, WHERE, ExitRecord, encode_raw, from_raw

log = logging.getLogger("hvm.trace")

FLUSH_INTERVAL = 0.05   # s: how often the writer looks at the queue (live callbacks are served this often)
WRITE_INTERVAL = 0.25   # s: records reach the file at most this long after they reach the queue
CHUNK = 8192            # records encoded and written at a time (also how often an interrupted close checks)
# Past this many queued records the writer does not wait for its interval (bounded memory).
HIGH_WATER = 250_000
# And past this many the oldest are dropped (a deque's maxlen: nothing on the vCPU's side), so a writer
# that cannot keep up (a slow disk, several busy vCPUs) cannot make hvm's memory grow without bound.
QUEUE_LIMIT = 1_000_000
# The device-name cache is emptied past this many addresses: a guest that touches every port or MMIO
# page must not grow it without bound.
DEVICE_CACHE_LIMIT = 4096
# A trace written to a pipe, FIFO or terminal whose reader stops reading: after this long without any
# progress the write counts as failed (tracing stops, the run goes on), so the writer never blocks for
# good, the queue cannot grow behind it, and close() cannot hang.
STALL_LIMIT = 2.0   # s


@dataclass(frozen=True)
class TraceConfig:
    path: Path | None = None         # JSON lines file; None: no file
    filter: str | None = None        # --trace-filter expression
    ring: int | None = None          # keep only the last N records (written at the end)
    rip: bool = False                # capture RIP per exit (one KVM_GET_REGS each: slower)
    memory: bool = False             # keep ExitRecords for Machine.exits()


class Tracer:
    def __init__(self, config: TraceConfig, resolve_device: Callable[[int, int], str | None]):
        self.config = config
        self._resolve = resolve_device
        self._devices: dict[tuple[int, int], str | None] = {}
        self._match = parse_filter(config.filter) if config.filter else None
        self.queue: deque = deque(maxlen=QUEUE_LIMIT)   # vCPU threads append raw tuples here
        self.overflowed = False                  # the queue was full at least once: records were lost
        self.append = self.queue.append
        self._ring: deque | None = deque(maxlen=config.ring) if config.ring else None
        self.records: list[ExitRecord] = []
        self.callbacks: list[Callable[[ExitRecord], None]] = []
        self.written = 0
        self.write_error: OSError | None = None  # the first failed write; no file output after it
        self._closed = False
        self._abandon = False                    # a SIGINT during close(): stop writing, keep what is out
        # Not following symlinks, never truncating what is not a regular file (hvm/files.py): HostFileError.
        self._fd: int | None = open_output(config.path, "trace file") if config.path else None
        if self._fd is not None and not stat.S_ISREG(os.fstat(self._fd).st_mode):
            os.set_blocking(self._fd, False)    # a stalled reader is noticed (STALL_LIMIT), never waited on
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trace-writer", daemon=True)
        self._thread.start()

    def device(self, reason: int, where: int) -> str | None:
        key = (reason, where)
        try:
            return self._devices[key]
        except KeyError:
            if len(self._devices) >= DEVICE_CACHE_LIMIT:
                self._devices.clear()
            name = self._devices[key] = self._resolve(reason, where)
            return name

    def _drain(self) -> None:
        """Take everything queued now, CHUNK records at a time: filter, resolve, encode, write, deliver."""
        q = self.queue
        if len(q) == QUEUE_LIMIT and not self.overflowed:
            self.overflowed = True
            log.warning("trace: the writer fell %d records behind the guest: the oldest queued ones are "
                        "dropped while it catches up (the trace has gaps)", QUEUE_LIMIT)
        match, ring = self._match, self._ring
        rip = self.config.rip
        keep = self.config.memory or bool(self.callbacks)
        if match is None and ring is None and not keep:
            self._drain_to_file()
            return
        while q and not self._abandon:
            lines = []
            out = self._fd is not None
            for _ in range(min(len(q), CHUNK)):
                raw = q.popleft()
                reason = raw[REASON]
                dev = self.device(reason, raw[WHERE]) if reason in (kc.EXIT_IO, kc.EXIT_MMIO) else None
                if match is not None and not match(raw, dev):
                    continue
                if ring is not None:
                    ring.append((raw, dev))
                    continue
                if out:
                    lines.append(encode_raw(raw, dev, rip))
                if keep:
                    self._deliver(from_raw(raw, dev, rip))
            if lines:
                self._write(lines)
        if self._abandon:
            q.clear()

    def _drain_to_file(self) -> None:
        """_drain for `hvm run --trace FILE` (no filter, ring or listeners): encode_raw inlined, devices
        from the cache directly. Every µs here is GIL time the vCPU threads wait for while the guest
        runs (about a third less than the general loop); tests check it writes what encode_raw does."""
        q = self.queue
        pop = q.popleft
        devices = self._devices
        names = REASON_NAMES
        io, mmio, internal = kc.EXIT_IO, kc.EXIT_MMIO, kc.EXIT_INTERNAL_ERROR
        rip = self.config.rip
        while q and not self._abandon:
            lines = []
            add = lines.append
            for _ in repeat(None, min(len(q), CHUNK)):
                t, vcpu, reason, where, size, direction, count, data, handle, extra = pop()
                tail = f',"handle_ns":{handle},"rip":{extra}}}\n' if rip else f',"handle_ns":{handle}}}\n'
                if reason == io or reason == mmio:
                    try:
                        dev = devices[(reason, where)]
                    except KeyError:
                        dev = self.device(reason, where)
                    dev = "null" if dev is None else f'"{dev}"'
                    if reason == io:
                        add(f'{{"t":{t},"vcpu":{vcpu},"reason":"IO","port":{where},"size":{size},'
                            f'"dir":"{"out" if direction else "in"}","count":{count},"data":"{data.hex()}",'
                            f'"device":{dev}{tail}')
                    else:
                        add(f'{{"t":{t},"vcpu":{vcpu},"reason":"MMIO","addr":{where},"size":{size},'
                            f'"dir":"{"write" if direction else "read"}","data":"{data.hex()}",'
                            f'"device":{dev}{tail}')
                elif reason == internal and not rip and extra is not None:
                    add(f'{{"t":{t},"vcpu":{vcpu},"reason":"{names.get(reason, reason)}",'
                        f'"handle_ns":{handle},"suberror":{extra}}}\n')
                else:
                    add(f'{{"t":{t},"vcpu":{vcpu},"reason":"{names.get(reason, reason)}"{tail}')
            if lines:
                self._write(lines)
        if self._abandon:
            q.clear()

    def _write(self, lines: list[str]) -> None:
        """Write whole lines with os.write (no buffer of ours that a kill would lose). A failure (a full
        disk, /dev/full, EIO) is a warning, once: file output stops, the guest's run goes on."""
        fd = self._fd
        if fd is None:
            return
        view = memoryview("".join(lines).encode())
        try:
            while view:
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    if not select.select([], [fd], [], STALL_LIMIT)[1]:
                        raise OSError(errno.ETIMEDOUT, f"nothing was read for {STALL_LIMIT:g} s") from None
        except OSError as e:
            self.write_error = e
            self._fd = None
            os.close(fd)
            log.warning("trace file %s: write failed (%s): tracing stopped after %d records, the run goes on",
                        self.config.path, e.strerror or e, self.written)
            return
        self.written += len(lines)

    def _deliver(self, rec: ExitRecord) -> None:
        if self.config.memory:
            self.records.append(rec)
        for cb in self.callbacks:
            cb(rec)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(FLUSH_INTERVAL):
            # Callbacks want records live; the file gets them every WRITE_INTERVAL (sooner past HIGH_WATER).
            now = time.monotonic()
            if self.callbacks or now - last >= WRITE_INTERVAL or len(self.queue) > HIGH_WATER:
                last = now
                self._drain()
        self._drain()

    def close(self) -> None:
        """Stop the writer after everything queued is out; in ring mode write the last N now. Idempotent.
        A SIGINT while this writes (on the main thread) ends the write-out early, without a traceback:
        the file keeps the whole lines written so far."""
        if self._closed:
            return
        self._closed = True
        previous = None
        if threading.current_thread() is threading.main_thread():
            try:
                previous = signal.signal(signal.SIGINT, self._interrupted)
            except ValueError:   # signals cannot be handled here (e.g. an embedded interpreter)
                previous = None
        try:
            self._stop.set()
            if self._thread.is_alive():
                self._thread.join()
            self._drain()
            if self._ring is not None:
                self._write_ring()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if self._abandon:
            log.warning("trace file %s: write-out interrupted: it keeps the %d records written",
                        self.config.path, self.written)

    def _interrupted(self, signo, frame) -> None:
        self._abandon = True

    def _write_ring(self) -> None:
        rip = self.config.rip
        ring = self._ring
        keep = self.config.memory or bool(self.callbacks)
        while ring and not self._abandon:
            lines = []
            for _ in range(min(len(ring), CHUNK)):
                raw, dev = ring.popleft()
                if self._fd is not None:
                    lines.append(encode_raw(raw, dev, rip))
                if keep:
                    self._deliver(from_raw(raw, dev, rip))
            if lines:
                self._write(lines)
        ring.clear()

    def __iter__(self) -> Iterator[ExitRecord]:
        return iter(self.records)
