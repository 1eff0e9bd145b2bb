"""PC platform pieces on their own: fw_cfg, ACPI PM registers, pc-testdev, ACPI tables, BIOS IVT."""
from __future__ import annotations

import struct

from hvm.boot.acpi import ACPI_BASE, write_acpi_tables
from hvm.boot.bios import BIOS_SEGMENT, write_real_mode_ivt
from hvm.memory import GuestMemory
from hvm.mmio.acpi_pm import PM1_CNT, PM_TMR, AcpiPm
from hvm.mmio.fw_cfg import FW_CFG_NB_CPUS, FW_CFG_RAM_SIZE, FW_CFG_SIGNATURE, FwCfg
from hvm.mmio.testdev import PcTestDev, PcTestDevIrq


def fw_read(dev: FwCfg, item: int, n: int) -> bytes:
    dev.write(0, 2, item)
    return bytes(dev.read(1, 1) for _ in range(n))


def test_fw_cfg_items_read_bytewise():
    dev = FwCfg.for_machine(256 << 20, 3)
    assert fw_read(dev, FW_CFG_SIGNATURE, 4) == b"QEMU"
    assert fw_read(dev, FW_CFG_NB_CPUS, 2) == b"\x03\x00"
    assert fw_read(dev, FW_CFG_RAM_SIZE, 8) == struct.pack("<Q", 256 << 20)
    assert fw_read(dev, 0x11, 8) == bytes(8)            # unknown item: zeros, as QEMU
    dev.write(0, 2, FW_CFG_NB_CPUS)
    assert dev.read(1, 2) == 3                           # a wide read gives consecutive bytes


def test_pm_timer_counts_at_3_58_mhz():
    now = [1_000_000_000]
    pm = AcpiPm(clock_ns=lambda: now[0])
    assert pm.read(PM_TMR, 4) == 0
    now[0] += 1_000_000_000                              # one second later
    assert pm.read(PM_TMR, 4) == 3579545
    now[0] += 4_000_000_000                              # wraps at 24 bits
    assert pm.read(PM_TMR, 4) == (5 * 3579545) & 0xFFFFFF


def test_pm1_control_s5_powers_off():
    calls = []
    pm = AcpiPm(on_poweroff=lambda: calls.append("off"))
    assert pm.read(PM1_CNT, 2) & 1                       # SCI_EN: always in ACPI mode
    pm.write(PM1_CNT, 2, (1 << 10) | (1 << 13))          # S1 sleep: not a poweroff
    assert calls == []
    pm.write(PM1_CNT, 2, (5 << 10) | (1 << 13))          # SLP_TYP=5 (\_S5), SLP_EN
    assert calls == ["off"]


def test_testdev_scratch_and_irq_lines():
    dev = PcTestDev()
    dev.write(0, 4, 0xDEADBEEF)
    assert (dev.read(0, 4), dev.read(0, 1), dev.read(2, 2)) == (0xDEADBEEF, 0xEF, 0xDEAD)
    dev.write(0, 1, 0x11)
    assert dev.read(0, 4) == 0xDEADBE11
    lines = []
    irq = PcTestDevIrq(lambda n, level: lines.append((n, level)))
    irq.write(11, 4, 1)
    irq.write(11, 4, 0)
    assert lines == [(11, 1), (11, 0)]


