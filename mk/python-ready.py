"""Can this Python make the project virtualenv and compile hvm's cffi modules? Exit 0 if so.

A stock Debian/Ubuntu python3 lacks ensurepip (package python3-venv) and Python.h (python3-dev); the Makefile
installs them when this says no. With --explain, say in one line what is still missing (exit 1) when it is.
"""
import os
import sys
import sysconfig

missing = []
try:
    import ensurepip  # noqa: F401  (python3 -m venv needs it to put pip into the venv)
    import venv  # noqa: F401
except ImportError:
    missing.append("venv/ensurepip (Debian/Ubuntu: python3-venv)")
if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
    missing.append("Python.h (Debian/Ubuntu: python3-dev)")
if sys.version_info < (3, 10):
    missing.append(f"Python >= 3.10 (this is {sys.version.split()[0]})")
if missing and "--explain" in sys.argv:
    print(f"{sys.executable} cannot build hvm's virtualenv: missing {', '.join(missing)}", file=sys.stderr)
sys.exit(1 if missing else 0)
