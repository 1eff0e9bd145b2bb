"""QEMU's debugcon and hvm's paravirtual console: the devices alone (no VM), their YAML, and
firmware/pvcon printing the same line three ways, counted exit by exit.
The guest runs were checked on the kvm_pvm host; nothing in them depends on the accelerator."""
from __future__ import annotations

import struct

import pytest

from conftest import FIRMWARE, FakeRam, write_yaml
from hvm import Machine
from hvm.config import ConfigError, FlatBoot, VmSpec, parse_devices, parse_spec
from hvm.console import Console
from hvm.mmio.debugcon import DebugCon
from hvm.mmio import pvconsole
from hvm.mmio.pvconsole import PVCONSOLE_MAGIC, PvConsole


def pv(ram: FakeRam) -> tuple[PvConsole, list[bytes]]:
    out: list[bytes] = []
    return PvConsole(ram, out.append), out


def descriptor(ram: FakeRam, at: int, addr: int, length: int) -> None:
    ram.data[at:at + 16] = struct.pack("<QII", addr, length, 0xDEAD)


def used(ram: FakeRam, at: int) -> int:
    return struct.unpack_from("<I", ram.data, at + 12)[0]


def test_pvconsole_doorbell_sends_the_buffer_and_answers_used():
    ram = FakeRam()
    ram.data[0x2000:0x2005] = b"hello"
    descriptor(ram, 0x1000, 0x2000, 5)
    dev, out = pv(ram)
    dev.write(0, 4, 0x1000)
    assert out == [b"hello"] and used(ram, 0x1000) == 5 and (dev.buffers, dev.refused) == (1, 0)


def test_pvconsole_refuses_buffers_outside_ram_or_too_long(monkeypatch, caplog):
    monkeypatch.setattr(pvconsole, "MAX_BUFFER", 16)
    ram = FakeRam()
    descriptor(ram, 0x1000, 0xFFF0, 0x20)          # runs past the end of RAM
    descriptor(ram, 0x1010, 0x2000, 17)            # in RAM, one byte over the bound
    descriptor(ram, 0x1020, 0x20000, 0)            # empty, but outside RAM
    descriptor(ram, 0x1030, 0x2000, 16)            # at the bound: taken
    dev, out = pv(ram)
    for at in (0x1000, 0x1010, 0x1020, 0x1030):
        dev.write(0, 4, at)
    assert out == [bytes(16)] and (dev.buffers, dev.refused) == (1, 3)
    assert [used(ram, at) for at in (0x1000, 0x1010, 0x1020, 0x1030)] == [0, 0, 0, 16]
    # a guest ringing in a loop does not flood the log: one warning, then debug lines
    assert [r.levelname for r in caplog.records if r.name == "hvm.mmio.pvconsole"] == ["WARNING"]


def test_pvconsole_with_guest_memory_around_the_pci_hole():
    """hvm's GuestMemory above 3 GiB: RAM below the hole and above 4 GiB, nothing in between."""
    from hvm.memory import GuestMemory

    with GuestMemory((3 << 30) + (4 << 20)) as mem:
        out: list[bytes] = []
        dev = PvConsole(mem, out.append)
        mem.write(0x1_0000_0000, b"above 4 GiB")
        for at, addr, length in ((0x1000, 0x1_0000_0000, 11), (0x1010, 0xC000_0000, 4), (0x1020, 0xBFFF_FFFC, 8)):
            mem.write(at, struct.pack("<QII", addr, length, 0xDEAD))
            dev.write(0, 4, at)
        assert out == [b"above 4 GiB"]
        assert [mem.read_u32(at + 12) for at in (0x1000, 0x1010, 0x1020)] == [11, 0, 0]
        dev.write(0, 4, 0xBFFF_FFF8)                # a descriptor across the start of the hole
        assert dev.refused == 3 and mem.read(0xBFFF_FFF8, 8) == bytes(8)


def test_pvconsole_drops_a_descriptor_outside_ram(caplog):
    ram = FakeRam()
    before = bytes(ram.data)
    dev, out = pv(ram)
    dev.write(0, 4, 0x20000)
    assert out == [] and dev.refused == 1 and bytes(ram.data) == before
    assert "descriptor at 0x20000 dropped" in caplog.text


def test_pvconsole_probe_and_odd_writes():
    ram = FakeRam()
    dev, out = pv(ram)
    assert dev.read(0, 4) == PVCONSOLE_MAGIC and dev.read(1, 1) == ord("v")
    dev.write(0, 1, 0x1000)          # not a u32 doorbell: ignored, counted as refused
    assert out == [] and dev.refused == 1


def test_debugcon_one_byte_per_write_and_readback():
    out: list[bytes] = []
    dev = DebugCon(out.append)
    dev.write(0, 1, ord("A"))
    dev.write(0, 2, 0x4342)          # as QEMU: only the low byte
    assert out == [b"A", b"B"] and dev.read(0, 1) == 0xE9


def test_yaml_turns_them_on():
    base = {"boot": {"image": str(FIRMWARE / "pvcon.bin")}}
    spec = parse_spec(base)
    assert spec.devices == ()    # off unless asked for, as in QEMU
    spec = parse_spec({**base, "devices": {"debugcon": True, "pvconsole": {"port": 0x520}}})
    assert [(d.name, d.values) for d in spec.devices] == [("debugcon", {"port": 0xE9}), ("pvconsole", {"port": 0x520})]