def find_table(mem: GuestMemory, sig: bytes) -> int | None:
    """Search as kvm-unit-tests' lib/acpi.c does: RSDP on a 16-byte boundary in 0xE0000..0xFFFFF."""
    for addr in range(0xE0000, 0x100000, 16):
        if mem.read(addr, 8) == b"RSD PTR ":
            break
    else:
        return None
    assert sum(mem.read(addr, 20)) & 0xFF == 0
    rsdt = struct.unpack("<I", mem.read(addr + 16, 4))[0]
    length = struct.unpack("<I", mem.read(rsdt + 4, 4))[0]
    assert mem.read(rsdt, 4) == b"RSDT" and sum(mem.read(rsdt, length)) & 0xFF == 0
    for i in range((length - 36) // 4):
        t = struct.unpack("<I", mem.read(rsdt + 36 + 4 * i, 4))[0]
        if mem.read(t, 4) == sig:
            tlen = struct.unpack("<I", mem.read(t + 4, 4))[0]
            assert sum(mem.read(t, tlen)) & 0xFF == 0, f"{sig} checksum"
            return t
    return None


def test_acpi_tables_are_found_and_consistent():
    with GuestMemory(16 << 20) as mem:
        placed = write_acpi_tables(mem, cpus=2, pm_base=0x600)
        assert placed["RSDP"] == ACPI_BASE
        fadt = find_table(mem, b"FACP")
        assert fadt is not None and struct.unpack("<I", mem.read(fadt + 4, 4))[0] == 116
        pm_tmr_blk, = struct.unpack("<I", mem.read(fadt + 76, 4))
        pm1a_cnt, = struct.unpack("<I", mem.read(fadt + 64, 4))
        assert (pm_tmr_blk, pm1a_cnt) == (0x608, 0x604)
        dsdt, = struct.unpack("<I", mem.read(fadt + 40, 4))
        assert mem.read(dsdt, 4) == b"DSDT" and b"_S5_" in mem.read(dsdt, 64)
        madt = find_table(mem, b"APIC")
        body = mem.read(madt + 44, struct.unpack("<I", mem.read(madt + 4, 4))[0] - 44)
        lapics, off = [], 0
        while off < len(body):
            kind, length = body[off], body[off + 1]
            if kind == 0:
                lapics.append(body[off + 3])
            off += length
        assert lapics == [0, 1]
        assert find_table(mem, b"XSDT") is None


def test_bios_ivt_points_every_vector_at_a_stub():
    with GuestMemory(4 << 20) as mem:
        write_real_mode_ivt(mem)
        ivt = struct.unpack("<512H", mem.read(0, 1024))
        for vector in range(256):
            off, seg = ivt[2 * vector], ivt[2 * vector + 1]
            assert seg == BIOS_SEGMENT
            stub = mem.read(seg * 16 + off, 16)
            assert 0xCF in stub[:9]                      # every stub ends in IRET
        timer = mem.read(BIOS_SEGMENT * 16 + ivt[2 * 8], 7)
        assert timer == bytes([0x50, 0xB0, 0x20, 0xE6, 0x20, 0x58, 0xCF])   # EOI to the master PIC


# --- hostile register values (issue 11) ----------------------------------------------------------------
import pytest  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hvm.mmio import DebugExit, PioBus, SerialUart  # noqa: E402
from hvm.mmio.debugcon import DebugCon  # noqa: E402
from hvm.mmio.i8042 import I8042, I8042_CMD_PORT, I8042_DATA_PORT, OUT_QUEUE  # noqa: E402
from hvm.mmio.pvconsole import PVCONSOLE_LEN, PvConsole  # noqa: E402
from hvm.mmio.rtc import RTC_PORT, Rtc  # noqa: E402


@pytest.mark.parametrize("size", [2, 4])
def test_rtc_wide_write_to_the_data_port_is_a_byte(size):
    """A 2- or 4-byte write to 0x71 was taken whole: hours = 0x12345678 moved the clock ~35000 years on, and
    the century read back (> 0xff) made the vCPU's struct.pack raise ("VMM error", status 4)."""
    rtc = Rtc(clock=lambda: 1.7e9)
    rtc.write(0, 1, 0x0B)
    rtc.write(1, 1, 0x06)                    # binary, 24 h
    rtc.write(0, 1, 0x04)                    # hours
    rtc.write(1, size, 0x12345678 & ((1 << (8 * size)) - 1))
    assert rtc.read(1, 1) == 0x78 % 24       # the low byte, 120 hours, rolled over into days
    rtc.write(0, 1, 0x32)                    # century
    assert rtc.read(1, 1) == 20
    rtc.write(0, 1, 0x20)                    # a CMOS RAM byte
    rtc.write(1, size, 0x12345678 & ((1 << (8 * size)) - 1))
    assert rtc.cmos[0x20] == 0x78


def test_rtc_clock_writes_cannot_walk_the_clock_out_of_range():
    rtc = Rtc(clock=lambda: 1.7e9)
    rtc.write(0, 1, 0x0B)
    rtc.write(1, 1, 0x06)                    # binary, 24 h
    for _ in range(3000):                    # day 255, again and again: ~2000 years on
        rtc.write(0, 1, 0x07)
        rtc.write(1, 1, 0xFF)
    for reg in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32):
        rtc.write(0, 1, reg)
        assert 0 <= rtc.read(1, 1) <= 0xFF


