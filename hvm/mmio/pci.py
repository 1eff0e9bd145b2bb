"""PCI bus 0 of the `pc` machine: configuration mechanism #1, an i440FX-like host bridge, BARs.

What a guest sees (as on QEMU's pc machine, hw/pci/pci.c and hw/pci-host/i440fx.c):
- port 0xCF8, 32-bit accesses only: the CONFIG_ADDRESS register (bit 31 enable, bits 23:16 bus, 15:11
  device, 10:8 function, 7:0 register). Narrower accesses there are not the register (Linux's type-1
  probe writes a byte to 0xCFB and expects the register unchanged): reads all ones, writes dropped. The
  register keeps all 32 bits as written, as QEMU's does, and its bits 1:0 select a byte too:
  kvm-unit-tests' pci_config_readw(dev, 2) writes 0x80000002 there and reads the device ID at 0xCFC.
- ports 0xCFC-0xCFF: CONFIG_DATA, any size at any offset: configuration offset (address & 0xFF) | (port
  & 3), as QEMU computes it. Disabled address, another bus than 0, or an absent function: reads all
  ones, writes dropped (what a PCI master abort gives the CPU: how guests tell a slot is empty).
- 00:00.0 is the host bridge (8086:1237, class 0x0600); registry devices with `pci=True` take the next
  slots (00:01.0, 00:02.0, ... in the spec's order).

Each function has a 256-byte configuration space with a write mask (bits a guest may change; the rest
read-only) and up to six BARs: 32-bit memory or I/O, sized by a power of two. Writing all ones to a BAR
reads back the size mask (the sizing protocol falls out of the write mask). A BAR's region is on hvm's
MmioBus/PioBus only while the command register enables that decoding and the address is one hvm accepts:
- memory: not 0, inside 32-bit space below 0xfec00000 (IOAPIC, LAPIC, firmware above), not over RAM;
- I/O: not 0, from 0x1000 (the ISA ports below belong to the chipset and to KVM's in-kernel devices)
  to the end of the 64 K port space;
- and over no other device's range (the buses refuse an overlap).
A BAR written elsewhere stays unmapped (accesses there are the buses' misses) with a rate-limited log
line; the sizing pattern (all ones) is unmapped silently. The guest can always move it back.

hvm assigns the BARs at build time as SeaBIOS would (assign_bars): memory from 0xc0000000 (the PCI hole
starts there, hvm/memory.py), I/O from 0xc000, largest first, each aligned to its size, and enables the
decoding; kvm-unit-tests and Linux read these assignments instead of making their own.

ECAM (PCI Express enhanced configuration access, QEMU q35's MMCONFIG) at 0xe0000000: 1 MiB for bus 0,
4 KiB per function at (device << 15) | (function << 12); any access size at any offset of the first 256
bytes (the same configuration space as through 0xCFC), all ones beyond them (conventional functions have
no extended space) and for absent functions. The ACPI MCFG table (hvm/boot/acpi.py) tells guests where.

Device state: the bus (registered at 0xCF8, so the snapshot finds it at "port:0xcf8") saves the address
register and every function's configuration space, which BARs were mapped, and the function's own state;
BAR regions themselves have no state (they move, so their bus address is no key). load() checks all of it
(read-only bytes equal to this machine's device, mapped BARs in accepted places) before changing anything.
"""
from __future__ import annotations

import logging
import threading

from hvm._types import TYPE_CHECKING, Any, Callable, Iterable
from hvm.mmio.bus import BusError
from hvm.mmio.device import StateReader, Stateless
from hvm.plain import Record

if TYPE_CHECKING:
    from hvm.mmio.bus import MmioBus, PioBus

log = logging.getLogger(__name__)

PCI_CONFIG_PORT = 0xCF8
PCI_CONFIG_LEN = 8
CONFIG_SIZE = 256

# Configuration space offsets (PCI 3.0, type 0 header).
VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION, CLASS_PROG, CACHE_LINE, LATENCY, HEADER_TYPE = 0x08, 0x09, 0x0C, 0x0D, 0x0E
BAR0, SUBSYS_VENDOR, SUBSYS_ID = 0x10, 0x2C, 0x2E
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D
NUM_BARS = 6

CMD_IO, CMD_MEMORY, CMD_MASTER = 0x1, 0x2, 0x4
# Command bits a guest may set (QEMU's default w mask: I/O, memory, bus master, parity, SERR, INTx disable).
COMMAND_WMASK = 0x0547

