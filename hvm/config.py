"""VM descriptions: YAML (or command-line flags) -> VmSpec, validated before any KVM call.

Every error is a ConfigError whose message names the source (file or "command line"), the field
and what is wrong, in one line. Unknown keys are errors. docs/config.md documents every field.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hvm.mmio.debugcon import DEBUGCON_PORT
from hvm.mmio.pvconsole import PVCONSOLE_LEN, PVCONSOLE_PORT

DEFAULT_MEMORY = 128 << 20   # as QEMU
MIN_MEMORY = 2 << 20
MAX_VCPUS = 64
SERIAL_SINKS = ("stdio", "none")
CPU_MODES = ("real", "protected", "long")


class ConfigError(Exception):
    """A VM description is wrong. str() is the one-line message for the user."""

    def __init__(self, source: str, field_name: str, message: str):
        self.source = source
        self.field = field_name
        super().__init__(f"{source}: {field_name}: {message}" if field_name else f"{source}: {message}")


@dataclass(frozen=True)
class FlatBoot:
    image: Path
    load: int
    entry: int
    mode: str
    regs: tuple[tuple[str, int], ...] = ()   # initial general-purpose registers, e.g. (("rdi", 1),)


@dataclass(frozen=True)
class KernelBoot:
    kernel: Path
    initrd: tuple[Path, ...] = ()
    cmdline: str = ""


@dataclass(frozen=True)
class SerialSpec:
    output: str = "stdio"           # "stdio", "none" or "file:PATH"
    input: str = "auto"             # "stdin", "none", "file:PATH", or "auto" (stdin when output is stdio)
    port: int = 0x3F8
    irq: int = 4


@dataclass(frozen=True)
class DebugExitSpec:
    port: int = 0xF4
    size: int = 4


@dataclass(frozen=True)
class VmSpec:
    name: str
    boot: FlatBoot | KernelBoot
    memory: int = DEFAULT_MEMORY
    vcpus: int = 1
    timeout: float | None = None
    machine: str = "none"           # "pc": irqchip, PIT, ACPI tables, PM timer, fw_cfg; "none": bare
    irqchip: bool = True
    pit: bool = True
    testdev: bool = False           # QEMU's pc-testdev (ports 0xe0, 0x2000+), for kvm-unit-tests
    serial: SerialSpec | None = field(default_factory=SerialSpec)
    debug_exit: DebugExitSpec | None = field(default_factory=DebugExitSpec)
    debugcon: int | None = None     # port of QEMU's isa-debugcon (one exit per byte), usually 0xe9
    pvconsole: int | None = None    # port of hvm's paravirtual console (one exit per buffer), usually 0xe00
    source: str = "command line"

    def with_overrides(self, **changes: Any) -> "VmSpec":
        return replace(self, **changes)


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: Any) -> int:
    """64M, 1G, 512MiB, 65536 -> bytes. A bare number in a string means MiB, as QEMU's -m."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size (use e.g. 64M, 1G)")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = m.group(2).upper()
            if not unit and not m.group(3):
                unit = "M"
            return int(m.group(1)) * _UNITS[unit]
    raise ValueError(f"{value!r} is not a size (use e.g. 64M, 1G)")


class _Fields:
    """Reads one mapping, tracking the path for error messages and rejecting unknown keys."""

    def __init__(self, source: str, data: Any, path: str, allowed: tuple[str, ...]):
        self.source = source
        self.path = path
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(source, path or "(top level)", f"expected a mapping, got {_kind(data)}")
        unknown = [k for k in data if k not in allowed]
        if unknown:
            raise ConfigError(source, self._name(str(unknown[0])),
                              f"unknown key (allowed here: {', '.join(allowed)})")
        self.data = data

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.source, self._name(key), message)

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def int(self, key: str, default: int | None = None, lo: int | None = None, hi: int | None = None) -> int:
        v = self.data.get(key, default)
        if isinstance(v, str):
            try:
                v = int(v, 0)
            except ValueError:
                raise self.error(key, f"expected an integer, got {v!r}") from None
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.error(key, f"expected an integer, got {_kind(v)}")
        if lo is not None and v < lo or hi is not None and v > hi:
            raise self.error(key, f"{v} is out of range ({lo}..{hi})")
        return v

    def str(self, key: str, default: str | None = None, choices: tuple[str, ...] | None = None) -> str:
        v = self.data.get(key, default)
        if not isinstance(v, str):
            raise self.error(key, f"expected a string, got {_kind(v)}")
        if choices and v not in choices:
            raise self.error(key, f"{v!r} is not one of: {', '.join(choices)}")
        return v

    def path_(self, key: str, base: Path, must_exist: bool = True) -> Path:
        v = self.data.get(key)
        if not isinstance(v, str) or not v:
            raise self.error(key, f"expected a file path, got {_kind(v)}")
        p = Path(v).expanduser()
        if not p.is_absolute():
            p = (base / p).resolve()
        if must_exist:
            if not p.exists():
                raise self.error(key, f"file not found: {p}")
            if not p.is_file():
                raise self.error(key, f"not a regular file: {p}")
        return p


