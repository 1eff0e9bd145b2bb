"""hvm.vcpu: vCPU threads, the KVM_RUN loop, and CPU setup from a BootState."""
from hvm.vcpu.report import CrashReport
from hvm.vcpu.runner import VcpuThread
from hvm.vcpu.setup import apply_boot_state, cpuid_for_vcpu

__all__ = ["CrashReport", "VcpuThread", "apply_boot_state", "cpuid_for_vcpu"]
