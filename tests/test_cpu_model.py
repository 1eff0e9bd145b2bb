"""The CPU model (hvm/cpu_model.py): QEMU's -cpu as `hvm run --cpu`, YAML `cpu:`, and hvm-qemu's -cpu; what a
guest then reads with CPUID (firmware/cpuid64.S)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import FIRMWARE, ROOT, write_yaml
from hvm.cpu_model import (FEATURES, CpuModelError, CpuSpec, apply_cpu_model, check_cpu, describe, parse_cpu)
from hvm.host import PVM_BACKEND_HIDES, PVM_HIDDEN_FEATURES, cpuid_clear_honoured, cpuid_hiding_ignored
from hvm.qemu_shim import translate

INTEL = [int.from_bytes(b"GenuineIntel"[i:i + 4], "little") for i in (0, 4, 8)]   # ebx, edx, ecx


def table() -> list[dict]:
    """A KVM_GET_SUPPORTED_CPUID-like table: every feature bit set in leaves 1, 7.0, 0x80000001, 0x80000008."""
    e = lambda f, i=0, a=0, b=0, c=0, d=0: {"function": f, "index": i, "flags": 0, "eax": a, "ebx": b, "ecx": c, "edx": d}
    ones = 0xFFFFFFFF
    return [e(0, a=0x10, b=0x68747541, c=0x444D4163, d=0x69746E65), e(1, a=0x00A20F12, b=0x800, c=ones, d=ones),
            e(7, 0, b=ones, c=ones, d=ones), e(0xD, 0, a=7), e(0x10), e(0x40000000, a=0x40000001),
            e(0x80000000, a=0x80000021), e(0x80000001, c=ones, d=ones), e(0x80000008, a=0x3030, b=ones),
            e(0x8000000A, d=ones), e(0x80000021)]


def regs(entries, leaf, sub=0):
    for x in entries:
        if x["function"] == leaf and x["index"] == sub:
            return x
    return None


def test_parse_models_features_vendor_and_aliases():
    assert parse_cpu("qemu64,+x2apic,+tsc-deadline") == CpuSpec("qemu64", None, (("x2apic", True),
                                                                                   ("tsc-deadline", True)))
    assert parse_cpu("max,+svm,-rdtscp,-xsave,-invpcid,-skinit").features == (
        ("svm", True), ("rdtscp", False), ("xsave", False), ("invpcid", False), ("skinit", False))
    assert parse_cpu("Opteron_G1,vendor=AuthenticAMD") == CpuSpec("Opteron_G1", "AuthenticAMD", ())
    assert parse_cpu("host,umip=on,pku=off,sse4_1=on,lahf_lm=off").features == (
        ("umip", True), ("pku", False), ("sse4.1", True), ("lahf-lm", False))
    assert parse_cpu("max,host-phys-bits,migratable=no").features == ()
    assert str(parse_cpu("qemu64,vendor=GenuineIntel,-pcid")) == "qemu64,vendor=GenuineIntel,-pcid"
    # every name upstream kvm-unit-tests' unittests.cfg passes as +/-feature, and the usual ones
    for name in ("x2apic", "tsc-deadline", "umip", "pku", "smap", "smep", "rdpru", "invpcid", "pcid", "la57", "vmx",
                 "svm", "rdtscp", "xsave", "skinit", "npt", "lm", "nx", "syscall", "hypervisor"):
        assert name in FEATURES, name
    assert describe("smap") == "CPUID.07H:EBX.smap [bit 20]"
    assert describe("rdpru") == "CPUID.80000008H:EBX.rdpru [bit 4]"


@pytest.mark.parametrize("text, message", [
    ("bogus", "unable to find CPU model 'bogus' (hvm has host, max, qemu64, Opteron_G1)"),
    ("qemu64,+foo", "Property 'qemu64-x86_64-cpu.foo' not found"),
    ("max,foo=on", "Property 'max-x86_64-cpu.foo' not found"),
    ("max,umip=maybe", "Property 'max-x86_64-cpu.umip' doesn't take value 'maybe' (on or off)"),
    ("max,vendor=CyrixInstead", "vendor=CyrixInstead: hvm gives GenuineIntel or AuthenticAMD"),
    ("max,hv_passthrough", "Property 'max-x86_64-cpu.hv_passthrough' not found"),
    ("IvyBridge,phys-bits=36", "unable to find CPU model 'IvyBridge'"),
    ("max,host-phys-bits=off", "host-phys-bits=off: hvm can give only host-phys-bits=on (the host's behaviour)"),
    ("", "expected MODEL[,vendor=NAME][,+feature][,-feature][,feature=on|off]"),
])
def test_parse_errors_in_qemus_words(text, message):
    with pytest.raises(CpuModelError) as e:
        parse_cpu(text)
    assert str(e.value).startswith(message)


def test_vendor_and_features_applied():
    out = apply_cpu_model(table(), parse_cpu("max,vendor=GenuineIntel,-x2apic,-lm,umip=off"))
    assert (regs(out, 0)["ebx"], regs(out, 0)["edx"], regs(out, 0)["ecx"]) == tuple(INTEL)
    assert regs(out, 1)["ecx"] == 0xFFFFFFFF & ~(1 << 21)
    assert regs(out, 0x80000001)["edx"] == 0xFFFFFFFF & ~(1 << 29)
    assert regs(out, 7)["ecx"] == 0xFFFFFFFF & ~(1 << 2)
    assert apply_cpu_model(table(), None) == table() and apply_cpu_model(table(), parse_cpu("host")) == table()


def test_qemu64_feature_set_and_levels():
    out = apply_cpu_model(table(), parse_cpu("qemu64"))
    assert regs(out, 0)["eax"] == 0xD and regs(out, 0x80000000)["eax"] == 0x8000000A
    assert regs(out, 0)["ebx"] == 0x68747541                 # AuthenticAMD, as QEMU's qemu64
    assert regs(out, 1)["eax"] == 0x00060FB1    # family 15, model 107 (0x6b), stepping 1
    # sse3, cx16, x2apic (QEMU adds it under KVM), hypervisor
    assert regs(out, 1)["ecx"] == (1 << 0) | (1 << 13) | (1 << 21) | (1 << 31)
    edx = sum(1 << b for b in (0, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 15, 16, 23, 24, 25, 26,   # QEMU's PPRO_FEATURES
                               12, 14, 17, 19))                                          # mtrr mca pse36 clflush
    assert regs(out, 1)["edx"] == edx
    assert (regs(out, 7)["ebx"], regs(out, 7)["ecx"], regs(out, 7)["edx"]) == (0, 0, 0)
    # syscall, nx, lm, and (AMD vendor) leaf 1's EDX bits AMD repeats there, as QEMU copies them
    assert regs(out, 0x80000001)["ecx"] == 1
    assert regs(out, 0x80000001)["edx"] == (1 << 11) | (1 << 20) | (1 << 29) | (edx & 0x0183F3FF)
    intel = apply_cpu_model(table(), parse_cpu("qemu64,vendor=GenuineIntel"))
    assert regs(intel, 0x80000001)["edx"] == (1 << 11) | (1 << 20) | (1 << 29)
    assert regs(out, 0xD, 0)["eax"] == 0 and regs(out, 7)["eax"] == 0
    assert regs(out, 0x10) is None and regs(out, 0x80000021) is None       # above the model's levels
    assert regs(out, 0x40000000) is not None                                # KVM's leaves stay
    plus = apply_cpu_model(table(), parse_cpu("qemu64,+umip,+pcid,-x2apic"))
    assert regs(plus, 7)["ecx"] == 1 << 2 and regs(plus, 1)["ecx"] == (1 << 0) | (1 << 13) | (1 << 17) | (1 << 31)


def test_plus_feature_never_sets_a_bit_kvm_does_not_support():
    t = table()
    regs(t, 7)["ecx"] = 0                 # no umip from KVM
    assert regs(apply_cpu_model(t, parse_cpu("qemu64,+umip")), 7)["ecx"] == 0


def test_opteron_g1_has_no_leaf_7():
    out = apply_cpu_model(table(), parse_cpu("Opteron_G1,vendor=AuthenticAMD"))
    assert regs(out, 0)["eax"] == 5 and regs(out, 7) is None and regs(out, 0xD) is None
    assert regs(out, 0x80000000)["eax"] == 0x80000008 and regs(out, 0x8000000A) is None
    assert regs(out, 0x80000001)["edx"] & ~0x0183F3FF == (1 << 11) | (1 << 20) | (1 << 29)
    assert regs(out, 0x80000001)["ecx"] == 0


def test_check_refuses_unsupported_hidden_and_unhideable():
    t = table()
    regs(t, 1)["ecx"] &= ~(1 << 5)                       # no vmx
    pvm = lambda leaf, reg, bit: cpuid_clear_honoured("kvm_pvm", leaf, reg, bit)
    hidden = [(7, 0, "ebx", 20, "smap")]
    check = lambda text, flags=frozenset(): check_cpu(parse_cpu(text), t, hidden, pvm, set(flags))
    with pytest.raises(CpuModelError, match=re.escape("host doesn't support requested feature: "
                                                      "CPUID.01H:ECX.vmx [bit 5]")):
        check("max,+vmx")
    with pytest.raises(CpuModelError, match=re.escape("host doesn't support requested feature: "
                                                      "CPUID.07H:EBX.smap [bit 20]")):
        check("max,+smap")                               # KVM has it, hvm hides it on this backend
    with pytest.raises(CpuModelError, match=re.escape("does not let hvm hide a feature the host has: "
                                                      "CPUID.01H:ECX.pcid [bit 17]")):
        check("qemu64,-pcid", {"pcid"})                  # the guest would read the host's pcid
    check("qemu64,-pcid,-invpcid")                       # the backend keeps them from guests anyway
    regs(t, 7)["ebx"] &= ~(1 << 7)
    with pytest.raises(CpuModelError, match="smep"):
        check("max,-smep", {"smep"})                     # not in KVM's table, but the guest reads the host's
    check("max,-smep")                                   # a host without it: nothing to hide
    check("qemu64,-x2apic,+tsc-deadline,-lm,-rdtscp,vendor=GenuineIntel")   # all honoured on kvm_pvm
    check_cpu(parse_cpu("qemu64,-pcid"), t, [], lambda *a: True)            # a hardware-assisted host



def test_hiding_ignored_comes_from_the_same_table():
    """What hvm/vcpu/complete.py takes as the guest's view (HostProfile.hiding_ignored) and what check_cpu refuses
    to hide both come from cpuid_clear_honoured + PVM_BACKEND_HIDES: a bit in one is never honoured by the other."""
    ignored = cpuid_hiding_ignored("kvm_pvm", PVM_HIDDEN_FEATURES)
    assert {"xsave", "popcnt", "movbe", "smap", "smep", "avx2"} <= ignored
    # CX16/PCID/INVPCID/RDPID: the backend keeps them from guests; RDTSCP: leaf 0x80000001 is honoured;
    # OSXSAVE follows the guest's CR4
    assert not ignored & {"cx16", "pcid", "invpcid", "rdpid", "rdtscp", "osxsave"}
    for leaf, _sub, reg, bit, name in PVM_HIDDEN_FEATURES:
        if name in ignored:
            assert not cpuid_clear_honoured("kvm_pvm", leaf, reg, bit), name
    assert cpuid_hiding_ignored("vmx", PVM_HIDDEN_FEATURES) == frozenset()

def run_cpuid(hvm, tmp_path, *extra: str, yaml_cpu: str | None = None):
    cfg = write_yaml(tmp_path, f"""
