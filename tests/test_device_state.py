"""Device state (hvm.mmio.device: save/load/reset), for every device in hvm/mmio/: driven through its
registers as the bus drives it, saved, loaded into a new device, saved again (the same dict), and the
two then behave the same; reset() gives a new device's state; malformed states are refused, in one line
naming device and field, and leave the device as it was. Also the ACPI power button (system_powerdown)."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import struct
from dataclasses import dataclass, field
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hvm.mmio
from conftest import GUEST_TIMEOUT, FakeRam
from hvm.mmio.acpi_pm import PM1_CNT, PM1_EVT, PWRBTN_EN, PWRBTN_STS, SCI_IRQ, AcpiPm
from hvm.mmio.debug_exit import DebugExit
from hvm.mmio.apic_regs import APIC_SIZE, ApicRegisters
from hvm.mmio.debugcon import DebugCon
from hvm.mmio.device import DeviceStateError, IrqLine
from hvm.mmio.fw_cfg import FW_CFG_RAM_SIZE, FW_CFG_SIGNATURE, FwCfg
from hvm.mmio.i8042 import I8042, I8042_CMD_PORT, I8042_DATA_PORT
from hvm.mmio.bus import MmioBus, PioBus
from hvm.mmio.pci import ECAM_SIZE, PciBus, PciEcam
from hvm.mmio.pci_testdev import PciTestDev
from hvm.mmio.pvconsole import PvConsole
from hvm.mmio.rtc import Rtc
from hvm.mmio.testdev import PcTestDev, PcTestDevByteView, PcTestDevIomem, PcTestDevIrq
from hvm.mmio.uart16550 import FIFO_SIZE, INPUT_QUEUE_LIMIT, SerialUart

WALL_T0 = 1.7e9          # a host UTC time (seconds) for the RTC
MONO_T0 = 10 ** 12       # a host monotonic time (ns) for the PM timer


def fake_ram() -> FakeRam:
    """4 KiB of guest RAM, the same bytes in every rig: a pvconsole descriptor (5 bytes at 0x200)."""
    ram = FakeRam(4096)
    struct.pack_into("<QII", ram.data, 0x100, 0x200, 5, 0)
    ram.data[0x200:0x205] = b"hello"
    return ram


@dataclass
class Rig:
    """One device with recording host wiring. `dev` is what save/load/reset are called on; `targets` the
    (device, length) ranges the guest reaches; `out` what the device did to the host (bytes sent, exit
    statuses, IRQ level changes, reset requests); `clock` its fake host clock."""
    dev: object
    targets: list[tuple[object, int]]
    out: list = field(default_factory=list)
    clock: list = field(default_factory=lambda: [0])
    tick: int | float = 0                # what one "tick" op adds to the clock
    feed: Callable[[bytes], None] | None = None


def uart_rig(now=None) -> Rig:
    rig = Rig(None, [])
    uart = SerialUart(rig.out.append, IrqLine(4, lambda n, level: rig.out.append(("irq", n, level))), name="com1")
    rig.dev, rig.targets, rig.feed = uart, [(uart, 8)], uart.feed
    return rig


def rtc_rig(now=None) -> Rig:
    rig = Rig(None, [], clock=[WALL_T0 if now is None else now], tick=1.25)
    rtc = Rtc(clock=lambda: rig.clock[0], irq=IrqLine(8, lambda n, level: rig.out.append(("irq", n, level))),
              timer=False)
    rig.dev, rig.targets = rtc, [(rtc, 2)]
    return rig


def i8042_rig(now=None) -> Rig:
    rig = Rig(None, [])
    chip = I8042(on_reset=lambda: rig.out.append("reset"))
    data, cmd = chip.port(I8042_DATA_PORT), chip.port(I8042_CMD_PORT)
    rig.dev, rig.targets = data, [(data, 1), (cmd, 1)]
    return rig


def acpi_rig(now=None) -> Rig:
    rig = Rig(None, [], clock=[MONO_T0 if now is None else now], tick=1_000_003)
    pm = AcpiPm(on_poweroff=lambda: rig.out.append("poweroff"), clock_ns=lambda: rig.clock[0],
                sci=IrqLine(SCI_IRQ, lambda n, level: rig.out.append(("irq", n, level))))
    rig.dev, rig.targets = pm, [(pm, 12)]
    return rig


def fw_cfg_rig(now=None) -> Rig:
    dev = FwCfg.for_machine(256 << 20, 2)
    return Rig(dev, [(dev, 2)])


def debug_exit_rig(now=None) -> Rig:
    rig = Rig(None, [])
    rig.dev = DebugExit(rig.out.append)
    rig.targets = [(rig.dev, 4)]
    return rig


def debugcon_rig(now=None) -> Rig:
    rig = Rig(None, [])
    rig.dev = DebugCon(rig.out.append)
    rig.targets = [(rig.dev, 1)]
    return rig


def pvconsole_rig(now=None) -> Rig:
    rig = Rig(None, [])
    rig.dev = PvConsole(fake_ram(), rig.out.append)
    rig.targets = [(rig.dev, 4)]
    return rig


def pc_testdev_rig(now=None) -> Rig:
    dev = PcTestDev()
    return Rig(dev, [(dev, 8)])


def pc_testdev_byte_rig(now=None) -> Rig:
    dev = PcTestDev()
    view = PcTestDevByteView(dev, 1)
    return Rig(dev, [(view, 3), (dev, 8)])   # the view's state is the register's: saved by PcTestDev


def pc_testdev_iomem_rig(now=None) -> Rig:
    dev = PcTestDevIomem()
    return Rig(dev, [(dev, 0x10000)])


def pc_testdev_irq_rig(now=None) -> Rig:
    rig = Rig(None, [])
    rig.dev = PcTestDevIrq(lambda n, level: rig.out.append(("irq", n, level)))
    rig.targets = [(rig.dev, 24)]
    return rig


def pci_rig(now=None) -> Rig:
    """PCI bus 0 with a pci-testdev, BARs assigned; the guest reaches ports 0xCF8-0xCFF and both BARs."""
    pio, mmio = PioBus(), MmioBus()
    bus = PciBus(pio, mmio, [(0, 16 << 20)])
    pio.register(0xCF8, 8, bus)
    dev = PciTestDev()
    bus.add(dev)
    bus.assign_bars()
    return Rig(bus, [(bus, 8), (dev.bars[0].region, 4096), (dev.bars[1].region, 256)])


def pci_ecam_rig(now=None) -> Rig:
    """The ECAM window: no state of its own (the PciBus it writes through has it)."""
    bus = pci_rig().dev
    ecam = PciEcam(bus)
    return Rig(ecam, [(ecam, ECAM_SIZE)])


def apic_rig(now=None) -> Rig:
    """The tcg accelerator's LAPIC register page (no interrupt logic: nothing goes out)."""
    dev = ApicRegisters()
    return Rig(dev, [(dev, APIC_SIZE)])