BAR_IO = 0x1     # bit 0 of an I/O BAR; memory BARs: 0 (32-bit, not prefetchable)

# The address windows hvm assigns from, as SeaBIOS does on QEMU's pc machine.
MEM_WINDOW = (0xC000_0000, 0xD000_0000)
IO_WINDOW = (0xC000, 0x1_0000)
# What a memory BAR may never cover: from here up sit the IOAPIC, HPET space, the LAPIC and the firmware.
MEM_LIMIT = 0xFEC0_0000
IO_MIN = 0x1000

ECAM_BASE = 0xE000_0000
ECAM_SIZE = 1 << 20         # bus 0 only: 32 devices x 8 functions x 4 KiB

LOGGED_REFUSALS = 8    # BAR placements refused with a line each; later ones are counted, not logged

HOST_BRIDGE = dict(vendor=0x8086, device=0x1237, class_code=0x060000, revision=0x02)


def devfn_name(devfn: int) -> str:
    return f"00:{devfn >> 3:02x}.{devfn & 7}"


class Bar(Record):
    """One BAR: its kind and size, the handler its region routes to, and where it is mapped (None: not).
    region: an object with name, read(offset, size), write(offset, size, value); refused: the address last
    refused (logged once; tried again at each config write). (Plain: hvm/plain.py says why.)"""
    _fields = ("index", "io", "size", "region", "mapped", "refused")

    def __init__(self, index: int, io: bool, size: int, region: Any, mapped: int | None = None,
                 refused: int | None = None):
        self._set(index=index, io=io, size=size, region=region, mapped=mapped, refused=refused)


class BarRegion:
    """What a BAR puts on a bus: it routes accesses to the function's handlers. No save()/reset(): the
    function's state (through the PCI bus) is the state; a region is only where it currently sits."""

    def __init__(self, name: str, read: Callable[[int, int], int], write: Callable[[int, int, int], None]):
        self.name = name
        self.read = read
        self.write = write


class PciFunction:
    """A PCI function with a type 0 header. Subclasses (devices) add BARs with add_bar() and may keep
    state of their own through save_state()/parse_state()/apply_state()/reset_state()."""

    name = "pci-function"

    def __init__(self, vendor: int, device: int, class_code: int, revision: int = 0,
                 subsystem_vendor: int = 0, subsystem: int = 0, interrupt_pin: int = 0) -> None:
        self.config = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.bars: list[Bar | None] = [None] * NUM_BARS
        self._put(VENDOR_ID, 2, vendor)
        self._put(DEVICE_ID, 2, device)
        self._put(REVISION, 1, revision)
        self._put(CLASS_PROG, 3, class_code)
        self._put(SUBSYS_VENDOR, 2, subsystem_vendor)
        self._put(SUBSYS_ID, 2, subsystem)
        self._put(INTERRUPT_PIN, 1, interrupt_pin)
        self._put(COMMAND, 2, COMMAND_WMASK, self.wmask)
        self.wmask[CACHE_LINE] = self.wmask[LATENCY] = self.wmask[INTERRUPT_LINE] = 0xFF
        self.reset_config = bytes(self.config)   # what reset() returns to (set again once BARs are assigned)

    def _put(self, offset: int, size: int, value: int, where: bytearray | None = None) -> None:
        (self.config if where is None else where)[offset:offset + size] = value.to_bytes(size, "little")

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    def add_bar(self, index: int, io: bool, size: int, read: Callable[[int, int], int],
                write: Callable[[int, int, int], None]) -> None:
        if not 0 <= index < NUM_BARS or self.bars[index] is not None:
            raise ValueError(f"{self.name}: BAR{index} is not free")
        if size & (size - 1) or size < (4 if io else 16) or size > (256 if io else 1 << 30):
            raise ValueError(f"{self.name}: BAR{index} size {size:#x} is not a power of two in range")
        self.bars[index] = Bar(index, io, size, BarRegion(f"{self.name}-bar{index}", read, write))
        flags = BAR_IO if io else 0
        self._put(BAR0 + 4 * index, 4, flags)
        self._put(BAR0 + 4 * index, 4, ~(size - 1) & (0xFFFF_FFFC if io else 0xFFFF_FFF0), self.wmask)
        self.reset_config = bytes(self.config)

    def bar_address(self, bar: Bar, config: bytes | bytearray | None = None) -> int:
        raw = int.from_bytes((self.config if config is None else config)[BAR0 + 4 * bar.index:][:4], "little")
        return raw & (0xFFFF_FFFC if bar.io else 0xFFFF_FFF0)

    # --- the function's own state (besides the configuration space); pci-testdev has some
    def save_state(self) -> dict:
        return {}

    def parse_state(self, state: object) -> Any:
        """Check `state` (raise DeviceStateError); the result goes to apply_state once everything is checked."""
        StateReader(self.name, state, ())
        return None

    def apply_state(self, parsed: Any) -> None:
        pass

    def reset_state(self) -> None:
        pass


