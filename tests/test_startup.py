"""What `hvm run` loads and builds at start-up (issue 16, docs/performance.md): the run of a trivial guest
imports only what it uses. No timing here: the modules a run imported, the collector's state, and the
plain records' behaviour (hvm/plain.py), which must match the dataclasses they replaced."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest

from conftest import FIRMWARE, GUEST_TIMEOUT, ROOT

# Run `hvm run` in-process through the console script's entry (hvm/__main__.py), then report what it loaded.
_PROBE = """
import json, sys, gc
sys.argv = ["hvm", "run"] + json.loads(sys.argv[1])
import hvm.__main__ as entry
try:
    entry.entry_point()
except SystemExit as e:
    status = e.code
print(json.dumps({"status": status, "modules": sorted(sys.modules), "gc": gc.isenabled()}))
"""

# Modules a KVM run of a multiboot kernel with built-in devices never needs: Unicorn's accelerator, the
# YAML parser, the device registry's scan (virtio, testdev, ...), QMP, CPU models, tracing, and the
# dataclasses machinery (with inspect, ast, dis) the boot path's records no longer use, and typing
# (hvm/_types.py).
NOT_LOADED = ("hvm.vcpu.tcg", "unicorn", "yaml", "hvm.mmio.virtio", "hvm.mmio.testdev", "hvm.mmio.debugcon",
              "hvm.qmp.address", "hvm.qmp.server", "hvm.cpu_model", "hvm.trace", "pkgutil", "dataclasses",
              "inspect", "shutil", "bz2", "lzma", "typing")


def _probe(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], cwd=ROOT, capture_output=True,
                          timeout=GUEST_TIMEOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def test_mbtest_run_imports_only_what_it_uses():
    out = _probe(["--kernel", str(FIRMWARE / "mbtest.elf"), "--serial", "none", "--timeout", "10"])
    assert out["status"] == 1, out["status"]        # mbtest exits through port 0xf4 with 0 -> (0 << 1) | 1
    loaded = set(out["modules"])
    assert "hvm.machine" in loaded and "hvm.builder" in loaded and "hvm.mmio.pci" in loaded
    unexpected = [m for m in NOT_LOADED if m in loaded or any(x.startswith(m + ".") for x in loaded)]
    assert unexpected == [], unexpected
    # the collector is off while importing (hvm/__main__.py) and on again for the run
    assert out["gc"] is True


def test_a_registry_device_still_loads_the_registry():
    """Naming a registry device scans the device modules as before (its name is checked, it is created)."""
    out = _probe(["--kernel", str(FIRMWARE / "mbtest.elf"), "--serial", "none", "--timeout", "10",
                  "--device", "debugcon"])
    assert out["status"] == 1
    assert "hvm.mmio.debugcon" in out["modules"] and "pkgutil" in out["modules"]


def test_compiled_ioctl_numbers_are_ioctl_opts():
    """The ioctl numbers compiled into the cffi module at install (hvm/kvm/_build.py) are exactly what
    ioctl-opt computes from the cffi sizes now, and they are what hvm.kvm.ioctls uses."""
    from hvm.kvm import _ffi, ioctls
    from hvm.kvm._ioctl_table import REQUESTS, compute

    if not _ffi.API_MODE:
        pytest.skip("the compiled cffi module is not built (ABI mode computes the numbers at import)")
    assert hasattr(_ffi.lib, "HVM_IOC_KVM_RUN"), "rebuild: setup.py build_ext --inplace (make install)"
    expected = compute(_ffi.ffi.sizeof)
    assert ioctls._compiled() == expected and len(expected) == len(REQUESTS) >= 47
    assert {name: getattr(ioctls, name) for name in REQUESTS} == expected
    assert ioctls.KVM_RUN == 0xAE80 and ioctls.NAMES[ioctls.KVM_GET_REGS] == "KVM_GET_REGS"


def test_mbtest_run_imports_neither_ioctl_opt_nor_ctypes():
    """With the numbers compiled in and guest RAM's address taken through cffi, a run imports neither."""
    from hvm.kvm import _ffi

    if not _ffi.API_MODE or not hasattr(_ffi.lib, "HVM_IOC_KVM_RUN"):
        pytest.skip("the compiled cffi module (with its ioctl numbers) is not built")
    out = _probe(["--kernel", str(FIRMWARE / "mbtest.elf"), "--serial", "none", "--timeout", "10"])
    assert out["status"] == 1
    assert [m for m in out["modules"] if m.startswith(("ctypes", "ioctl_opt"))] == []


def test_guest_memory_host_address_is_the_mappings():
    """GuestMemory's host addresses (what KVM's memory slots point at), taken through cffi, are the
    mappings' own addresses as ctypes sees them, and the mappings still close (no buffer export left)."""
    import ctypes

    from hvm.memory import GuestMemory

    mem = GuestMemory(8 << 20)
    try:
        (region,) = mem.regions
        anchor = ctypes.c_char.from_buffer(region.mapping)
        assert region.host_addr == ctypes.addressof(anchor) and region.host_addr % 4096 == 0
        del anchor
        ctypes.memmove(region.host_addr + 5, b"hvm", 3)      # a write through the address lands in the mapping
        assert region.mapping[5:8] == b"hvm"
    finally:
        mem.close()
    assert region.mapping.closed


