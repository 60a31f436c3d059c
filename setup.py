# The C extensions are built by cffi: the data plane (vhostuser._native) and
# vhostuser-blkload's loop (vhostuser._blkload). Everything else is in
# pyproject.toml.
from setuptools import setup

setup(cffi_modules=["csrc/build_native.py:ffibuilder", "csrc/build_blkload.py:ffibuilder"])
