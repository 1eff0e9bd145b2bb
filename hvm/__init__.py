"""hvm: a small virtual machine monitor in Python on Linux KVM.

    from hvm import Machine, load_config
    with Machine(load_config("configs/hello.yaml")) as vm:
        result = vm.run()
"""
from hvm.config import ConfigError, VmSpec, load_config
from hvm.machine import ExitStats, Machine, RunResult

__all__ = ["ConfigError", "ExitStats", "Machine", "RunResult", "VmSpec", "load_config"]
__version__ = "0.1.0"
