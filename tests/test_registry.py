"""The device registry (hvm/mmio/registry.py): a device type declared in its own file is reachable from
YAML, --device, hvm-qemu, the docs and the machine without editing anything else."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from hvm.cli import _device_overrides
from hvm.config import ConfigError, FlatBoot, VmSpec, parse_devices, parse_spec
from hvm.mmio import registry
from hvm.snapshot.codec import CodecError, spec_from_dict, spec_to_dict

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware" / "build"

TOY = '''
"""A toy device, declared the way every device is: one file."""
from hvm.mmio.device import Stateless
from hvm.mmio.registry import DeviceType, Prop

CLOSED = []


class Toy(Stateless):
    name = "toy"

    def __init__(self, props):
        self.props = props

    def read(self, offset, size):
        return self.props["value"]

    def write(self, offset, size, value):
        pass


def _create(ctx, props):
    device = Toy(props)
    ctx.pio.register(props["port"], 2, device)
    ctx.on_close(lambda: CLOSED.append(ctx.name))
    return device


DEVICE = DeviceType(
    name="toy", aliases=("qemu-toy",), help="a device made in a test", create=_create, multiple=True,
    props=(Prop("port", "port", 0x700, alias="iobase"), Prop("value", "int", 7, lo=0, hi=255),
           Prop("loud", "bool", False), Prop("mode", "choice", "a", choices=("a", "b")),
           Prop("mac", "mac", "52:54:00:00:00:01")),
    ports=lambda p: [(p["port"], 2)])
'''


@pytest.fixture
def toy_registry(tmp_path, monkeypatch):
    """The registry with one more package holding toy.py: as if toy.py had been added to hvm/mmio/."""
    pkg = tmp_path / "extra_devices"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "toy.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_PACKAGES", registry._PACKAGES + ("extra_devices",))
    monkeypatch.setattr(registry, "_types", None)
    monkeypatch.setattr(registry, "_names", {})
    yield sys.modules.get("extra_devices.toy")
    for name in ("extra_devices.toy", "extra_devices"):
        sys.modules.pop(name, None)


def _flat(**devices) -> dict:
    return {"boot": {"image": str(FIRMWARE / "hello.bin")}, "devices": devices}


def test_a_device_file_is_all_it_takes(toy_registry):
    spec = parse_spec(_flat(toy=[{"value": 9}, {"port": "0x710", "loud": "on", "mode": "b", "mac": "52:54:00:AB:CD:EF"}]))
    assert [(d.name, d.index, d.values) for d in spec.devices] == [
        ("toy0", 0, {"port": 0x700, "value": 9, "loud": False, "mode": "a", "mac": "52:54:00:00:00:01"}),
        ("toy1", 1, {"port": 0x710, "value": 7, "loud": True, "mode": "b", "mac": "52:54:00:ab:cd:ef"})]
    # --device, with QEMU's names for the device and the option; repeated: two instances
    origins: dict = {}
    over = _device_overrides(["qemu-toy,iobase=0x720", "toy,value=3"], origins)
    assert over == {"toy": [{"port": "0x720"}, {"value": "3"}]}
    assert origins["devices.toy[0].port"] == "--device qemu-toy: iobase"
    spec = parse_spec(_flat(toy=over["toy"]), origins=origins)
    assert [d.values["port"] for d in spec.devices] == [0x720, 0x700]
    assert "toy (also qemu-toy): a device made in a test" in registry.describe()
    assert "| `toy` (a list of mappings) | `toy`, `qemu-toy` |" in registry.markdown()


@pytest.mark.parametrize("devices, message", [
    ({"toy": [{"value": 256}]}, "devices.toy[0].value: 256 is out of range (0..255)"),
    ({"toy": [{"mode": "c"}]}, "devices.toy[0].mode: 'c' is not one of: a, b"),
    ({"toy": [{"loud": 2}]}, "devices.toy[0].loud: expected on or off, got a number (2)"),
    ({"toy": [{"mac": "01:00:5e:00:00:01"}]}, "devices.toy[0].mac: 01:00:5e:00:00:01 is a multicast address"),
    ({"toy": [{"mac": "52:54:00"}]}, "devices.toy[0].mac: expected a MAC address like 52:54:00:12:34:56"),
    ({"toy": [{"colour": 1}]}, "devices.toy[0].colour: unknown key (allowed here: port, value, loud, mode, mac)"),
    ({"toy": [{}, {}]}, "devices.toy: ports 0x700..0x701 overlap toy0's (0x700..0x701)"),
    ({"toy": "yes"}, "devices.toy: expected true, a mapping of properties or a list of them, got a string ('yes')"),
    ({"toy": [{}] * 40}, "devices.toy: 40 instances, at most 32 allowed"),
])
def test_properties_are_checked_from_the_declaration(toy_registry, devices, message):
    with pytest.raises(ConfigError) as e:
        parse_spec(_flat(**devices))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_machine_creates_and_closes_a_registry_device(toy_registry):
    from hvm.console import Console
    from hvm.machine import Machine

    spec = VmSpec(name="toy", boot=FlatBoot(FIRMWARE / "hello.bin", 0x7C00, 0x7C00, "real"), memory=4 << 20,
                  timeout=10, irqchip=False, devices=parse_devices({"toy": [{"value": 42}]}))
    toy = sys.modules["extra_devices.toy"]
    with Machine(spec, console=Console("none", "none")) as vm:
        assert vm.pio.find(0x701).device is vm.devices["toy0"]
        assert vm.pio.read(0x700, 1) == 42
        assert vm.run().status == 0
    assert toy.CLOSED == ["toy0"]


def test_a_name_declared_twice_is_refused(toy_registry, tmp_path):
    (tmp_path / "extra_devices" / "toy2.py").write_text(
        "from hvm.mmio.registry import DeviceType\n"
        "DEVICE = DeviceType(name='toy2', aliases=('pvconsole',), help='x', create=lambda c, p: None)\n")
    with pytest.raises(RuntimeError, match="device name 'pvconsole' is declared twice"):
        registry.device_types()


def test_docs_config_lists_every_device():
    text = (ROOT / "docs" / "config.md").read_text()
    start, end = text.index(registry.DOC_BEGIN), text.index(registry.DOC_END) + len(registry.DOC_END)
    assert text[start:end] == registry.markdown(), "docs/config.md is out of date: run `make docs-devices`"
    for name in registry.device_types():
        assert f"| `{name}` (" in text


def test_snapshot_description_carries_devices():
    spec = VmSpec(name="d", boot=FlatBoot(FIRMWARE / "hello.bin", 0x7C00, 0x7C00, "real"),
                  devices=parse_devices({"debugcon": {"port": 0x402}, "pvconsole": True}))
    back = spec_from_dict(spec_to_dict(spec), "snapshot x")
    assert back.devices == spec.devices
    d = spec_to_dict(spec)
    d["devices"][0][1]["port"] = 0x1FFFF
    with pytest.raises(CodecError, match=r"devices.debugcon.port: 131071 is out of range \(0..65535\)"):
        spec_from_dict(d, "snapshot x")
    d["devices"] = [["nope", {}]]
    with pytest.raises(CodecError, match="device 'nope' is not a device hvm has"):
        spec_from_dict(d, "snapshot x")
