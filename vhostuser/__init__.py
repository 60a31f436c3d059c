"""vhostuser: vhost-user back-ends (virtio-blk, virtio-net) with a C data plane.

The control plane (sockets, messages, negotiation) is Python; rings, guest
memory and the built-in back-ends' I/O run in C worker threads.
"""
__version__ = "0.1.0"
