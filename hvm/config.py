"""VM descriptions: YAML (or command-line flags) -> VmSpec, validated before any KVM call.

Every error is a ConfigError whose message names the source (file or "command line"), the field
and what is wrong, in one line. Unknown keys are errors. docs/config.md documents every field.
"""
from __future__ import annotations

import errno
import math
import os
import re
import stat
from pathlib import Path

from hvm._types import TYPE_CHECKING, Any
from hvm.files import HostFileError, _describe, check_regular_input, expand_user
from hvm.mmio import registry
from hvm.mmio.registry import REQUIRED, DeviceConfig
from hvm.plain import Frozen

if TYPE_CHECKING:
    from hvm.cpu_model import CpuSpec
    from hvm.qmp.address import QmpAddress

DEFAULT_MEMORY = 128 << 20   # as QEMU
MIN_MEMORY = 2 << 20
MAX_MEMORY = 1 << 40         # 1 TiB: beyond what a host could back, and what the guest's memory map lays out
MAX_TIMEOUT = 1e6            # seconds (11.6 days): a watchdog must be a number a timer can wait for
# A VM description is a few hundred bytes. These bounds keep a hostile or mistaken file (a YAML bomb, a
# 200k-key mapping, 3000 nested lists, /dev/zero) to a fraction of a second and a few MB: size before
# parsing, nesting depth and expanded node count (aliases counted as what they expand to) while composing.
MAX_CONFIG_BYTES = 64 << 10
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 4096
SHOW_LIMIT = 60              # characters of a user's value quoted in an error message
# Images that the Makefile builds: a missing one is "not built yet", with the target that builds it.
REPO_ROOT = Path(__file__).resolve().parent.parent
BUILT_BY = {REPO_ROOT / "build" / "linux": "make linux", REPO_ROOT / "firmware" / "build": "make firmware"}
MAX_VCPUS = 64
SERIAL_SINKS = ("stdio", "none")
CPU_MODES = ("real", "protected", "long")


class ConfigError(Exception):
    """A VM description is wrong. str() is the one-line message for the user.

    `flag` is the command-line flag the wrong value came from (then the message names the flag, not the
    YAML file it overrode: "--vcpus: 0 is out of range (1..64)")."""

    def __init__(self, source: str, field_name: str, message: str, flag: str | None = None):
        self.source = source
        self.field = field_name
        self.flag = flag
        message = _one_line(message, 400)     # whatever a value, a path or a library said
        field_name = _one_line(field_name, 100)
        if flag:
            text = f"{flag}: {message}"
        else:
            text = f"{_one_line(source, 4200)}: {field_name}: {message}" if field_name else \
                f"{_one_line(source, 4200)}: {message}"
        super().__init__(text)