def test_unknown_device_key_still_names_the_registry_devices(tmp_path):
    cfg = tmp_path / "vm.yaml"
    cfg.write_text(f"boot: {{kernel: '{FIRMWARE / 'mbtest.elf'}'}}\ndevices: {{serial: none, nosuch: true}}\n")
    proc = subprocess.run([sys.executable, "-m", "hvm", "run", str(cfg)], cwd=ROOT, capture_output=True,
                          timeout=GUEST_TIMEOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert err.startswith(f"hvm: {cfg}: devices.nosuch: unknown key (allowed here: serial, debug_exit, ")
    assert "virtio-blk" in err and err.count("\n") == 1, err


def test_terminal_width_as_shutil(monkeypatch):
    from hvm import cli

    monkeypatch.setenv("COLUMNS", "57")
    assert cli._terminal_columns() == 57
    monkeypatch.setenv("COLUMNS", "junk")
    import shutil

    assert cli._terminal_columns() == shutil.get_terminal_size().columns


# --- plain records (hvm/plain.py) behave as the frozen/mutable dataclasses they replaced ---------------
def test_frozen_record_equality_hash_repr_and_immutability():
    from hvm.config import DebugExitSpec, SerialSpec, VmSpec, KernelBoot

    a, b = SerialSpec("none"), SerialSpec(output="none")
    assert a == b and hash(a) == hash(b) and a != SerialSpec("stdio")
    assert repr(a) == "SerialSpec(output='none', input='auto', port=1016, irq=4)"
    assert SerialSpec() != DebugExitSpec() and (SerialSpec() == 1) is False
    with pytest.raises(AttributeError):
        a.output = "stdio"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del a.port
    spec = VmSpec(name="x", boot=KernelBoot(FIRMWARE / "mbtest.elf"))
    assert spec.serial == SerialSpec() and spec.debug_exit == DebugExitSpec()
    changed = spec.with_overrides(vcpus=2, serial=None)
    assert (changed.vcpus, changed.serial, changed.name, spec.vcpus) == (2, None, "x", 1)
    with pytest.raises(TypeError):
        spec.replace(nosuch=1)
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert {spec: 1}[VmSpec(name="x", boot=KernelBoot(FIRMWARE / "mbtest.elf"))] == 1


def test_vmspec_replace_runs_the_timeout_check():
    from hvm.config import ConfigError, KernelBoot, VmSpec

    spec = VmSpec(name="x", boot=KernelBoot(FIRMWARE / "mbtest.elf"))
    with pytest.raises(ConfigError, match="is not a number of seconds"):
        spec.with_overrides(timeout=float("inf"))


def test_mutable_record_fields_and_defaults():
    from hvm.boot.state import BootState, Segment
    from hvm.machine import ExitStats, RunResult

    s1, s2 = BootState("real", 0x7C00), BootState("real", 0x7C00)
    assert s1 == s2 and s1.regs is not s2.regs and s1.cs == Segment(0, type=0xB)
    s1.regs["rax"] = 1
    s1.rip = 5
    assert s1 != s2 and s1.rip == 5
    with pytest.raises(TypeError):
        hash(s1)
    stats = ExitStats(by_reason={"IO": 3})
    assert stats.total == 3 and stats.as_dict()["by_port"] == {} and stats.other_mmio == 0
    r = RunResult(1, "debug-exit")
    assert repr(r) == "RunResult(status=1, reason='debug-exit', message='', crash=None, seconds=0.0)"


def test_device_context_hides_the_machine_from_repr():
    from hvm.mmio.registry import DeviceContext

    ctx = DeviceContext("x", 0, None, None, None, None, None, None, None, None, machine=object())
    assert "machine=" not in repr(ctx) and "pci=None" in repr(ctx)


@pytest.mark.skipif(not os.path.exists(ROOT / ".venv" / "bin" / "hvm"), reason="no project .venv (make install)")
def test_venv_install_is_a_plain_path():
    """`make install`'s editable install puts the tree on sys.path with a plain .pth line (no import hook
    whose imports every Python start in the venv would pay)."""
    import glob

    pths = glob.glob(str(ROOT / ".venv" / "lib" / "python*" / "site-packages" / "__editable__*hvm*.pth"))
    assert len(pths) == 1, pths
    with open(pths[0]) as f:
        assert f.read().strip() == str(ROOT)


def test_port_numbers_table_is_every_port():
    """PioBus's miss offsets (each port's own number), built from bytes at start-up: the same table."""
    import array

    from hvm.mmio.bus import PioBus, _port_numbers

    assert _port_numbers() == array.array("l", range(0x10000))
    bus = PioBus()
    assert bus._offsets.typecode == "l" and bus._offsets[0x3FF] == 0x3FF and bus._offsets[0xFFFF] == 0xFFFF