def apic_busy() -> Rig:
    rig = apic_rig()
    for reg, value in ((0x80, 0x20), (0xF0, 0x1FF), (0x320, 0x20030), (0x310, 0x01000000), (0x300, 0x4500),
                       (0x380, 12345), (0x3E0, 0xB)):
        rig.dev.write(reg, 4, value)
    return rig


# Every device class in hvm/mmio/ with its rig. A device class missing here fails test_every_device_has_a_rig.
RIGS: dict[str, Callable[..., Rig]] = {
    "SerialUart": uart_rig, "Rtc": rtc_rig, "_Port": i8042_rig, "AcpiPm": acpi_rig, "FwCfg": fw_cfg_rig,
    "DebugExit": debug_exit_rig, "DebugCon": debugcon_rig, "PvConsole": pvconsole_rig,
    "PcTestDev": pc_testdev_rig, "PcTestDevIrq": pc_testdev_irq_rig, "PciBus": pci_rig,
    "PciEcam": pci_ecam_rig,
    "PcTestDevByteView": pc_testdev_byte_rig, "PcTestDevIomem": pc_testdev_iomem_rig, "ApicRegisters": apic_rig,
}
# The RTC reads host wall-clock time plus the guest's offset: a restored one is compared at the same host
# time. The PM timer counts on from its saved value whatever the new host's clock says.
WALL_CLOCK = {"Rtc"}