name: cpuid64
memory: 16M
timeout: 15
boot: {{image: {FIRMWARE / 'cpuid64.bin'}, load: 0x100000, mode: long}}
""" + (f"cpu: {yaml_cpu}\n" if yaml_cpu else ""))
    return hvm("run", str(cfg), *extra)


def seen(r) -> dict[str, str]:
    line = r.stdout.decode().splitlines()[0]
    assert line.startswith("cpuid: "), (r.stdout, r.stderr)
    return dict(kv.split("=") for kv in line[7:].split())


def test_guest_sees_vendor_and_feature_bits(hvm, tmp_path):
    """What hvm sets that every backend honours (kvm_pvm included): the vendor, leaf 0x80000001, x2apic."""
    host = seen(run_cpuid(hvm, tmp_path))
    r = run_cpuid(hvm, tmp_path, "--cpu", "qemu64,vendor=GenuineIntel,-x2apic,-lm")   # Intel: no AMD aliases
    assert r.status == 1, r.stderr
    got = seen(r)
    assert got["vendor"] == "GenuineIntel"
    assert int(got["1.ecx"], 16) >> 21 & 1 == 0                        # -x2apic
    assert int(got["80000001.edx"], 16) == (1 << 11) | (1 << 20)      # qemu64's syscall, nx; -lm
    assert int(got["80000001.ecx"], 16) == int(host["80000001.ecx"], 16) & 1     # lahf-lm if the host has it
    yaml = seen(run_cpuid(hvm, tmp_path, yaml_cpu="max,vendor=AuthenticAMD,+x2apic"))
    assert yaml["vendor"] == "AuthenticAMD" and int(yaml["1.ecx"], 16) >> 21 & 1 == 1
    assert yaml["80000001.edx"] == host["80000001.edx"]


def test_cpu_errors_are_one_line_status_2(hvm, tmp_path):
    from test_config import assert_config_error

    assert assert_config_error(run_cpuid(hvm, tmp_path, "--cpu", "qemu64,+foo")) == \
        "hvm: --cpu: Property 'qemu64-x86_64-cpu.foo' not found"
    line = assert_config_error(run_cpuid(hvm, tmp_path, yaml_cpu="'[1]'"))
    assert "cpu" in line
    line = assert_config_error(run_cpuid(hvm, tmp_path, yaml_cpu="Pentium"))
    assert "vm.yaml: cpu: unable to find CPU model 'Pentium'" in line
    r = run_cpuid(hvm, tmp_path, "--cpu", "max,+vmx")
    if r.status == 1:
        pytest.skip("this host's KVM offers VT-x to guests")
    assert assert_config_error(r) == "hvm: cpu max,+vmx: host doesn't support requested feature: CPUID.01H:ECX.vmx [bit 5]"


def test_snapshot_description_keeps_the_cpu_model():
    from hvm.config import FlatBoot, VmSpec
    from hvm.snapshot.codec import spec_from_dict, spec_to_dict

    spec = VmSpec(name="c", boot=FlatBoot(FIRMWARE / "cpuid64.bin", 0x100000, 0x100000, "long"),
                  cpu=parse_cpu("qemu64,vendor=GenuineIntel,-x2apic"))
    d = spec_to_dict(spec)
    assert d["cpu"] == "qemu64,vendor=GenuineIntel,-x2apic"
    assert spec_from_dict(d, "snap").cpu == spec.cpu


# --- hvm-qemu ----------------------------------------------------------------------------------------------
def shim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hvm.qemu_shim", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def test_shim_translates_cpu():
    assert translate(["-cpu", "qemu64,+x2apic", "-kernel", "k"])[-4:] == ["--cpu", "qemu64,+x2apic", "--kernel", "k"]


@pytest.mark.parametrize("args, message", [
    (["-cpu", "qemu64,+foo"], "hvm-qemu: -cpu qemu64,+foo: Property 'qemu64-x86_64-cpu.foo' not found"),
    (["-cpu", "max,+smap"], "hvm-qemu: -cpu max,+smap: host doesn't support requested feature: "
                            "CPUID.07H:EBX.smap [bit 20]"),
    (["-M", "q35,kernel-irqchip=split"], "hvm-qemu: -machine q35: hvm emulates the i440FX-era 'pc' machine only, "
                                          "not q35"),
    (["-device", "intel-iommu,intremap=on,eim=off"], "hvm-qemu: -device intel-iommu: not a device hvm has "
                                                     "(hvm has no IOMMU and no 'edu' PCI device)"),
    (["-device", "edu"], "hvm-qemu: -device edu: not a device hvm has (hvm has no IOMMU and no 'edu' PCI device)"),
])
def test_shim_refuses_before_the_kernel_so_the_runner_skips(args, message):
    """Upstream's runner first runs the VMM with a kernel that does not exist: any other error is a SKIP."""
    if "smap" in args[-1]:
        from hvm.host import detect
        if not detect().hidden_features:
            pytest.skip("hvm hides SMAP only on the kvm_pvm backend")
    r = shim(*args, "-kernel", "_NO_FILE_4Uhere_")
    assert (r.returncode, r.stderr.strip()) == (2, message)