def _one_line(text: str, limit: int) -> str:
    """`text` as part of a one-line message: control and line-breaking characters escaped, at most `limit`
    characters (then "...")."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


class FlatBoot(Frozen):
    _fields = ("image", "load", "entry", "mode", "regs")

    def __init__(self, image: Path, load: int, entry: int, mode: str, regs: tuple[tuple[str, int], ...] = ()):
        # regs: initial general-purpose registers, e.g. (("rdi", 1),)
        self._set(image=image, load=load, entry=entry, mode=mode, regs=regs)


class KernelBoot(Frozen):
    _fields = ("kernel", "initrd", "cmdline")

    def __init__(self, kernel: Path, initrd: tuple[Path, ...] = (), cmdline: str = ""):
        self._set(kernel=kernel, initrd=initrd, cmdline=cmdline)


class SerialSpec(Frozen):
    _fields = ("output", "input", "port", "irq")

    def __init__(self, output: str = "stdio", input: str = "auto", port: int = 0x3F8, irq: int = 4):
        # output: "stdio", "none" or "file:PATH"; input: "stdin", "none", "file:PATH", or "auto" (stdin when
        # output is stdio)
        self._set(output=output, input=input, port=port, irq=irq)


class DebugExitSpec(Frozen):
    _fields = ("port", "size")

    def __init__(self, port: int = 0xF4, size: int = 4):
        self._set(port=port, size=size)


_DEFAULT = object()     # VmSpec's serial and debug_exit: a fresh default SerialSpec()/DebugExitSpec()


class VmSpec(Frozen):
    """A validated VM description (plain: hvm/plain.py says why). Fields:
    machine: "pc" (irqchip, PIT, ACPI tables, PM timer, fw_cfg) or "none" (bare);
    devices: every other device, as declared in its own file (hvm/mmio/registry.py): debugcon, pvconsole,
      testdev, virtio-blk, ... in the order the machine creates them;
    virtio_cmdline: add virtio_mmio.device=... to a Linux command line (else: ACPI only);
    script: hvm.script.Step: `script:` steps `hvm run` runs against the console;
    qmp: a QMP socket to listen on (hvm/qmp/, docs/lifecycle.md);
    cpu: `cpu:`/--cpu: QEMU's -cpu model (hvm/cpu_model.py); None: the host's CPUID;
    accel: `accel:`/--accel: "kvm" (hardware assist through /dev/kvm), "tcg" (binary translation: Unicorn,
      hvm/vcpu/tcg.py) or "auto" (KVM when /dev/kvm works, else tcg with a notice: Machine resolves it)."""
    _fields = ("name", "boot", "memory", "vcpus", "timeout", "machine", "irqchip", "pit", "serial", "debug_exit",
               "devices", "virtio_cmdline", "source", "script", "qmp", "cpu", "accel")

    def __init__(self, name: str, boot: FlatBoot | KernelBoot, memory: int = DEFAULT_MEMORY, vcpus: int = 1,
                 timeout: float | None = None, machine: str = "none", irqchip: bool = True, pit: bool = True,
                 serial: SerialSpec | None = _DEFAULT, debug_exit: DebugExitSpec | None = _DEFAULT,  # type: ignore
                 devices: tuple[DeviceConfig, ...] = (), virtio_cmdline: bool = True, source: str = "command line",
                 script: tuple = (), qmp: QmpAddress | None = None, cpu: CpuSpec | None = None,
                 accel: str = "auto"):
        self._set(name=name, boot=boot, memory=memory, vcpus=vcpus, timeout=timeout, machine=machine,
                  irqchip=irqchip, pit=pit, serial=SerialSpec() if serial is _DEFAULT else serial,
                  debug_exit=DebugExitSpec() if debug_exit is _DEFAULT else debug_exit, devices=devices,
                  virtio_cmdline=virtio_cmdline, source=source, script=script, qmp=qmp, cpu=cpu, accel=accel)
        # A VmSpec built in code (not by parse_spec) gets the checks that keep the watchdog working.
        if self.timeout is not None and not _timeout_ok(self.timeout):
            raise ConfigError(self.source, "timeout", f"{_show(self.timeout)} is not a number of seconds "
                              f"in 0..{MAX_TIMEOUT:.0f}")

    def with_overrides(self, **changes: Any) -> "VmSpec":
        return self.replace(**changes)

    def device(self, type_name: str) -> DeviceConfig | None:
        """The first device of that type, or None."""
        for d in self.devices:
            if d.type == type_name:
                return d
        return None


# Patterns as strings: re compiles (and caches) one at its first use, not at every start-up of hvm.
_SIZE_RE = r"(?i)^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: Any) -> int:
    """64M, 1G, 512MiB, 65536 -> bytes. A bare number in a string means MiB, as QEMU's -m."""
    if isinstance(value, bool):
        raise ValueError(f"{_show(value)} is not a size (use e.g. 64M, 1G)")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and len(value) <= 64:  # a longer string is no size (and int() of it is slow)
        m = re.match(_SIZE_RE, value)
        if m:
            unit = m.group(2).upper()
            if not unit and not m.group(3):
                unit = "M"
            return int(m.group(1)) * _UNITS[unit]
    raise ValueError(f"{_show(value)} is not a size (use e.g. 64M, 1G)")


def _timeout_ok(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0 <= value <= MAX_TIMEOUT)