class HostBridge(PciFunction):
    """00:00.0: the i440FX PMC as QEMU presents it (no BARs; its chipset registers are not emulated)."""

    name = "i440fx"

    def __init__(self) -> None:
        super().__init__(**HOST_BRIDGE)
        # QEMU's i440FX reads with memory and I/O decoding on (a host bridge always decodes).
        self._put(COMMAND, 2, CMD_IO | CMD_MEMORY)
        self._put(STATUS, 2, 0x0280)     # fast back-to-back capable, medium DEVSEL timing
        self.reset_config = bytes(self.config)


class PciBus:
    """Bus 0 and configuration mechanism #1 at ports 0xCF8-0xCFF (register it there)."""

    name = "pci"

    def __init__(self, pio: "PioBus", mmio: "MmioBus", ram: Iterable[tuple[int, int]]) -> None:
        self.pio, self.mmio = pio, mmio
        self.ram = [(gpa, size) for gpa, size in ram]
        self.address = 0
        self.functions: dict[int, PciFunction] = {0: HostBridge()}
        self._lock = threading.RLock()
        self._refused = 0

    def add(self, function: PciFunction) -> int:
        """Put `function` in the next free slot (function 0 of it); returns its devfn."""
        for slot in range(1, 32):
            devfn = slot << 3
            if devfn not in self.functions:
                self.functions[devfn] = function
                return devfn
        raise ValueError(f"{function.name}: PCI bus 0 is full (32 slots)")

    # --- firmware: BAR assignment as SeaBIOS makes it ------------------------------------------------
    def assign_bars(self) -> None:
        """Give every BAR an address in hvm's windows (largest first, aligned to its size), enable the
        decoding each function needs, map the BARs, and make this the state reset() returns to."""
        with self._lock:
            for io, (start, end) in ((False, MEM_WINDOW), (True, IO_WINDOW)):
                bars = [(fn, bar) for _, fn in sorted(self.functions.items())
                        for bar in fn.bars if bar is not None and bar.io == io]
                bars.sort(key=lambda fb: -fb[1].size)       # stable: slot order among equal sizes
                at = start
                for fn, bar in bars:
                    at = (at + bar.size - 1) & ~(bar.size - 1)
                    if at + bar.size > end:
                        raise ValueError(f"{fn.name}: no room for BAR{bar.index} ({bar.size:#x} bytes) in the "
                                         f"PCI {'I/O' if io else 'memory'} window {start:#x}-{end - 1:#x}")
                    fn._put(BAR0 + 4 * bar.index, 4, at | (BAR_IO if io else 0))
                    fn._put(COMMAND, 2, fn.get(COMMAND, 2) | (CMD_IO if io else CMD_MEMORY))
                    at += bar.size
            for fn in self.functions.values():
                fn.reset_config = bytes(fn.config)
                self._update(fn)

    # --- ports 0xCF8-0xCFF ---------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset < 4:
            if offset == 0 and size == 4:
                return self.address
            return (1 << (8 * size)) - 1
        with self._lock:
            fn, reg = self._target(offset - 4)
            if fn is None:
                return (1 << (8 * size)) - 1
            n = min(size, 4 - (reg & 3))         # bytes that stay inside the selected dword
            value = int.from_bytes(fn.config[reg:reg + n], "little")
            return value | (((1 << (8 * (size - n))) - 1) << (8 * n))

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 4:
            if offset == 0 and size == 4:
                self.address = value
            return
        with self._lock:
            fn, reg = self._target(offset - 4)
            if fn is None:
                return
            self.config_write(fn, reg, min(size, 4 - (reg & 3)), value)

    def _target(self, port_offset: int) -> tuple[PciFunction | None, int]:
        a = self.address
        if not a & 0x8000_0000 or (a >> 16) & 0xFF:
            return None, 0
        return self.functions.get((a >> 8) & 0xFF), (a & 0xFF) | port_offset

    def config_write(self, fn: PciFunction, reg: int, size: int, value: int) -> None:
        """A guest write of `size` bytes at configuration offset `reg`: masked byte by byte by the
        write mask; the BAR mappings follow a change of the command register or of a BAR."""
        with self._lock:
            touched = False
            for i in range(size):
                r = reg + i
                if r >= CONFIG_SIZE:
                    break
                m = fn.wmask[r]
                if m:
                    fn.config[r] = (fn.config[r] & ~m) | ((value >> (8 * i)) & m)
                    touched |= r in (COMMAND, COMMAND + 1) or BAR0 <= r < BAR0 + 4 * NUM_BARS
            if touched:
                self._update(fn)

    def config_read(self, devfn: int, reg: int, size: int) -> int:
        """Configuration read as the guest makes it (tests, the firmware tables): all ones if absent."""
        fn = self.functions.get(devfn)
        if fn is None:
            return (1 << (8 * size)) - 1
        return fn.get(reg, size)

    # --- BAR mappings ----------------------------------------------------------------------------------
    def _placement(self, fn: PciFunction, bar: Bar, config: bytes | bytearray) -> tuple[int | None, str]:
        """Where `bar` should be mapped under `config` (None: not), and why not (empty: silent)."""
        command = int.from_bytes(config[COMMAND:COMMAND + 2], "little")
        if not command & (CMD_IO if bar.io else CMD_MEMORY):
            return None, ""
        base = fn.bar_address(bar, config)
        end = base + bar.size
        if base == 0:
            return None, ""
        if bar.io:
            if end > 0x1_0000:
                return None, ""                         # beyond the port space: the sizing pattern, or nothing
            if base < IO_MIN:
                return None, f"ports {base:#x}-{end - 1:#x} are the chipset's (below {IO_MIN:#x})"
            return base, ""
        if end > MEM_LIMIT:
            if base >= MEM_LIMIT:
                return None, ""                         # the sizing pattern, or firmware space: not decoded
            return None, f"{base:#x}-{end - 1:#x} reaches {MEM_LIMIT:#x} (IOAPIC, LAPIC, firmware)"
        for gpa, size in self.ram:
            if base < gpa + size and gpa < end:
                return None, f"{base:#x}-{end - 1:#x} is over RAM"
        return base, ""

    def _update(self, fn: PciFunction) -> None:
        for bar in fn.bars:
            if bar is None:
                continue
            want, why = self._placement(fn, bar, fn.config)
            if want is not None and want == bar.mapped:
                continue
            self._unmap(bar)
            address = fn.bar_address(bar)
            if want is None:
                if why:
                    self._refuse(fn, bar, address, why)
                continue
            bus = self.pio if bar.io else self.mmio
            try:
                bus.register(want, bar.size, bar.region)
            except BusError as e:
                self._refuse(fn, bar, address, str(e))
                continue
            bar.mapped, bar.refused = want, None

    def _unmap(self, bar: Bar) -> None:
        if bar.mapped is not None:
            (self.pio if bar.io else self.mmio).unregister(bar.mapped, bar.region)
            bar.mapped = None

    def _refuse(self, fn: PciFunction, bar: Bar, address: int, why: str) -> None:
        if bar.refused == address:
            return                                      # the same placement again: said already
        bar.refused = address
        self._refused += 1
        if self._refused <= LOGGED_REFUSALS:
            log.warning("pci %s BAR%d left unmapped: %s", fn.name, bar.index, why)
            if self._refused == LOGGED_REFUSALS:
                log.warning("pci: further refused BAR placements are not logged")

    # --- device state ----------------------------------------------------------------------------------
    def save(self) -> dict:
        with self._lock:
            functions = {}
            for devfn, fn in sorted(self.functions.items()):
                mapped = sum(1 << b.index for b in fn.bars if b is not None and b.mapped is not None)
                functions[devfn_name(devfn)] = {"config": bytes(fn.config), "mapped": mapped,
                                                "state": fn.save_state()}
            return {"address": self.address, "functions": functions}

    def load(self, state: dict) -> None:
        r = StateReader(self.name, state, ("address", "functions"))
        address = r.integer("address", 0, 0xFFFF_FFFF)
        saved = state["functions"]
        names = {devfn_name(d): d for d in self.functions}
        if not isinstance(saved, dict) or set(saved) != set(names):
            got = ", ".join(sorted(map(str, saved))) if isinstance(saved, dict) else type(saved).__name__
            raise r.fail("functions", f"has {got}, this machine has {', '.join(sorted(names))}")
        with self._lock:
            plan = []
            ours = {id(b.region) for fn in self.functions.values() for b in fn.bars if b is not None}
            placed: list[tuple[bool, int, int, str]] = []
            for key, devfn in sorted(names.items()):
                fn = self.functions[devfn]
                fr = StateReader(f"{self.name} {key} ({fn.name})", saved[key], ("config", "mapped", "state"))
                config = fr.blob("config", CONFIG_SIZE, CONFIG_SIZE)
                for i in range(CONFIG_SIZE):
                    if (config[i] ^ fn.reset_config[i]) & ~fn.wmask[i]:
                        raise fr.fail("config", f"read-only byte {i:#04x} is {config[i]:#04x}, this machine's "
                                                f"{fn.name} has {fn.reset_config[i]:#04x}")
                mapped = fr.integer("mapped", 0, (1 << NUM_BARS) - 1)
                for bar in fn.bars:
                    if bar is None:
                        continue
                    if not mapped >> bar.index & 1:
                        continue
                    base, why = self._placement(fn, bar, config)
                    if base is None:
                        raise fr.fail("config", f"BAR{bar.index} is saved as mapped, but "
                                                f"{why or 'its address or the command register does not decode'}")
                    self._check_free(fr, bar, base, ours, placed)
                    placed.append((bar.io, base, base + bar.size, f"BAR{bar.index} of {fn.name}"))
                if mapped & ~sum(1 << b.index for b in fn.bars if b is not None):
                    raise fr.fail("mapped", f"{mapped:#x} names a BAR {fn.name} does not have")
                plan.append((fn, config, mapped, fn.parse_state(state["functions"][key]["state"])))
            # Everything checked: apply.
            self.address = address
            for fn, _, _, _ in plan:
                for bar in fn.bars:
                    if bar is not None:
                        self._unmap(bar)
            for fn, config, mapped, parsed in plan:
                fn.config[:] = config
                fn.apply_state(parsed)
                for bar in fn.bars:
                    if bar is not None and mapped >> bar.index & 1:
                        base, _ = self._placement(fn, bar, fn.config)
                        (self.pio if bar.io else self.mmio).register(base, bar.size, bar.region)
                        bar.mapped = base

    def _check_free(self, fr: StateReader, bar: Bar, base: int, ours: set[int],
                    placed: list[tuple[bool, int, int, str]]) -> None:
        end = base + bar.size
        bus = self.pio if bar.io else self.mmio
        for rng in bus.overlapping(base, bar.size):
            if id(rng.device) not in ours:
                raise fr.fail("config", f"BAR{bar.index} at {base:#x} overlaps {rng.device.name}")
        for io, lo, hi, what in placed:
            if io == bar.io and base < hi and lo < end:
                raise fr.fail("config", f"BAR{bar.index} at {base:#x} overlaps {what}")

    def reset(self) -> None:
        """Power-on as the firmware leaves it: the BIOS assignments, decoding enabled."""
        with self._lock:
            self.address = 0
            for fn in self.functions.values():
                fn.config[:] = fn.reset_config
                fn.reset_state()
                self._update(fn)


class PciEcam(Stateless):
    """The ECAM window of bus 0 (register it at ECAM_BASE, ECAM_SIZE on the MmioBus). It has no state of
    its own: it is another way into the functions' configuration spaces, which the PciBus saves."""

    name = "pci-ecam"

    def __init__(self, bus: PciBus) -> None:
        self.bus = bus

    def read(self, offset: int, size: int) -> int:
        devfn, reg = offset >> 12, offset & 0xFFF
        with self.bus._lock:
            fn = self.bus.functions.get(devfn)
            if fn is None or reg + size > CONFIG_SIZE:
                return (1 << (8 * size)) - 1
            return fn.get(reg, size)

    def write(self, offset: int, size: int, value: int) -> None:
        devfn, reg = offset >> 12, offset & 0xFFF
        with self.bus._lock:
            fn = self.bus.functions.get(devfn)
            if fn is not None and reg < CONFIG_SIZE:
                self.bus.config_write(fn, reg, min(size, CONFIG_SIZE - reg), value)
