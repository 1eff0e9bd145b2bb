"""Exit records: the raw tuple the run loop produces (cheap), the ExitRecord scripts see, and the
JSON-lines encoding (hand-written f-strings: measurably cheaper than json.dumps per record)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

from hvm.kvm import constants as kc

# Raw record, built on the vCPU thread right after the handler returns:
# (t_ns since VM start, vcpu, reason code, port|addr|None, size, direction (1 = out/write), count,
#  data bytes, handle_ns, extra) -- extra is the RIP when captured, else the suberror of an internal error.
T, VCPU, REASON, WHERE, SIZE, DIRECTION, COUNT, DATA, HANDLE, EXTRA = range(10)

REASON_NAMES = {code: name for code, name in kc.EXIT_REASON_NAMES.items()}


@dataclass(frozen=True)
class ExitRecord:
    t_ns: int
    vcpu: int
    reason: str
    handle_ns: int
    port: int | None = None
    addr: int | None = None
    size: int = 0
    direction: str | None = None   # "in"/"out" for I/O, "read"/"write" for MMIO
    count: int = 0
    data: bytes = b""
    device: str | None = None
    rip: int | None = None
    suberror: int | None = None

    @property
    def value(self) -> int:
        """The first element's value, little-endian (what a single in/out/read/write carried)."""
        return int.from_bytes(self.data[:self.size], "little") if self.size else 0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in json.loads(encode_record(self)).items()}


def from_raw(raw: tuple, device: str | None, rip_captured: bool) -> ExitRecord:
    reason = raw[REASON]
    name = REASON_NAMES.get(reason, str(reason))
    extra = raw[EXTRA]
    common = dict(t_ns=raw[T], vcpu=raw[VCPU], reason=name, handle_ns=raw[HANDLE],
                  rip=extra if rip_captured else None,
                  suberror=extra if (not rip_captured and reason == kc.EXIT_INTERNAL_ERROR) else None)
    if reason == kc.EXIT_IO:
        return ExitRecord(port=raw[WHERE], size=raw[SIZE], direction="out" if raw[DIRECTION] else "in",
                          count=raw[COUNT], data=raw[DATA], device=device, **common)
    if reason == kc.EXIT_MMIO:
        return ExitRecord(addr=raw[WHERE], size=raw[SIZE], direction="write" if raw[DIRECTION] else "read",
                          count=1, data=raw[DATA], device=device, **common)
    return ExitRecord(**common)


def encode_raw(raw: tuple, device: str | None, rip_captured: bool) -> str:
    """One JSON line for a raw record, without building an ExitRecord."""
    reason = raw[REASON]
    name = REASON_NAMES.get(reason, str(reason))
    dev = "null" if device is None else f'"{device}"'
    head = f'{{"t":{raw[T]},"vcpu":{raw[VCPU]},"reason":"{name}"'
    tail = f',"handle_ns":{raw[HANDLE]}'
    if rip_captured:
        tail += f',"rip":{raw[EXTRA]}'
    if reason == kc.EXIT_IO:
        d = "out" if raw[DIRECTION] else "in"
        return (f'{head},"port":{raw[WHERE]},"size":{raw[SIZE]},"dir":"{d}","count":{raw[COUNT]},'
                f'"data":"{raw[DATA].hex()}","device":{dev}{tail}}}\n')
    if reason == kc.EXIT_MMIO:
        d = "write" if raw[DIRECTION] else "read"
        return (f'{head},"addr":{raw[WHERE]},"size":{raw[SIZE]},"dir":"{d}","data":"{raw[DATA].hex()}",'
                f'"device":{dev}{tail}}}\n')
    if reason == kc.EXIT_INTERNAL_ERROR and not rip_captured and raw[EXTRA] is not None:
        tail += f',"suberror":{raw[EXTRA]}'
    return f"{head}{tail}}}\n"


def encode_record(r: ExitRecord) -> str:
    d: dict[str, Any] = {"t": r.t_ns, "vcpu": r.vcpu, "reason": r.reason}
    if r.port is not None:
        d.update(port=r.port, size=r.size, dir=r.direction, count=r.count, data=r.data.hex(), device=r.device)
    elif r.addr is not None:
        d.update(addr=r.addr, size=r.size, dir=r.direction, data=r.data.hex(), device=r.device)
    d["handle_ns"] = r.handle_ns
    if r.rip is not None:
        d["rip"] = r.rip
    if r.suberror is not None:
        d["suberror"] = r.suberror
    return json.dumps(d, separators=(",", ":")) + "\n"


def iter_dicts(path) -> Iterator[dict]:
    """Stream a JSON-lines trace as dicts, skipping lines that do not parse (e.g. cut short by a kill)."""
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except ValueError:
                continue


def decode_line(line: str) -> ExitRecord:
    d = json.loads(line)
    return ExitRecord(t_ns=d["t"], vcpu=d["vcpu"], reason=d["reason"], handle_ns=d.get("handle_ns", 0),
                      port=d.get("port"), addr=d.get("addr"), size=d.get("size", 0), direction=d.get("dir"),
                      count=d.get("count", 1 if "addr" in d else 0), data=bytes.fromhex(d.get("data", "")),
                      device=d.get("device"), rip=d.get("rip"), suberror=d.get("suberror"))
