"""hvm.kvm: the only package that knows KVM. cffi structs, ioctl-opt request numbers,
and Kvm -> Vm -> Vcpu objects in the shape of rust-vmm's kvm-ioctls."""
from hvm.kvm._ffi import API_MODE, KICK_SIGNAL, ffi, install_kick_handler
from hvm.kvm.errors import KvmError
from hvm.kvm.system import Kvm
from hvm.kvm.vcpu import Vcpu
from hvm.kvm.vm import Vm

__all__ = ["API_MODE", "KICK_SIGNAL", "Kvm", "KvmError", "Vcpu", "Vm", "ffi", "install_kick_handler"]
