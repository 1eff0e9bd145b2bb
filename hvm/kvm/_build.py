"""cffi API-mode build script, run by setuptools at install time (cffi_modules in setup.py).

Compiling against <linux/kvm.h> makes the C compiler verify the layouts declared in _cdef.py.
"""
import importlib.util
import pathlib

from cffi import FFI


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).with_name(name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_cdef = _load("_cdef")
_table = _load("_ioctl_table")

# The ioctl numbers, computed with ioctl-opt from the declared structs' sizes (ABI mode: the same
# declarations, no compiler needed), compiled in as constants so `hvm` reads them at start-up instead of
# importing ioctl-opt; the compiler checks each against <linux/kvm.h>'s own.
_abi = FFI()
_abi.cdef(_cdef.CDEF)
_numbers = _table.compute(_abi.sizeof)
IOCTL_CDEF = "".join(f"#define HVM_IOC_{name} ...\n" for name in _numbers)
IOCTL_SOURCE = "".join(
    f"#define HVM_IOC_{name} {value:#x}UL\n"
    f"#ifdef {name}\n_Static_assert(HVM_IOC_{name} == {name}, \"{name}: ioctl-opt's number is not <linux/kvm.h>'s\");\n"
    f"#endif\n" for name, value in _numbers.items())

ffibuilder = FFI()
ffibuilder.cdef(_cdef.CDEF + _cdef.CDEF_API_ONLY + IOCTL_CDEF)
ffibuilder.set_source("hvm.kvm._kvm_cffi", _cdef.SOURCE + IOCTL_SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