def test_shim_lists_its_cpu_models():
    r = shim("-cpu", "help")
    assert r.returncode == 0 and r.stdout.splitlines()[:5] == ["Available CPUs:", "x86 host", "x86 max", "x86 qemu64",
                                                               "x86 Opteron_G1"]
    assert " x2apic " in r.stdout and " rdpru " in r.stdout


def test_shim_accepts_a_cpu_it_can_give():
    r = shim("-cpu", "Opteron_G1,vendor=AuthenticAMD", "-kernel", "_NO_FILE_4Uhere_")
    assert r.returncode == 1 and "could not load kernel '_NO_FILE_4Uhere_'" in r.stderr


@pytest.mark.parametrize("command", ["hvm-qemu -h", "hvm-qemu -device help", "hvm --help", "hvm run --help"])
def test_no_broken_pipe_traceback(command):
    """`... | head -1` as a shell pipeline, and a reader that is already gone (EPIPE on the first write)."""
    argv = ([sys.executable, "-m", "hvm.qemu_shim"] if command.startswith("hvm-qemu") else
            [sys.executable, "-m", "hvm"]) + command.split()[1:]
    pipeline = subprocess.run(" ".join(map(repr, argv)) + " | head -1", shell=True, capture_output=True, text=True,
                              timeout=60, cwd=ROOT)
    assert pipeline.stderr == "" and len(pipeline.stdout.splitlines()) == 1
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run(argv, stdout=w, stderr=subprocess.PIPE, text=True, timeout=60, cwd=ROOT)
    finally:
        os.close(w)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr
    assert proc.returncode in (0, 141)