def device_classes() -> dict[str, type]:
    """Every class defined in hvm/mmio/ that the bus can route guest accesses to (read and write)."""
    found = {}
    for info in pkgutil.iter_modules(hvm.mmio.__path__):
        if info.name in ("bus", "device"):
            continue
        module = importlib.import_module(f"hvm.mmio.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and not getattr(cls, "_is_protocol", False) \
                    and callable(getattr(cls, "read", None)) and callable(getattr(cls, "write", None)):
                found[name] = cls
    return found


def test_every_device_has_save_load_reset_and_a_rig():
    classes = device_classes()
    assert set(classes) == set(RIGS), "a device in hvm/mmio/ without a rig here (or a rig for none)"
    for name, cls in classes.items():
        for method in ("save", "load", "reset"):
            assert callable(getattr(cls, method, None)), f"{name} has no {method}()"
    assert callable(getattr(I8042, "save")) and callable(getattr(I8042, "load"))   # the chip the ports share


# --- driving a device as the bus does ----------------------------------------------------------------
OP = st.tuples(st.sampled_from(["r", "r", "w", "w", "w", "host", "tick"]), st.integers(0, 1 << 16),
               st.sampled_from([1, 1, 2, 4]), st.one_of(st.integers(0, 0xFF), st.integers(0, 0xFFFFFFFF)))
OPS = st.lists(OP, max_size=40)


def apply(rig: Rig, ops) -> list:
    """Run the ops; return what the guest read."""
    reads = []
    for kind, where, size, value in ops:
        dev, length = rig.targets[where % len(rig.targets)]
        offset = (where // len(rig.targets)) % length
        if offset + size > length:
            size = 1
        value &= (1 << (8 * size)) - 1
        if kind == "r":
            reads.append(dev.read(offset, size))
        elif kind == "w":
            dev.write(offset, size, value)
        elif kind == "host" and rig.feed is not None:
            rig.feed(value.to_bytes(4, "little")[:size])
        elif kind == "tick":
            rig.clock[0] += rig.tick
    return reads


def rig_like(name: str, a: Rig) -> Rig:
    """A new device for `a`'s state: on the same wall clock, or a monotonic clock far from a's; guest RAM
    (pvconsole's) is the guest's, which a snapshot restores as it was."""
    if name in WALL_CLOCK:
        return RIGS[name](a.clock[0])
    b = RIGS[name](a.clock[0] * 3 + 7 if a.tick else None)
    if name == "PvConsole":
        b.dev._ram.data[:] = a.dev._ram.data
    return b


@pytest.mark.parametrize("name", sorted(RIGS))
@settings(max_examples=40, derandomize=True, deadline=None)
@given(before=OPS, after=OPS)
def test_save_load_save_is_identical_and_behaviour_continues(name, before, after):
    a = RIGS[name]()
    apply(a, before)
    state = a.dev.save()
    b = rig_like(name, a)
    b.dev.load(state)
    assert b.dev.save() == state
    # from here on the two devices see the same accesses, host input and time, and must answer alike
    del a.out[:], b.out[:]
    assert apply(a, after) == apply(b, after)
    assert a.out == b.out
    assert a.dev.save() == b.dev.save()


@pytest.mark.parametrize("name", sorted(RIGS))
@settings(max_examples=25, derandomize=True, deadline=None)
@given(ops=OPS)
def test_reset_gives_a_new_devices_state(name, ops):
    a = RIGS[name]()
    apply(a, ops)
    a.dev.reset()
    assert a.dev.save() == RIGS[name](a.clock[0]).dev.save()


# --- states that reach every field ---------------------------------------------------------------
def uart_busy() -> Rig:
    rig = uart_rig()
    u = rig.dev
    u.write(2, 1, 0xC1)                 # FIFO on, trigger level 14
    u.write(1, 1, 0x0F)                 # every interrupt enabled
    u.write(7, 1, 0x5A)                 # scratch
    rig.feed(b"hello, restored world " * 3)
    assert u.read(0, 1) == ord("h")
    u.write(3, 1, 0x9B)                 # DLAB, 8E1
    u.write(0, 1, 0x03)                 # divisor 0x0103
    u.write(1, 1, 0x01)
    u.write(3, 1, 0x1B)
    return rig


def test_uart_state_names_every_register_and_the_queues():
    rig = uart_busy()
    state = rig.dev.save()
    assert state == {"ier": 0x0F, "lcr": 0x1B, "mcr": 0x08, "lsr": 0x61, "msr": 0xB0, "scr": 0x5A, "fcr": 0xC1,
                     "divisor": 0x0103, "rx_fifo": b"ello, restored w",
                     "pending_input": b"orld " + b"hello, restored world " * 2,
                     "thr_interrupt": True, "rx_active": True, "irq_level": True}


def test_uart_restored_fifo_and_pending_input_come_out_in_order_and_the_irq_is_driven():
    a = uart_busy()
    b = uart_rig()
    b.dev.load(a.dev.save())
    assert b.out == [("irq", 4, 1)]             # the line the guest saw high is high on the new irqchip
    got = bytes(b.dev.read(0, 1) for _ in range(65))
    assert got == b"ello, restored world " + b"hello, restored world " * 2
    assert b.dev.read(5, 1) & 0x01 == 0          # no data ready: nothing lost, nothing repeated
    b.dev.reset()
    assert b.out[-1] == ("irq", 4, 0) and b.dev.input_pending == 0


def test_uart_lsr_error_bits_survive_until_read():
    rig = uart_rig()
    u = rig.dev
    u.write(4, 1, 0x18)                  # loopback, OUT2
    u.write(2, 1, 0x00)                  # 16450 mode: a one-byte holding register
    u.write(0, 1, 0x41)
    u.write(0, 1, 0x42)                  # overrun
    b = uart_rig()
    b.dev.load(u.save())
    assert b.dev.read(5, 1) & 0x03 == 0x03    # OE and DR
    assert b.dev.read(5, 1) & 0x02 == 0       # OE clears on read
    assert b.dev.read(0, 1) == 0x41


def rtc_busy() -> Rig:
    rig = rtc_rig()
    r = rig.dev
    for reg, value in ((0x0B, 0x06), (0x09, 31), (0x04, 23), (0x40, 0xAB), (0x0E, 0x99)):
        r.write(0, 1, reg)
        r.write(1, 1, value)
    r.write(0, 1, 0x32)
    return rig


def test_rtc_keeps_the_guests_clock_offset_against_host_time():
    a = rtc_busy()
    state = a.dev.save()
    assert state["index"] == 0x32 and state["cmos"][0x40] == 0xAB and state["cmos"][0x0B] == 0x06
    assert state["offset_us"] != 0
    # restored an hour later on the host: the guest's clock is an hour on too, from where the guest set it
    b = rtc_rig(WALL_T0 + 3600)
    b.dev.load(state)
    b.dev.write(0, 1, 0x09)
    assert b.dev.read(1, 1) == 31                # binary mode, the year the guest set (2031)
    b.dev.write(0, 1, 0x04)
    a.dev.write(0, 1, 0x04)
    assert b.dev.read(1, 1) == (a.dev.read(1, 1) + 1) % 24


def i8042_busy() -> Rig:
    rig = i8042_rig()
    data, cmd = rig.targets[0][0], rig.targets[1][0]
    cmd.write(0, 1, 0x60)
    data.write(0, 1, 0x47)               # command byte
    cmd.write(0, 1, 0xAA)                # self test: 0x55 waits
    cmd.write(0, 1, 0x20)                # command byte waits behind it
    cmd.write(0, 1, 0xD1)                # a write to the output port waits for its data byte
    return rig


def test_i8042_restored_queue_and_pending_command():
    a = i8042_busy()
    state = a.dev.save()
    assert state == {"ctr": 0x47, "status": 0x0C, "out": b"\x55\x47", "pending_write": 0xD1}
    b = i8042_rig()
    b.targets[1][0].load(state)                  # either port loads the one chip
    data, cmd = b.targets[0][0], b.targets[1][0]
    assert cmd.read(0, 1) & 0x01 and data.read(0, 1) == 0x55 and data.read(0, 1) == 0x47
    data.write(0, 1, 0xFE)                       # the pending 0xD1 takes it: reset line low
    assert b.out == ["reset"]


def acpi_busy() -> Rig:
    rig = acpi_rig()
    pm = rig.dev
    pm.write(PM1_EVT + 2, 2, PWRBTN_EN)
    pm.write(PM1_CNT, 2, 0x0401)
    rig.clock[0] += 5_000_000_000            # 5 s of PM time
    pm.press_power_button()
    return rig


def test_pm_timer_counts_on_from_the_saved_value_on_another_host_clock():
    a = acpi_busy()
    before = a.dev.read(8, 4)
    b = acpi_rig(now=123)                          # a new process: its monotonic clock is unrelated
    b.dev.load(a.dev.save())
    assert b.dev.read(8, 4) == before
    b.clock[0] += 1_000_000_000
    assert b.dev.read(8, 4) == (before + 3579545) & 0xFFFFFF
    assert b.out == [("irq", SCI_IRQ, 1)] and b.dev.read(PM1_EVT, 2) == PWRBTN_STS


def fw_cfg_busy() -> Rig:
    rig = fw_cfg_rig()
    rig.dev.write(0, 2, FW_CFG_RAM_SIZE)
    rig.dev.read(1, 2)
    return rig


def test_fw_cfg_restored_read_position():
    a = fw_cfg_busy()
    assert a.dev.save() == {"selector": FW_CFG_RAM_SIZE, "position": 2}
    b = fw_cfg_rig()
    b.dev.load(a.dev.save())
    assert bytes(b.dev.read(1, 1) for _ in range(6)) == struct.pack("<Q", 256 << 20)[2:]
    assert fw_cfg_rig().dev.save() == {"selector": FW_CFG_SIGNATURE, "position": 0}


def pc_testdev_irq_busy() -> Rig:
    rig = pc_testdev_irq_rig()
    rig.dev.write(3, 1, 1)
    rig.dev.write(10, 1, 7)
    return rig


def test_testdev_irq_lines_are_driven_again_on_load_and_lowered_on_reset():
    a = pc_testdev_irq_busy()
    b = pc_testdev_irq_rig()
    b.dev.load(a.dev.save())
    assert b.out == [("irq", 3, 1), ("irq", 10, 1)]
    b.dev.reset()
    assert b.out[2:] == [("irq", 3, 0), ("irq", 10, 0)] and b.dev.save() == {"levels": 0}


def pc_testdev_busy() -> Rig:
    rig = pc_testdev_rig()
    rig.dev.write(0, 4, 0xCAFEF00D)
    return rig


def pci_busy() -> Rig:
    rig = pci_rig()
    bus, bar0 = rig.dev, rig.targets[1][0]
    bus.write(0, 4, 0x8000_0810)
    bus.write(4, 4, 0xC800_0000)          # BAR0 moved
    bar0.write(0, 1, 1)                   # test 1 runs
    bar0.write(0x801, 1, 0)
    return rig


def pc_testdev_iomem_busy() -> Rig:
    rig = pc_testdev_iomem_rig()
    rig.dev.write(0xFFFC, 4, 0xCAFEF00D)
    return rig


BUSY: dict[str, Callable[[], Rig]] = {
    "SerialUart": uart_busy, "Rtc": rtc_busy, "_Port": i8042_busy, "AcpiPm": acpi_busy, "FwCfg": fw_cfg_busy,
    "PcTestDev": pc_testdev_busy, "PcTestDevIrq": pc_testdev_irq_busy, "PciBus": pci_busy,
    "PcTestDevIomem": pc_testdev_iomem_busy, "PcTestDevByteView": pc_testdev_byte_rig,   # its state is the register's
    "DebugExit": debug_exit_rig, "DebugCon": debugcon_rig, "PvConsole": pvconsole_rig,    # no state to reach
    "PciEcam": pci_ecam_rig, "ApicRegisters": apic_busy,
}


# --- malformed states ------------------------------------------------------------------------------
OPTIONAL = {"pending_write"}   # int or None


def bad_values(key, value):
    """Values of the wrong type or out of every field's range, for a field whose good value is `value`."""
    if isinstance(value, bool):
        return [1, "true", None, b"\x01"]
    if isinstance(value, int) or value is None:
        return [True, "1", 1.0, 1 << 70, -(1 << 70), [1]] + ([] if key in OPTIONAL else [None])
    if isinstance(value, bytes):
        return [bytes(1 << 17), "text", 7, None, bytearray(1), list(value[:2])]
    if isinstance(value, dict):
        return [{}, None, [value], "text", 7, {**value, "bogus": value}]
    raise AssertionError(f"unexpected value type {type(value)}")


def malformed(state: dict):
    for key, value in state.items():
        yield f"missing {key}", key, {k: v for k, v in state.items() if k != key}
        for bad in bad_values(key, value):
            yield f"{key}={bad!r:.20}", key, {**state, key: bad}
    yield "extra key", "bogus", {**state, "bogus": 0}


def device_name(rig: Rig) -> str:
    return rig.dev.name


@pytest.mark.parametrize("name", sorted(RIGS))
def test_malformed_states_are_refused_in_one_line_and_change_nothing(name):
    rig = BUSY[name]()
    good = rig.dev.save()
    cases = list(malformed(good))
    assert cases
    for what, key, bad in cases + [("not a dict", "dict", [good]), ("none", "dict", None)]:
        out_before = list(rig.out)
        with pytest.raises(DeviceStateError) as info:
            rig.dev.load(bad)
        message = str(info.value)
        assert "\n" not in message and f"device {device_name(rig)}" in message, (what, message)
        assert key in message, (what, message)
        assert rig.dev.save() == good, what
        assert rig.out == out_before, what        # no IRQ line moved, nothing sent
    assert isinstance(DeviceStateError("x"), ValueError)


@pytest.mark.parametrize("field_, value, why", [
    ("rx_fifo", bytes(FIFO_SIZE + 1), "17 bytes, at most 16 allowed"),
    ("pending_input", bytes(INPUT_QUEUE_LIMIT + 1), "4097 bytes, at most 4096 allowed"),
    ("fcr", 0x02, "0x2 has bits the register does not keep"),
    ("ier", 0x10, "16 is out of range 0x0..0xf"),
    ("mcr", 0x20, "32 is out of range 0x0..0x1f"),
])
def test_uart_bounds(field_, value, why):
    rig = uart_busy()
    good = rig.dev.save()
    with pytest.raises(DeviceStateError, match=f"^device com1: state field '{field_}': {why}"):
        rig.dev.load({**good, field_: value})
    assert rig.dev.save() == good


def test_uart_fifo_bound_follows_fifo_mode():
    rig = uart_rig()
    state = rig.dev.save()                       # FIFOs off: the receiver holds one byte
    rig.dev.load({**state, "rx_fifo": b"x"})
    with pytest.raises(DeviceStateError, match="'rx_fifo': 2 bytes, at most 1 allowed"):
        rig.dev.load({**state, "rx_fifo": b"xy"})
    rig.dev.load({**state, "fcr": 0x01, "rx_fifo": bytes(16)})


@pytest.mark.parametrize("rig_fn, change, match", [
    (rtc_rig, {"cmos": bytes(127)}, "'cmos': 127 bytes, exactly 128 allowed"),
    (rtc_rig, {"index": 0x80}, "'index': 128 is out of range"),
    (rtc_rig, {"offset_us": 9000 * 366 * 86400 * 10 ** 6}, "'offset_us': .* outside the years 1900..9999"),
    (i8042_rig, {"out": bytes(17)}, "'out': 17 bytes, at most 16 allowed"),
    (i8042_rig, {"pending_write": 0xAA}, "'pending_write': 170 is not None or one of 0x60, 0xd1"),
    (acpi_rig, {"pm1_cnt": 0}, "'pm1_cnt': 0x0: SCI_EN is always set"),
    (acpi_rig, {"timer_ns": -1}, "'timer_ns': -1 is out of range"),
    (fw_cfg_rig, {"selector": FW_CFG_RAM_SIZE, "position": 9}, "'position': 9 is out of range 0x0..0x8"),
    (fw_cfg_rig, {"selector": 0x4000}, "'selector': 16384 is out of range"),
    (pc_testdev_irq_rig, {"levels": 1 << 24}, "'levels': 16777216 is out of range"),
])
def test_device_specific_bounds(rig_fn, change, match):
    rig = rig_fn()
    good = rig.dev.save()
    with pytest.raises(DeviceStateError, match=f"^device {rig.dev.name}: state field {match}"):
        rig.dev.load({**good, **change})
    assert rig.dev.save() == good


# --- the ACPI power button (QMP system_powerdown) --------------------------------------------------------
def test_power_button_sets_status_and_raises_the_sci_only_when_enabled():
    rig = acpi_rig()
    pm = rig.dev
    pm.press_power_button()
    assert pm.read(PM1_EVT, 2) == PWRBTN_STS and rig.out == []        # status, but no SCI: not enabled
    pm.write(PM1_EVT + 2, 2, PWRBTN_EN)                                 # enabling a pending event raises it
    assert rig.out == [("irq", SCI_IRQ, 1)] and pm.sci.level
    pm.write(PM1_EVT, 2, PWRBTN_STS)                                    # write 1 to clear: SCI goes low
    assert pm.read(PM1_EVT, 2) == 0 and rig.out[-1] == ("irq", SCI_IRQ, 0)
    pm.press_power_button()
    assert rig.out[-1] == ("irq", SCI_IRQ, 1) and pm.read(PM1_EVT, 4) == PWRBTN_STS | PWRBTN_EN << 16
    pm.write(PM1_EVT, 2, 0x0001)                                        # clearing another bit: still pending
    assert pm.sci.level
    pm.write(PM1_EVT + 2, 2, 0)                                         # disabling lowers it, status stays
    assert rig.out[-1] == ("irq", SCI_IRQ, 0) and pm.read(PM1_EVT, 2) == PWRBTN_STS
    pm.write(PM1_EVT, 4, PWRBTN_EN << 16 | PWRBTN_STS)                  # one 4-byte write: clear and enable
    assert pm.read(PM1_EVT, 4) == PWRBTN_EN << 16 and not pm.sci.level
    assert rig.out.count(("irq", SCI_IRQ, 1)) == 2


def test_reset_lowers_the_sci():
    rig = acpi_busy()
    assert rig.dev.sci.level
    rig.dev.reset()
    assert not rig.dev.sci.level and rig.out[-1] == ("irq", SCI_IRQ, 0) and rig.dev.read(PM1_EVT, 4) == 0


def test_fadt_announces_a_fixed_feature_power_button():
    from hvm.boot.acpi import fadt_body

    flags, = struct.unpack_from("<I", fadt_body(0, 0, 0x600), 112 - 36)
    assert not flags & (1 << 4)          # PWR_BUTTON clear: the fixed-feature button in PM1 exists
    assert flags & (1 << 5)              # SLP_BUTTON set: no sleep button


# A real-mode guest that enables PWRBTN_EN, says "R", polls PM1_STS until the button is pressed, clears it
# (write 1), checks it is clear and exits through debug-exit with 0x21 (status 67); 0x01 (3) if not clear.
POWER_BUTTON_GUEST = bytes([
    0xFA,                       # cli
    0xBA, 0x02, 0x06,           # mov dx, 0x602        PM1_EN
    0xB8, 0x00, 0x01,           # mov ax, 0x100        PWRBTN_EN
    0xEF,                       # out dx, ax
    0xBA, 0xF8, 0x03,           # mov dx, 0x3f8
    0xB0, 0x52,                 # mov al, 'R'
    0xEE,                       # out dx, al
    0xBA, 0x00, 0x06,           # mov dx, 0x600        PM1_STS
    0xED,                       # 1: in ax, dx
    0xA9, 0x00, 0x01,           # test ax, 0x100
    0x74, 0xFA,                 # jz 1b
    0xEF,                       # out dx, ax           write 1 to clear
    0xED,                       # in ax, dx
    0xA9, 0x00, 0x01,           # test ax, 0x100
    0x75, 0x04,                 # jnz 2f
    0xB0, 0x21,                 # mov al, 0x21
    0xE6, 0xF4,                 # out 0xf4, al
    0xB0, 0x01,                 # 2: mov al, 1
    0xE6, 0xF4,                 # out 0xf4, al
    0xF4,                       # hlt
])


def test_system_powerdown_reaches_the_guest(tmp_path):
    from hvm import Machine
    from hvm.config import FlatBoot, VmSpec
    from hvm.console import Console

    image = tmp_path / "pwrbtn.bin"
    image.write_bytes(POWER_BUTTON_GUEST)
    spec = VmSpec(name="pwrbtn", boot=FlatBoot(image, 0x7C00, 0x7C00, "real"), memory=4 << 20, machine="pc",
                  timeout=GUEST_TIMEOUT)
    with Machine(spec, console=Console("none", "none")) as vm:
        events = []
        vm.add_listener(lambda event, data: events.append((event, data)))
        vm.start()
        vm.wait_for_console(b"R", timeout=GUEST_TIMEOUT)
        vm.system_powerdown()
        assert ("POWERDOWN", {}) in events
        result = vm.wait(GUEST_TIMEOUT)
        assert result is not None and (result.status, result.reason) == (67, "debug-exit"), result
        assert not vm.acpi_pm.sci.level          # the guest's clear lowered the SCI on the irqchip
        with pytest.raises(RuntimeError, match="has ended"):
            vm.system_powerdown()


def test_system_powerdown_needs_machine_pc(tmp_path):
    from hvm import Machine
    from hvm.config import FlatBoot, VmSpec
    from hvm.console import Console

    image = tmp_path / "hlt.bin"
    image.write_bytes(b"\xF4")
    spec = VmSpec(name="bare", boot=FlatBoot(image, 0x7C00, 0x7C00, "real"), memory=4 << 20, timeout=GUEST_TIMEOUT)
    with Machine(spec, console=Console("none", "none")) as vm:
        with pytest.raises(RuntimeError, match="machine: pc"):
            vm.system_powerdown()


# --- a whole machine's devices, keyed by bus range as a snapshot keys them ------------------------------
def full_pc_spec(image):
    from hvm.config import FlatBoot, VmSpec, parse_devices

    return VmSpec(name="devices", boot=FlatBoot(image, 0x7C00, 0x7C00, "real"), memory=4 << 20, machine="pc",
                  timeout=GUEST_TIMEOUT,
                  devices=parse_devices({"testdev": True, "debugcon": True, "pvconsole": True}))


def machine_states(vm) -> dict:
    return {f"{vm.pio.kind}:{r.base:#x}": r.device.save() for r in vm.pio.ranges}


def without_time(states: dict) -> dict:
    """The states with the PM timer's count and the RTC's register C left out (a real clock runs between two
    saves: the RTC's periodic and update flags are set from it, as on the chip, whether enabled or not)."""
    out = {k: {f: v for f, v in s.items() if f != "timer_ns"} for k, s in states.items()}
    for s in out.values():
        if "cmos" in s:
            s["cmos"] = s["cmos"][:0x0C] + b"\0" + s["cmos"][0x0D:]
    return out


def test_every_device_of_a_pc_machine_saves_and_loads_into_a_new_machine(tmp_path):
    from hvm import Machine
    from hvm.console import Console

    image = tmp_path / "hlt.bin"
    image.write_bytes(b"\xF4")
    spec = full_pc_spec(image)
    with Machine(spec, console=Console("none", "none")) as a, Machine(spec, console=Console("none", "none")) as b:
        fresh = machine_states(a)
        # what a guest would do, through the bus: UART setup and scratch, an RTC register, fw_cfg item,
        # the i8042 command byte, PM1 enable, testdev scratch and an IRQ line
        for port, size, value in ((0x3FB, 1, 0x83), (0x3F8, 1, 0x01), (0x3FB, 1, 0x03), (0x3FA, 1, 0xC7),
                                  (0x3FF, 1, 0x77), (0x70, 1, 0x20), (0x71, 1, 0x99), (0x510, 2, 0x05),
                                  (0x64, 1, 0x20), (0x602, 2, 0x0100), (0xE0, 4, 0x12345678), (0x2005, 1, 1),
                                  (0xCF8, 4, 0x8000_000C), (0xCFD, 1, 0x40)):   # host bridge latency timer
            a.pio.write(port, size, value)
        assert a.pio.read(0x511, 1) == 1            # fw_cfg NB_CPUS, first byte
        a.acpi_pm.press_power_button()
        saved = machine_states(a)
        assert set(saved) == {"port:0x3f8", "port:0xf4", "port:0x510", "port:0x600", "port:0x70", "port:0x60",
                              "port:0x64", "port:0xe9", "port:0xe00", "port:0xe0", "port:0x2000", "port:0xcf8",
                              "port:0xe8", "port:0xea", "port:0xeb"}   # pc-testdev's byte view; 0xe9 debugcon's
        changed = {k for k in saved if without_time(saved)[k] != without_time(fresh)[k]}
        assert changed == {"port:0x3f8", "port:0x510", "port:0x600", "port:0x70", "port:0x60", "port:0x64",
                           "port:0xe0", "port:0x2000", "port:0xcf8"}
        devices_b = {f"{b.pio.kind}:{r.base:#x}": r.device for r in b.pio.ranges}
        for key, state in saved.items():
            devices_b[key].load(state)
        assert without_time(machine_states(b)) == without_time(saved)
        assert b.acpi_pm.sci.level and b.pio.read(0x3FF, 1) == 0x77 and b.pio.read(0x60, 1) == 0x61
        assert b.pio.read(0x511, 1) == 0            # the item's second byte, where a left off
        assert machine_states(b)["port:0x600"]["timer_ns"] >= saved["port:0x600"]["timer_ns"]
        for r in b.pio.ranges:
            r.device.reset()
        assert without_time(machine_states(b)) == without_time(fresh) and not b.acpi_pm.sci.level
        # pc-testdev's iomem, on the MMIO bus (saved under mmio:0xff000000 in a snapshot)
        a.mmio.write(0xFF00FFFC, 4, 0xCAFEF00D)
        iomem_a = {r.base: r.device for r in a.mmio.ranges}[0xFF000000]
        iomem_b = {r.base: r.device for r in b.mmio.ranges}[0xFF000000]
        iomem_b.load(iomem_a.save())
        assert b.mmio.read(0xFF00FFFC, 4) == 0xCAFEF00D and b.mmio.read(0xFF00FFFE, 8) == 0xCAFE


def test_a_guest_write_cannot_give_the_testdev_a_state_its_load_refuses():
    """A 4-byte write at offset 2 of the 4-byte scratch register: only its low half lands in it, and the
    state saved then loads (a snapshot of that guest restores)."""
    from hvm.mmio.testdev import PcTestDev

    dev = PcTestDev()
    dev.write(0, 4, 0x11223344)
    dev.write(2, 4, 0xAABBCCDD)
    assert dev.read(0, 4) == 0xCCDD3344
    state = dev.save()
    other = PcTestDev()
    other.load(state)
    assert other.save() == state == {"data": 0xCCDD3344}


def test_apic_register_page_without_interrupt_logic():
    """What a guest reads from the tcg accelerator's APIC page: id 0, an integrated xAPIC's version, masked LVT
    entries at reset, registers back as written, and an ICR whose delivery status is idle at once (an IPI is
    dropped, never pending: kvm-unit-tests' apic setup waits on that bit)."""
    a = ApicRegisters()
    assert (a.read(0x20, 4), a.read(0x30, 4), a.read(0x320, 4), a.read(0xF0, 4)) == (0, 0x50014, 0x10000, 0xFF)
    a.write(0x300, 4, 0x000C4500 | (1 << 12))        # INIT to all-but-self, delivery status set by the guest
    assert a.read(0x300, 4) == 0x000C4500
    a.write(0x80, 4, 0x35)
    assert (a.read(0x80, 4), a.read(0xA0, 4)) == (0x35, 0x30)   # TPR back; PPR follows its class
    a.write(0xB0, 4, 0)                                 # EOI: nothing
    assert a.read(0xB0, 4) == 0 and a.read(0x100, 4) == 0 and a.read(0x390, 4) == 0
    assert a.read(0x31, 1) == 0x00 and a.read(0x32, 1) == 0x05   # byte reads of the version register
