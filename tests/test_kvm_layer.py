"""hvm.kvm on its own: ioctl numbers, struct layouts, system/VM/vCPU objects, errors."""
from __future__ import annotations

import errno
import os
import subprocess

import pytest

from hvm.kvm import Kvm, KvmError, ffi, ioctls
from hvm.kvm import constants as kc


def test_ioctl_numbers_match_linux_headers(tmp_path):
    """ioctl-opt + cffi sizes must give exactly the numbers <linux/kvm.h> defines."""
    names = ["KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_RUN", "KVM_GET_REGS", "KVM_SET_SREGS",
             "KVM_SET_USER_MEMORY_REGION", "KVM_GET_SUPPORTED_CPUID", "KVM_SET_CPUID2", "KVM_SET_MSRS",
             "KVM_IRQ_LINE", "KVM_CREATE_PIT2", "KVM_SET_IDENTITY_MAP_ADDR", "KVM_GET_VCPU_EVENTS",
             "KVM_GET_MP_STATE", "KVM_SET_FPU", "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP",
             "KVM_GET_PIT2", "KVM_SET_PIT2",
             # the snapshot's state (hvm/snapshot/kvmstate.py)
             "KVM_GET_MSR_INDEX_LIST", "KVM_GET_LAPIC", "KVM_SET_LAPIC", "KVM_GET_XSAVE", "KVM_SET_XSAVE",
             "KVM_GET_XSAVE2", "KVM_GET_XCRS", "KVM_SET_XCRS", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS",
             "KVM_GET_CLOCK", "KVM_SET_CLOCK", "KVM_SET_VCPU_EVENTS", "KVM_SET_MP_STATE", "KVM_GET_MSRS",
             "KVM_GET_SREGS", "KVM_GET_FPU", "KVM_IOEVENTFD"]
    src = tmp_path / "n.c"
    src.write_text("#include <stdio.h>\n#include <linux/kvm.h>\nint main(void){\n" + "".join(
        f'printf("%lu\\n", (unsigned long){n});\n' for n in names) + "return 0;}\n")
    exe = tmp_path / "n"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True, timeout=60)
    values = [int(x) for x in subprocess.run([str(exe)], capture_output=True, check=True, timeout=10).stdout.split()]
    assert {n: getattr(ioctls, n) for n in names} == dict(zip(names, values))


def test_kvm_run_layout():
    assert ffi.offsetof("struct kvm_run", "exit_reason") == 8
    assert ffi.offsetof("struct kvm_run", "io") == 32
    assert ffi.offsetof("struct kvm_run", "mmio") == 32
    assert ffi.sizeof("struct kvm_run") == 2352  # 32 + 256 + 16 + 2048


def test_system_and_vm_objects():
    with Kvm() as kvm:
        assert kvm.vcpu_mmap_size() >= 4096
        assert kvm.check_extension(kc.CAP_USER_MEMORY) > 0
        assert kvm.check_extension(kc.CAP_IMMEDIATE_EXIT) > 0
        cpuid = kvm.supported_cpuid()
        assert any(e["function"] == 0 for e in cpuid)
        with kvm.create_vm() as vm:
            vm.set_identity_map_address()
            vm.set_tss_address()
            with vm.create_vcpu(0) as vcpu:
                regs = vcpu.get_regs()
                assert regs.rip == 0xFFF0  # x86 reset vector, CS base 0xffff0000
                assert vcpu.get_sregs().cs.base == 0xFFFF0000
                regs.rax = 0x1234
                vcpu.set_regs(regs)
                assert vcpu.get_regs().rax == 0x1234
                vcpu.set_msrs({0x174: 0x10})  # IA32_SYSENTER_CS
                assert vcpu.get_msrs([0x174]) == {0x174: 0x10}


def test_errors_name_the_ioctl_and_errno():
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.create_vcpu(0).close()
        with pytest.raises(KvmError) as e:
            vm.create_vcpu(0)  # the same id twice
        assert str(e.value).startswith("KVM_CREATE_VCPU: File exists")
    with pytest.raises(KvmError, match=r"^open /nonexistent/kvm: No such file or directory"):
        Kvm("/nonexistent/kvm")
    assert "is /dev/kvm readable and writable by you?" in str(KvmError("KVM_CREATE_VM", errno.EACCES))


def test_objects_close_their_fds():
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
            vcpu.get_regs()
    assert len(os.listdir("/proc/self/fd")) == before
