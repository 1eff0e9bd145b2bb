"""VMCALL/VMMCALL: on kvm_pvm neither is a hypercall, and KVM's fix-hypercall quirk loops on them forever
inside KVM_RUN (kvm-unit-tests' hypercall, vmexit_vmcall and apic entries hung). hvm disables that quirk
there (hvm/host.py PVM_DISABLED_QUIRKS), so the guest gets the #UD a CPU without VMX/SVM raises."""
from __future__ import annotations

import pytest

from conftest import FIRMWARE, write_yaml
from hvm.host import PVM_DISABLED_QUIRKS, detect
from hvm.kvm import Kvm
from hvm.kvm.vm import KVM_CAP_DISABLE_QUIRKS2, KVM_X86_QUIRK_FIX_HYPERCALL_INSN

HOST = detect()


def vmcall_yaml(tmp_path):
    return write_yaml(tmp_path, f"boot: {{image: {FIRMWARE / 'vmcall.bin'}, mode: protected, load: 0x100000}}\n"
                                "memory: 16M\n")


@pytest.mark.skipif(HOST.backend != "kvm_pvm", reason="the loop and the quirk fix are kvm_pvm's")
def test_vmcall_and_vmmcall_raise_ud_instead_of_hanging(hvm, tmp_path):
    r = hvm("run", str(vmcall_yaml(tmp_path)), "--timeout", "10")
    assert r.out == "vmcall: #UD\nvmmcall: #UD\n", r.stderr
    assert r.status == (0x11 << 1) | 1, r.stderr      # isa-debug-exit: the guest ran to its end


@pytest.mark.skipif(HOST.backend not in ("vmx", "svm"), reason="needs VT-x/AMD-V: a real hypercall")
def test_vmcall_and_vmmcall_are_hypercalls_on_hardware(hvm, tmp_path):
    # nr -1 is no hypercall: KVM returns -KVM_ENOSYS (-1000, low byte 0x18); the other vendor's instruction
    # is patched by the quirk hvm leaves enabled on hardware.
    r = hvm("run", str(vmcall_yaml(tmp_path)), "--timeout", "10")
    assert r.out == "vmcall: ret=18\nvmmcall: ret=18\n", r.stderr


def test_pvm_profile_disables_only_the_fix_hypercall_quirk():
    assert PVM_DISABLED_QUIRKS == KVM_X86_QUIRK_FIX_HYPERCALL_INSN == 1 << 5
    if HOST.backend == "kvm_pvm":
        assert HOST.disabled_quirks == PVM_DISABLED_QUIRKS
    else:
        assert HOST.disabled_quirks == 0


@pytest.mark.skipif(HOST.backend != "kvm_pvm", reason="kvm_pvm host")
def test_vm_disable_quirks_returns_the_bits_disabled():
    with Kvm() as kvm, kvm.create_vm() as vm:
        can = vm.check_extension(KVM_CAP_DISABLE_QUIRKS2)
        assert can & KVM_X86_QUIRK_FIX_HYPERCALL_INSN
        assert vm.disable_quirks(KVM_X86_QUIRK_FIX_HYPERCALL_INSN | (1 << 63)) == KVM_X86_QUIRK_FIX_HYPERCALL_INSN
        with pytest.raises(ValueError):
            vm.enable_cap(KVM_CAP_DISABLE_QUIRKS2, 1, 2, 3, 4, 5)