def test_i8042_output_queue_is_bounded():
    kbc = I8042()
    cmd = kbc.port(I8042_CMD_PORT)
    for _ in range(100_000):                 # a command flood: self-test answers nobody reads
        cmd.write(0, 1, 0xAA)
    assert len(kbc.out) == OUT_QUEUE
    data = kbc.port(I8042_DATA_PORT)
    assert [data.read(0, 1) for _ in range(OUT_QUEUE)] == [0x55] * OUT_QUEUE
    assert cmd.read(0, 1) & 1 == 0           # output buffer empty again


def pc_bus(mem: GuestMemory) -> PioBus:
    """Every device of the pc machine (and the optional ones) on one port bus, as hvm.machine wires them."""
    bus = PioBus()
    bus.register(0x3F8, 8, SerialUart(lambda b: None))
    bus.register(0xF4, 4, DebugExit(lambda status: None))
    bus.register(0x510, 2, FwCfg.for_machine(64 << 20, 2))
    bus.register(0x600, 12, AcpiPm(lambda: None))
    bus.register(RTC_PORT, 2, Rtc())
    kbc = I8042(lambda: None)
    bus.register(I8042_DATA_PORT, 1, kbc.port(I8042_DATA_PORT))
    bus.register(I8042_CMD_PORT, 1, kbc.port(I8042_CMD_PORT))
    bus.register(0xE9, 1, DebugCon(lambda b: None))
    bus.register(0xE00, PVCONSOLE_LEN, PvConsole(mem, lambda b: None))
    bus.register(0xE0, 8, PcTestDev())
    bus.register(0x2000, 24, PcTestDevIrq(lambda line, level: None))
    return bus


PORTS = [0x3F8 + i for i in range(8)] + [0xF4, 0x510, 0x511] + [0x600 + i for i in range(12)] + \
        [0x70, 0x71, 0x60, 0x64, 0xE9, 0xE00, 0xE01, 0xE02, 0xE03] + [0xE0 + i for i in range(8)] + \
        [0x2000, 0x2017, 0x80]
VALUE = st.one_of(st.integers(0, 0x3F), st.integers(0, 0xFF), st.integers(0, 0xFFFFFFFF))
ACCESS = st.tuples(st.sampled_from(PORTS), st.sampled_from([1, 2, 4]), st.booleans(), VALUE, st.integers(1, 4))
# Index/data devices, with a dictionary of their registers and commands (as fuzzers use dictionaries): select,
# then one access to the data port. Pure random sequences almost never select a register and then use it.
INDEXED = st.one_of(
    st.tuples(st.just(0x70), st.one_of(st.sampled_from([0, 2, 4, 6, 7, 8, 9, 0xA, 0xB, 0xC, 0xD, 0x32]),
                                       st.integers(0, 0xFF)), st.just(0x71)),
    st.tuples(st.just(0x510), st.one_of(st.sampled_from([0, 1, 3, 4, 5, 0xF]), st.integers(0, 0xFFFF)),
              st.just(0x511)),
    st.tuples(st.just(0x64), st.sampled_from([0x20, 0x60, 0xA7, 0xA8, 0xA9, 0xAA, 0xAB, 0xAD, 0xAE, 0xD0, 0xD1,
                                              0xFE]), st.just(0x60)),
    st.tuples(st.just(0x3FB), st.sampled_from([0x03, 0x83]), st.sampled_from([0x3F8 + i for i in range(8)])),
)
STEP = st.one_of(ACCESS.map(lambda a: [a]),
                 st.tuples(INDEXED, st.sampled_from([1, 2, 4]), st.booleans(), VALUE).map(
                     lambda t: [(t[0][0], 1, True, t[0][1], 1), (t[0][2], t[1], t[2], t[3], 1)]))


