"""The device registry: a device type is declared once, in its own file, and everything else reaches it
through that declaration (QEMU's qdev in spirit: typed properties with defaults, the resources the device
wants, how it is realized).

A device module defines, at module level, `DEVICE = DeviceType(...)`. The registry finds every module of
hvm/mmio/ and hvm/mmio/virtio/ that has one, so adding a device is adding its file (plus a test):
- the YAML key `devices: {NAME: ...}` and `--device NAME,prop=value` (hvm/config.py validates the
  properties from the declaration: same one-line errors as every other field),
- `hvm-qemu -device` (QEMU's names through `aliases`, QEMU's option names through `Prop.alias`),
- docs/config.md's device table (`hvm run --device help` prints it from here),
- the machine's wiring (hvm/builder.py): fixed port ranges, or a virtio-mmio slot and IRQ it allocates,
- the snapshot (the device's save()/load() through the bus it is registered on).

Devices never see KVM: create() gets a DeviceContext with guest memory, the buses, IRQ lines and the
console.
"""
from __future__ import annotations

import importlib
import logging
import threading

from hvm._types import TYPE_CHECKING, Any, Callable
from hvm.plain import Frozen, Record

if TYPE_CHECKING:
    from hvm.console import Console
    from hvm.memory import GuestMemory
    from hvm.mmio.bus import MmioBus, PioBus
    from hvm.mmio.device import IrqLine

log = logging.getLogger(__name__)


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()   # a property with no default: it must be given
PROP_KINDS = ("bool", "int", "port", "str", "choice", "path", "mac", "size")

# virtio-mmio slots: 4 KiB each from 0xd0000000, in the PCI hole below 4 GiB (hvm/memory.py), as
# Firecracker places them; one IRQ each, from the ISA lines a PC leaves free (0 PIT, 1 keyboard, 2 cascade,
# 3/4 COM, 8 RTC, 9 SCI, 12 mouse are taken). ACPI and the MP table declare them level-triggered.
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_SLOT = 0x1000
VIRTIO_IRQS = (5, 6, 7, 10, 11, 14, 15)


# The records below are plain classes (hvm/plain.py: a dataclass costs ~0.5 ms to create at every start).
class Prop(Frozen):
    """One typed property of a device type: its YAML key and --device option. kind: one of PROP_KINDS;
    lo, hi: the range of an "int" (inclusive); choices: a "choice"'s values; alias: QEMU's option name for
    it ("iobase" for port)."""
    _fields = ("name", "kind", "default", "lo", "hi", "choices", "alias", "help")

    def __init__(self, name: str, kind: str, default: Any = REQUIRED, lo: int | None = None, hi: int | None = None,
                 choices: tuple[str, ...] = (), alias: str | None = None, help: str = ""):
        self._set(name=name, kind=kind, default=default, lo=lo, hi=hi, choices=choices, alias=alias, help=help)
        if self.kind not in PROP_KINDS:
            raise ValueError(f"property {self.name}: unknown kind {self.kind!r}")


class VirtioSlot(Frozen):
    """The MMIO window and interrupt line the machine gave a virtio-mmio device."""
    _fields = ("base", "irq", "size")

    def __init__(self, base: int, irq: int, size: int = VIRTIO_MMIO_SLOT):
        self._set(base=base, irq=irq, size=size)


class DeviceType(Frozen):
    """A device type's declaration (a device module's DEVICE):
    name: the `devices:` key and the --device NAME; help: one line (docs/config.md, `--device help`);
    create(ctx, props) -> the device; props: its Props; aliases: other --device names (QEMU's);
    multiple: several instances (a YAML list, a repeated --device);
    virtio: wants a virtio-mmio slot (4 KiB + an IRQ) from the machine;
    ports(props) -> its fixed port ranges [(base, length)]; check(props): config-time checks beyond the
    types (ValueError(message)); uses_console: writes to the console (then it is the terminal without a
    UART); snapshot: False if the VM cannot be snapshotted with it (host files, fds);
    requires_irqchip: raises interrupts that mean nothing without the irqchip;
    pci: a PCI function on the pc machine's bus 0 (ctx.pci; machine: pc)."""
    _fields = ("name", "help", "create", "props", "aliases", "multiple", "virtio", "ports", "check",
               "uses_console", "snapshot", "requires_irqchip", "pci")

    def __init__(self, name: str, help: str, create: Callable[["DeviceContext", dict], Any],
                 props: tuple[Prop, ...] = (), aliases: tuple[str, ...] = (), multiple: bool = False,
                 virtio: bool = False, ports: Callable[[dict], list[tuple[int, int]]] | None = None,
                 check: Callable[[dict], None] | None = None, uses_console: bool = False, snapshot: bool = True,
                 requires_irqchip: bool = False, pci: bool = False):
        self._set(name=name, help=help, create=create, props=props, aliases=aliases, multiple=multiple,
                  virtio=virtio, ports=ports, check=check, uses_console=uses_console, snapshot=snapshot,
                  requires_irqchip=requires_irqchip, pci=pci)

    def prop(self, name: str) -> Prop | None:
        for p in self.props:
            if p.name == name or p.alias == name:
                return p
        return None


class DeviceConfig(Frozen):
    """One device instance of a VmSpec: its type, validated properties, and its instance name."""
    _fields = ("type", "props", "name", "index")

    def __init__(self, type: str, props: tuple[tuple[str, Any], ...], name: str, index: int = 0):
        self._set(type=type, props=props, name=name, index=index)

    @property
    def values(self) -> dict:
        return dict(self.props)


