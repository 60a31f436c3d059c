"""What users of the library test with: BackgroundServer (serving a device
from a thread of a test, server.py) and the hypothesis strategies
(strategies.py; needs the ``testing`` extra: pip install 'vhostuser[testing]').

The project's own test infrastructure (guest images, QEMU runner, NBD, Ceph,
DPDK helpers) is the separate vhostuser_devkit package in devkit/.
"""