def test_what_the_backend_takes_matches_hosts_table(hvm, tmp_path):
    """hvm/host.py's table of what kvm_pvm takes from hvm's CPUID, checked against the backend: qemu64 clears all of
    leaf 7.0 and most of leaf 1; on kvm_pvm the guest still reads the host's there (so `-feature` of those is
    refused), but x2apic/tsc-deadline and leaf 0x80000001 follow the model. A hardware-assisted host takes all."""
    from hvm.host import detect

    host = seen(run_cpuid(hvm, tmp_path))
    model = seen(run_cpuid(hvm, tmp_path, "--cpu", "qemu64,-x2apic"))
    assert int(model["80000001.ecx"], 16) & ~1 == 0                       # honoured everywhere
    assert int(model["1.ecx"], 16) >> 21 & 1 == 0 and int(model["1.ecx"], 16) >> 24 & 1 == 0
    if detect().backend == "kvm_pvm":
        assert (model["7.ebx"], model["7.ecx"], model["1.edx"]) == (host["7.ebx"], host["7.ecx"], host["1.edx"])
        # what the backend keeps from every guest (hvm/host.py PVM_BACKEND_HIDES): no guest sees it
        for name in PVM_BACKEND_HIDES:
            leaf, _sub, reg, bit = FEATURES[name]
            assert int(host[f"{leaf:x}.{reg}"], 16) >> bit & 1 == 0, name
    else:
        assert (model["7.ebx"], model["7.ecx"]) == ("00000000", "00000000")
