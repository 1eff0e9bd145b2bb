"""cffi API-mode build script, run by setuptools at install time (cffi_modules in setup.py).

Compiling against <linux/kvm.h> makes the C compiler verify the layouts declared in _cdef.py.
"""
import importlib.util
import pathlib

from cffi import FFI

_spec = importlib.util.spec_from_file_location("_cdef", pathlib.Path(__file__).with_name("_cdef.py"))
_cdef = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cdef)

ffibuilder = FFI()
ffibuilder.cdef(_cdef.CDEF + _cdef.CDEF_API_ONLY)
ffibuilder.set_source("hvm.kvm._kvm_cffi", _cdef.SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