def _show(value: Any) -> str:
    """A user's value quoted in an error message: short, one line, and never expanded from a YAML alias
    bomb or a 10,000-digit number."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        if abs(value) >= 10 ** 30:  # str() of a huge int is slow, and refused past 4300 digits
            return f"{'-' if value < 0 else ''}{value.bit_length()}-bit number"
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        if len(value) > SHOW_LIMIT:
            return repr(value[:SHOW_LIMIT]) + f"... ({len(value)} characters)"
        return repr(value)
    return _kind(value)


class _Fields:
    """Reads one mapping, tracking the path for error messages and rejecting unknown keys."""

    def __init__(self, source: str, data: Any, path: str, allowed: tuple[str, ...],
                 origins: dict[str, str] | None = None):
        self.source = source
        self.path = path
        self.origins = origins or {}
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise self._error(path or "(top level)", f"expected a mapping, got {_kind(data)}")
        unknown = [k for k in data if k not in allowed]
        if unknown:
            key = unknown[0]
            name = _show(key) if not isinstance(key, str) or len(key) > SHOW_LIMIT else key
            raise ConfigError(source, self._name(name), f"unknown key (allowed here: {', '.join(allowed)})")
        self.data = data

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def sub(self, data: Any, path: str, allowed: tuple[str, ...]) -> "_Fields":
        return _Fields(self.source, data, path, allowed, self.origins)

    def _error(self, name: str, message: str) -> ConfigError:
        # The value may have come from a flag (cli.py records which flag set which field): name the flag.
        probe = name
        while probe:
            flag = self.origins.get(probe)
            if flag:
                inner = name[len(probe) + 1:]
                return ConfigError(self.source, name, f"{inner}: {message}" if inner else message, flag=flag)
            probe = probe.rpartition(".")[0]
        return ConfigError(self.source, name, message)

    def error(self, key: str, message: str) -> ConfigError:
        return self._error(self._name(key), message)

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def int(self, key: str, default: int | None = None, lo: int | None = None, hi: int | None = None) -> int:
        v = self.data.get(key, default)
        if isinstance(v, str):
            try:
                if len(v) > 64:  # no field takes a longer number; int() of 100k digits is slow
                    raise ValueError
                v = int(v, 0)
            except ValueError:
                raise self.error(key, f"expected an integer, got {_show(v)}") from None
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.error(key, f"expected an integer, got {_kind(v)}")
        if lo is not None and v < lo or hi is not None and v > hi:
            raise self.error(key, f"{_show(v)} is out of range ({lo}..{hi})")
        return v

    def str(self, key: str, default: str | None = None, choices: tuple[str, ...] | None = None) -> str:
        v = self.data.get(key, default)
        if not isinstance(v, str):
            raise self.error(key, f"expected a string, got {_kind(v)}")
        if choices and v not in choices:
            raise self.error(key, f"{_show(v)} is not one of: {', '.join(choices)}")
        return v

    def path_(self, key: str, base: Path, must_exist: bool = True, value: Any = ...) -> Path:
        v = self.data.get(key) if value is ... else value
        if not isinstance(v, str) or not v:
            raise self.error(key, f"expected a file path, got {_kind(v)}")
        p = _user_path(v, base, lambda m: self.error(key, m))
        if must_exist:
            check_input_file(p, lambda m: self.error(key, m))
        return p


def _user_path(text: str, base: Path, error) -> Path:
    """A path from the user: ~ expanded, relative to `base`. `error(message)` makes the ConfigError."""
    if "\0" in text:
        raise error(f"{_show(text)} is not a file path (it contains a NUL byte)")
    try:
        p = expand_user(text, "path")
    except HostFileError as e:
        raise error(str(e).removeprefix("path ")) from None
    if not p.is_absolute():
        p = base / p
    # Normalized without following links (resolve() would also stat every component: a FIFO or a
    # 4 KB-long name must reach check_input_file's one-line errors, not an exception here).
    return Path(os.path.normpath(p))


def check_input_file(p: Path, error) -> None:
    """A file hvm will read: it exists and is a regular file, or a one-line error saying what it is and,
    for an image the Makefile builds, which `make` target builds it."""
    try:
        st = os.stat(p)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            for folder, target in BUILT_BY.items():
                if p.is_relative_to(folder):
                    raise error(f"{p} is not built yet: run `{target}`") from None
            raise error(f"file not found: {p}") from None
        raise error(f"{p}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"not a regular file: {p} is {_describe(st.st_mode)}")
    try:
        check_regular_input(p, "file")
    except HostFileError as e:
        raise error(str(e).removeprefix("file ")) from None


def _kind(v: Any) -> str:
    if v is None:
        return "nothing"
    if isinstance(v, bool):
        return f"a boolean ({v})"
    if isinstance(v, (int, float)):
        return f"a number ({_show(v)})"
    if isinstance(v, str):
        return f"a string ({_show(v)})"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


TOP_KEYS = ("name", "memory", "vcpus", "timeout", "machine", "irqchip", "pit", "boot", "devices", "script", "qmp",
            "virtio_cmdline", "cpu", "accel")
ACCELS = ("auto", "kvm", "tcg")
MACHINES = ("auto", "pc", "none")
BOOT_KEYS = ("image", "load", "entry", "mode", "regs", "kernel", "initrd", "cmdline")
GP_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
           "r15")
BUILTIN_DEVICE_KEYS = ("serial", "debug_exit")   # the rest come from the registry (device_keys())
SERIAL_KEYS = ("output", "input", "port", "irq")
DEBUG_EXIT_KEYS = ("port", "size")


def load_yaml(path: Path) -> dict:
    """Read a YAML file into a mapping; every failure is a ConfigError naming the file (load_yaml_document)."""
    source = str(path)
    data = load_yaml_document(path)
    if data is None:
        raise ConfigError(source, "", "file is empty (expected a VM description)")
    if not isinstance(data, dict):
        raise ConfigError(source, "", f"expected a mapping of VM settings at the top level, got {_kind(data)}")
    return data


def load_yaml_document(path: Path) -> Any:
    """Read a YAML file (any document: a script file is a list); every failure is a ConfigError naming it.

    The file must be a regular file of at most MAX_CONFIG_BYTES (a FIFO would hang, /dev/zero would be read
    until memory runs out), and the YAML at most MAX_YAML_DEPTH deep and MAX_YAML_NODES nodes with aliases
    expanded (a billion-laughs bomb is refused while it is composed, before anything walks it)."""
    source = str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(source, "", "file not found") from None
    except (OSError, ValueError) as e:
        raise ConfigError(source, "", f"cannot read: {getattr(e, 'strerror', None) or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(source, "", "is a directory, not a YAML file")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(source, "", f"is {_describe(st.st_mode)}, not a YAML file (hvm reads regular files)")
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO after the stat, the open does not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise ConfigError(source, "", f"cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(source, "", f"is {_describe(st.st_mode)}, not a YAML file")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(source, "", f"cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(source, "", f"more than {MAX_CONFIG_BYTES >> 10} KiB: not a VM description")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(source, "", f"not UTF-8 text (byte {e.start})") from None
    return parse_yaml(text, source)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> Python data, within MAX_YAML_DEPTH and MAX_YAML_NODES; any failure is a ConfigError."""
    import yaml  # here, not at the top: PyYAML's import is ~25 ms, and `hvm run --kernel ...` reads no YAML

    loader = None
    try:
        loader = _bounded_loader(yaml)(text)   # the reader checks the characters here already
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(source, "", f"invalid YAML: {where}{_clip(problem)}") from None
    except (ValueError, TypeError, OverflowError, LookupError, AttributeError) as e:
        # A constructor's own failure on a well-formed scalar: a timestamp like 2024-13-45, or PyYAML's
        # AttributeError on `!!timestamp x` (its explicit tags skip the format check)
        node = getattr(loader, "node", None)
        where = f"line {node.start_mark.line + 1}, column {node.start_mark.column + 1}: " if node else ""
        raise ConfigError(source, "", f"invalid YAML: {where}{_clip(str(e))}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:200] + "..."


_LOADER = None


def _bounded_loader(yaml):
    """A SafeLoader that counts while composing: nesting depth, and nodes with every alias counted as the
    whole subtree it stands for, so that expansion (by the constructor, merge keys or an error message)
    stays within MAX_YAML_NODES. An alias to a node still being composed (a recursive structure) is refused."""
    global _LOADER
    if _LOADER is not None:
        return _LOADER

    class BoundedLoader(yaml.SafeLoader):
        def __init__(self, stream):
            super().__init__(stream)
            self._depth = 0
            self._nodes = 0
            self._sizes: dict[int, int] = {}   # id(node) -> expanded size, for finished nodes
            self.node = None                     # the node being constructed, for error positions

        def construct_object(self, node, deep=False):
            self.node = node
            return super().construct_object(node, deep)

        def construct_yaml_int(self, node):
            # int() of a long decimal string is quadratic (and refused past 4300 digits): no field needs it
            if len(node.value) > 100:
                raise yaml.constructor.ConstructorError(None, None, f"a number of {len(node.value)} characters "
                                                        "(too long for any field)", node.start_mark)
            return super().construct_yaml_int(node)

        def _limit(self, problem: str):
            mark = self.peek_event().start_mark if self.check_event() else None
            return yaml.composer.ComposerError(None, None, problem, mark)

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                node = self.anchors.get(event.anchor)
                if node is not None:
                    size = self._sizes.get(id(node))
                    if size is None:
                        raise yaml.composer.ComposerError(None, None, "an alias to the node that contains it "
                                                          "(a recursive structure)", event.start_mark)
                    self._count(size, event.start_mark)
                return super().compose_node(parent, index)
            if self._depth >= MAX_YAML_DEPTH:
                raise self._limit(f"nested more than {MAX_YAML_DEPTH} levels deep")
            before = self._nodes
            self._depth += 1
            try:
                self._count(1, None)
                node = super().compose_node(parent, index)
            finally:
                self._depth -= 1
            self._sizes[id(node)] = self._nodes - before
            return node

        def _count(self, n: int, mark) -> None:
            self._nodes += n
            if self._nodes > MAX_YAML_NODES:
                if mark is None and self.check_event():
                    mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_YAML_NODES} values (counting "
                                                  "what each alias stands for): not a VM description", mark)

    BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)
    _LOADER = BoundedLoader
    return _LOADER


