"""--trace-filter: 'reason=io,port=0x3f8' style. Terms with the same key are alternatives (OR),
different keys must all match (AND). Keys: reason, port, addr (N or LO-HI), vcpu, dir, device."""
from __future__ import annotations

from typing import Callable

from hvm.kvm import constants as kc
from hvm.trace.record import COUNT, DIRECTION, REASON, VCPU, WHERE

KEYS = ("reason", "port", "addr", "vcpu", "dir", "device")


class FilterError(ValueError):
    pass


def _int(text: str, key: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise FilterError(f"trace filter: {key}={text!r} is not a number") from None


def parse_filter(expr: str) -> Callable[[tuple, str | None], bool]:
    """Compile a filter expression to a predicate over (raw record, device name)."""
    terms: dict[str, list] = {}
    for part in expr.split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in KEYS:
            raise FilterError(f"trace filter: {part!r} is not KEY=VALUE with KEY one of {', '.join(KEYS)}")
        value = value.strip()
        if key == "reason":
            codes = [c for c, n in kc.EXIT_REASON_NAMES.items() if n.lower() == value.lower()]
            if not codes:
                raise FilterError(f"trace filter: unknown exit reason {value!r}")
            terms.setdefault(key, []).append(codes[0])
        elif key in ("port", "vcpu"):
            terms.setdefault(key, []).append(_int(value, key))
        elif key == "addr":
            lo, dash, hi = value.partition("-")
            terms.setdefault(key, []).append((_int(lo, key), _int(hi, key) if dash else _int(lo, key)))
        elif key == "dir":
            if value not in ("in", "out", "read", "write"):
                raise FilterError("trace filter: dir must be in, out, read or write")
            terms.setdefault(key, []).append(1 if value in ("out", "write") else 0)
        else:
            terms.setdefault(key, []).append(value)

    reasons = set(terms.get("reason", ()))
    ports = set(terms.get("port", ()))
    addrs = terms.get("addr", [])
    vcpus = set(terms.get("vcpu", ()))
    dirs = set(terms.get("dir", ()))
    devices = set(terms.get("device", ()))

    def match(raw: tuple, device: str | None) -> bool:
        if reasons and raw[REASON] not in reasons:
            return False
        if ports and (raw[REASON] != kc.EXIT_IO or raw[WHERE] not in ports):
            return False
        if addrs and (raw[REASON] != kc.EXIT_MMIO or not any(lo <= raw[WHERE] <= hi for lo, hi in addrs)):
            return False
        if vcpus and raw[VCPU] not in vcpus:
            return False
        if dirs and (raw[COUNT] == 0 or raw[DIRECTION] not in dirs):
            return False
        if devices and device not in devices:
            return False
        return True

    return match
