# The cffi module for the KVM layer is compiled at install time (API mode, checked against
# <linux/kvm.h>); everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["hvm/kvm/_build.py:ffibuilder"])