def _kind(v: Any) -> str:
    if v is None:
        return "nothing"
    if isinstance(v, bool):
        return f"a boolean ({v})"
    if isinstance(v, (int, float)):
        return f"a number ({v})"
    if isinstance(v, str):
        return f"a string ({v!r})"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


TOP_KEYS = ("name", "memory", "vcpus", "timeout", "machine", "irqchip", "pit", "boot", "devices")
MACHINES = ("auto", "pc", "none")
BOOT_KEYS = ("image", "load", "entry", "mode", "regs", "kernel", "initrd", "cmdline")
GP_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
           "r15")
DEVICE_KEYS = ("serial", "debug_exit", "testdev", "debugcon", "pvconsole")
PORT_KEYS = ("port",)
SERIAL_KEYS = ("output", "input", "port", "irq")
DEBUG_EXIT_KEYS = ("port", "size")


def load_yaml(path: Path) -> dict:
    """Read a YAML file into a mapping; every failure is a ConfigError naming the file."""
    source = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(source, "", "file not found") from None
    except IsADirectoryError:
        raise ConfigError(source, "", "is a directory, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(source, "", f"cannot read: {e}") from None
    import yaml  # here, not at the top: PyYAML's import is ~25 ms, and `hvm run --kernel ...` reads no YAML

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(source, "", f"invalid YAML: {where}{problem}") from None
    if data is None:
        raise ConfigError(source, "", "file is empty (expected a VM description)")
    if not isinstance(data, dict):
        raise ConfigError(source, "", f"expected a mapping of VM settings at the top level, got {_kind(data)}")
    return data


def parse_spec(data: dict, source: str = "command line", base_dir: Path | None = None) -> VmSpec:
    """Validate a raw mapping (from YAML, possibly with command-line overrides merged in)."""
    base = base_dir or Path.cwd()
    top = _Fields(source, data, "", TOP_KEYS)

    name = top.str("name", Path(source).stem if source != "command line" else "vm")
    try:
        memory = parse_size(top.get("memory", DEFAULT_MEMORY))
    except ValueError as e:
        raise top.error("memory", str(e)) from None
    if memory < MIN_MEMORY:
        raise top.error("memory", f"{memory} bytes is too small (at least {MIN_MEMORY >> 20} MiB)")
    if memory % 4096:
        raise top.error("memory", "must be a multiple of 4 KiB")
    vcpus = top.int("vcpus", 1, 1, MAX_VCPUS)

    timeout = top.get("timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
            raise top.error("timeout", f"expected seconds (a number >= 0), got {_kind(timeout)}")
        timeout = float(timeout) or None

    if not top.has("boot"):
        raise ConfigError(source, "boot", "missing: say what to boot (boot.image or boot.kernel)")
    boot_f = _Fields(source, top.get("boot"), "boot", BOOT_KEYS)
    boot: FlatBoot | KernelBoot
    if boot_f.has("kernel") and boot_f.has("image"):
        raise boot_f.error("kernel", "give either boot.kernel or boot.image, not both")
    if boot_f.has("kernel"):
        for key in ("load", "entry", "mode", "regs"):
            if boot_f.has(key):
                raise boot_f.error(key, "only applies to a flat boot.image")
        kernel = boot_f.path_("kernel", base)
        initrd_raw = boot_f.get("initrd") or []
        if isinstance(initrd_raw, str):
            initrd_raw = [initrd_raw]
        if not isinstance(initrd_raw, list):
            raise boot_f.error("initrd", f"expected a path or a list of paths, got {_kind(initrd_raw)}")
        initrd = []
        for i, item in enumerate(initrd_raw):
            sub = _Fields(source, {"initrd": item}, "boot", ("initrd",))
            p = sub.path_("initrd", base)
            initrd.append(p)
        cmdline = boot_f.str("cmdline", "") if boot_f.has("cmdline") else ""
        boot = KernelBoot(kernel, tuple(initrd), cmdline)
    elif boot_f.has("image"):
        for key in ("initrd", "cmdline"):
            if boot_f.has(key):
                raise boot_f.error(key, "only applies to boot.kernel")
        image = boot_f.path_("image", base)
        mode = boot_f.str("mode", "real", CPU_MODES)
        load = boot_f.int("load", 0x7C00 if mode == "real" else 0x100000, 0, 0xFFFFFFFF)
        entry = boot_f.int("entry", load, 0, 0xFFFFFFFF)
        if mode == "real" and load + image.stat().st_size > 0xA0000:
            raise boot_f.error("load", f"a real-mode image must fit below 640 KiB ({load:#x} + "
                               f"{image.stat().st_size} bytes does not)")
        regs_f = _Fields(source, boot_f.get("regs"), "boot.regs", GP_REGS)
        regs = tuple((r, regs_f.int(r, 0, 0, (1 << 64) - 1)) for r in GP_REGS if regs_f.has(r))
        boot = FlatBoot(image, load, entry, mode, regs)
    else:
        raise boot_f.error("image", "missing: give boot.image (a flat binary) or boot.kernel (a multiboot ELF)")

    machine = top.str("machine", "auto", MACHINES)
    if machine == "auto":
        # A kernel gets a PC (as QEMU's -kernel does); a flat image gets a bare machine, so that its
        # `cli; hlt` reaches hvm and ends the VM, unless it has several vCPUs to start.
        machine = "pc" if isinstance(boot, KernelBoot) or vcpus > 1 else "none"
    irqchip = _on_off(top, "irqchip", machine == "pc")
    if vcpus > 1 and not irqchip:
        raise top.error("irqchip", f"{vcpus} vCPUs need the in-kernel irqchip (to start the other CPUs)")
    pit = _on_off(top, "pit", irqchip)
    if pit and not irqchip:
        raise top.error("pit", "the in-kernel PIT needs the in-kernel irqchip")

    devices = _Fields(source, top.get("devices"), "devices", DEVICE_KEYS)
    serial: SerialSpec | None = SerialSpec()
    if "serial" in devices.data:
        raw = devices.get("serial")
        if raw is False or raw == "none":
            serial = None
        elif isinstance(raw, str):
            serial = SerialSpec(output=_sink(devices, "serial", raw))
        else:
            sf = _Fields(source, raw, "devices.serial", SERIAL_KEYS)
            out = _sink(sf, "output", sf.str("output", "stdio"))
            inp = sf.str("input", "auto")
            if inp not in ("auto", "stdin", "none") and not inp.startswith("file:"):
                raise sf.error("input", f"{inp!r} is not one of: auto, stdin, none, file:PATH")
            serial = SerialSpec(out, inp, sf.int("port", 0x3F8, 0, 0xFFF8), sf.int("irq", 4, 0, 23))
    debug_exit: DebugExitSpec | None = DebugExitSpec()
    if "debug_exit" in devices.data:
        raw = devices.get("debug_exit")
        if raw is False:
            debug_exit = None
        elif raw is True or raw is None:
            debug_exit = DebugExitSpec()
        else:
            df = _Fields(source, raw, "devices.debug_exit", DEBUG_EXIT_KEYS)
            size = df.int("size", 4, 1, 4)
            if size not in (1, 2, 4):
                raise df.error("size", f"{size} is not 1, 2 or 4")
            debug_exit = DebugExitSpec(df.int("port", 0xF4, 0, 0xFFFF - size + 1), size)

    testdev = devices.get("testdev", False)
    if not isinstance(testdev, bool):
        raise devices.error("testdev", f"expected true or false, got {_kind(testdev)}")

    debugcon = _optional_port(devices, "debugcon", DEBUGCON_PORT, 1)
    pvconsole = _optional_port(devices, "pvconsole", PVCONSOLE_PORT, PVCONSOLE_LEN)

    return VmSpec(name=name, boot=boot, memory=memory, vcpus=vcpus, timeout=timeout, machine=machine,
                  irqchip=irqchip, pit=pit, testdev=testdev, serial=serial, debug_exit=debug_exit,
                  debugcon=debugcon, pvconsole=pvconsole, source=source)


def _optional_port(devices: _Fields, key: str, default: int, length: int) -> int | None:
    """A device that is off unless asked for: `key: true`, or `key: {port: N}`; its port, or None."""
    raw = devices.get(key, False)
    if raw is False or raw is None:
        return None
    if raw is True:
        return default
    if not isinstance(raw, dict):
        raise devices.error(key, f"expected true, false or {{port: N}}, got {_kind(raw)}")
    sub = _Fields(devices.source, raw, f"devices.{key}", PORT_KEYS)
    return sub.int("port", default, 0, 0x10000 - length)


def _on_off(fields: _Fields, key: str, default: bool) -> bool:
    raw = fields.get(key, "auto")
    if raw in ("auto", None):
        return default
    if isinstance(raw, bool):
        return raw
    if raw in ("on", "off"):
        return raw == "on"
    raise fields.error(key, f"expected auto, on or off, got {_kind(raw)}")


def _sink(fields: _Fields, key: str, value: str) -> str:
    if value in SERIAL_SINKS or (value.startswith("file:") and len(value) > 5):
        return value
    raise fields.error(key, f"{value!r} is not one of: stdio, none, file:PATH")


def load_config(path: Path | str, overrides: dict | None = None) -> VmSpec:
    """Read a YAML VM description, merge command-line overrides (same shape), validate."""
    path = Path(path)
    data = load_yaml(path)
    if overrides:
        data = merge(data, overrides)
    return parse_spec(data, str(path), path.resolve().parent)


def merge(base: dict, over: dict) -> dict:
    """Deep-merge `over` into a copy of `base` (mappings merge, anything else replaces)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
