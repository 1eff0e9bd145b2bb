"""hvm: a small virtual machine monitor in Python on Linux KVM.

    from hvm import Machine, load_config
    with Machine(load_config("configs/hello.yaml")) as vm:
        result = vm.run()
"""
# The names below are loaded on first use (PEP 562), not when the package is: `hvm run` imports only what
# its run needs (hvm.cli), and `import hvm.snapshot` does not pull in the machine.
__all__ = ["ConfigError", "ExitStats", "Machine", "RunResult", "VmSpec", "load_config"]
__version__ = "0.1.0"

_LAZY = {"ConfigError": "hvm.config", "VmSpec": "hvm.config", "load_config": "hvm.config",
         "ExitStats": "hvm.machine", "Machine": "hvm.machine", "RunResult": "hvm.machine"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hvm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
