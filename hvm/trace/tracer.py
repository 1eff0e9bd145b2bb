"""Tracer: takes raw exit records from vCPU threads (a deque append: the only hot-path cost) and,
on its own thread, filters, resolves devices, encodes and writes them, keeps them for scripts,
or keeps only the last N (ring mode: written when the VM ends, crash or not). The encoding waits
until the VM has ended (or the queue is long, or a callback wants records live), so that it does not
compete with the vCPU threads for the GIL while the guest runs."""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from hvm.kvm import constants as kc
from hvm.trace.filter import parse_filter
from hvm.trace.record import REASON, WHERE, ExitRecord, encode_raw, from_raw

FLUSH_INTERVAL = 0.05
# Records wait in memory until the VM ends (or until this many are queued): encoding them while the
# guest runs would take the GIL from the vCPU threads (measured: ~40% fewer exits/s at ~100k exits/s).
HIGH_WATER = 250_000


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
        self.queue: deque = deque()              # vCPU threads append raw tuples here
        self.append = self.queue.append
        self._ring: deque | None = deque(maxlen=config.ring) if config.ring else None
        self.records: list[ExitRecord] = []
        self.callbacks: list[Callable[[ExitRecord], None]] = []
        self.written = 0
        self._file = open(config.path, "w", buffering=1 << 20) if config.path else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trace-writer", daemon=True)
        self._thread.start()

    def device(self, reason: int, where: int) -> str | None:
        key = (reason, where)
        try:
            return self._devices[key]
        except KeyError:
            name = self._devices[key] = self._resolve(reason, where)
            return name

    def _drain(self) -> None:
        q = self.queue
        match, ring, out = self._match, self._ring, self._file
        rip = self.config.rip
        keep = self.config.memory or bool(self.callbacks)
        lines = []
        while q:
            raw = q.popleft()
            reason = raw[REASON]
            dev = self.device(reason, raw[WHERE]) if reason in (kc.EXIT_IO, kc.EXIT_MMIO) else None
            if match is not None and not match(raw, dev):
                continue
            if ring is not None:
                ring.append((raw, dev))
                continue
            if out is not None:
                lines.append(encode_raw(raw, dev, rip))
            if keep:
                self._deliver(from_raw(raw, dev, rip))
        if lines:
            out.write("".join(lines))
            self.written += len(lines)

    def _deliver(self, rec: ExitRecord) -> None:
        if self.config.memory:
            self.records.append(rec)
        for cb in self.callbacks:
            cb(rec)

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            # Live delivery only when someone is listening (callbacks); otherwise wait for the end,
            # unless the queue grows past HIGH_WATER (bounded memory for long traces).
            if self.callbacks or len(self.queue) > HIGH_WATER:
                self._drain()
        self._drain()

    def close(self) -> None:
        """Stop the writer after everything queued is out; in ring mode write the last N now."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
        self._drain()
        if self._ring is not None:
            rip = self.config.rip
            lines = []
            for raw, dev in self._ring:
                if self._file is not None:
                    lines.append(encode_raw(raw, dev, rip))
                if self.config.memory or self.callbacks:
                    self._deliver(from_raw(raw, dev, rip))
            if lines:
                self._file.write("".join(lines))
                self.written += len(lines)
            self._ring.clear()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __iter__(self) -> Iterator[ExitRecord]:
        return iter(self.records)
