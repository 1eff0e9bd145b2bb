"""Encoding of a snapshot's metadata sections: the VM description and the state dicts.

Values are those the device interface allows (int, bool, str, bytes, None, lists, dicts) and finite floats. JSON carries
them with two tags so that the encoding is unambiguous and decoding builds no other type:
a JSON object is never a dict of the state but {"b": HEX} for bytes or {"d": [[key, value], ...]} for a
dict (keys may be ints). The output is canonical (a value always encodes to the same text), so
save -> load -> save gives identical sections.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hvm.config import (CPU_MODES, GP_REGS, MACHINES, MAX_MEMORY, MIN_MEMORY, SERIAL_SINKS, ConfigError,
                        DebugExitSpec, FlatBoot, KernelBoot, SerialSpec, VmSpec, parse_devices)
from hvm.mmio import registry

MAX_DEPTH = 32


class CodecError(ValueError):
    pass


def _enc(v: Any, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise CodecError("state nested too deep")
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):   # the description's timeout; JSON keeps a finite float exactly (repr)
        if v != v or v in (float("inf"), float("-inf")):
            raise CodecError("cannot save a float that is not finite")
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"b": bytes(v).hex()}
    if isinstance(v, (list, tuple)):
        return [_enc(x, depth + 1) for x in v]
    if isinstance(v, dict):
        return {"d": [[_enc(k, depth + 1), _enc(x, depth + 1)] for k, x in v.items()]}
    raise CodecError(f"cannot save a value of type {type(v).__name__}")


def _dec(v: Any, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise CodecError("state nested too deep")
    if v is None or isinstance(v, (bool, int, str, float)):
        return v
    if isinstance(v, list):
        return [_dec(x, depth + 1) for x in v]
    if isinstance(v, dict) and len(v) == 1:
        if isinstance(v.get("b"), str):
            try:
                return bytes.fromhex(v["b"])
            except ValueError:
                raise CodecError("bad bytes value") from None
        if isinstance(v.get("d"), list):
            out = {}
            for pair in v["d"]:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise CodecError("bad dict entry")
                key = _dec(pair[0], depth + 1)
                if isinstance(key, (list, dict)):
                    raise CodecError("unhashable dict key")
                out[key] = _dec(pair[1], depth + 1)
            return out
    raise CodecError(f"unexpected value {str(v)[:40]}")


def encode(value: Any) -> bytes:
    return json.dumps(_enc(value), separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def decode(data: bytes) -> Any:
    try:
        raw = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CodecError(f"not a state encoding ({type(e).__name__})") from None
    return _dec(raw)


# --- the VM description -------------------------------------------------------------------------
def spec_to_dict(spec: VmSpec) -> dict:
    boot = spec.boot
    if isinstance(boot, FlatBoot):
        b = {"kind": "flat", "image": str(boot.image), "load": boot.load, "entry": boot.entry, "mode": boot.mode,
             "regs": [[r, v] for r, v in boot.regs]}
    else:
        b = {"kind": "kernel", "kernel": str(boot.kernel), "initrd": [str(p) for p in boot.initrd],
             "cmdline": boot.cmdline}
    return {
        "name": spec.name, "boot": b, "memory": spec.memory, "vcpus": spec.vcpus, "timeout": spec.timeout,
        "machine": spec.machine, "irqchip": spec.irqchip, "pit": spec.pit,
        "serial": None if spec.serial is None else spec.serial.as_dict(),
        "debug_exit": None if spec.debug_exit is None else {"port": spec.debug_exit.port,
                                                              "size": spec.debug_exit.size},
        # Registry devices as the YAML would give them: read back through the same validation.
        "devices": [[d.type, {k: (str(v) if isinstance(v, Path) else v) for k, v in d.props}] for d in spec.devices],
        "virtio_cmdline": spec.virtio_cmdline,
        "cpu": None if spec.cpu is None else str(spec.cpu),   # read back through parse_cpu's validation
    }


def _cpu(raw: Any):
    """The saved CPU model (a -cpu string, or None in files from before models)."""
    from hvm.cpu_model import CpuModelError, parse_cpu

    if raw is None:
        return None
    try:
        return parse_cpu(raw)
    except CpuModelError:
        raise CodecError("description field 'cpu' is malformed") from None


def _devices_from_list(raw: Any, irqchip: bool) -> tuple:
    """The saved devices, validated as a config's are (hvm/config.py). Types that hold host files or fds
    (snapshot=False) are never in a snapshot hvm wrote: one in the file is refused, so a crafted snapshot
    cannot make hvm open a host path."""
    if not isinstance(raw, list) or len(raw) > 64:
        raise CodecError("description field 'devices' is malformed")
    mapping: dict[str, Any] = {}
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], dict)):
            raise CodecError("description field 'devices' is malformed")
        name, props = item
        dt = registry.lookup(name)
        if dt is None or dt.name != name:
            raise CodecError(f"description: device {name[:40]!r} is not a device hvm has")
        if not dt.snapshot:
            raise CodecError(f"description: a {name} device cannot be restored from a snapshot")
        if dt.multiple:
            mapping.setdefault(name, []).append(props)
        elif name in mapping:
            raise CodecError(f"description: device {name} twice")
        else:
            mapping[name] = props
    try:
        return parse_devices(mapping, "snapshot", irqchip)
    except ConfigError as e:
        raise CodecError(f"description: {e}") from None


def _want(d: dict, key: str, types, optional: bool = False):
    v = d.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,))):
        raise CodecError(f"description field {key!r} is malformed")
    return v


def spec_from_dict(d: Any, source: str) -> VmSpec:
    """The saved description back into a VmSpec; every field type-checked (a CodecError otherwise)."""
    if not isinstance(d, dict):
        raise CodecError("description is not a mapping")
    b = _want(d, "boot", dict)
    boot: FlatBoot | KernelBoot
    if b.get("kind") == "flat":
        regs = _want(b, "regs", list)
        if not all(isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) and isinstance(r[1], int)
                   for r in regs):
            raise CodecError("description field 'boot.regs' is malformed")
        boot = FlatBoot(Path(_want(b, "image", str)), _want(b, "load", int), _want(b, "entry", int),
                        _want(b, "mode", str), tuple((r, v) for r, v in regs))
    elif b.get("kind") == "kernel":
        initrd = _want(b, "initrd", list)
        if not all(isinstance(p, str) for p in initrd):
            raise CodecError("description field 'boot.initrd' is malformed")
        boot = KernelBoot(Path(_want(b, "kernel", str)), tuple(Path(p) for p in initrd), _want(b, "cmdline", str))
    else:
        raise CodecError("description field 'boot.kind' is malformed")
    serial = None
    s = _want(d, "serial", dict, optional=True)
    if s is not None:
        serial = SerialSpec(_want(s, "output", str), _want(s, "input", str), _want(s, "port", int), _want(s, "irq", int))
    debug_exit = None
    de = _want(d, "debug_exit", dict, optional=True)
    if de is not None:
        debug_exit = DebugExitSpec(_want(de, "port", int), _want(de, "size", int))
    memory = _want(d, "memory", int)
    vcpus = _want(d, "vcpus", int)
    if memory <= 0 or memory % 4096 or not 1 <= vcpus <= 64:
        raise CodecError("description: memory or vcpus out of range")
    timeout = d.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))):
        raise CodecError("description field 'timeout' is malformed")
    try:
        spec = VmSpec(name=_want(d, "name", str), boot=boot, memory=memory, vcpus=vcpus, timeout=timeout,
                      machine=_want(d, "machine", str), irqchip=_want(d, "irqchip", bool), pit=_want(d, "pit", bool),
                      serial=serial, debug_exit=debug_exit,
                      devices=_devices_from_list(d.get("devices"), _want(d, "irqchip", bool)),
                      virtio_cmdline=_want(d, "virtio_cmdline", bool), source=source, cpu=_cpu(d.get("cpu")))
    except CodecError:
        raise
    except Exception as e:   # VmSpec's own checks (ConfigError)
        raise CodecError(f"description: {e}") from None
    _check_ranges(spec)
    return spec


def _check_ranges(spec: VmSpec) -> None:
    """The ranges parse_spec (hvm/config.py) enforces on a config, for a description read from a file: a
    value no config could give (an IRQ line past the IOAPIC's, a machine kind hvm does not build, a serial
    sink that is no sink) is refused here rather than reaching KVM or a device."""
    def bad(name: str) -> CodecError:
        return CodecError(f"description field {name!r} is out of range")

    if not MIN_MEMORY <= spec.memory <= MAX_MEMORY:
        raise bad("memory")
    if spec.machine not in MACHINES or spec.machine == "auto":
        raise bad("machine")
    if (spec.vcpus > 1 or spec.pit) and not spec.irqchip:
        raise bad("irqchip")
    boot = spec.boot
    if isinstance(boot, FlatBoot):
        if (boot.mode not in CPU_MODES or not 0 <= boot.load <= 0xFFFFFFFF or not 0 <= boot.entry <= 0xFFFFFFFF
                or any(r not in GP_REGS or not 0 <= v < 1 << 64 for r, v in boot.regs)):
            raise bad("boot")
    s = spec.serial
    if s is not None:
        out_ok = s.output in SERIAL_SINKS or (s.output.startswith("file:") and len(s.output) > 5)
        in_ok = s.input in ("auto", "stdin", "none") or (s.input.startswith("file:") and len(s.input) > 5)
        if not out_ok or not in_ok or "\0" in s.output + s.input or not 0 <= s.port <= 0xFFF8 or not 0 <= s.irq <= 23:
            raise bad("serial")
    de = spec.debug_exit
    if de is not None and (de.size not in (1, 2, 4) or not 0 <= de.port <= 0x10000 - de.size):
        raise bad("debug_exit")
    # (devices: validated by _devices_from_list as a config's are)