def parse_spec(data: dict, source: str = "command line", base_dir: Path | None = None,
               origins: dict[str, str] | None = None) -> VmSpec:
    """Validate a raw mapping (from YAML, possibly with command-line overrides merged in).

    `origins` maps a field's dotted path ("vcpus", "devices.serial.output") to the flag that set it, so
    that an error in an overridden value names the flag instead of the YAML file."""
    base = base_dir or Path.cwd()
    top = _Fields(source, data, "", TOP_KEYS, origins)

    name = top.str("name", Path(source).stem if source != "command line" else "vm")
    try:
        memory = parse_size(top.get("memory", DEFAULT_MEMORY))
    except ValueError as e:
        raise top.error("memory", str(e)) from None
    if memory < MIN_MEMORY:
        raise top.error("memory", f"{_show(memory)} bytes is too small (at least {MIN_MEMORY >> 20} MiB)")
    if memory > MAX_MEMORY:
        raise top.error("memory", f"{_show(memory)} bytes is too large (at most {MAX_MEMORY >> 30} GiB)")
    if memory % 4096:
        raise top.error("memory", "must be a multiple of 4 KiB")
    vcpus = top.int("vcpus", 1, 1, MAX_VCPUS)

    timeout = top.get("timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
            raise top.error("timeout", f"expected seconds (a number >= 0), got {_kind(timeout)}")
        if not _timeout_ok(timeout):  # inf, nan, 1e300: a timer cannot wait for that (and nan fires at once)
            raise top.error("timeout", f"{_show(timeout)} is not a number of seconds in 0..{MAX_TIMEOUT:.0f} "
                            "(0: no watchdog)")
        timeout = float(timeout) or None

    if not top.has("boot"):
        raise ConfigError(source, "boot", "missing: say what to boot (boot.image or boot.kernel)")
    boot_f = top.sub(top.get("boot"), "boot", BOOT_KEYS)
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
        if len(initrd_raw) > 64:
            raise boot_f.error("initrd", f"{len(initrd_raw)} files: at most 64")
        initrd = [boot_f.path_("initrd", base, value=item) for item in initrd_raw]
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
        regs_f = boot_f.sub(boot_f.get("regs"), "boot.regs", GP_REGS)
        regs = tuple((r, regs_f.int(r, 0, 0, (1 << 64) - 1)) for r in GP_REGS if regs_f.has(r))
        boot = FlatBoot(image, load, entry, mode, regs)
    else:
        raise boot_f.error("image", "missing: give boot.image (a flat binary) or boot.kernel (a multiboot "
                           "ELF, a Linux bzImage or a 64-bit vmlinux)")

    machine = top.str("machine", "auto", MACHINES)
    if machine == "auto":
        # A kernel gets a PC (as QEMU's -kernel does); a flat image gets a bare machine, so that its
        # `cli; hlt` reaches hvm and ends the VM, unless it has several vCPUs to start.
        # A PCI device (pci-testdev) needs the PC's PCI bus: asking for one asks for a PC.
        machine = "pc" if isinstance(boot, KernelBoot) or vcpus > 1 or _wants_pci(top.get("devices")) else "none"
    irqchip = _on_off(top, "irqchip", machine == "pc")
    if vcpus > 1 and not irqchip:
        raise top.error("irqchip", f"{vcpus} vCPUs need the in-kernel irqchip (to start the other CPUs)")
    pit = _on_off(top, "pit", irqchip)
    if pit and not irqchip:
        raise top.error("pit", "the in-kernel PIT needs the in-kernel irqchip")

    raw_devices = top.get("devices")
    devices = top.sub(raw_devices, "devices", device_keys() if _names_registry(raw_devices) else BUILTIN_DEVICE_KEYS)
    serial: SerialSpec | None = SerialSpec()
    if "serial" in devices.data:
        raw = devices.get("serial")
        if raw is False or raw == "none":
            serial = None
        elif isinstance(raw, str):
            serial = SerialSpec(output=_sink(devices, "serial", raw))
        else:
            sf = devices.sub(raw, "devices.serial", SERIAL_KEYS)
            out = _sink(sf, "output", sf.str("output", "stdio"))
            inp = sf.str("input", "auto")
            if inp not in ("auto", "stdin", "none"):
                if not inp.startswith("file:") or len(inp) == 5:
                    raise sf.error("input", f"{_show(inp)} is not one of: auto, stdin, none, file:PATH")
                inp = "file:" + str(_serial_input(sf, inp[5:]))
            serial = SerialSpec(out, inp, sf.int("port", 0x3F8, 0, 0xFFF8), sf.int("irq", 4, 0, 23))
    debug_exit: DebugExitSpec | None = DebugExitSpec()
    if "debug_exit" in devices.data:
        raw = devices.get("debug_exit")
        if raw is False:
            debug_exit = None
        elif raw is True or raw is None:
            debug_exit = DebugExitSpec()
        else:
            df = devices.sub(raw, "devices.debug_exit", DEBUG_EXIT_KEYS)
            size = df.int("size", 4, 1, 4)
            if size not in (1, 2, 4):
                raise df.error("size", f"{size} is not 1, 2 or 4")
            debug_exit = DebugExitSpec(df.int("port", 0xF4, 0, 0xFFFF - size + 1), size)

    device_list = _registry_devices(devices, base, irqchip)
    for d in device_list:
        if machine != "pc" and getattr(registry.lookup(d.type), "pci", False):
            raise devices.error(d.type, "a PCI device: it needs machine: pc (the PCI bus is the PC's)")
    _check_port_overlaps(devices, serial, debug_exit, device_list)
    virtio_cmdline = _on_off(top, "virtio_cmdline", True)

    script: tuple = ()
    if top.has("script"):
        from hvm.script import check_steps, parse_steps  # (hvm.script imports this module)

        if "script" in top.origins:     # set by a flag (--script FILE): its steps were checked with its name
            script = tuple(top.get("script"))
        else:
            script = parse_steps(top.get("script"), source)
        check_steps(script, serial is not None, top.origins.get("script", source))

    qmp = None
    raw_qmp = top.get("qmp")
    if raw_qmp is not None and raw_qmp is not False:
        if not isinstance(raw_qmp, str):
            raise top.error("qmp", f"expected a socket path or unix:PATH[,server=on][,wait=off], got {_kind(raw_qmp)}")
        # A path from --qmp is the current directory's, one from the YAML file the file's directory's.
        qmp_base = Path.cwd() if top.origins.get("qmp") else base
        from hvm.qmp.address import QmpAddressError, parse_qmp_address   # (only when a config asks for QMP)

        try:
            qmp = parse_qmp_address(raw_qmp, qmp_base)
        except QmpAddressError as e:
            raise top.error("qmp", str(e)) from None

    cpu = None
    raw_cpu = data.get("cpu")
    if raw_cpu is not None:
        if not isinstance(raw_cpu, str):
            raise top.error("cpu", f"expected MODEL[,vendor=NAME][,+feature][,-feature], got {_kind(raw_cpu)}")
        from hvm.cpu_model import CpuModelError, parse_cpu   # (only when a config names a CPU model)

        try:
            cpu = parse_cpu(raw_cpu)
        except CpuModelError as e:
            raise top.error("cpu", str(e)) from None

    accel = top.str("accel", "auto", ACCELS)
    if accel == "tcg":
        # What the binary-translation accelerator is (hvm/vcpu/tcg.py, docs/tcg.md): one Unicorn CPU with its
        # own CPU model, no interrupt controller.
        if vcpus > 1:
            raise top.error("vcpus", f"{vcpus} vCPUs: accel tcg runs one vCPU")
        if cpu is not None:
            raise top.error("cpu", "applies to accel kvm (KVM's CPUID); accel tcg runs Unicorn's qemu64 CPU")

    return VmSpec(name=name, boot=boot, memory=memory, vcpus=vcpus, timeout=timeout, machine=machine,
                  irqchip=irqchip, pit=pit, serial=serial, debug_exit=debug_exit, devices=device_list,
                  virtio_cmdline=virtio_cmdline, source=source, qmp=qmp, script=script, cpu=cpu, accel=accel)


def parse_devices(mapping: Any, source: str = "Python", irqchip: bool = True,
                  base: Path | None = None) -> tuple[DeviceConfig, ...]:
    """Registry devices from a `devices:`-shaped mapping, with a config's checks: VmSpec(devices=...) in
    code (`parse_devices({"debugcon": True, "virtio-blk": [{"file": "disk.img"}]})`) and a snapshot's
    description. Relative paths are relative to `base` (default: the current directory)."""
    fields = _Fields(source, mapping, "devices", tuple(registry.device_types()), {})
    return _registry_devices(fields, Path.cwd() if base is None else base, irqchip)


def _wants_pci(raw: Any) -> bool:
    """Whether a `devices:` mapping (not validated yet) asks for a PCI device."""
    if not _names_registry(raw):
        return False
    return any(v not in (None, False) and getattr(registry.device_types().get(str(k)), "pci", False)
               for k, v in raw.items())


def _names_registry(raw: Any) -> bool:
    """Whether a `devices:` mapping (not validated yet) has a key beyond the built-in serial and debug_exit:
    only then does the registry import every device module to know their names (~10 ms of a start-up)."""
    return isinstance(raw, dict) and any(k not in BUILTIN_DEVICE_KEYS for k in raw)


def device_keys() -> tuple[str, ...]:
    """The keys of `devices:`: the serial port and debug-exit, then every registered device type."""
    return BUILTIN_DEVICE_KEYS + tuple(registry.device_types())


MAX_DEVICE_INSTANCES = 32        # of one type (virtio slots run out before that: registry.VIRTIO_IRQS)
_MAC_RE = r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"


def _registry_devices(devices: _Fields, base: Path, irqchip: bool) -> tuple[DeviceConfig, ...]:
    """`devices: {NAME: true | false | {props} | [{props}, ...]}` for every registered type, each
    instance's properties validated from its type's declaration (hvm/mmio/registry.py)."""
    out: list[DeviceConfig] = []
    if not _names_registry(devices.data):
        return ()
    virtio = 0
    for name, dt in registry.device_types().items():
        raw = devices.get(name)
        if raw is None or raw is False:
            continue
        if isinstance(raw, list):
            if not dt.multiple:
                raise devices.error(name, f"expected true, false or a mapping of properties, got a list "
                                    f"({name} is a single device)")
            if len(raw) > MAX_DEVICE_INSTANCES:
                raise devices.error(name, f"{len(raw)} instances, at most {MAX_DEVICE_INSTANCES} allowed")
            items = [(f"devices.{name}[{i}]", item) for i, item in enumerate(raw)]
        elif raw is True or isinstance(raw, dict):
            items = [(f"devices.{name}", raw)]
        else:
            shape = "true, a mapping of properties or a list of them" if dt.multiple else \
                "true, false or a mapping of properties"
            raise devices.error(name, f"expected {shape}, got {_kind(raw)}")
        for index, (path, item) in enumerate(items):
            if item is True:
                item = {}
            elif not isinstance(item, dict):
                raise devices._error(path, f"expected a mapping of properties, got {_kind(item)}")
            fields = devices.sub(item, path, tuple(p.name for p in dt.props))
            props = {p.name: _prop_value(fields, p, base) for p in dt.props}
            if dt.check is not None:
                try:
                    dt.check(props)
                except ValueError as e:
                    raise devices._error(path, str(e)) from None
            if dt.virtio:
                virtio += 1
                if virtio > len(registry.VIRTIO_IRQS):
                    raise devices._error(path, f"more than {len(registry.VIRTIO_IRQS)} virtio devices (hvm has "
                                         f"that many virtio-mmio slots)")
            # (a virtio device without the irqchip works for a polling driver: its line only records the level)
            if dt.requires_irqchip and not irqchip:
                raise devices._error(path, f"{name} raises interrupts: it needs the in-kernel irqchip "
                                     "(irqchip: on, or machine: pc)")
            instance = f"{name}{index}" if dt.multiple else name
            out.append(DeviceConfig(name, tuple(props.items()), instance, index))
    return tuple(out)


def _prop_value(fields: _Fields, prop, base: Path) -> Any:
    key = prop.name
    if not fields.has(key):
        if prop.default is REQUIRED:
            raise fields.error(key, "missing (required)")
        return prop.default
    raw = fields.get(key)
    kind = prop.kind
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if raw in ("on", "off", "true", "false", "yes", "no"):
            return raw in ("on", "true", "yes")
        raise fields.error(key, f"expected on or off, got {_kind(raw)}")
    if kind == "int":
        return fields.int(key, None, prop.lo, prop.hi)
    if kind == "port":
        return fields.int(key, None, 0, 0xFFFF)
    if kind == "str":
        value = fields.str(key)
        if not value.isprintable() or len(value) > 256:
            raise fields.error(key, f"{_show(value)} is not a printable string of at most 256 characters")
        return value
    if kind == "choice":
        return fields.str(key, None, prop.choices)
    if kind == "path":
        return fields.path_(key, base)
    if kind == "mac":
        value = raw if isinstance(raw, str) else None
        if value is None or not re.match(_MAC_RE, value):
            raise fields.error(key, f"expected a MAC address like 52:54:00:12:34:56, got {_kind(raw)}")
        if int(value[:2], 16) & 1:
            raise fields.error(key, f"{value} is a multicast address (the first octet must be even)")
        return value.lower()
    if kind == "size":
        try:
            return parse_size(raw)
        except ValueError as e:
            raise fields.error(key, str(e)) from None
    raise AssertionError(kind)


def _check_port_overlaps(devices: _Fields, serial: SerialSpec | None, debug_exit: DebugExitSpec | None,
                         device_list: tuple[DeviceConfig, ...]) -> None:
    """Two devices on one I/O port would be refused by the bus when the VM is built: say so here, naming
    both, before any KVM call."""
    taken: list[tuple[int, int, str]] = []
    if serial is not None:
        taken.append((serial.port, 8, "serial"))
    if debug_exit is not None:
        taken.append((debug_exit.port, debug_exit.size, "debug_exit"))
    for d in device_list:
        dt = registry.lookup(d.type)
        if dt is None or dt.ports is None:
            continue
        for base, length in dt.ports(d.values):
            for other_base, other_len, other in taken:
                if base < other_base + other_len and other_base < base + length:
                    raise devices.error(d.type, f"ports {base:#x}..{base + length - 1:#x} overlap {other}'s "
                                        f"({other_base:#x}..{other_base + other_len - 1:#x})")
            taken.append((base, length, d.name))
    # The virtio devices' lines (registry.VIRTIO_IRQS, in order) are level-triggered and driven by each
    # device alone: a UART on one of them would lower it under the virtio device (a lost interrupt).
    virtio = [d for d in device_list if getattr(registry.lookup(d.type), "virtio", False)]
    if serial is not None and serial.irq in registry.VIRTIO_IRQS[:len(virtio)]:
        owner = virtio[registry.VIRTIO_IRQS.index(serial.irq)].name
        raise devices._error("devices.serial.irq", f"IRQ {serial.irq} is {owner}'s (virtio devices take IRQs "
                             f"{', '.join(map(str, registry.VIRTIO_IRQS[:len(virtio)]))}, in order)")


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
    if value in SERIAL_SINKS:
        return value
    if value.startswith("file:") and len(value) > 5:
        path = value[5:]
        if "\0" in path:
            raise fields.error(key, f"{_show(path)} is not a file path (it contains a NUL byte)")
        try:
            expand_user(path, "serial output file")
        except HostFileError as e:
            raise fields.error(key, str(e)) from None
        return value  # opened (without following links) only once the whole VM is built: cli/machine
    raise fields.error(key, f"{_show(value)} is not one of: stdio, none, file:PATH")


def _serial_input(fields: _Fields, text: str) -> Path:
    """serial.input file:PATH: relative to the current directory (as the output file), a regular file
    that exists. hvm streams it to the guest as the guest reads, so there is no size bound; a FIFO or a
    device would block or never end, so it is refused with what to do instead."""
    p = _user_path(text, Path.cwd(), lambda m: fields.error("input", m))
    try:
        st = os.stat(p)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise fields.error("input", f"file not found: {p}") from None
        raise fields.error("input", f"{p}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise fields.error("input", f"{p} is {_describe(st.st_mode)}, not a regular file (for a pipe or a "
                           "device use input: stdin and redirect hvm's stdin from it)")
    if not os.access(p, os.R_OK):
        raise fields.error("input", f"{p}: Permission denied")
    return p


def load_config(path: Path | str, overrides: dict | None = None) -> VmSpec:
    """Read a YAML VM description, merge command-line overrides (same shape), validate."""
    path = Path(path)
    data = load_yaml(path)
    if overrides:
        data = merge(data, overrides)
    return parse_spec(data, str(path), Path(os.path.abspath(path)).parent)


def merge(base: dict, over: dict) -> dict:
    """Deep-merge `over` into a copy of `base` (mappings merge, anything else replaces)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
