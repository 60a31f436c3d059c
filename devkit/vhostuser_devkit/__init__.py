"""Development kit of the vhostuser project: what its own tests, benchmarks
and demo need and users of the library don't - a Debian guest-image builder
and QEMU runner, qemu-nbd/nbdkit, a one-node Ceph cluster, DPDK testpmd and
QMP helpers, vhostuser-daemon as a process, the C ring lab, test patterns.

Not part of the vhostuser wheel: the README's test command installs it
(``pip install -e ./devkit``). It is tied to Debian's package names.
"""