class DeviceContext(Record):
    """What a device type's create() gets: the machine's resources, never KVM.
    set_console_input(feed, pending, release=None): this device takes the console's input instead of the
      UART; release() lets a feed blocked on a full queue go when the VM stops.
    irq_setter: the irqchip's line setter (None without one).
    ioevent(addr, length, datamatch, callback) -> bool: a guest write there runs callback on hvm's ioevent
      thread without an exit to hvm (KVM_IOEVENTFD, hvm/ioevents.py); False where that is not available.
    pci: the pc machine's PCI bus 0 (hvm/mmio/pci.py): a `pci=True` device adds its PciFunction with
      ctx.pci.add(); the machine assigns the BARs once every device is created. None on machine: none."""
    _fields = ("name", "index", "memory", "console", "pio", "mmio", "slot", "irq_line", "on_close",
               "set_console_input", "irq_setter", "ioevent", "machine", "pci")
    _hidden = ("machine",)

    def __init__(self, name: str, index: int, memory: "GuestMemory", console: "Console", pio: "PioBus",
                 mmio: "MmioBus", slot: VirtioSlot | None, irq_line: Callable[[int], "IrqLine"],
                 on_close: Callable[[Callable[[], None]], None], set_console_input: Callable[..., None],
                 irq_setter: Callable[[int, int], None] | None = None,
                 ioevent: Callable[[int, int, int | None, Callable[[], None]], bool] | None = None,
                 machine: Any = None, pci: Any = None):
        self._set(name=name, index=index, memory=memory, console=console, pio=pio, mmio=mmio, slot=slot,
                  irq_line=irq_line, on_close=on_close, set_console_input=set_console_input,
                  irq_setter=irq_setter, ioevent=ioevent, machine=machine, pci=pci)


_types: dict[str, DeviceType] | None = None
_names: dict[str, DeviceType] = {}
_lock = threading.Lock()
_PACKAGES = ("hvm.mmio", "hvm.mmio.virtio")
_NOT_DEVICES = {"registry", "bus", "device", "pci"}


def _discover() -> dict[str, DeviceType]:
    import pkgutil   # (the scan runs only when a config or a command names a registry device)

    found: dict[str, DeviceType] = {}
    for package_name in _PACKAGES:
        try:
            package = importlib.import_module(package_name)
        except ModuleNotFoundError:
            continue
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            if info.ispkg or info.name.startswith("_") or info.name in _NOT_DEVICES:
                continue
            module = importlib.import_module(f"{package_name}.{info.name}")
            dt = getattr(module, "DEVICE", None)
            if isinstance(dt, DeviceType):
                _add(found, dt, module.__name__)
    return found


def _add(found: dict[str, DeviceType], dt: DeviceType, where: str) -> None:
    for name in (dt.name, *dt.aliases):
        if name in _names and _names[name] is not dt:
            raise RuntimeError(f"{where}: device name {name!r} is declared twice")
        _names[name] = dt
    found[dt.name] = dt


def device_types() -> dict[str, DeviceType]:
    """Every declared device type by name, in name order."""
    global _types
    with _lock:
        if _types is None:
            _types = dict(sorted(_discover().items()))
        return _types


def lookup(name: str) -> DeviceType | None:
    """The device type called `name` (its name or one of its aliases)."""
    device_types()
    return _names.get(name)


def names_help() -> str:
    """The device names, as an error message lists them."""
    return ", ".join(device_types())


def describe() -> str:
    """A table of every device type and its properties (`--device help`, docs/config.md)."""
    lines = []
    for dt in device_types().values():
        aka = f" (also {', '.join(dt.aliases)})" if dt.aliases else ""
        lines.append(f"{dt.name}{aka}: {dt.help}")
        for p in dt.props:
            default = "required" if p.default is REQUIRED else f"default {_show_default(p.default)}"
            choices = f", one of {'/'.join(p.choices)}" if p.choices else ""
            alias = f" (or {p.alias})" if p.alias else ""
            lines.append(f"    {p.name}{alias}: {p.kind}{choices}, {default}{': ' + p.help if p.help else ''}")
    return "\n".join(lines)


def _show_default(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, int) and v > 9:
        return hex(v)
    return "none" if v is None else str(v)


DOC_BEGIN = "<!-- devices: generated from the registry: `make docs-devices` -->"
DOC_END = "<!-- end of devices -->"


def markdown() -> str:
    """docs/config.md's device table, between DOC_BEGIN and DOC_END (a test checks it is up to date)."""
    out = [DOC_BEGIN, "", "| `devices:` key | `--device` names | what it is | properties (default) |",
           "|---|---|---|---|"]
    for dt in device_types().values():
        props = "<br>".join(
            f"`{p.name}`{f' (`{p.alias}`)' if p.alias else ''}: {p.kind}"
            f"{' ' + '/'.join(p.choices) if p.choices else ''}"
            f" ({'required' if p.default is REQUIRED else _show_default(p.default)})"
            f"{' — ' + p.help if p.help else ''}" for p in dt.props) or "—"
        names = ", ".join(f"`{n}`" for n in (dt.name, *dt.aliases))
        shape = "a list of mappings" if dt.multiple else "true or a mapping"
        out.append(f"| `{dt.name}` ({shape}) | {names} | {dt.help} | {props} |")
    out += ["", DOC_END]
    return "\n".join(out)



def update_doc(path: str) -> bool:
    """Rewrite the generated device table in `path` (docs/config.md); True when it changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, end = text.index(DOC_BEGIN), text.index(DOC_END) + len(DOC_END)
    new = text[:start] + markdown() + text[end:]
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text