@pytest.mark.parametrize("devices, message", [
    ({"debugcon": "yes"}, "devices.debugcon: expected true, false or a mapping of properties, got a string ('yes')"),
    ({"pvconsole": {"port": 0xFFFE}}, "devices.pvconsole.port: 65534 is out of range (0..65532)"),
    ({"pvconsole": {"iobase": 1}}, "devices.pvconsole.iobase: unknown key (allowed here: port)"),
    ({"debugcon": {"port": 0x3F9}}, "devices.debugcon: ports 0x3f9..0x3f9 overlap serial's (0x3f8..0x3ff)"),
    ({"debugcon": [{"port": 1}]}, "devices.debugcon: expected true, false or a mapping of properties, got a list "
                                  "(debugcon is a single device)"),
])
def test_yaml_errors_name_the_field(devices, message):
    with pytest.raises(ConfigError) as e:
        parse_spec({"boot": {"image": str(FIRMWARE / "pvcon.bin")}, "devices": devices})
    assert message in str(e.value)


LINE = b"one line, printed three ways\n"
UART_INIT_EXITS = 5


def pvcon_image(tmp_path, method: int, iterations: int):
    from bench.exits import patch_header   # checks the header layout the firmware's comment gives

    return patch_header(FIRMWARE / "pvcon.bin", tmp_path / f"pvcon-{method}.bin", iterations, method,
                        arg_as_built=0)


@pytest.mark.parametrize("method, exits_per_line", [
    (0, 2 * len(LINE)),     # 16550: LSR poll + THR write per byte
    (1, len(LINE)),         # debugcon: one OUT per byte
    (2, 1),                 # pvconsole: one OUT per line
])
@pytest.mark.parametrize("fast_loop", [True, False])
def test_same_output_fewer_exits(tmp_path, method, exits_per_line, fast_loop):
    spec = VmSpec(name="pvcon", boot=FlatBoot(pvcon_image(tmp_path, method, 3), 0x7C00, 0x7C00, "real"),
                  memory=4 << 20, timeout=20, irqchip=False,
                  devices=parse_devices({"debugcon": True, "pvconsole": True}))
    with Machine(spec, console=Console("none", "none"), fast_loop=fast_loop) as vm:
        result = vm.run()
        stats = vm.stats()
        text = vm.console.text()
    assert (result.reason, result.status) == ("debug-exit", 1)
    assert text == (LINE * 3).decode()
    assert stats.by_reason == {"IO": UART_INIT_EXITS + 3 * exits_per_line + 1}
    console_ports = {0: {0x3F8: 1 + 3 * len(LINE), 0x3FD: 3 * len(LINE)},    # DLL at init, then THR; LSR
                     1: {0x3F8: 1, 0xE9: 3 * len(LINE)},
                     2: {0x3F8: 1, 0xE00: 3}}[method]
    assert {p: n for p, n in stats.by_port.items() if p in (0x3F8, 0x3FD, 0xE9, 0xE00)} == console_ports


def test_pvconsole_refusal_reaches_the_guest(tmp_path):
    """With the pvconsole at another port, the doorbell OUT hits nothing, `used` stays 0, and pvcon
    reports it through the debug-exit status (3)."""
    spec = VmSpec(name="pvcon", boot=FlatBoot(pvcon_image(tmp_path, 2, 2), 0x7C00, 0x7C00, "real"),
                  memory=4 << 20, timeout=20, irqchip=False,
                  devices=parse_devices({"pvconsole": {"port": 0xE10}}))
    with Machine(spec, console=Console("none", "none")) as vm:
        result = vm.run()
        assert (result.reason, result.status, vm.console.text()) == ("debug-exit", 3, "")
        assert vm.stats().unhandled_ports == {0xE00: 1}


def test_command_line_devices(tmp_path, hvm):
    """As a user would: `--device pvconsole` and `--device isa-debugcon` (QEMU's -device syntax)."""
    pv_image = pvcon_image(tmp_path, 2, 2)
    run = hvm("run", str(_flat_yaml(tmp_path, pv_image)), "--device", "pvconsole", "--stats")
    assert (run.status, run.out) == (1, (LINE * 2).decode())
    assert "0x0e00                    2" in run.stderr       # --stats: two doorbells for two lines
    dc_image = pvcon_image(tmp_path, 1, 1)
    run = hvm("run", str(_flat_yaml(tmp_path, dc_image)), "--device", "isa-debugcon,iobase=0xe9")
    assert (run.status, run.out) == (1, LINE.decode())
    run = hvm("run", str(_flat_yaml(tmp_path, dc_image)), "--device", "virtio-gpu")
    assert run.status == 2 and run.out == ""
    assert "--device: 'virtio-gpu' is not a device hvm has (isa-debug-exit, debugcon, " in run.stderr
    run = hvm("run", str(_flat_yaml(tmp_path, dc_image)), "--device", "pvconsole,iobase=0xfffe")
    assert (run.status, run.stderr.strip()) == (2, "hvm: --device pvconsole: iobase: 65534 is out of range (0..65532)")
    run = hvm("run", "--device", "help")
    assert run.status == 0 and "pvconsole: hvm's paravirtual console" in run.out
    assert "    port (or iobase): int, default 0xe00" in run.out


def _flat_yaml(tmp_path, image):
    return write_yaml(tmp_path, f"boot: {{image: '{image}'}}\ntimeout: 20\n", f"{image.stem}.yaml")


def test_console_writes_a_big_buffer_whole(tmp_path, monkeypatch):
    """A pipe or terminal may take part of a write: Console.write goes on until all of pvconsole's
    buffer is out (the UART's and debugcon's single bytes never showed this)."""
    import os

    taken: list[bytes] = []

    def partial_write(fd, data):
        taken.append(bytes(data[:3]))
        return min(3, len(data))

    console = Console(f"file:{tmp_path / 'out'}", "none")
    monkeypatch.setattr(os, "write", partial_write)
    console.write(b"one line, printed three ways\n")
    monkeypatch.undo()
    console.close()
    assert b"".join(taken) == b"one line, printed three ways\n" and console.text() == LINE.decode()
