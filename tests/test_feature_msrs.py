"""MSRs that exist only with a CPUID feature (SPEC_CTRL, PRED_CMD, FLUSH_CMD): kvm_pvm lets a guest use them
whatever its CPUID says; hvm denies them with a KVM MSR filter when the vCPU's CPUID lacks the feature, so
the guest gets the #GP a CPU without them raises (kvm-unit-tests msr/msr64)."""
from __future__ import annotations


import pytest

from conftest import FIRMWARE, write_yaml
from hvm.host import denied_feature_msrs, detect
from hvm.kvm import Kvm

HOST = detect()


def leaf(function: int, **regs: int) -> dict[str, int]:
    return {"function": function, "index": 0, "flags": 0, "eax": 0, "ebx": 0, "ecx": 0, "edx": 0, **regs}


def test_no_feature_denies_all_three():
    assert denied_feature_msrs([leaf(7), leaf(0x80000008)]) == [(0x48, 1), (0x49, 1), (0x10B, 1)]
    assert denied_feature_msrs([]) == [(0x48, 1), (0x49, 1), (0x10B, 1)]


def test_intel_spec_ctrl_bit_allows_spec_ctrl_and_pred_cmd():
    assert denied_feature_msrs([leaf(7, edx=1 << 26)]) == [(0x10B, 1)]
    assert denied_feature_msrs([leaf(7, edx=1 << 26 | 1 << 28)]) == []


def test_amd_bits_allow_each_msr_on_its_own():
    assert denied_feature_msrs([leaf(0x80000008, ebx=1 << 14)]) == [(0x49, 1), (0x10B, 1)]   # IBRS
    assert denied_feature_msrs([leaf(0x80000008, ebx=1 << 12)]) == [(0x48, 1), (0x10B, 1)]   # IBPB


def test_a_subleaf_other_than_0_does_not_count():
    assert denied_feature_msrs([dict(leaf(7, edx=1 << 26), index=1)]) == [(0x48, 1), (0x49, 1), (0x10B, 1)]


@pytest.mark.skipif(HOST.backend != "kvm_pvm", reason="the filter is set on kvm_pvm only (KVM checks CPUID itself "
                                                     "on VT-x/AMD-V)")
def test_guest_gets_gp_on_msrs_its_cpuid_lacks(hvm, tmp_path):
    with Kvm() as kvm:
        assert denied_feature_msrs(kvm.supported_cpuid()) == [(0x48, 1), (0x49, 1), (0x10B, 1)], \
            "this host's KVM offers one of the features: the expected output below no longer holds"
    p = write_yaml(tmp_path, f"boot: {{image: {FIRMWARE / 'msrgp.bin'}, mode: protected, load: 0x100000}}\n"
                             "memory: 16M\n")
    r = hvm("run", str(p), "--timeout", "10")
    assert r.out == "".join(f"{op} {msr}: #GP\n" for msr in ("048", "049", "10b") for op in ("rdmsr", "wrmsr"))
    assert r.status == (0x11 << 1) | 1, r.stderr


@pytest.mark.skipif(HOST.backend != "kvm_pvm", reason="kvm_pvm host")
def test_deny_msrs_validates_its_ranges():
    with Kvm() as kvm, kvm.create_vm() as vm:
        with pytest.raises(ValueError):
            vm.deny_msrs([])
        with pytest.raises(ValueError):
            vm.deny_msrs([(0x48, 0)])
        with pytest.raises(ValueError):
            vm.deny_msrs([(0x48, 1)] * 17)
        vm.deny_msrs([(0x48, 2), (0x10B, 1)])

# upstream's runner on msr and msr64 (they failed on the three MSRs before the filter): tests/test_kut_upstream.py
