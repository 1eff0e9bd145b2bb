# The cffi modules (the KVM layer, the vCPU fast loop) are compiled at install time (API mode, checked against
# <linux/kvm.h>); everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["hvm/kvm/_build.py:ffibuilder", "hvm/vcpu/_fastloop_build.py:ffibuilder"])