@given(st.lists(STEP, max_size=150))
def test_no_register_sequence_makes_a_pc_device_fault(steps):
    """Random port reads/writes of every size, single and string (rep), to every pc device, called as the bus
    calls them (values masked on the way in) but without its masking on the way out: none may raise (the bus
    would turn it into a DeviceFault, status 70), and every value read must fit the access by itself."""
    with GuestMemory(1 << 20) as mem:
        bus = pc_bus(mem)
        for port, size, is_write, value, count in (a for step in steps for a in step):
            r = bus.find(port)
            if r is None:
                continue
            offset, value = port - r.base, value & ((1 << (8 * size)) - 1)
            for _ in range(count):
                if is_write:
                    r.device.write(offset, size, value)
                else:
                    check_read(r.device, offset, size)
        # Whatever state the writes left: every register reads back within its access size (the RTC's index
        # selects 128 of them).
        rtc = bus.find(0x71).device
        for index in range(128):
            rtc.write(0, 1, index)
            for size in (1, 2, 4):
                check_read(rtc, 1, size)


def check_read(device, offset: int, size: int) -> None:
    got = device.read(offset, size)
    assert isinstance(got, int) and 0 <= got < 1 << (8 * size), (device.name, offset, size, got)


INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x9999, 0xFFFF, 0x12345678, 0x99999999, 0xFFFFFFFF)
RTC_INDEXES = (0, 2, 4, 6, 7, 8, 9, 0xA, 0xB, 0xC, 0xD, 0x20, 0x32, 0x7F)
FW_CFG_ITEMS = (0, 1, 3, 4, 5, 0xF, 0x19, 0x3FFF)


def _selections(port: int):
    """The index writes that select a register before `port` is used (index/data pairs), or one empty one."""
    if port == 0x71:
        return [(0x70, i) for i in RTC_INDEXES]
    if port == 0x511:
        return [(0x510, i) for i in FW_CFG_ITEMS]
    return [None]


def test_any_register_write_leaves_every_register_readable_within_its_size():
    """Exhaustive where the random sequences above are thin: each register of each device (RTC and fw_cfg
    registers selected through their index port), each size, a dictionary of values written in turn; after
    each write, every port and RTC register reads back within the access size. (A 4-byte 0x12345678 to the RTC's hours made
    the century read back as 0x178.)"""
    with GuestMemory(1 << 20) as mem:
        for port in PORTS:
            if port in (0xF4, 0x64, 0x80):  # debug-exit; the i8042 command port resets; nobody at 0x80
                continue
            for select in _selections(port):
                for size in (1, 2, 4):
                    bus = pc_bus(mem)         # the values' effects add up, as in a guest
                    for value in INTERESTING:
                        if select is not None:
                            bus.write(*select[:1], 1, select[1])
                        r = bus.find(port)
                        r.device.write(port - r.base, size, value & ((1 << (8 * size)) - 1))
                        for p in PORTS:
                            if p not in (0xF4, 0x71, 0x80):
                                q = bus.find(p)
                                check_read(q.device, p - q.base, 1)
                        rtc = bus.find(0x71).device
                        for index in RTC_INDEXES:
                            rtc.write(0, 1, index)
                            check_read(rtc, 1, 1)
